//! Pre-connected kernel devices a [`KernelProvider`](crate::KernelProvider) takes instead of a
//! cold attach: a [`WarmSource`] (the daemon's stock) hands out a [`WarmDevice`] of the disk's
//! size, whose kernel connections already serve an unbound [`SwitchableDevice`]; the provider
//! binds its overlay to it (no netlink round trip, only a page-cache flush).

use std::sync::Arc;

use rootfork_kernel::{NbdDispatcher, SwitchableDevice, WarmSlot};

/// A connected, unbound slot and the dispatcher serving it (whose counters become the
/// sandbox's NBD counters once bound).
pub struct WarmDevice {
    /// The connected slot.
    pub slot: WarmSlot,
    /// Serves the slot's [`SwitchableDevice`] on every connection (and on replacements after a
    /// reconnect).
    pub dispatcher: NbdDispatcher,
}

impl std::fmt::Debug for WarmDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmDevice")
            .field("slot", &self.slot)
            .finish()
    }
}

impl WarmDevice {
    /// A warm device from a slot connected with a dispatcher serving `switchable`.
    pub fn new(slot: WarmSlot, dispatcher: NbdDispatcher) -> Self {
        WarmDevice { slot, dispatcher }
    }

    /// The unbound device a stock connects a slot with: `size` bytes, reading zeroes until bound.
    pub fn switchable(size: u64, block_size: u32) -> Arc<SwitchableDevice> {
        Arc::new(SwitchableDevice::new(size, block_size))
    }
}

/// Where pre-connected devices come from.
pub trait WarmSource: Send + Sync {
    /// A warm device of exactly `size` bytes, if one is ready (taking it out of the stock).
    /// A miss may tell the source to stock that size.
    fn take(&self, size: u64) -> Option<WarmDevice>;
}
