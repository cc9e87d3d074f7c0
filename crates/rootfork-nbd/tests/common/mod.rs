//! A raw NBD client for the conformance tests: every byte on the wire is visible to the test.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rootfork_nbd::consts::*;
use rootfork_nbd::request::{encode_header, RequestHeader};
use rootfork_nbd::testing::MemDevice;
use rootfork_nbd::{Export, ServeOptions, Server};

/// A server on a Unix socket in a temporary directory.
pub struct Fixture {
    pub server: Server,
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub dev: Arc<MemDevice>,
}

pub const SIZE: u64 = 1 << 20;

pub fn fixture_with(opts: ServeOptions, dev: Arc<MemDevice>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let server = Server::new(opts);
    server
        .add_export(Export {
            name: "disk".into(),
            description: "a test disk".into(),
            device: dev.clone(),
        })
        .unwrap();
    let ro = Arc::new(MemDevice::read_only(vec![0x5a; 65536], 4096));
    server
        .add_export(Export {
            name: "ro".into(),
            description: String::new(),
            device: ro,
        })
        .unwrap();
    server.listen_unix(&path).unwrap();
    Fixture {
        server,
        dir,
        path,
        dev,
    }
}

pub fn fixture() -> Fixture {
    fixture_with(
        ServeOptions::default(),
        Arc::new(MemDevice::new(SIZE, 4096)),
    )
}

pub struct Raw {
    pub s: UnixStream,
    pub extended: bool,
}

pub struct Chunk {
    pub flags: u16,
    pub ty: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Raw {
    /// Connects and reads the greeting; sends no client flags yet.
    pub fn greet(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw { s, extended: false };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        r
    }

    /// Greeting plus fixed-newstyle, no-zeroes client flags.
    pub fn connect(path: &Path) -> Raw {
        let mut r = Raw::greet(path);
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// Whether the server closed the stream (reads EOF).
    pub fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 64];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(n) => panic!("expected end of stream, got {:?}", &b[..n]),
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    pub fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.send(&v);
    }

    /// One option reply: (option, type, data).
    pub fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (opt, ty, self.read_n(len))
    }

    /// Replies up to and including the final one (ACK or an error).
    pub fn opt_replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (_, ty, d) = self.opt_reply();
            let last = ty == REP_ACK || ty & (1 << 31) != 0;
            out.push((ty, d));
            if last {
                return out;
            }
        }
    }

    /// Asks for one option with an empty payload and returns its single reply type.
    pub fn simple_opt(&mut self, opt: u32) -> u32 {
        self.opt(opt, &[]);
        self.opt_reply().1
    }

    /// Negotiates structured replies (or extended headers), optional contexts, then GO.
    pub fn go(&mut self, name: &str, structured: bool, extended: bool, contexts: &[&str]) {
        if extended {
            assert_eq!(self.simple_opt(OPT_EXTENDED_HEADERS), REP_ACK);
            self.extended = true;
        } else if structured {
            assert_eq!(self.simple_opt(OPT_STRUCTURED_REPLY), REP_ACK);
        }
        if !contexts.is_empty() {
            self.opt(
                OPT_SET_META_CONTEXT,
                &rootfork_nbd::options::encode_meta(name, contexts),
            );
            let r = self.opt_replies();
            assert_eq!(r.last().unwrap().0, REP_ACK);
        }
        self.opt(OPT_GO, &rootfork_nbd::options::encode_info(name, &[]));
        let r = self.opt_replies();
        assert_eq!(r.last().unwrap().0, REP_ACK, "GO failed: {:?}", r.last());
    }

    pub fn req(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u64) {
        let h = encode_header(
            &RequestHeader {
                flags,
                kind,
                cookie,
                offset,
                length,
            },
            self.extended,
        );
        self.send(&h);
    }

    /// A simple reply: (errno, cookie).
    pub fn simple(&mut self) -> (u32, u64) {
        let b = self.read_n(16);
        assert_eq!(
            u32::from_be_bytes(b[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(b[4..8].try_into().unwrap()),
            u64::from_be_bytes(b[8..16].try_into().unwrap()),
        )
    }

    /// One structured or extended reply chunk.
    pub fn chunk(&mut self) -> Chunk {
        let m = self.read_n(4);
        self.chunk_after_magic(u32::from_be_bytes(m[0..4].try_into().unwrap()))
    }

    fn chunk_after_magic(&mut self, magic: u32) -> Chunk {
        let mut b = magic.to_be_bytes().to_vec();
        if self.extended {
            b.extend(self.read_n(28));
            assert_eq!(magic, EXTENDED_REPLY_MAGIC);
            let len = u64::from_be_bytes(b[24..32].try_into().unwrap()) as usize;
            Chunk {
                flags: u16::from_be_bytes([b[4], b[5]]),
                ty: u16::from_be_bytes([b[6], b[7]]),
                cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
                payload: self.read_n(len),
            }
        } else {
            b.extend(self.read_n(16));
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
            let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            Chunk {
                flags: u16::from_be_bytes([b[4], b[5]]),
                ty: u16::from_be_bytes([b[6], b[7]]),
                cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
                payload: self.read_n(len),
            }
        }
    }

    /// Chunks of one reply up to the one flagged DONE.
    pub fn chunks(&mut self) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            let done = c.flags & REPLY_FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }

    /// The outcome of a reply without data, whatever its framing (a simple reply, or a
    /// structured/extended NONE or ERROR chunk): (errno, cookie).
    pub fn status(&mut self) -> (u32, u64) {
        let m = self.read_n(4);
        let magic = u32::from_be_bytes(m[0..4].try_into().unwrap());
        if magic == SIMPLE_REPLY_MAGIC {
            assert!(!self.extended, "simple reply after extended headers");
            let b = self.read_n(12);
            return (
                u32::from_be_bytes(b[0..4].try_into().unwrap()),
                u64::from_be_bytes(b[4..12].try_into().unwrap()),
            );
        }
        let c = self.chunk_after_magic(magic);
        assert_ne!(c.flags & REPLY_FLAG_DONE, 0);
        if c.ty == REPLY_TYPE_ERROR {
            (
                u32::from_be_bytes(c.payload[0..4].try_into().unwrap()),
                c.cookie,
            )
        } else {
            assert_eq!(c.ty, REPLY_TYPE_NONE);
            (0, c.cookie)
        }
    }

    /// Reads a structured read reply and reassembles `len` bytes at `offset`.
    pub fn read_data(&mut self, offset: u64, len: usize) -> (Vec<u8>, Vec<u16>) {
        let mut out = vec![0xeeu8; len];
        let mut types = Vec::new();
        for c in self.chunks() {
            types.push(c.ty);
            match c.ty {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = u64::from_be_bytes(c.payload[0..8].try_into().unwrap());
                    let rel = (at - offset) as usize;
                    out[rel..rel + c.payload.len() - 8].copy_from_slice(&c.payload[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let at = u64::from_be_bytes(c.payload[0..8].try_into().unwrap());
                    let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize;
                    let rel = (at - offset) as usize;
                    out[rel..rel + n].fill(0);
                }
                t => panic!("unexpected chunk type {t}"),
            }
        }
        (out, types)
    }
}

/// A server on a Unix socket serving `dev` as the export "disk".
pub fn server_for(
    opts: ServeOptions,
    dev: Arc<dyn rootfork_block::BlockDevice>,
) -> (Server, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let server = Server::new(opts);
    server
        .add_export(Export {
            name: "disk".into(),
            description: String::new(),
            device: dev,
        })
        .unwrap();
    server.listen_unix(&path).unwrap();
    (server, dir, path)
}
