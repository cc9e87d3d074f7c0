//! A small blocking NBD client for the restart tests: fixed newstyle, `NBD_OPT_GO` on a named
//! export, simple replies, any number of requests in flight. Errors are returned, not panics,
//! so a test can see its server go away in the middle of a request.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rootfork_nbd::consts::*;
use rootfork_nbd::request::{encode_header, RequestHeader};

/// One connection in the transmission phase.
pub struct NbdClient {
    s: UnixStream,
    /// The export's size.
    pub size: u64,
}

/// A reply: its cookie and errno (0: success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The request's cookie.
    pub cookie: u64,
    /// The server's errno.
    pub errno: u32,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl NbdClient {
    /// Connects to `socket` and opens `export`.
    pub fn connect(socket: &Path, export: &str) -> io::Result<NbdClient> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting)?;
        if &greeting[..16] != b"NBDMAGICIHAVEOPT" {
            return Err(invalid("not an NBD newstyle server"));
        }
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        let data = rootfork_nbd::options::encode_info(export, &[]);
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let mut size = None;
        loop {
            let mut head = [0u8; 20];
            s.read_exact(&mut head)?;
            if be_u64(&head) != OPTION_REPLY_MAGIC {
                return Err(invalid("bad option reply magic"));
            }
            let (ty, len) = (be_u32(&head[12..]), be_u32(&head[16..]) as usize);
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload)?;
            match ty {
                REP_ACK => break,
                // NBD_INFO_EXPORT: type, size, flags.
                REP_INFO if len >= 10 && be_u16(&payload) == 0 => {
                    size = Some(be_u64(&payload[2..]));
                }
                REP_INFO => {}
                _ => return Err(invalid(format!("GO {export:?} refused (reply {ty:#x})"))),
            }
        }
        let size = size.ok_or_else(|| invalid("no export size"))?;
        Ok(NbdClient { s, size })
    }

    /// Connects, retrying until `timeout` (a daemon coming back up).
    pub fn connect_within(socket: &Path, export: &str, timeout: Duration) -> NbdClient {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match NbdClient::connect(socket, export) {
                Ok(c) => return c,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!(
                    "no NBD server at {} within {timeout:?}: {e}",
                    socket.display()
                ),
            }
        }
    }

    fn send(&mut self, kind: u16, cookie: u64, offset: u64, length: u64) -> io::Result<()> {
        let h = encode_header(
            &RequestHeader {
                flags: 0,
                kind,
                cookie,
                offset,
                length,
            },
            false,
        );
        self.s.write_all(&h)
    }

    /// Sends a write of `data` at `offset` (the reply is read by [`NbdClient::reply`]).
    pub fn send_write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut req = encode_header(
            &RequestHeader {
                flags: 0,
                kind: CMD_WRITE,
                cookie,
                offset,
                length: data.len() as u64,
            },
            false,
        );
        req.extend_from_slice(data);
        self.s.write_all(&req)
    }

    /// The next reply (of a request without a payload to read back: write, flush).
    pub fn reply(&mut self) -> io::Result<Reply> {
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head)?;
        if be_u32(&head) != SIMPLE_REPLY_MAGIC {
            return Err(invalid("bad reply magic"));
        }
        Ok(Reply {
            errno: be_u32(&head[4..]),
            cookie: be_u64(&head[8..]),
        })
    }

    /// Reads `len` bytes at `offset` (one request in flight).
    pub fn read(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.send(CMD_READ, u64::MAX, offset, len as u64)?;
        let r = self.reply()?;
        if r.errno != 0 {
            return Err(io::Error::from_raw_os_error(r.errno as i32));
        }
        let mut buf = vec![0u8; len];
        self.s.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Flushes (one request in flight).
    pub fn flush(&mut self) -> io::Result<()> {
        self.send(CMD_FLUSH, u64::MAX - 1, 0, 0)?;
        match self.reply()? {
            Reply { errno: 0, .. } => Ok(()),
            r => Err(io::Error::from_raw_os_error(r.errno as i32)),
        }
    }

    /// Says goodbye.
    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, 0);
    }
}
