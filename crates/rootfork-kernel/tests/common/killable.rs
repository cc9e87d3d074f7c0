//! A test-side dispatcher wrapper whose connections the test can kill from outside.
//!
//! It keeps a duplicate of our end of every socket the real `NbdDispatcher` serves and shuts one
//! down on request (`shutdown(SHUT_RDWR)`, as an I/O error ends it), so the production types need
//! no test-only API.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use rootfork_block::BlockDevice;
use rootfork_kernel::{Dispatch, Dispatcher, NbdDispatcher};
use rootfork_nbd::ServeOptions;

/// The real dispatcher, plus a handle on our end of every socket it serves.
pub struct Killable {
    pub inner: NbdDispatcher,
    ends: Mutex<Vec<UnixStream>>,
}

impl Killable {
    /// An `NbdDispatcher` of `device` with default serve options.
    pub fn new(device: Arc<dyn BlockDevice>) -> Self {
        Killable {
            inner: NbdDispatcher::new(device, ServeOptions::default()),
            ends: Mutex::new(Vec::new()),
        }
    }

    /// Kills the `k`-th connection ever served (oldest first).
    pub fn kill(&self, k: usize) -> io::Result<()> {
        let ends = self.ends.lock().expect("ends lock");
        let e = ends.get(k).ok_or(io::ErrorKind::NotFound)?;
        e.shutdown(std::net::Shutdown::Both)
    }

    /// How many of the sockets ever served are shut down (by the kernel, by a kill, or closed).
    pub fn hung_up_count(&self) -> usize {
        let ends = self.ends.lock().expect("ends lock");
        ends.iter().filter(|e| hung_up(e)).count()
    }

    /// Kills the `k`-th (oldest first) of the connections still open; forgets the closed ones.
    pub fn kill_live(&self, k: usize) -> io::Result<()> {
        let mut ends = self.ends.lock().expect("ends lock");
        ends.retain(|e| !hung_up(e));
        let e = ends.get(k).ok_or(io::ErrorKind::NotFound)?;
        e.shutdown(std::net::Shutdown::Both)
    }
}

/// Whether `s` or its peer is shut down (`POLLHUP`).
fn hung_up(s: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::empty())];
    poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

impl Dispatcher for Killable {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn server_flags(&self) -> u64 {
        self.inner.server_flags()
    }

    fn spawn(&self, stream: UnixStream) -> io::Result<Box<dyn Dispatch>> {
        self.ends
            .lock()
            .expect("ends lock")
            .push(stream.try_clone()?);
        self.inner.spawn(stream)
    }
}
