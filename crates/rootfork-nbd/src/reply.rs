//! Encoding replies: simple, structured and extended framing, as header bytes plus payload slices
//! ready for one vectored write.

use std::io::IoSlice;

use crate::buf::Buf;
use crate::consts::*;

/// How replies are framed on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Framing {
    /// Structured replies negotiated.
    pub structured: bool,
    /// Extended headers negotiated (implies structured replies).
    pub extended: bool,
}

/// One run of a read reply: data from the buffer, or a hole that reads as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRun {
    /// Offset of the run relative to the request's offset.
    pub rel: u32,
    /// Length of the run.
    pub len: u32,
    /// Whether the run is a hole (no data sent).
    pub hole: bool,
}

/// The outcome of a request, before framing.
#[derive(Debug)]
pub enum Outcome {
    /// Success without payload.
    Ok,
    /// Failure with a protocol errno.
    Err(u32),
    /// A read: `buf` holds the data runs at their relative offsets; hole runs are not sent.
    Read {
        buf: Option<Buf>,
        runs: Vec<ReadRun>,
    },
    /// Block status: per selected context, its id and descriptors (length, flags).
    BlockStatus(Vec<(u32, Vec<(u64, u32)>)>),
}

#[derive(Debug, Clone, Copy)]
enum Seg {
    Head(usize, usize),
    Data(usize, usize),
}

/// A framed reply: bytes and payload slices to send in order.
#[derive(Debug)]
pub struct Encoded {
    head: Vec<u8>,
    buf: Option<Buf>,
    segs: Vec<Seg>,
}

impl Encoded {
    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.segs
            .iter()
            .map(|s| match *s {
                Seg::Head(a, b) | Seg::Data(a, b) => b - a,
            })
            .sum()
    }

    /// Appends this reply's slices to `out`.
    pub fn slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        for s in &self.segs {
            match *s {
                Seg::Head(a, b) => out.push(IoSlice::new(&self.head[a..b])),
                Seg::Data(a, b) => {
                    if let Some(buf) = &self.buf {
                        out.push(IoSlice::new(&buf[a..b]))
                    }
                }
            }
        }
    }

    /// Number of slices [`Encoded::slices`] appends.
    pub fn slice_count(&self) -> usize {
        self.segs.len()
    }

    /// The bytes of the reply in one vector (tests, fuzzing).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut s = Vec::new();
        self.slices(&mut s);
        s.iter().flat_map(|x| x.iter().copied()).collect()
    }
}

struct Builder {
    head: Vec<u8>,
    segs: Vec<Seg>,
    mark: usize,
}

