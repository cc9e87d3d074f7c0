//! Byte-level codec for netlink messages: `nlmsghdr`, `genlmsghdr` and `nlattr` (TLV) encoding
//! with the kernel's 4-byte alignment, and a bounds-checked decoder.
//!
//! Everything is host-endian (netlink is), and every length is checked before a slice is taken,
//! so a malformed reply becomes a [`DecodeError`], never a panic.

/// `NLMSG_ERROR`: an error report or (with errno 0) an acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a multipart dump.
pub const NLMSG_DONE: u16 = 3;
/// `GENL_ID_CTRL`: the generic netlink controller family.
pub const GENL_ID_CTRL: u16 = 0x10;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_MULTI`: part of a multipart reply.
pub const NLM_F_MULTI: u16 = 0x2;
/// `NLM_F_ACK`: ask for an acknowledgement.
pub const NLM_F_ACK: u16 = 0x4;
/// `NLA_F_NESTED`: the attribute holds attributes.
pub const NLA_F_NESTED: u16 = 1 << 15;
/// Mask of the attribute type bits.
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Size of `struct genlmsghdr` (already 4-byte aligned).
pub const GENL_HDRLEN: usize = 4;
/// Size of `struct nlattr`.
pub const NLA_HDRLEN: usize = 4;

/// Rounds `len` up to the netlink alignment of 4 bytes.
pub const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// A decoding failure: the bytes are not a well-formed netlink message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than a header or a declared length needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A declared length is smaller than its own header.
    #[error("bad length {len} in {what}")]
    BadLength {
        /// What was being decoded.
        what: &'static str,
        /// The declared length.
        len: usize,
    },
    /// An attribute's payload does not have the size its type needs.
    #[error("attribute {ty} has {len} bytes, expected {expected}")]
    AttrSize {
        /// Attribute type.
        ty: u16,
        /// Payload length.
        len: usize,
        /// Expected payload length.
        expected: usize,
    },
}

/// Builds one netlink message: header, generic netlink header, then attributes.
///
/// Nested attributes are opened with [`MessageBuilder::begin_nested`] and closed with
/// [`MessageBuilder::end_nested`], which patches the nest's length.
#[derive(Debug)]
pub struct MessageBuilder {
    buf: Vec<u8>,
}

/// A position returned by [`MessageBuilder::begin_nested`].
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct Nest(usize);

impl MessageBuilder {
    /// Starts a generic netlink message of `family` with command `cmd` and version `version`.
    pub fn genl(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched in finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: 0, the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        MessageBuilder { buf }
    }

    fn attr_header(&mut self, ty: u16, payload_len: usize) {
        let len = (NLA_HDRLEN + payload_len) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
    }

    fn pad(&mut self) {
        let padded = align4(self.buf.len());
        self.buf.resize(padded, 0);
    }

    /// Appends an attribute with raw payload bytes.
    pub fn bytes(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        self.attr_header(ty, payload.len());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    /// Appends a `u8` attribute.
    pub fn u8(&mut self, ty: u16, v: u8) -> &mut Self {
        self.bytes(ty, &[v])
    }

    /// Appends a `u16` attribute.
    pub fn u16(&mut self, ty: u16, v: u16) -> &mut Self {
        self.bytes(ty, &v.to_ne_bytes())
    }

    /// Appends a `u32` attribute.
    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.bytes(ty, &v.to_ne_bytes())
    }

    /// Appends a `u64` attribute.
    pub fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.bytes(ty, &v.to_ne_bytes())
    }

    /// Appends a NUL-terminated string attribute (`NLA_STRING`/`NLA_NUL_STRING`).
    pub fn string(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut payload = Vec::with_capacity(s.len() + 1);
        payload.extend_from_slice(s.as_bytes());
        payload.push(0);
        self.bytes(ty, &payload)
    }

    /// Opens a nested attribute of type `ty` (sent with `NLA_F_NESTED`).
    pub fn begin_nested(&mut self, ty: u16) -> Nest {
        let at = self.buf.len();
        self.attr_header(ty | NLA_F_NESTED, 0);
        Nest(at)
    }

    /// Closes a nested attribute, patching its length.
    pub fn end_nested(&mut self, nest: Nest) -> &mut Self {
        let len = (self.buf.len() - nest.0) as u16;
        self.buf[nest.0..nest.0 + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The finished message with its length patched in.
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// One decoded netlink message (borrowing the receive buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// `nlmsg_type`: a family id, `NLMSG_ERROR` or `NLMSG_DONE`.
    pub ty: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// `nlmsg_pid`.
    pub pid: u32,
    /// Everything after the netlink header.
    pub payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// For `NLMSG_ERROR`: the (negative or zero) error code.
    pub fn error_code(&self) -> Result<i32, DecodeError> {
        if self.payload.len() < 4 {
            return Err(DecodeError::Truncated {
                what: "nlmsgerr",
                need: 4,
                have: self.payload.len(),
            });
        }
        Ok(read_u32(self.payload, 0) as i32)
    }

    /// For `NLMSG_ERROR`: the sequence number of the request it answers, read from the echoed
    /// request header (the outer header carries it too, but this is what the kernel echoes).
    pub fn error_request_seq(&self) -> Option<u32> {
        (self.payload.len() >= 4 + NLMSG_HDRLEN).then(|| read_u32(self.payload, 4 + 8))
    }

    /// For a generic netlink message: the command, version and attributes.
    pub fn genl(&self) -> Result<(u8, u8, Attrs<'a>), DecodeError> {
        if self.payload.len() < GENL_HDRLEN {
            return Err(DecodeError::Truncated {
                what: "genlmsghdr",
                need: GENL_HDRLEN,
                have: self.payload.len(),
            });
        }
        Ok((
            self.payload[0],
            self.payload[1],
            Attrs {
                buf: &self.payload[GENL_HDRLEN..],
            },
        ))
    }
}

/// Iterates over the messages in one datagram.
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    buf: &'a [u8],
}

impl<'a> Messages<'a> {
    /// The messages of a received datagram.
    pub fn new(buf: &'a [u8]) -> Self {
        Messages { buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let b = self.buf;
        if b.len() < NLMSG_HDRLEN {
            self.buf = &[];
            return Some(Err(DecodeError::Truncated {
                what: "nlmsghdr",
                need: NLMSG_HDRLEN,
                have: b.len(),
            }));
        }
        let len = read_u32(b, 0) as usize;
        if len < NLMSG_HDRLEN {
            self.buf = &[];
            return Some(Err(DecodeError::BadLength {
                what: "nlmsghdr",
                len,
            }));
        }
        if len > b.len() {
            self.buf = &[];
            return Some(Err(DecodeError::Truncated {
                what: "netlink message",
                need: len,
                have: b.len(),
            }));
        }
        let msg = Message {
            ty: read_u16(b, 4),
            flags: read_u16(b, 6),
            seq: read_u32(b, 8),
            pid: read_u32(b, 12),
            payload: &b[NLMSG_HDRLEN..len],
        };
        self.buf = &b[align4(len).min(b.len())..];
        Some(Ok(msg))
    }
}

/// One attribute: type (flags masked off) and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    /// The attribute type without `NLA_F_NESTED`/`NLA_F_NET_BYTEORDER`.
    pub ty: u16,
    /// The payload.
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    fn fixed<const N: usize>(&self) -> Result<[u8; N], DecodeError> {
        self.payload.try_into().map_err(|_| DecodeError::AttrSize {
            ty: self.ty,
            len: self.payload.len(),
            expected: N,
        })
    }

    /// The payload as a `u8`.
    pub fn as_u8(&self) -> Result<u8, DecodeError> {
        Ok(self.fixed::<1>()?[0])
    }

    /// The payload as a `u16`.
    pub fn as_u16(&self) -> Result<u16, DecodeError> {
        Ok(u16::from_ne_bytes(self.fixed()?))
    }

    /// The payload as a `u32`.
    pub fn as_u32(&self) -> Result<u32, DecodeError> {
        Ok(u32::from_ne_bytes(self.fixed()?))
    }

    /// The payload as a `u64`.
    pub fn as_u64(&self) -> Result<u64, DecodeError> {
        Ok(u64::from_ne_bytes(self.fixed()?))
    }

    /// The payload as a string, up to the first NUL (lossy on invalid UTF-8).
    pub fn as_string(&self) -> String {
        let end = self
            .payload
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(self.payload.len());
        String::from_utf8_lossy(&self.payload[..end]).into_owned()
    }

    /// The payload as nested attributes.
    pub fn nested(&self) -> Attrs<'a> {
        Attrs { buf: self.payload }
    }
}

/// Iterates over a run of attributes.
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a> {
    buf: &'a [u8],
}

impl<'a> Attrs<'a> {
    /// Attributes packed in `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Attrs { buf }
    }

    /// The first attribute of type `ty`, if any (decoding errors before it are returned).
    pub fn find(&self, ty: u16) -> Result<Option<Attr<'a>>, DecodeError> {
        for a in *self {
            let a = a?;
            if a.ty == ty {
                return Ok(Some(a));
            }
        }
        Ok(None)
    }
}

