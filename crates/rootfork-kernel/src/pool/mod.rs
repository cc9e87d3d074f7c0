//! The `/dev/nbdN` device pool: host-wide claims (`flock` per slot), the quiescence rule, a
//! cooldown after release, a rotating start index, move-only leases, a status listing, metrics
//! and events.
//!
//! A slot is handed out only when three things hold at once: this process can take its lock file
//! (no other rootfork process on the host has it), its last orderly release is older than the
//! cooldown, and sysfs shows it quiescent (no `pid`, size 0, `inflight` `0 0`, no holders). The
//! lock is taken *before* sysfs is read, so no other rootfork process can start a connect between
//! the check and the claim.
//!
//! Each claim's record names the pool's rootfork instance (see [`crate::identity`]); reclaim and
//! [`DevicePool::own_devices`] use it to tell this instance's orphans from everyone else's.

mod cache_file;
mod events;
mod lease;
mod lockfile;
mod metrics;
pub(crate) mod own;
mod private_dir;
mod status;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

pub use cache_file::{remove_cache_file, CacheRemoveError};
pub use events::{EventSink, PoolEvent};
pub use lease::Lease;
pub use lockfile::{now_ms, LockDir, LockError, LockRecord, RecordState, SlotLock};
pub use metrics::{HistogramSnapshot, MetricsSnapshot, QuiescenceSkips, LATENCY_BOUNDS_US};
pub use own::OwnDevice;
pub use private_dir::{DirError, PrivateDir, Untrusted};
pub use status::{SlotState, SlotStatus};

use crate::identity::Identity;
use crate::sysfs::{vanishing, Sysfs};
use events::Events;
use metrics::Metrics;

/// Where the pool looks and how it behaves.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Where sysfs is mounted (`/sys`).
    pub sysfs_root: PathBuf,
    /// Directory of the per-slot lock files (`/run/rootfork/nbd`). Every rootfork process on the
    /// host must use the same one; it must be this user's and not writable by others.
    pub lock_dir: PathBuf,
    /// How long a released slot rests before it is handed out again.
    pub cooldown: Duration,
    /// This boot and rootfork instance, as written into backend identifiers and claim records.
    pub identity: Identity,
    /// The only directory whose files a dead claim's record may name for removal (the overlay
    /// cache directory); `None` removes no cache files.
    pub cache_dir: Option<PathBuf>,
}

impl PoolConfig {
    /// The host's sysfs and lock directory as `identity` (the defaults, without making up a new
    /// instance only to replace it).
    pub fn with_identity(identity: Identity) -> Self {
        PoolConfig {
            sysfs_root: PathBuf::from("/sys"),
            lock_dir: PathBuf::from("/run/rootfork/nbd"),
            cooldown: Duration::from_millis(200),
            identity,
            cache_dir: None,
        }
    }
}

impl Default for PoolConfig {
    /// The host's sysfs and lock directory, and a new instance of this boot.
    fn default() -> Self {
        PoolConfig::with_identity(Identity::new_instance().unwrap_or_else(|e| {
            // Only names are lost: the claim lock still decides who is alive.
            tracing::warn!("{e}; naming this instance without the boot id");
            Identity {
                boot: "unknown".into(),
                instance: format!("p{}t{}", std::process::id(), now_ms()),
            }
        }))
    }
}

/// Errors from claiming or listing slots.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// There is no `nbd` module.
    #[error("the nbd kernel module is not loaded ({0} is missing)")]
    ModuleNotLoaded(PathBuf),
    /// Every slot is claimed, cooling down or not quiescent.
    #[error("no free nbd slot among {total}: {busy} claimed, {cooling} cooling down, {not_quiescent} not quiescent")]
    Exhausted {
        /// Slots in the pool.
        total: usize,
        /// Claimed by this or another process.
        busy: usize,
        /// Released within the cooldown.
        cooling: usize,
        /// Refused by the quiescence check.
        not_quiescent: usize,
    },
    /// A lock file or the lock directory is not trusted, or cannot be used.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Reading sysfs failed.
    #[error("nbd pool i/o")]
    Io(#[from] io::Error),
    /// The slot asked for by [`DevicePool::claim_own`] is claimed by a live process (or by
    /// this one).
    #[error("/dev/nbd{index} is claimed by a live process")]
    Held {
        /// The slot.
        index: u32,
    },
}

impl PoolError {
    /// The errno for metrics and the wire.
    pub fn errno(&self) -> i32 {
        match self {
            PoolError::ModuleNotLoaded(_) => libc::ENODEV,
            PoolError::Exhausted { .. } => libc::EBUSY,
            PoolError::Lock(e) => e.errno(),
            PoolError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            PoolError::Held { .. } => libc::EBUSY,
        }
    }
}

