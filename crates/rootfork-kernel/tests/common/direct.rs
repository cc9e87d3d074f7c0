//! `O_DIRECT` I/O on an attached device (so reads reach the NBD server, not the page cache), and
//! waiting for the attachment to see a killed connection dead.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use rootfork_kernel::Attachment;

/// A 4096-aligned buffer of `len` bytes (O_DIRECT) carved out of a larger allocation.
pub struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Self {
        let buf = vec![0u8; len + 4096];
        let off = buf.as_ptr().align_offset(4096);
        Aligned { buf, off, len }
    }

    /// A buffer of `len` bytes with a pattern that depends on `seed` and on the position.
    pub fn filled(len: usize, seed: u8) -> Self {
        let mut a = Aligned::new(len);
        for (i, b) in a.as_mut().iter_mut().enumerate() {
            *b = seed ^ (i as u8).wrapping_mul(31) ^ ((i >> 12) as u8);
        }
        a
    }

    pub fn as_ref(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }

    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// The attachment's device opened read-write with `O_DIRECT`.
pub fn direct(a: &Attachment) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(a.device_path())
}

/// `len` bytes at `at` read from a file opened with `O_DIRECT`.
pub fn read_direct(f: &File, len: usize, at: u64) -> io::Result<Aligned> {
    let mut b = Aligned::new(len);
    f.read_exact_at(b.as_mut(), at)?;
    Ok(b)
}

/// Waits (bounded by `limit`) until `a` shows `dead` dead connections; returns how long it took.
pub fn until_dead(a: &Attachment, dead: usize, limit: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    while a.connection_health().dead != dead {
        if t.elapsed() > limit {
            return Err(format!("health: {:?}", a.connection_health()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(t.elapsed())
}
