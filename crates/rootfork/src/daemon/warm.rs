//! The warm stock (`kernel.warm_slots`): pre-connected `/dev/nbdN` devices, per disk size, that
//! kernel sandbox creates take instead of attaching cold (rootfork-kernel's
//! [`WarmSlot`](rootfork_kernel::WarmSlot): binding an overlay costs a page-cache flush, not a
//! netlink connect).
//!
//! - **Sizes**: the kernel fixes a device's size at connect, so a slot fits only disks of its
//!   size. The stock keeps `warm_slots` devices for each of the templates' sizes at start and for
//!   each disk size a kernel create asked for since (a miss adds its size), at most
//!   [`MAX_SIZES`] sizes; the size wanted least recently goes first, and its devices are closed.
//! - **Refill**: one background task connects a device whenever a wanted size has fewer than
//!   `warm_slots`, woken by a miss at once and by a hit only once the create that took the
//!   device is ready (its [`TakenGuard`] dropped), so the two do not compete; a failed connect (every slot taken, the module gone) waits with backoff
//!   (1 s doubling to 30 s) before the next try.
//! - **Listing**: a stocked slot's claim is named `.warm-<size>` (sandbox ids cannot start with a
//!   dot), so `device list` and the `pool_slots` metric show it as state `warm`.
//! - **Restart**: on shutdown the task closes every stocked device. After a crash the claims die
//!   with the process and the next start's reclaim disconnects the devices like any dead
//!   rootfork's (their backend identifier names this host).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rootfork_kernel::{AttachError, AttachOptions, Attacher, NbdDispatcher, WarmSlot};
use rootfork_nbd::ServeOptions;
use rootfork_provider::{TakenGuard, WarmDevice, WarmSource};
use tokio::sync::{watch, Notify};

use crate::daemon::core::Core;

/// The prefix of a stocked slot's claim name.
pub const WARM_PREFIX: &str = ".warm-";

/// The most disk sizes stocked at once.
pub const MAX_SIZES: usize = 4;

/// The overlay's block size, which the unbound device reports until bound.
const UNBOUND_BLOCK_SIZE: u32 = 4096;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Whether a claim name is a stocked slot's.
pub fn is_warm_claim(sandbox: &str) -> bool {
    sandbox.starts_with(WARM_PREFIX)
}

#[derive(Default)]
struct Shelves {
    /// Ready devices per size.
    ready: BTreeMap<u64, Vec<WarmDevice>>,
    /// Sizes to stock, the least recently wanted first.
    sizes: Vec<u64>,
    /// Set at shutdown: nothing is stocked any more.
    closed: bool,
}

/// Counters of the stock.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WarmCounts {
    /// Devices ready now.
    pub ready: usize,
    /// Devices the stock aims for (`warm_slots` × sizes).
    pub target: usize,
    /// Creates that took a stocked device.
    pub hits: u64,
    /// Kernel creates that found none of their size.
    pub misses: u64,
    /// Connects of stock devices that failed.
    pub failures: u64,
}

/// Pre-connected devices by size.
pub struct WarmStock {
    per_size: usize,
    shelves: Mutex<Shelves>,
    /// Wakes the refill (shared with the guards of taken devices).
    wake: Arc<Notify>,
    hits: AtomicU64,
    misses: AtomicU64,
    failures: AtomicU64,
}

impl std::fmt::Debug for WarmStock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmStock")
            .field("per_size", &self.per_size)
            .field("counts", &self.counts())
            .finish()
    }
}

