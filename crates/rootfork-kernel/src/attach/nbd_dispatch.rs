//! The real [`Dispatcher`]: rootfork-nbd's kernel-mode connections serving a [`BlockDevice`].

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use rootfork_block::BlockDevice;
use rootfork_nbd::fence::WriteFence;
use rootfork_nbd::kernel::{transmission_flags, KernelConnection};
use rootfork_nbd::stats::Stats;
use rootfork_nbd::{ServeOptions, StatsSnapshot};

use super::seams::{Dispatch, Dispatcher};

/// Serves one device in kernel mode (simple replies, no handshake) on every socket of an
/// attachment; all connections share the device (`CAN_MULTI_CONN`) and one set of counters, so
/// [`NbdDispatcher::stats`] covers every connection it ever spawned, replaced ones included.
///
/// Every connection it spawns sits behind one [`WriteFence`]: a write the kernel gave up on (it
/// shut that socket down and requeued the request on another connection) is never applied after
/// the requeued copy, so a stale write cannot land over a newer one (docs/kernel.md, *Stale
/// writes*).
pub struct NbdDispatcher {
    device: Arc<dyn BlockDevice>,
    opts: ServeOptions,
    stats: Arc<Stats>,
    fence: Arc<WriteFence>,
}

impl NbdDispatcher {
    /// Serves `device` with `opts`.
    pub fn new(device: Arc<dyn BlockDevice>, opts: ServeOptions) -> Self {
        NbdDispatcher {
            device,
            opts,
            stats: Arc::new(Stats::default()),
            fence: WriteFence::new(),
        }
    }

    /// Writes refused so far because the kernel had declared their connection dead.
    pub fn fenced_writes(&self) -> u64 {
        self.fence.fenced()
    }

    /// Requests answered by every connection spawned so far (per command: counts, errors,
    /// bytes, latency histogram).
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The device served.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }
}

impl Dispatcher for NbdDispatcher {
    fn size(&self) -> u64 {
        self.device.size()
    }

    fn server_flags(&self) -> u64 {
        u64::from(transmission_flags(&*self.device))
    }

    fn spawn(&self, stream: UnixStream) -> io::Result<Box<dyn Dispatch>> {
        Ok(Box::new(KernelConnection::spawn_fenced(
            stream,
            self.device.clone(),
            self.opts.clone(),
            self.stats.clone(),
            self.fence.clone(),
        )?))
    }
}

impl Dispatch for KernelConnection {
    fn drain(&self) {
        KernelConnection::drain(self);
    }

    fn shutdown(&self) {
        KernelConnection::shutdown(self);
    }

    fn in_flight(&self) -> usize {
        KernelConnection::in_flight(self)
    }

    fn oldest_request_age(&self) -> Option<Duration> {
        KernelConnection::oldest_request_age(self)
    }

    fn is_finished(&self) -> bool {
        KernelConnection::is_finished(self)
    }

    fn wait(self: Box<Self>) {
        let (reason, stats) = (*self).wait_reason();
        tracing::debug!(?reason, ?stats, "kernel NBD connection ended");
    }
}
