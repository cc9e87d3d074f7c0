//! The daemon's view of the kernel `/dev/nbdN` pool: availability (the `nbd` module may be
//! absent, and then only the socket provider works), a lazily opened netlink attacher, the reclaim
//! of this host's dead devices at start, and the device listing.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rootfork_kernel::pool::now_ms;
use rootfork_kernel::{reclaim, Attacher, DevicePool, HostNodes, NbdNetlink, PoolConfig};

use crate::api::v1::{Device, ListDevicesResponse};
use crate::error::{DaemonError, Result};
use crate::events::EventBus;

/// The kernel side.
#[derive(Debug)]
pub struct KernelSide {
    pool: DevicePool,
    attacher: OnceLock<std::result::Result<Attacher, String>>,
}

impl KernelSide {
    /// A pool using `lock_dir` for host-wide claims; its events go to `events`.
    pub fn new(lock_dir: std::path::PathBuf, events: Arc<EventBus>) -> KernelSide {
        let pool = DevicePool::new(PoolConfig {
            lock_dir,
            ..PoolConfig::default()
        });
        pool.subscribe(Arc::new(move |e| events.emit_pool(e)));
        KernelSide {
            pool,
            attacher: OnceLock::new(),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &DevicePool {
        &self.pool
    }

    /// Why kernel devices cannot be used, if they cannot.
    pub fn unavailable_reason(&self) -> Option<String> {
        if !self.pool.sysfs().module_loaded() {
            return Some(format!(
                "the nbd kernel module is not loaded ({} is missing); load it with `modprobe nbd`, or use the socket provider",
                self.pool.sysfs().root().join("module/nbd").display()
            ));
        }
        if let Some(Err(e)) = self.attacher.get() {
            return Some(e.clone());
        }
        None
    }

    /// The attacher (opens the netlink family on first use).
    pub fn attacher(&self) -> Result<Attacher> {
        if let Some(why) = self.unavailable_reason() {
            return Err(DaemonError::Unavailable(why));
        }
        let pool = self.pool.clone();
        self.attacher
            .get_or_init(|| {
                NbdNetlink::open(Duration::from_secs(10))
                    .map(|c| Attacher::new(pool, Arc::new(c), Arc::new(HostNodes)))
                    .map_err(|e| format!("cannot open the kernel's nbd netlink family: {e}"))
            })
            .clone()
            .map_err(DaemonError::Unavailable)
    }

    /// Cleans up this host's devices and claims left by dead rootfork processes (when the
    /// module is loaded).
    pub fn reclaim_dead(&self) {
        if self.unavailable_reason().is_some() {
            return;
        }
        let control = match NbdNetlink::open(Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("not reclaiming nbd devices: {e}");
                return;
            }
        };
        match reclaim(&self.pool, &control, Duration::from_secs(10)) {
            Ok(list) => {
                for r in list {
                    tracing::info!(index = r.index, disconnected = ?r.disconnected, cache_removed = ?r.cache_removed, error = ?r.error, "reclaimed an nbd slot of a dead rootfork process");
                }
            }
            Err(e) => tracing::warn!("reclaiming nbd devices: {e}"),
        }
    }

    /// The device listing.
    pub fn list(&self) -> ListDevicesResponse {
        if let Some(reason) = self.unavailable_reason() {
            return ListDevicesResponse {
                available: false,
                reason,
                devices: vec![],
            };
        }
        match self.pool.list() {
            Ok(slots) => ListDevicesResponse {
                available: true,
                reason: String::new(),
                devices: slots
                    .into_iter()
                    .map(|s| Device {
                        index: s.index,
                        path: s.device.display().to_string(),
                        state: serde_json::to_value(s.state)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        sandbox: s.sandbox.unwrap_or_default(),
                        backend: s.backend.unwrap_or_default(),
                        since_unix_ms: s.since_ms.unwrap_or(0) as i64,
                        owner_pid: s.owner_pid.unwrap_or(0),
                    })
                    .collect(),
            },
            Err(e) => ListDevicesResponse {
                available: false,
                reason: format!("listing nbd slots failed: {e}"),
                devices: vec![],
            },
        }
    }

    /// Whether slot `index` is still connected in sysfs.
    pub fn slot_connected(&self, index: u32) -> std::result::Result<bool, String> {
        self.pool
            .sysfs()
            .slot(index)
            .map(|s| s.connected())
            .map_err(|e| format!("reading sysfs of nbd{index}: {e}"))
    }

    /// Milliseconds now, on the pool's clock.
    pub fn now_ms() -> u64 {
        now_ms()
    }
}
