//! The write fence shared by every kernel connection of one device.
//!
//! The Linux `nbd` driver (6.1, `nbd_xmit_timeout`) gives up on a request that outlives
//! `NBD_ATTR_TIMEOUT`: under the socket's `tx_lock` it marks that socket dead —
//! `kernel_sock_shutdown(SHUT_RDWR)` on its end of our socketpair — and only then requeues the
//! request, which the submit path sends on another live connection (`find_fallback`). Our end of
//! the dead socket may still hold the request: queued for a worker, or waiting in the receive
//! buffer. Without a fence it is applied late: W1 completes on connection 2, the guest writes W2
//! to the same block, then the stale W1 lands on top of it.
//!
//! The fence makes that impossible. Before a modifying command (write, trim, write-zeroes) is
//! applied, its connection [`WriteFence::enter`]s:
//!
//! 1. it waits until no *other* connection of the device is applying an overlapping range;
//! 2. it registers its own range;
//! 3. only then it asks whether its socket is still alive (`POLLHUP` on our end, which the
//!    kernel's shutdown sets before it requeues). Dead: the range is withdrawn and the command is
//!    refused ([`Fenced`]), it never reaches the device.
//!
//! Why this suffices: let W1 be the request on the dead connection and W1′ its requeued copy.
//! If W1's liveness check (step 3) ran after the kernel's shutdown, W1 is refused. Otherwise W1
//! was registered before the shutdown, hence before W1′ was even sent; W1′ then finds W1's range
//! registered in step 1 and waits until W1 has been applied. Either way W1 is applied before W1′
//! (same data) or never, so nothing the guest writes after W1′ completes can be overwritten by
//! W1. Registering before checking keeps the `poll` system call outside the lock.
//!
//! The same check fences our own shutdowns: [`Shared::shutdown`](crate::conn) shuts our end
//! down, which also shows as `POLLHUP`, so a write still queued when a dispatch is stopped is
//! refused instead of landing after its replacement took over.
//!
//! Overlapping writes on one connection are not ordered here (the kernel never has two
//! overlapping writes in flight that it expects in a particular order), and a fence costs one
//! `poll(2)` and two uncontended lock round trips per modifying command.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::request::Command;

/// A modifying command refused because its connection was declared dead before it could be
/// applied; it never reached the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("write on a dead kernel connection fenced (the kernel requeued it elsewhere)")]
pub struct Fenced;

/// One range being applied by one connection.
#[derive(Debug, Clone, Copy)]
struct Applying {
    connection: u64,
    start: u64,
    end: u64,
}

impl Applying {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

/// Orders and fences the modifying commands of every connection serving one device. Share one
/// (`Arc`) between all the connections of a `/dev/nbdN`, replacements included.
#[derive(Debug, Default)]
pub struct WriteFence {
    applying: Mutex<Vec<Applying>>,
    released: Condvar,
    next_connection: AtomicU64,
    fenced: AtomicU64,
}

impl WriteFence {
    /// A fence with no connection.
    pub fn new() -> Arc<WriteFence> {
        Arc::new(WriteFence::default())
    }

    /// How many commands were refused because their connection was dead.
    pub fn fenced(&self) -> u64 {
        self.fenced.load(Ordering::Relaxed)
    }

    /// A new connection's id.
    pub(crate) fn connection(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Enters the fence for `len` bytes at `offset` on `connection`: waits for overlapping
    /// ranges of other connections, registers the range, then checks `alive`. The returned
    /// guard withdraws the range when the command has been applied (dropped).
    pub(crate) fn enter(
        &self,
        connection: u64,
        offset: u64,
        len: u64,
        alive: impl FnOnce() -> bool,
    ) -> Result<FenceGuard<'_>, Fenced> {
        let (start, end) = (offset, offset.saturating_add(len.max(1)));
        let mut applying = self.applying.lock();
        while applying
            .iter()
            .any(|a| a.connection != connection && a.overlaps(start, end))
        {
            self.released.wait(&mut applying);
        }
        applying.push(Applying {
            connection,
            start,
            end,
        });
        drop(applying);
        let guard = FenceGuard {
            fence: self,
            connection,
            start,
            end,
        };
        if alive() {
            Ok(guard)
        } else {
            drop(guard);
            self.fenced.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                offset,
                len,
                "kernel NBD connection dead: a write it still held was fenced, not applied"
            );
            Err(Fenced)
        }
    }
}

/// The bytes `cmd` changes, `(offset, len)`; `None` for commands that change nothing.
pub(crate) fn modified_range(cmd: &Command) -> Option<(u64, u64)> {
    match *cmd {
        Command::Write { offset, len, .. } => Some((offset, u64::from(len))),
        Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. } => {
            Some((offset, len))
        }
        Command::Read { .. }
        | Command::Disc
        | Command::Flush
        | Command::Cache { .. }
        | Command::BlockStatus { .. } => None,
    }
}

/// A registered range; withdrawn (and waiters woken) on drop.
#[derive(Debug)]
pub(crate) struct FenceGuard<'a> {
    fence: &'a WriteFence,
    connection: u64,
    start: u64,
    end: u64,
}

impl Drop for FenceGuard<'_> {
    fn drop(&mut self) {
        let mut applying = self.fence.applying.lock();
        if let Some(i) = applying.iter().position(|a| {
            a.connection == self.connection && a.start == self.start && a.end == self.end
        }) {
            applying.swap_remove(i);
        }
        drop(applying);
        self.fence.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_dead_connection_is_refused_and_counted() {
        let f = WriteFence::new();
        let c = f.connection();
        assert_eq!(f.enter(c, 0, 4096, || false).unwrap_err(), Fenced);
        assert_eq!(f.fenced(), 1);
        // Nothing stays registered: another connection enters at once.
        let other = f.connection();
        assert!(f.enter(other, 0, 4096, || true).is_ok());
    }

    #[test]
    fn same_connection_and_disjoint_ranges_do_not_wait() {
        let f = WriteFence::new();
        let (a, b) = (f.connection(), f.connection());
        let _g1 = f.enter(a, 0, 4096, || true).unwrap();
        let _g2 = f.enter(a, 0, 4096, || true).unwrap();
        let _g3 = f.enter(b, 4096, 4096, || true).unwrap();
        assert_eq!(f.fenced(), 0);
    }

    #[test]
    fn an_overlapping_range_of_another_connection_waits_until_applied() {
        let f = WriteFence::new();
        let (a, b) = (f.connection(), f.connection());
        let g = f.enter(a, 4096, 8192, || true).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            let f = &f;
            s.spawn(move || {
                let _g = f.enter(b, 8192, 512, || true).unwrap();
                tx.send(()).unwrap();
            });
            // Still applying on `a`: `b` must not get in (it would, at once, without a fence).
            assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
            drop(g);
            rx.recv().unwrap();
        });
    }

    #[test]
    fn liveness_is_checked_after_registering() {
        // The check runs with the range registered: an overlapping writer of another connection
        // that arrives meanwhile waits, whatever the verdict.
        let f = WriteFence::new();
        let (a, b) = (f.connection(), f.connection());
        let seen = std::cell::Cell::new(false);
        let g = f
            .enter(a, 0, 512, || {
                seen.set(f.applying.lock().iter().any(|r| r.connection == a));
                true
            })
            .unwrap();
        assert!(seen.get());
        drop(g);
        assert!(f.enter(b, 0, 512, || true).is_ok());
    }
}