impl<'a> IntoIterator for Attrs<'a> {
    type Item = Result<Attr<'a>, DecodeError>;
    type IntoIter = AttrIter<'a>;

    fn into_iter(self) -> AttrIter<'a> {
        AttrIter { buf: self.buf }
    }
}

/// Iterator behind [`Attrs`].
#[derive(Debug, Clone)]
pub struct AttrIter<'a> {
    buf: &'a [u8],
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = Result<Attr<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let b = self.buf;
        if b.len() < NLA_HDRLEN {
            self.buf = &[];
            return Some(Err(DecodeError::Truncated {
                what: "nlattr",
                need: NLA_HDRLEN,
                have: b.len(),
            }));
        }
        let len = read_u16(b, 0) as usize;
        if len < NLA_HDRLEN {
            self.buf = &[];
            return Some(Err(DecodeError::BadLength {
                what: "nlattr",
                len,
            }));
        }
        if len > b.len() {
            self.buf = &[];
            return Some(Err(DecodeError::Truncated {
                what: "nlattr payload",
                need: len,
                have: b.len(),
            }));
        }
        let attr = Attr {
            ty: read_u16(b, 2) & NLA_TYPE_MASK,
            payload: &b[NLA_HDRLEN..len],
        };
        self.buf = &b[align4(len).min(b.len())..];
        Some(Ok(attr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn getfamily_request_matches_golden_bytes() {
        // CTRL_CMD_GETFAMILY (3), version 1, CTRL_ATTR_FAMILY_NAME (2) = "nbd\0".
        let mut b = MessageBuilder::genl(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, 7, 3, 1);
        b.string(2, "nbd");
        let msg = b.finish();
        #[rustfmt::skip]
        let golden: [u8; 28] = [
            28, 0, 0, 0,      // nlmsg_len
            0x10, 0,          // nlmsg_type GENL_ID_CTRL
            5, 0,             // REQUEST | ACK
            7, 0, 0, 0,       // seq
            0, 0, 0, 0,       // pid
            3, 1, 0, 0,       // genlmsghdr: cmd, version, reserved
            8, 0, 2, 0,       // nlattr len 8, type 2
            b'n', b'b', b'd', 0,
        ];
        assert_eq!(msg, golden);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn padding_and_nesting_match_golden_bytes() {
        let mut b = MessageBuilder::genl(0x20, NLM_F_REQUEST, 1, 1, 1);
        b.u8(9, 0xaa);
        let outer = b.begin_nested(7);
        let inner = b.begin_nested(1);
        b.u32(1, 5);
        b.end_nested(inner);
        b.end_nested(outer);
        let msg = b.finish();
        #[rustfmt::skip]
        let golden: [u8; 44] = [
            44, 0, 0, 0, 0x20, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0,
            1, 1, 0, 0,
            5, 0, 9, 0, 0xaa, 0, 0, 0,           // u8 attr: len 5, padded to 8
            16, 0, 7, 0x80,                      // nested 7 (NLA_F_NESTED), len 16
            12, 0, 1, 0x80,                      // nested 1, len 12
            8, 0, 1, 0, 5, 0, 0, 0,              // u32 attr 1 = 5
        ];
        assert_eq!(msg, golden);
    }

    #[test]
    fn decodes_messages_and_nested_attrs() {
        let mut b = MessageBuilder::genl(0x20, 0, 9, 5, 1);
        let outer = b.begin_nested(9);
        let item = b.begin_nested(1);
        b.u32(1, 3).u8(2, 1);
        b.end_nested(item);
        b.end_nested(outer);
        b.string(10, "rootfork:h:1:s");
        b.u64(2, 1 << 33);
        let mut two = b.finish();
        let len1 = two.len();
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&9u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-16i32).to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        two.extend_from_slice(&ack);

        let msgs: Vec<_> = Messages::new(&two).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].payload.len(), len1 - NLMSG_HDRLEN);
        let (cmd, ver, attrs) = msgs[0].genl().unwrap();
        assert_eq!((cmd, ver), (5, 1));
        let list = attrs.find(9).unwrap().unwrap();
        let item = list.nested().find(1).unwrap().unwrap();
        assert_eq!(item.nested().find(1).unwrap().unwrap().as_u32(), Ok(3));
        assert_eq!(item.nested().find(2).unwrap().unwrap().as_u8(), Ok(1));
        assert_eq!(
            attrs.find(10).unwrap().unwrap().as_string(),
            "rootfork:h:1:s"
        );
        assert_eq!(attrs.find(2).unwrap().unwrap().as_u64(), Ok(1 << 33));
        assert_eq!(msgs[1].ty, NLMSG_ERROR);
        assert_eq!(msgs[1].error_code(), Ok(-16));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(matches!(
            Messages::new(&[1, 2, 3]).next(),
            Some(Err(DecodeError::Truncated { .. }))
        ));
        let mut m = vec![0u8; 16];
        m[0] = 200; // declares more than there is
        assert!(matches!(
            Messages::new(&m).next(),
            Some(Err(DecodeError::Truncated { .. }))
        ));
        m[0] = 4; // smaller than a header
        assert!(matches!(
            Messages::new(&m).next(),
            Some(Err(DecodeError::BadLength { .. }))
        ));
        let attrs = [2u8, 0, 1, 0];
        assert!(matches!(
            Attrs::new(&attrs).into_iter().next(),
            Some(Err(DecodeError::BadLength { .. }))
        ));
        let attrs = [8u8, 0, 1, 0, 1];
        assert!(matches!(
            Attrs::new(&attrs).into_iter().next(),
            Some(Err(DecodeError::Truncated { .. }))
        ));
        let a = Attr {
            ty: 1,
            payload: &[1, 2, 3],
        };
        assert!(matches!(a.as_u32(), Err(DecodeError::AttrSize { .. })));
        // Every prefix of a valid message decodes to Ok or Err, never panics.
        let mut b = MessageBuilder::genl(0x20, 0, 1, 1, 1);
        b.string(10, "abc").u64(2, 5);
        let full = b.finish();
        for n in 0..full.len() {
            for m in Messages::new(&full[..n]).flatten() {
                if let Ok((_, _, attrs)) = m.genl() {
                    assert!(attrs.into_iter().count() <= 2);
                }
            }
        }
    }
}
