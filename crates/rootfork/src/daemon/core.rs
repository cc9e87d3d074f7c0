//! The daemon's shared state ([`Core`]) and the few helpers every operation uses: finding a
//! sandbox, changing its state (with an event), and recording a failed operation in the metrics.
//! The operations themselves are in `actions.rs` (the entry points) and the modules they hand
//! off to.
//!
//! Locking: `templates.map` is taken before `sandboxes` whenever both are needed, so a template
//! cannot be deleted between a create's existence check and the sandbox's registration (which is
//! what makes the template's reference count exact). Each sandbox's `live` lock is held for the
//! whole of an operation on it and never while taking the maps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::daemon::builds::Builds;
use crate::daemon::kernel::KernelSide;
use crate::daemon::lifecycle::Tombstones;
use crate::daemon::model::SandboxState;
use crate::daemon::records::Records;
use crate::daemon::sandbox::Sandbox;
use crate::daemon::shared::SharedFiles;
use crate::daemon::stats::ClosedTotals;
use crate::daemon::templates::TemplateStore;
use crate::daemon::warm::WarmStock;
use crate::error::{DaemonError, Result};
use crate::events::{EventBus, EventKind};
use crate::metrics::Metrics;

/// Directories under the state directory.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// Template records.
    pub templates: PathBuf,
    /// The build store: templates' base builds and pauses' layers.
    pub store: PathBuf,
    /// The chunk cache of builds read from the object store (`--store`).
    pub chunk_cache: PathBuf,
    /// Per-sandbox NBD sockets.
    pub nbd: PathBuf,
    /// Overlay cache files.
    pub cache: PathBuf,
    /// Paused sandboxes' VM states (and the diffs of daemons before the build store, migrated
    /// at start).
    pub paused: PathBuf,
    /// Scratch space.
    pub tmp: PathBuf,
    /// VM consoles, QEMU logs and QMP sockets.
    pub vm: PathBuf,
    /// Sandbox records.
    pub sandboxes: PathBuf,
}

impl Dirs {
    /// The layout under `state`.
    pub fn new(state: &Path) -> Dirs {
        Dirs {
            templates: state.join("templates"),
            store: state.join("store"),
            chunk_cache: state.join("chunk-cache"),
            nbd: state.join("nbd"),
            cache: state.join("cache"),
            paused: state.join("paused"),
            tmp: state.join("tmp"),
            vm: state.join("vm"),
            sandboxes: state.join("sandboxes"),
        }
    }

    /// The directories whose contents belong to one daemon run (paused diffs and overlay
    /// caches outlive it: the sandbox records say which are kept).
    pub fn per_run(&self) -> [&Path; 3] {
        [&self.nbd, &self.tmp, &self.vm]
    }
}

/// Everything the daemon shares between its tasks.
#[derive(Debug)]
pub struct Core {
    /// The configuration.
    pub config: Config,
    /// Directories.
    pub dirs: Dirs,
    /// Templates.
    pub templates: TemplateStore,
    /// The build store and which builds are in use.
    pub builds: Builds,
    /// The object store shared with other hosts (`--store`).
    pub remote: Option<crate::daemon::remote::Remote>,
    /// Sandboxes by id (live ones and recent tombstones).
    pub sandboxes: parking_lot::RwLock<BTreeMap<String, Arc<Sandbox>>>,
    /// Deleted sandboxes kept for late calls.
    pub(crate) tombstones: Tombstones,
    /// Durable sandbox records.
    pub(crate) records: Records,
    /// The users of files several sandboxes share (a parent's paused diff and its forks).
    pub shared: SharedFiles,
    /// The event feed.
    pub events: Arc<EventBus>,
    /// Metrics.
    pub metrics: Metrics,
    /// The kernel pool.
    pub kernel: KernelSide,
    /// Pre-connected kernel devices (`kernel.warm_slots` > 0).
    pub warm: Option<Arc<WarmStock>>,
    /// Counters of providers that have been closed.
    pub(crate) closed: ClosedTotals,
    /// Numbers for socket and QMP file names.
    seq: AtomicU64,
    /// NBD connections over every socket export.
    pub nbd_connections: Arc<rootfork_nbd::ConnectionBudget>,
    /// NBD buffer bytes in flight over every sandbox (socket and kernel).
    pub nbd_bytes: Arc<rootfork_nbd::ByteBudget>,
}

