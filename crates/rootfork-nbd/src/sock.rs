//! The connected stream a connection runs on (Unix or TCP), with the few operations the engine
//! needs: plain reads, vectored sends that never raise `SIGPIPE`, and shutdown.

use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recv, sendmsg, MsgFlags};

/// Most slices handed to one `sendmsg` call (Linux's `IOV_MAX`).
pub const IOV_MAX: usize = 1024;

/// A connected stream socket.
#[derive(Debug)]
pub enum Sock {
    /// A Unix stream (a client of a Unix listener, or the kernel's socketpair end).
    Unix(UnixStream),
    /// A TCP stream.
    Tcp(TcpStream),
}

impl Sock {
    /// Reads into `buf`, retrying on `EINTR`; `Ok(0)` at end of stream.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = match self {
                Sock::Unix(s) => (&*s).read(buf),
                Sock::Tcp(s) => (&*s).read(buf),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    /// Reads what is already waiting into `buf` without blocking (`MSG_DONTWAIT`), retrying on
    /// `EINTR`; `Ok(None)` when nothing is waiting, `Ok(Some(0))` at end of stream.
    pub fn read_nonblocking(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            return match recv(self.as_fd().as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => Ok(Some(n)),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => Ok(None),
                Err(e) => Err(e.into()),
            };
        }
    }

    /// Sends every byte of `slices`, in order (consumes the slice array's contents).
    pub fn send_all(&self, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
        while !slices.is_empty() {
            let n = slices.len().min(IOV_MAX);
            let sent = match sendmsg::<()>(
                self.as_fd().as_raw_fd(),
                &slices[..n],
                &[],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => k,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            advance(&mut slices, sent);
        }
        Ok(())
    }

    /// One `sendmsg` of at most [`IOV_MAX`] slices; with `nonblocking`, `Ok(0)` means the socket
    /// buffer is full (`EAGAIN`).
    pub fn send_some(&self, slices: &[IoSlice<'_>], nonblocking: bool) -> io::Result<usize> {
        let mut flags = MsgFlags::MSG_NOSIGNAL;
        if nonblocking {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        let n = slices.len().min(IOV_MAX);
        loop {
            return match sendmsg::<()>(self.as_fd().as_raw_fd(), &slices[..n], &[], flags, None) {
                Ok(0) if !slices.is_empty() && slices.iter().any(|s| !s.is_empty()) => {
                    Err(io::ErrorKind::WriteZero.into())
                }
                Ok(k) => Ok(k),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) if nonblocking => Ok(0),
                Err(e) => Err(e.into()),
            };
        }
    }

    /// Asks for a send buffer of at least `bytes` (the kernel caps it at `net.core.wmem_max`);
    /// best effort, errors are ignored.
    pub fn grow_send_buffer(&self, bytes: usize) {
        use nix::sys::socket::{getsockopt, setsockopt, sockopt::SndBuf};
        if getsockopt(self, SndBuf).is_ok_and(|cur| cur < bytes) {
            let _ = setsockopt(self, SndBuf, &bytes);
        }
    }

    /// Shuts down one or both directions (errors are ignored: the peer may be gone).
    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(how),
            Sock::Tcp(s) => s.shutdown(how),
        };
    }

    /// Whether the stream is shut down in both directions (`POLLHUP`): the peer shut it down
    /// or closed it (the kernel's `nbd` driver does when it declares a socket dead), or we did.
    /// Data still buffered does not hide it. A `poll` that fails counts as hung up.
    pub fn hung_up(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.as_fd(), PollFlags::empty())];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(_) => true,
        }
    }

    /// A second handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }

    /// Sets (or clears) the read timeout.
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_read_timeout(t),
            Sock::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Unix(s) => s.as_fd(),
            Sock::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for &Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Sock::read(self, buf)
    }
}

impl io::Write for &Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send_all(&mut [IoSlice::new(buf)])?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Drops `n` sent bytes from the front of `slices`.
pub(crate) fn advance<'a>(slices: &mut &mut [IoSlice<'a>], mut n: usize) {
    let mut skip = 0;
    for s in slices.iter() {
        if n < s.len() {
            break;
        }
        n -= s.len();
        skip += 1;
    }
    let rest = std::mem::take(slices);
    *slices = &mut rest[skip..];
    if n > 0 {
        let first: &'a [u8] = {
            // Re-borrow the first slice's bytes with its original lifetime.
            let s: &IoSlice<'a> = &slices[0];
            let ptr = s.as_ptr();
            let len = s.len();
            // SAFETY: `ptr`/`len` describe the bytes of an `IoSlice<'a>`, which are borrowed for
            // `'a`; taking a sub-slice of them keeps the same lifetime and stays in bounds
            // because `n < len` (the loop above stopped at this slice).
            unsafe { std::slice::from_raw_parts(ptr.add(n), len - n) }
        };
        slices[0] = IoSlice::new(first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_skips_whole_and_partial_slices() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5];
        let mut v = [IoSlice::new(&a), IoSlice::new(&b)];
        let mut s: &mut [IoSlice<'_>] = &mut v;
        advance(&mut s, 4);
        assert_eq!(s.len(), 1);
        assert_eq!(&*s[0], &[5]);
    }
}