impl WarmStock {
    /// A stock of `per_size` devices for each wanted size (nothing is connected until
    /// [`run`] refills it).
    pub fn new(per_size: usize) -> Arc<WarmStock> {
        Arc::new(WarmStock {
            per_size,
            shelves: Mutex::default(),
            wake: Arc::new(Notify::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    /// Marks `size` as wanted (most recently); returns the devices of a size that had to make
    /// room, for the caller to close.
    pub fn want(&self, size: u64) -> Vec<WarmDevice> {
        let evicted = self.mark_wanted(size);
        self.wake.notify_one();
        evicted
    }

    /// [`WarmStock::want`] without waking the refill.
    fn mark_wanted(&self, size: u64) -> Vec<WarmDevice> {
        let mut evicted = Vec::new();
        let mut s = self.shelves.lock();
        if s.closed {
            return evicted;
        }
        s.sizes.retain(|&x| x != size);
        s.sizes.push(size);
        while s.sizes.len() > MAX_SIZES {
            let old = s.sizes.remove(0);
            evicted.extend(s.ready.remove(&old).unwrap_or_default());
        }
        evicted
    }

    /// The counters.
    pub fn counts(&self) -> WarmCounts {
        let s = self.shelves.lock();
        WarmCounts {
            ready: s.ready.values().map(Vec::len).sum(),
            target: self.per_size * s.sizes.len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// A wanted size with fewer ready devices than `per_size` (the most recently wanted first).
    fn short_size(&self) -> Option<u64> {
        let s = self.shelves.lock();
        if s.closed {
            return None;
        }
        s.sizes
            .iter()
            .rev()
            .copied()
            .find(|size| s.ready.get(size).map_or(0, Vec::len) < self.per_size)
    }

    /// Shelves a connected device; gives it back when its size is no longer wanted (or the
    /// stock is closed), for the caller to close.
    fn put(&self, size: u64, device: WarmDevice) -> Option<WarmDevice> {
        let mut s = self.shelves.lock();
        if s.closed || !s.sizes.contains(&size) {
            return Some(device);
        }
        s.ready.entry(size).or_default().push(device);
        None
    }

    /// Closes the stock: every ready device is returned for closing, and nothing is stocked
    /// again.
    fn close(&self) -> Vec<WarmDevice> {
        let mut s = self.shelves.lock();
        s.closed = true;
        std::mem::take(&mut s.ready)
            .into_values()
            .flatten()
            .collect()
    }
}

impl WarmSource for WarmStock {
    fn take(&self, size: u64) -> Option<WarmDevice> {
        let taken = self.shelves.lock().ready.get_mut(&size).and_then(Vec::pop);
        // A miss stocks this size from now on (the refill woken at once: the create attaches
        // cold anyway); a hit wakes the refill only when the taker drops the device's guard, once
        // its sandbox is ready, so the replacement's connect does not compete with the bind.
        let evicted = self.mark_wanted(size);
        let taken = match taken {
            Some(d) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                let wake = self.wake.clone();
                Some(d.with_taken_guard(TakenGuard::new(move || wake.notify_one())))
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.wake.notify_one();
                None
            }
        };
        for d in evicted {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(close_device(d))),
                // Dropping a slot disconnects and releases it without waiting.
                Err(_) => drop(d),
            }
        }
        taken
    }
}

/// Connects one unbound device of `size` bytes.
pub async fn connect(
    attacher: &Attacher,
    opts: &AttachOptions,
    serve: ServeOptions,
    size: u64,
) -> Result<WarmDevice, AttachError> {
    let device = WarmDevice::switchable(size, UNBOUND_BLOCK_SIZE);
    let dispatcher = NbdDispatcher::new(device.clone(), serve);
    let mut opts = opts.clone();
    opts.sandbox = format!("{WARM_PREFIX}{size}");
    opts.cache_path = None;
    let attachment = attacher.attach(&dispatcher, &opts).await?;
    Ok(WarmDevice::new(
        WarmSlot::stocked(attachment, device)?,
        dispatcher,
    ))
}

async fn close_device(d: WarmDevice) {
    let index = d.slot.index();
    if let Err(e) = d.slot.close().await {
        tracing::warn!(index, "closing a stocked nbd device: {e}");
    }
}

/// The attach options of stocked devices: those of the daemon's kernel sandboxes.
fn attach_options(core: &Core) -> AttachOptions {
    AttachOptions {
        connections: core.config.kernel_connections,
        timeout: core.config.kernel_request_timeout,
        dead_conn_timeout: core.config.kernel_dead_conn_timeout,
        ..AttachOptions::default()
    }
}

/// The serve options of stocked devices: those of the daemon's kernel sandboxes.
pub fn serve_options(core: &Core) -> ServeOptions {
    ServeOptions {
        byte_budget: Some(core.nbd_bytes.clone()),
        ..ServeOptions::default()
    }
}

/// Keeps `stock` filled until `stop` turns true, then closes every stocked device. Starts with
/// the templates' sizes.
pub async fn run(core: Arc<Core>, stock: Arc<WarmStock>, mut stop: watch::Receiver<bool>) {
    let attacher = match core.kernel.attacher() {
        Ok(a) => a,
        Err(e) => {
            tracing::info!("no warm nbd stock: {e}");
            return;
        }
    };
    let mut templates = core.templates.list();
    templates.sort_by_key(|t| std::cmp::Reverse(t.created_unix_ms));
    for t in templates.iter().take(MAX_SIZES).rev() {
        stock.want(t.size_bytes);
    }
    let opts = attach_options(&core);
    let mut backoff = BACKOFF_MIN;
    loop {
        if *stop.borrow() {
            break;
        }
        let Some(size) = stock.short_size() else {
            tokio::select! {
                _ = stock.wake.notified() => continue,
                _ = stop.changed() => break,
            }
        };
        let connected = tokio::select! {
            r = connect(&attacher, &opts, serve_options(&core), size) => r,
            _ = stop.changed() => break,
        };
        match connected {
            Ok(d) => {
                backoff = BACKOFF_MIN;
                tracing::debug!(index = d.slot.index(), size, "stocked a warm nbd device");
                if let Some(d) = stock.put(size, d) {
                    close_device(d).await;
                }
            }
            Err(e) => {
                stock.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(size, retry_in = ?backoff, "connecting a warm nbd device: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    close_all(&stock).await;
}

/// Closes every stocked device and stops stocking (shutdown).
pub async fn close_all(stock: &WarmStock) {
    let devices = stock.close();
    let n = devices.len();
    for d in devices {
        close_device(d).await;
    }
    if n > 0 {
        tracing::info!(closed = n, "closed the warm nbd stock");
    }
}

#[cfg(test)]
mod tests {
    //! The stock's bookkeeping (sizes wanted, eviction, refill order, counters, closing); the
    //! devices themselves are exercised on the real kernel by the daemon VM suite.
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_miss_wants_the_size_and_the_refill_serves_the_newest_first() {
        let stock = WarmStock::new(2);
        assert_eq!(stock.short_size(), None, "nothing wanted yet");
        assert!(stock.take(64 * MIB).is_none());
        assert!(stock.take(32 * MIB).is_none());
        let c = stock.counts();
        assert_eq!((c.ready, c.target, c.hits, c.misses), (0, 4, 0, 2));
        assert_eq!(
            stock.short_size(),
            Some(32 * MIB),
            "the most recent size first"
        );
        // Wanting 64 MiB again makes it the most recent.
        assert!(stock.want(64 * MIB).is_empty());
        assert_eq!(stock.short_size(), Some(64 * MIB));
    }

    #[test]
    fn at_most_max_sizes_the_least_recent_goes() {
        let stock = WarmStock::new(1);
        for i in 1..=MAX_SIZES as u64 {
            stock.want(i * MIB);
        }
        assert_eq!(stock.counts().target, MAX_SIZES);
        stock.want(MIB); // 1 MiB is now the most recent; 2 MiB the least
        stock.want(100 * MIB);
        let sizes = stock.shelves.lock().sizes.clone();
        assert_eq!(sizes.len(), MAX_SIZES);
        assert!(!sizes.contains(&(2 * MIB)), "{sizes:?}");
        assert!(
            sizes.contains(&MIB) && sizes.contains(&(100 * MIB)),
            "{sizes:?}"
        );
    }

    #[test]
    fn a_closed_stock_wants_nothing_more() {
        let stock = WarmStock::new(1);
        stock.want(MIB);
        assert!(stock.close().is_empty());
        assert_eq!(stock.short_size(), None);
        assert!(stock.want(2 * MIB).is_empty());
        assert!(stock.take(MIB).is_none());
        assert_eq!(
            stock.short_size(),
            None,
            "a miss after close stocks nothing"
        );
    }

    /// Whether the refill has a wake-up waiting (consumes it).
    fn woken(stock: &WarmStock) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::select! {
                biased;
                _ = stock.wake.notified() => true,
                _ = std::future::ready(()) => false,
            }
        })
    }

    #[test]
    fn a_miss_wakes_the_refill_at_once() {
        let stock = WarmStock::new(1);
        assert!(!woken(&stock), "nothing to wake for yet");
        assert!(stock.take(MIB).is_none());
        assert!(woken(&stock), "a miss wakes the refill");
        assert!(!woken(&stock), "one wake-up per miss");
    }

    #[test]
    fn warm_claims_are_recognised_and_sandbox_ids_cannot_be_one() {
        assert!(is_warm_claim(".warm-67108864"));
        assert!(!is_warm_claim("warm-67108864"));
        assert!(crate::names::sandbox_id(".warm-1").is_err());
    }
}
