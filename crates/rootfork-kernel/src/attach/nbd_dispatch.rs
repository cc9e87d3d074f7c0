//! The real [`Dispatcher`]: rootfork-nbd's kernel-mode connections serving a [`BlockDevice`].

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use rootfork_block::BlockDevice;
use rootfork_nbd::kernel::{transmission_flags, KernelConnection};
use rootfork_nbd::ServeOptions;

use super::seams::{Dispatch, Dispatcher};

/// Serves one device in kernel mode (simple replies, no handshake) on every socket of an
/// attachment; all connections share the device (`CAN_MULTI_CONN`).
pub struct NbdDispatcher {
    device: Arc<dyn BlockDevice>,
    opts: ServeOptions,
}

impl NbdDispatcher {
    /// Serves `device` with `opts`.
    pub fn new(device: Arc<dyn BlockDevice>, opts: ServeOptions) -> Self {
        NbdDispatcher { device, opts }
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
        Ok(Box::new(KernelConnection::spawn(
            stream,
            self.device.clone(),
            self.opts.clone(),
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

    fn is_finished(&self) -> bool {
        KernelConnection::is_finished(self)
    }

    fn wait(self: Box<Self>) {
        let (reason, stats) = (*self).wait_reason();
        tracing::debug!(?reason, ?stats, "kernel NBD connection ended");
    }
}
