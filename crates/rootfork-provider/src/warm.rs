//! Pre-connected kernel devices a [`KernelProvider`](crate::KernelProvider) takes instead of a
//! cold attach: a [`WarmSource`] (the daemon's stock) hands out a [`WarmDevice`] of the disk's
//! size, whose kernel connections already serve an unbound [`SwitchableDevice`]; the provider
//! binds its overlay to it (no netlink round trip, only a page-cache flush). A taken device may
//! carry a [`TakenGuard`], dropped once the sandbox's device is ready (or the bind given up): the
//! source's cue to connect a replacement then, not while the bind runs.

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
    /// Dropped by the taker once the sandbox is ready with this device, or when it gives the
    /// device up (see [`TakenGuard`]).
    pub taken: Option<TakenGuard>,
}

/// Runs its callback once, when dropped: how a [`WarmSource`] learns that a device it handed
/// out is bound and its sandbox ready (or that the taker gave up), so that its refill — a
/// netlink connect, a dispatcher start and the kernel's partition scan of a new device — does
/// not compete with the bind for the CPU (under the 2-vCPU TCG test VM the refill started at the
/// take made warm creates 2–3× slower).
pub struct TakenGuard(Option<Box<dyn FnOnce() + Send>>);

impl TakenGuard {
    /// A guard that calls `f` when dropped.
    pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
        TakenGuard(Some(Box::new(f)))
    }
}

impl Drop for TakenGuard {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

impl std::fmt::Debug for TakenGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TakenGuard").finish_non_exhaustive()
    }
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
        WarmDevice {
            slot,
            dispatcher,
            taken: None,
        }
    }

    /// The same device with `guard` to drop once taken and ready.
    pub fn with_taken_guard(mut self, guard: TakenGuard) -> Self {
        self.taken = Some(guard);
        self
    }

    /// The unbound device a stock connects a slot with: `size` bytes, reading zeroes until bound.
    pub fn switchable(size: u64, block_size: u32) -> Arc<SwitchableDevice> {
        Arc::new(SwitchableDevice::new(size, block_size))
    }
}

/// Where pre-connected devices come from.
pub trait WarmSource: Send + Sync {
    /// A warm device of exactly `size` bytes, if one is ready (taking it out of the stock).
    /// A miss may tell the source to stock that size. The taker drops the device's
    /// [`TakenGuard`] once its sandbox is ready.
    fn take(&self, size: u64) -> Option<WarmDevice>;
}

#[cfg(test)]
mod tests {
    use super::TakenGuard;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_taken_guard_calls_back_once_when_dropped() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let guard = TakenGuard::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 0, "called before the drop");
        drop(guard);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
