//! The daemon's view of the kernel `/dev/nbdN` pool: availability (the `nbd` module may be
//! absent, and then only the socket provider works), a lazily opened netlink attacher, the reclaim
//! of devices whose owner is gone at start, and the device listing.
//!
//! The daemon is one rootfork instance across restarts: its instance id is kept in the state
//! directory (`nbd-instance-id`), so a daemon restarted in a new pid namespace or container names
//! the same instance in backend identifiers and may take its orphaned devices back at once
//! ([`KernelSide::own_devices`] lists them with their sandboxes for an adoption).
//!
//! [`KernelBackend`] is a test seam: a kernel (sysfs tree, netlink control, device nodes) to use
//! instead of the host's, so the daemon's kernel path runs against rootfork-kernel's fakes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rootfork_kernel::identity::{load_or_create_instance_id, Identity};
use rootfork_kernel::pool::{now_ms, OwnDevice};
use rootfork_kernel::{
    reclaim, Attacher, DeviceNodes, DevicePool, HostNodes, NbdControl, NbdNetlink, PoolConfig,
    PoolError, ReclaimOptions, SlotState,
};
use rootfork_provider::NodePath;

use crate::daemon::model::{DeviceInfo, DeviceList};
use crate::daemon::warm::is_warm_claim;
use crate::error::{DaemonError, Result};
use crate::events::EventBus;

/// A kernel to talk to instead of the host's: a sysfs tree, the `nbd` netlink control and the
/// device nodes. A test seam (`Config::kernel_backend`); production never sets it.
#[derive(Clone)]
pub struct KernelBackend {
    /// Root of the sysfs tree (`block/nbdN`, `module/nbd`).
    pub sysfs_root: PathBuf,
    /// Connect, disconnect, reconfigure.
    pub control: Arc<dyn NbdControl>,
    /// Opening and flushing device nodes.
    pub nodes: Arc<dyn DeviceNodes>,
    /// Slot index → device node path.
    pub node_path: NodePath,
}

impl std::fmt::Debug for KernelBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelBackend")
            .field("sysfs_root", &self.sysfs_root)
            .finish_non_exhaustive()
    }
}

/// The kernel side.
#[derive(Debug)]
pub struct KernelSide {
    pool: DevicePool,
    attacher: OnceLock<std::result::Result<Attacher, String>>,
    backend: Option<KernelBackend>,
}

impl KernelSide {
    /// A pool using `lock_dir` for host-wide claims, as the instance whose id is kept in
    /// `instance_file` (made on first use), on the host's kernel unless `backend` says otherwise;
    /// its events go to `events`.
    pub fn new(
        lock_dir: PathBuf,
        instance_file: &Path,
        events: Arc<EventBus>,
        backend: Option<KernelBackend>,
    ) -> KernelSide {
        let mut config = PoolConfig {
            lock_dir,
            ..PoolConfig::default()
        };
        match load_or_create_instance_id(instance_file).and_then(|id| Identity::this_boot(&id)) {
            Ok(identity) => config.identity = identity,
            // The pool still works; only a restarted daemon will not recognise these devices
            // as its own (others reclaim them after their dead_conn_timeout).
            Err(e) => tracing::warn!(
                "{e}; attaching as a one-off instance {}",
                config.identity.instance
            ),
        }
        if let Some(b) = &backend {
            config.sysfs_root = b.sysfs_root.clone();
        }
        let pool = DevicePool::new(config);
        pool.subscribe(Arc::new(move |e| events.emit_pool(e)));
        let attacher = OnceLock::new();
        if let Some(b) = &backend {
            let _ = attacher.set(Ok(Attacher::new(
                pool.clone(),
                b.control.clone(),
                b.nodes.clone(),
            )));
        }
        KernelSide {
            pool,
            attacher,
            backend,
        }
    }

    /// The slot → device node mapping of a test backend (`None`: `/dev/nbdN`).
    pub fn node_path(&self) -> Option<NodePath> {
        self.backend.as_ref().map(|b| b.node_path.clone())
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
            return Err(DaemonError::KernelUnavailable(why));
        }
        let pool = self.pool.clone();
        self.attacher
            .get_or_init(|| {
                NbdNetlink::open(Duration::from_secs(10))
                    .map(|c| Attacher::new(pool, Arc::new(c), Arc::new(HostNodes)))
                    .map_err(|e| format!("cannot open the kernel's nbd netlink family: {e}"))
            })
            .clone()
            .map_err(DaemonError::KernelUnavailable)
    }

    /// This daemon instance's devices (in this boot), with their sandboxes and whether their
    /// owner is gone: what an adoption after a restart starts from.
    pub fn own_devices(&self) -> std::result::Result<Vec<OwnDevice>, PoolError> {
        self.pool.own_devices()
    }

    /// Checks that the lock directory can be trusted (this user's, not writable by others), when
    /// the kernel path can be used at all.
    pub fn check_lock_dir(&self) -> std::result::Result<(), PoolError> {
        if !self.pool.sysfs().module_loaded() {
            return Ok(());
        }
        self.pool.check_lock_dir()
    }

    /// Cleans up devices and claims whose owner is gone (when the module is loaded): this
    /// instance's at once, others' after their `dead_conn_timeout`.
    pub fn reclaim_dead(&self) {
        if self.unavailable_reason().is_some() {
            return;
        }
        let control: Arc<dyn NbdControl> = match &self.backend {
            Some(b) => b.control.clone(),
            None => match NbdNetlink::open(Duration::from_secs(10)) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    tracing::warn!("not reclaiming nbd devices: {e}");
                    return;
                }
            },
        };
        match reclaim(&self.pool, &*control, &ReclaimOptions::default()) {
            Ok(list) => {
                for r in list.into_iter().filter(|r| r.deferred.is_none()) {
                    tracing::info!(index = r.index, disconnected = ?r.disconnected, cache_removed = ?r.cache_removed, error = ?r.error, "reclaimed an nbd slot of a dead rootfork process");
                }
            }
            Err(e) => tracing::warn!("reclaiming nbd devices: {e}"),
        }
    }

    /// The device listing.
    pub fn list(&self) -> DeviceList {
        if let Some(reason) = self.unavailable_reason() {
            return DeviceList::Unavailable(reason);
        }
        match self.pool.list() {
            Ok(slots) => DeviceList::Available(
                slots
                    .into_iter()
                    .map(|s| DeviceInfo {
                        index: s.index,
                        path: s.device,
                        state: slot_state(s.state, s.sandbox.as_deref()),
                        sandbox: s.sandbox,
                        backend: s.backend,
                        since_unix_ms: s.since_ms.unwrap_or(0) as i64,
                        owner_pid: s.owner_pid,
                    })
                    .collect(),
            ),
            Err(e) => DeviceList::Unavailable(format!("listing nbd slots failed: {e}")),
        }
    }

    /// Whether slot `index` is still connected in sysfs.
    pub fn slot_connected(&self, index: u32) -> std::io::Result<bool> {
        self.pool.sysfs().slot(index).map(|s| s.connected())
    }

    /// Milliseconds now, on the pool's clock.
    pub fn now_ms() -> u64 {
        now_ms()
    }
}

/// A slot's state name for the listing: the pool's, except `warm` for a connected slot of the
/// warm stock (see `daemon/warm.rs`).
fn slot_state(state: SlotState, sandbox: Option<&str>) -> String {
    if state == SlotState::Connected && sandbox.is_some_and(is_warm_claim) {
        return "warm".to_owned();
    }
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}
