//! RAII guards for the resources an attachment acquires, so that an error or a cancelled future
//! at any step undoes exactly what was done: [`Connected`] disconnects the device,
//! [`Dispatches`] shuts the dispatcher connections down and joins them.

use std::sync::Arc;

use crate::netlink::NbdControl;

use super::seams::Dispatch;

/// A device the kernel may have connected; dropping it while armed sends `DISCONNECT`.
pub(crate) struct Connected {
    control: Arc<dyn NbdControl>,
    index: u32,
    armed: bool,
}

impl Connected {
    pub(crate) fn new(control: Arc<dyn NbdControl>, index: u32) -> Self {
        Connected {
            control,
            index,
            armed: true,
        }
    }

    /// Disarms the guard: the device stays connected (handed over to the next process).
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }

    /// Disconnects now and disarms the guard.
    pub(crate) fn disconnect(mut self) -> Result<(), crate::netlink::NlError> {
        self.armed = false;
        self.control.disconnect(self.index)
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.control.disconnect(self.index) {
                tracing::warn!(index = self.index, "disconnect during cleanup failed: {e}");
            }
        }
    }
}

/// The dispatcher connections of one device; dropping shuts them down and joins them.
#[derive(Default)]
pub(crate) struct Dispatches(pub(crate) Vec<Box<dyn Dispatch>>);

impl Dispatches {
    pub(crate) fn drain(&self) {
        self.0.iter().for_each(|d| d.drain());
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.0.iter().map(|d| d.in_flight()).sum()
    }

    pub(crate) fn all_finished(&self) -> bool {
        self.0.iter().all(|d| d.is_finished())
    }

    /// Shuts down and joins every connection.
    pub(crate) fn stop(&mut self) {
        for d in &self.0 {
            d.shutdown();
        }
        for d in self.0.drain(..) {
            d.wait();
        }
    }
}

impl Drop for Dispatches {
    fn drop(&mut self) {
        self.stop();
    }
}