/// Why slots were passed over in one claim pass.
#[derive(Debug, Default)]
struct Tally {
    busy: usize,
    cooling: usize,
    not_quiescent: usize,
}

/// What this process knows about a slot it holds.
#[derive(Debug, Clone)]
pub(crate) struct LocalSlot {
    pub(crate) sandbox: String,
    pub(crate) since_ms: u64,
    pub(crate) connected: bool,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cfg: PoolConfig,
    pub(crate) sysfs: Sysfs,
    pub(crate) locks: LockDir,
    next: AtomicU32,
    pub(crate) local: Mutex<BTreeMap<u32, LocalSlot>>,
    /// Held while this process probes a slot's claim lock (locks it, looks, and keeps it or lets
    /// it go): a claim, a reclaim, a listing and an adoption of this process would otherwise
    /// take each other's passing lock for a live owner's (a reclaim then left a dead device
    /// connected; a claim counted the slot busy). Never held across a kernel call.
    pub(crate) probe: Mutex<()>,
    /// Claims kept until the process exits ([`Lease::retain`]).
    pub(crate) retained: Mutex<Vec<SlotLock>>,
    pub(crate) metrics: Metrics,
    pub(crate) events: Events,
}

/// The device pool. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct DevicePool {
    pub(crate) shared: Arc<Shared>,
}

