//! Transmission-phase requests: parsing the header (compact or extended) and classifying it into a
//! [`Command`] or an [`Invalid`] answer, without ever losing stream sync.
//!
//! Both functions are pure and total so they can be fuzzed directly: [`parse_header`] never
//! panics on any byte string and [`classify`] answers every header.

use crate::consts::*;

/// Length of a compact request header.
pub const COMPACT_HEADER_LEN: usize = 28;
/// Length of an extended request header.
pub const EXTENDED_HEADER_LEN: usize = 32;

/// A raw request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length of the request (compact headers: 32 bits).
    pub length: u64,
}

/// A request header whose magic is wrong: the stream is out of sync and must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

/// Parses one request header from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds less than a whole header, else the header and the number of
/// bytes it took.
pub fn parse_header(
    buf: &[u8],
    extended: bool,
) -> Result<Option<(RequestHeader, usize)>, BadMagic> {
    let need = if extended {
        EXTENDED_HEADER_LEN
    } else {
        COMPACT_HEADER_LEN
    };
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = be32(&buf[0..4]);
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(BadMagic(magic));
    }
    if buf.len() < need {
        return Ok(None);
    }
    let flags = be16(&buf[4..6]);
    let kind = be16(&buf[6..8]);
    let cookie = be64(&buf[8..16]);
    let offset = be64(&buf[16..24]);
    let length = if extended {
        be64(&buf[24..32])
    } else {
        u64::from(be32(&buf[24..28]))
    };
    Ok(Some((
        RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        },
        need,
    )))
}

/// Encodes a request header (for tests, fuzzing and clients).
pub fn encode_header(h: &RequestHeader, extended: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(EXTENDED_HEADER_LEN);
    if extended {
        v.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    } else {
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    v.extend_from_slice(&h.flags.to_be_bytes());
    v.extend_from_slice(&h.kind.to_be_bytes());
    v.extend_from_slice(&h.cookie.to_be_bytes());
    v.extend_from_slice(&h.offset.to_be_bytes());
    if extended {
        v.extend_from_slice(&h.length.to_be_bytes());
    } else {
        v.extend_from_slice(&(h.length as u32).to_be_bytes());
    }
    v
}

/// What the connection negotiated, as far as request validation cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Size of the export in bytes.
    pub size: u64,
    /// Minimum block size advertised (a power of two; offsets and lengths must be multiples).
    pub min_block: u32,
    /// Maximum read length in bytes (the advertised maximum block size; longer: `EOVERFLOW`).
    pub max_payload: u32,
    /// Maximum write payload in bytes (at least `max_payload`; longer: `EINVAL`).
    pub max_write: u32,
    /// Whether the export refuses writes.
    pub read_only: bool,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// Whether extended headers were negotiated.
    pub extended: bool,
    /// Whether at least one meta context was selected.
    pub has_meta: bool,
}

/// A valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`; `df` forbids fragmenting the reply.
    Read { offset: u64, len: u32, df: bool },
    /// `NBD_CMD_WRITE`; the payload of `len` bytes follows the header.
    Write { offset: u64, len: u32, fua: bool },
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim { offset: u64, len: u64, fua: bool },
    /// `NBD_CMD_CACHE`.
    Cache { offset: u64, len: u64 },
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
}

/// A request that gets an error reply; `payload` bytes after the header must still be discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid {
    /// The errno to answer with.
    pub errno: u32,
    /// Bytes of payload following the header.
    pub payload: u64,
    /// Refused because the request is larger than the server serves (a read over
    /// `max_payload`, a write over `max_write`), as opposed to malformed.
    pub too_large: bool,
}

/// The number of payload bytes that follow a header, whatever its validity.
pub fn payload_len(h: &RequestHeader, extended: bool) -> u64 {
    if h.kind == CMD_WRITE || (extended && h.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
        h.length
    } else {
        0
    }
}

/// Validates a header against what was negotiated.
pub fn classify(h: &RequestHeader, lim: &Limits) -> Result<Command, Invalid> {
    let payload = payload_len(h, lim.extended);
    let bad = |errno| {
        Err(Invalid {
            errno,
            payload,
            too_large: false,
        })
    };
    let too_large = |errno| {
        Err(Invalid {
            errno,
            payload,
            too_large: true,
        })
    };
    let allowed = match h.kind {
        CMD_READ => {
            if lim.structured {
                CMD_FLAG_DF
            } else {
                0
            }
        }
        CMD_WRITE => {
            CMD_FLAG_FUA
                | if lim.extended {
                    CMD_FLAG_PAYLOAD_LEN
                } else {
                    0
                }
        }
        CMD_DISC => 0,
        CMD_FLUSH => CMD_FLAG_FUA,
        CMD_TRIM => CMD_FLAG_FUA,
        CMD_CACHE => 0,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return bad(EINVAL),
    };
    if h.flags & !allowed != 0 {
        return bad(EINVAL);
    }
    let (offset, len) = (h.offset, h.length);
    match h.kind {
        CMD_DISC => return Ok(Command::Disc),
        // The kernel sends FLUSH with whatever sector its flush request carried: ignore both.
        CMD_FLUSH => return Ok(Command::Flush),
        CMD_BLOCK_STATUS if !lim.has_meta => return bad(EINVAL),
        _ => {}
    }
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && lim.read_only {
        return bad(EPERM);
    }
    if len == 0 {
        return bad(EINVAL);
    }
    let mask = u64::from(lim.min_block.max(1)) - 1;
    if offset & mask != 0 || len & mask != 0 {
        return bad(EINVAL);
    }
    // The protocol keeps `EOVERFLOW` for a length over the advertised maximum on a command
    // without payload (a read); a write over it breaks a MUST of the client's and gets `EINVAL`.
    if h.kind == CMD_READ && len > u64::from(lim.max_payload) {
        return too_large(EOVERFLOW);
    }
    if h.kind == CMD_WRITE && len > u64::from(lim.max_write.max(lim.max_payload)) {
        return too_large(EINVAL);
    }
    // Beyond the end: `ENOSPC` for writes and write-zeroes, `EINVAL` for everything else (read,
    // trim, cache, block status), as the protocol's error section and command sections say.
    let end = offset.checked_add(len);
    if end.is_none_or(|e| e > lim.size) {
        return bad(if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        });
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    Ok(match h.kind {
        CMD_READ => Command::Read {
            offset,
            len: len as u32,
            df: h.flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write {
            offset,
            len: len as u32,
            fua,
        },
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
            fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            len,
            req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
        },
        _ => unreachable!("kinds were matched above"),
    })
}

pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