impl Core {
    /// Shared state over an opened template store.
    pub fn new(
        config: Config,
        dirs: Dirs,
        builds: Builds,
        templates: TemplateStore,
        records: Records,
    ) -> Core {
        let events = Arc::new(EventBus::default());
        if config.fault_injection {
            tracing::warn!(
                triggers = %config.state_dir.join("faults").display(),
                "debug.fault_injection is on: for testing recovery only"
            );
        }
        let kernel = KernelSide::new(
            config.nbd_lock_dir.clone(),
            &config.state_dir.join("nbd-instance-id"),
            events.clone(),
            config.seams.kernel_backend.clone(),
        );
        // Whatever the count, connections never take the descriptors kept for the daemon.
        let nbd_connections = rootfork_nbd::ConnectionBudget::keeping_fds_free(
            config
                .max_connections
                .unwrap_or_else(crate::daemon::limits::default_connection_budget),
            crate::daemon::limits::FD_RESERVE,
        );
        let nbd_bytes = rootfork_nbd::ByteBudget::new(config.max_inflight_bytes);
        // Fault injection needs a handle on each connection's socket, which a stocked device was
        // connected without: with it on, every kernel create attaches cold and nothing is stocked.
        if config.kernel_warm_slots > 0 && config.fault_injection {
            tracing::warn!("kernel.warm_slots is ignored while debug.fault_injection is on");
        }
        let warm = (config.kernel_warm_slots > 0 && !config.fault_injection)
            .then(|| WarmStock::new(config.kernel_warm_slots));
        let remote = builds.remote().map(|store| {
            let prefix = match &config.store_url {
                Some(u) => u.backend().1,
                None => String::new(),
            };
            let id = rootfork_kernel::identity::load_or_create_instance_id(
                &config.state_dir.join("nbd-instance-id"),
            )
            .unwrap_or_else(|e| {
                tracing::warn!("no instance id for the object store's holder records: {e}");
                format!("unknown-{}", std::process::id())
            });
            crate::daemon::remote::Remote::new(
                store.clone(),
                &prefix,
                crate::daemon::remote::Holder {
                    id,
                    host: crate::daemon::remote::host_name(),
                },
            )
        });
        Core {
            remote,
            config,
            dirs,
            builds,
            templates,
            sandboxes: Default::default(),
            tombstones: Default::default(),
            records,
            shared: SharedFiles::default(),
            events,
            metrics: Metrics::new(),
            kernel,
            warm,
            closed: Default::default(),
            seq: AtomicU64::new(0),
            nbd_connections,
            nbd_bytes,
        }
    }

    /// A number not handed out before in this run.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands out only numbers above `n` from now on (`n` names a file an adopted sandbox
    /// still uses).
    pub(crate) fn skip_seq_past(&self, n: u64) {
        self.seq.fetch_max(n.saturating_add(1), Ordering::Relaxed);
    }

    /// Counts a failed operation under `op` (by errno) and passes the result on.
    pub(crate) fn recorded<T>(&self, op: &'static str, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.metrics.error(op, e.errno());
            if !e.is_bad_input() {
                tracing::debug!(op, "{e}");
            }
        }
        r
    }

    /// A sandbox by id (live or a recent tombstone).
    pub(crate) fn lookup(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.sandboxes.read().get(id).cloned()
    }

    /// A sandbox by id, or `SandboxNotFound`.
    pub(crate) fn find(&self, id: &str) -> Result<Arc<Sandbox>> {
        self.lookup(id)
            .ok_or_else(|| DaemonError::SandboxNotFound(id.into()))
    }

    /// Moves a sandbox to `state` (with `message`, if given) and tells the event feed.
    pub(crate) fn set_state(&self, sb: &Sandbox, state: SandboxState, message: Option<String>) {
        sb.update(|s| {
            s.state = state;
            if matches!(state, SandboxState::Paused | SandboxState::Deleted) {
                s.vm_lost = false;
            }
            if let Some(m) = &message {
                s.message.clone_from(m);
            }
        });
        let mut ev = EventBus::event(EventKind::Sandbox)
            .sandbox(&sb.id)
            .state(state);
        if let Some(m) = message {
            ev = ev.message(m);
        }
        self.events.emit(ev);
    }

    /// Sandboxes (not deleted) per template.
    pub fn template_refs(&self) -> BTreeMap<String, u32> {
        let mut m = BTreeMap::new();
        for s in self.sandboxes.read().values().filter(|s| s.is_live()) {
            *m.entry(s.template.clone()).or_default() += 1;
        }
        m
    }

    /// Fault-injection triggers (`debug.fault_injection`).
    pub fn faults_dir(&self) -> PathBuf {
        self.config.state_dir.join("faults")
    }

    /// Time left of the health probe bound.
    pub fn probe_timeout(&self) -> Duration {
        self.config.probe_timeout
    }

    /// How long a request may wait for the server before the health check fails.
    pub fn stuck_request(&self) -> Duration {
        self.config.stuck_request
    }
}