impl DevicePool {
    /// A pool over the slots that sysfs shows.
    pub fn new(cfg: PoolConfig) -> Self {
        let sysfs = Sysfs::new(cfg.sysfs_root.clone());
        let locks = LockDir::new(cfg.lock_dir.clone());
        DevicePool {
            shared: Arc::new(Shared {
                cfg,
                sysfs,
                locks,
                next: AtomicU32::new(0),
                local: Mutex::new(BTreeMap::new()),
                probe: Mutex::new(()),
                retained: Mutex::new(Vec::new()),
                metrics: Metrics::default(),
                events: Events::default(),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.cfg
    }

    /// The pool's sysfs view.
    pub fn sysfs(&self) -> &Sysfs {
        &self.shared.sysfs
    }

    /// The pool's lock directory.
    pub fn locks(&self) -> &LockDir {
        &self.shared.locks
    }

    /// Creates the lock directory if needed and checks that it can be trusted (this user's, not
    /// writable by others, not a symlink). Run it at start to refuse early with a clear error.
    pub fn check_lock_dir(&self) -> Result<(), PoolError> {
        Ok(self.shared.locks.check()?)
    }

    /// The claim record this pool writes for `sandbox`.
    pub(crate) fn claim_record(&self, sandbox: &str) -> LockRecord {
        LockRecord {
            instance: Some(self.shared.cfg.identity.instance.clone()),
            ..LockRecord::now(RecordState::Claimed, sandbox)
        }
    }

    /// Removes a dead claim's cache file if it is one of this pool's (see `cache_file.rs`).
    pub(crate) fn remove_dead_cache(
        &self,
        cache: &std::path::Path,
    ) -> Result<bool, CacheRemoveError> {
        remove_cache_file(self.shared.cfg.cache_dir.as_deref(), cache)
    }

    /// Calls `sink` for every future event.
    pub fn subscribe(&self, sink: EventSink) {
        self.shared.events.subscribe(sink);
    }

    /// Events as a channel.
    pub fn events(&self) -> std::sync::mpsc::Receiver<PoolEvent> {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        self.subscribe(Arc::new(move |e: &PoolEvent| {
            let _ = tx.lock().send(e.clone());
        }));
        rx
    }

    pub(crate) fn emit(&self, ev: PoolEvent) {
        self.shared.events.emit(ev);
    }

    /// Records a successful attach's claim-to-connected latency.
    pub fn record_connect_latency(&self, d: Duration) {
        self.shared.metrics.connect_latency.observe(d);
    }

    /// Records a failed attach.
    pub fn record_failure(&self, errno: i32) {
        self.shared.metrics.failure(errno);
    }

    /// Records that a slot was not quiescent right after its `DISCONNECT` returned.
    pub(crate) fn record_teardown_pending(&self, why: crate::sysfs::NotQuiescent) {
        self.shared.metrics.teardown_pending(why);
    }

    pub(crate) fn record_reclaimed(&self) {
        self.shared
            .metrics
            .reclaimed_total
            .fetch_add(1, Ordering::Relaxed);
    }

    fn slots(&self) -> Result<Vec<u32>, PoolError> {
        if !self.shared.sysfs.module_loaded() {
            return Err(PoolError::ModuleNotLoaded(
                self.shared.sysfs.root().join("module/nbd"),
            ));
        }
        Ok(self.shared.sysfs.pool_indices()?)
    }

    fn cooling(&self, rec: Option<&LockRecord>) -> bool {
        rec.is_some_and(|r| {
            r.state == RecordState::Released
                && now_ms().saturating_sub(r.since_ms) < self.shared.cfg.cooldown.as_millis() as u64
        })
    }

    /// Claims a free, quiescent slot for `sandbox`, starting after the previously claimed one.
    ///
    /// The cooldown is a preference: slots released within it are taken only when no other slot
    /// is free (they still have to pass the quiescence check).
    pub fn claim(&self, sandbox: &str) -> Result<Lease, PoolError> {
        let slots = self.slots()?;
        let m = &self.shared.metrics;
        let start = self.shared.next.fetch_add(1, Ordering::Relaxed) as usize;
        let mut tally = Tally::default();
        if let Some(l) = self.claim_pass(&slots, start, sandbox, false, &mut tally)? {
            return Ok(l);
        }
        if tally.cooling > 0 {
            let mut again = Tally::default();
            if let Some(l) = self.claim_pass(&slots, start, sandbox, true, &mut again)? {
                return Ok(l);
            }
            tally = again;
        }
        m.exhausted_total.fetch_add(1, Ordering::Relaxed);
        Err(PoolError::Exhausted {
            total: slots.len(),
            busy: tally.busy,
            cooling: tally.cooling,
            not_quiescent: tally.not_quiescent,
        })
    }

    fn claim_pass(
        &self,
        slots: &[u32],
        start: usize,
        sandbox: &str,
        allow_cooling: bool,
        tally: &mut Tally,
    ) -> Result<Option<Lease>, PoolError> {
        let n = slots.len();
        let m = &self.shared.metrics;
        for k in 0..n {
            let pos = (start + k) % n;
            let index = slots[pos];
            let _probe = self.shared.probe.lock();
            if self.shared.local.lock().contains_key(&index) {
                tally.busy += 1;
                continue;
            }
            let Some(mut lock) = self.shared.locks.try_lock(index)? else {
                tally.busy += 1;
                m.busy_skips.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let rec = lock.read();
            if !allow_cooling && self.cooling(rec.as_ref()) {
                tally.cooling += 1;
                m.cooling_skips.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let st = match self.shared.sysfs.slot(index) {
                Ok(st) => st,
                // Gone, or an attribute removed by a teardown while we read it: not this one.
                Err(e) if vanishing(&e) => {
                    tally.not_quiescent += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if let Err(why) = st.check_quiescent() {
                tracing::debug!(index, %why, "nbd slot not quiescent, skipped");
                tally.not_quiescent += 1;
                m.not_quiescent(why);
                continue;
            }
            // A claim whose owner died before connecting (or after a clean disconnect but before
            // releasing) may have left its cache file behind.
            if let Some(r) = rec.filter(|r| r.state == RecordState::Claimed) {
                if let Some(cache) = &r.cache {
                    match self.remove_dead_cache(cache) {
                        Ok(true) => {
                            tracing::info!(index, cache = %cache.display(), "removed a dead claim's cache file")
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(index, "not removing a dead claim's cache file: {e}")
                        }
                    }
                }
                self.record_reclaimed();
                self.emit(PoolEvent::Reclaimed {
                    index,
                    backend: None,
                });
            }
            let lease = self.take_claim(index, lock, sandbox)?;
            self.shared.next.store(pos as u32 + 1, Ordering::Relaxed);
            return Ok(Some(lease));
        }
        Ok(None)
    }

    /// Makes slot `index`, whose lock this process holds, `sandbox`'s: the claim record
    /// written, the slot known as this process's, counted and reported.
    pub(crate) fn take_claim(
        &self,
        index: u32,
        mut lock: SlotLock,
        sandbox: &str,
    ) -> Result<Lease, PoolError> {
        let rec = self.claim_record(sandbox);
        let since_ms = rec.since_ms;
        lock.write(&rec)?;
        self.shared.local.lock().insert(
            index,
            LocalSlot {
                sandbox: sandbox.to_owned(),
                since_ms,
                connected: false,
            },
        );
        let m = &self.shared.metrics;
        m.claimed.fetch_add(1, Ordering::Relaxed);
        m.claims_total.fetch_add(1, Ordering::Relaxed);
        self.emit(PoolEvent::Claimed {
            index,
            sandbox: sandbox.to_owned(),
        });
        Ok(Lease::new(self.clone(), index, sandbox.to_owned(), lock))
    }

    /// The pool's metrics, with `ready` counted from a fresh scan.
    pub fn metrics(&self) -> MetricsSnapshot {
        let list = self.list().unwrap_or_default();
        let ready = list.iter().filter(|s| s.state == SlotState::Free).count() as u64;
        self.shared.metrics.snapshot(ready, list.len() as u64)
    }
}

#[cfg(test)]
mod tests;