impl Builder {
    fn new() -> Self {
        Builder {
            head: Vec::with_capacity(64),
            segs: Vec::with_capacity(2),
            mark: 0,
        }
    }
    fn close_head(&mut self) {
        if self.head.len() > self.mark {
            self.segs.push(Seg::Head(self.mark, self.head.len()));
            self.mark = self.head.len();
        }
    }
    fn data(&mut self, a: usize, b: usize) {
        self.close_head();
        if b > a {
            self.segs.push(Seg::Data(a, b));
        }
    }
    fn finish(mut self, buf: Option<Buf>) -> Encoded {
        self.close_head();
        Encoded {
            head: self.head,
            buf,
            segs: self.segs,
        }
    }
    fn simple(&mut self, errno: u32, cookie: u64) {
        self.head
            .extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        self.head.extend_from_slice(&errno.to_be_bytes());
        self.head.extend_from_slice(&cookie.to_be_bytes());
    }
    #[allow(clippy::too_many_arguments)]
    fn chunk(&mut self, f: Framing, flags: u16, ty: u16, cookie: u64, offset: u64, len: u64) {
        if f.extended {
            self.head
                .extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            self.head.extend_from_slice(&flags.to_be_bytes());
            self.head.extend_from_slice(&ty.to_be_bytes());
            self.head.extend_from_slice(&cookie.to_be_bytes());
            self.head.extend_from_slice(&offset.to_be_bytes());
            self.head.extend_from_slice(&len.to_be_bytes());
        } else {
            self.head
                .extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            self.head.extend_from_slice(&flags.to_be_bytes());
            self.head.extend_from_slice(&ty.to_be_bytes());
            self.head.extend_from_slice(&cookie.to_be_bytes());
            self.head.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
    fn error_chunk(&mut self, f: Framing, errno: u32, cookie: u64, offset: u64) {
        self.chunk(f, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, offset, 6);
        self.head.extend_from_slice(&errno.to_be_bytes());
        self.head.extend_from_slice(&0u16.to_be_bytes());
    }
}

/// Frames `outcome` as the reply to request `cookie` at `offset` (of command `kind`).
pub fn encode(f: Framing, cookie: u64, offset: u64, outcome: Outcome) -> Encoded {
    let mut b = Builder::new();
    match outcome {
        Outcome::Ok if f.extended => {
            b.chunk(f, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, offset, 0);
            b.finish(None)
        }
        Outcome::Ok => {
            b.simple(0, cookie);
            b.finish(None)
        }
        Outcome::Err(errno) if f.structured || f.extended => {
            b.error_chunk(f, errno, cookie, offset);
            b.finish(None)
        }
        Outcome::Err(errno) => {
            b.simple(errno, cookie);
            b.finish(None)
        }
        Outcome::Read { buf, runs } if !(f.structured || f.extended) => {
            // Simple reply: the whole range as data; holes must already be zero in the buffer.
            b.simple(0, cookie);
            let total = runs
                .iter()
                .map(|r| (r.rel + r.len) as usize)
                .max()
                .unwrap_or(0);
            b.data(0, total);
            b.finish(buf)
        }
        Outcome::Read { buf, runs } => {
            let n = runs.len();
            for (i, r) in runs.iter().enumerate() {
                let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                let at = offset + u64::from(r.rel);
                if r.hole {
                    b.chunk(f, flags, REPLY_TYPE_OFFSET_HOLE, cookie, offset, 12);
                    b.head.extend_from_slice(&at.to_be_bytes());
                    b.head.extend_from_slice(&r.len.to_be_bytes());
                } else {
                    b.chunk(
                        f,
                        flags,
                        REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        offset,
                        8 + u64::from(r.len),
                    );
                    b.head.extend_from_slice(&at.to_be_bytes());
                    b.data(r.rel as usize, (r.rel + r.len) as usize);
                }
            }
            if n == 0 {
                b.chunk(f, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, offset, 0);
            }
            b.finish(buf)
        }
        Outcome::BlockStatus(contexts) => {
            let n = contexts.len();
            for (i, (id, descs)) in contexts.iter().enumerate() {
                let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                if f.extended {
                    let len = 8 + 16 * descs.len() as u64;
                    b.chunk(f, flags, REPLY_TYPE_BLOCK_STATUS_EXT, cookie, offset, len);
                    b.head.extend_from_slice(&id.to_be_bytes());
                    b.head
                        .extend_from_slice(&(descs.len() as u32).to_be_bytes());
                    for &(l, s) in descs {
                        b.head.extend_from_slice(&l.to_be_bytes());
                        b.head.extend_from_slice(&u64::from(s).to_be_bytes());
                    }
                } else {
                    let len = 4 + 8 * descs.len() as u64;
                    b.chunk(f, flags, REPLY_TYPE_BLOCK_STATUS, cookie, offset, len);
                    b.head.extend_from_slice(&id.to_be_bytes());
                    for &(l, s) in descs {
                        b.head.extend_from_slice(&(l as u32).to_be_bytes());
                        b.head.extend_from_slice(&s.to_be_bytes());
                    }
                }
            }
            if n == 0 {
                b.chunk(f, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, offset, 0);
            }
            b.finish(None)
        }
    }
}
