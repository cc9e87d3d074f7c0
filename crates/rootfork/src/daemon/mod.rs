//! The daemon: [`Daemon::start`] prepares the state directory, loads (or builds) templates,
//! reclaims dead kernel devices, serves the gRPC API on its Unix socket (and TCP if asked), the
//! metrics endpoint and the health checker; [`Daemon::shutdown`] stops them and keeps every
//! sandbox for the next start (or deletes them all with `delete_on_exit`).
//!
//! State directory layout (mode 0700):
//!
//! | path | what |
//! |---|---|
//! | `api.sock` | the API (0600) |
//! | `daemon.lock` | `flock`ed while a daemon uses the directory |
//! | `templates/NAME.img`, `NAME.json` | templates (images 0444) and their records |
//! | `nbd/N.sock` | per-sandbox NBD sockets (socket provider) |
//! | `cache/ID.G.cache` | overlay cache files |
//! | `paused/ID.G.diff` | paused sandboxes' exported changes (also read by their forks) |
//! | `paused/ID.G.vmstate` | paused sandboxes' VM memory and device state (a QEMU VM paused live) |
//! | `sandboxes/ID.json` | sandbox records (written atomically at every lifecycle change) |
//! | `format` | the state directory's format version |
//! | `api.token` | generated bearer token when TCP is on and no token file is given |
//!
//! Sandboxes survive a restart: each sandbox has a durable record in `sandboxes/`; a stop
//! (SIGTERM) hands the running socket sandboxes over (flushed, files kept, still running) and
//! pauses the others; a start restores every recorded sandbox and serves the running socket
//! ones again on the same socket (`persist.rs`, `adopt.rs`). A start removes what a previous
//! run left in `nbd/`, `tmp/` and `vm/`, and the files in `cache/` and `paused/` no record owns.
//! The directory's format is versioned (`format`).
//!
//! The daemon by concern:
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | start (state directory, listeners, tasks) and shutdown |
//! | `state_dir.rs` | the directory lock, per-run leftovers, the TCP token file |
//! | `core.rs` | the shared state and the helpers every operation uses |
//! | `actions.rs` | the operations' entry points, each handing off to its owner below |
//! | `spec.rs` | validated create requests (sandbox and VM specs) and their errors |
//! | `model.rs` | states and the views the operations return |
//! | `templates/` | the template store and import / list / delete |
//! | `lifecycle.rs` | sandbox create and delete, tombstones |
//! | `disk.rs` | a sandbox's provider: build, bring up, retire |
//! | `pause.rs` | pause and resume (as layers of the build store) |
//! | `builds.rs` | the build store: templates as base builds, pauses as layers, collection of unused builds |
//! | `migrate.rs` | older records' paused diffs turned into layers at start |
//! | `fork.rs` | fork: new sandboxes from a paused one's layers and VM snapshot |
//! | `shared.rs` | files several sandboxes use (a parent's VM state and its forks), counted from the records |
//! | `records.rs`, `persist.rs` | durable sandbox records; restore at start, keep at stop |
//! | `adopt.rs` | serving a running socket sandbox of a previous run again at start |
//! | `vm.rs` | booting, restoring and stopping the sandbox's VM (QEMU, or Firecracker: `firecracker.rs`) |
//! | `snapshot.rs` | a running VM's state saved by a pause, restored by a resume |
//! | `sandbox.rs` | one sandbox's record: identity, status, live resources |
//! | `health.rs` | the periodic health check and recovery |
//! | `kernel.rs` | the kernel `/dev/nbdN` pool as the daemon sees it |
//! | `limits.rs` | admission: `limits.max_sandboxes`, file descriptors (`RLIMIT_NOFILE`) |
//! | `stats.rs` | metrics recording: closed-provider totals, the scrape snapshot |
//! | `demo.rs` | the demo template of a first start |
//! | `notify.rs` | systemd notifications: `READY=1`, `STOPPING=1`, the watchdog tied to the health loop |
//!
//! The gRPC edge is `crate::service`: it turns wire messages into these types and back.

mod actions;
mod adopt;
pub mod builds;
pub mod core;
pub mod demo;
mod disk;
mod firecracker;
pub mod fork;
pub mod health;
pub mod kernel;
mod lifecycle;
pub mod limits;
mod migrate;
pub mod model;
pub mod notify;
mod pause;
mod persist;
pub mod records;
pub mod remote;
pub mod sandbox;
pub mod shared;
pub mod snapshot;
pub mod spec;
mod start;
mod state_dir;
mod stats;
pub mod templates;
mod vm;
mod vm_adopt;
pub mod warm;

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use crate::paced_incoming::PacedIncoming;

use self::core::{Core, Dirs};
use self::state_dir::{clean_dir, lock_state, read_or_make_token};
use self::templates::TemplateStore;
use crate::config::Config;
use crate::metrics_http::{self, Bound};
use crate::service::{self, Access, Api};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another daemon uses the state directory.
    #[error("another rootfork daemon is using state directory {0} (its lock is held)")]
    Locked(PathBuf),
    /// Something already listens on the API socket.
    #[error("something is already listening on {0}; is another rootfork daemon running?")]
    InUse(PathBuf),
    /// I/O while preparing.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The state directory was written by a newer daemon.
    #[error("state directory {dir} has format {found}; this daemon reads up to {supported} (a downgrade cannot read it)")]
    NewerFormat {
        /// The directory.
        dir: PathBuf,
        /// Its format.
        found: u32,
        /// The newest this daemon reads.
        supported: u32,
    },
    /// Templates could not be loaded or built.
    #[error(transparent)]
    Daemon(#[from] crate::error::DaemonError),
    /// The nbd lock directory cannot be trusted or used.
    #[error("the nbd lock directory: {0}")]
    LockDir(#[source] rootfork_kernel::PoolError),
    /// The object store (`--store`) cannot be used.
    #[error("the object store {url}: {source}")]
    Store {
        /// The store's URL.
        url: String,
        /// Why.
        #[source]
        source: rootfork_store::StoreError,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let context = context.into();
    move |source| StartError::Io { context, source }
}

/// A running daemon.
pub struct Daemon {
    core: Arc<Core>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    api_socket: PathBuf,
    tcp: Option<SocketAddr>,
    metrics: Option<Bound>,
    health_heartbeat: watch::Receiver<std::time::Instant>,
    _lock: nix::fcntl::Flock<File>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("api_socket", &self.api_socket)
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Starts a daemon with `config` on the current Tokio runtime.
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
        let state = config.state_dir.clone();
        std::fs::create_dir_all(&state)
            .map_err(io(format!("creating state directory {}", state.display())))?;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("setting the mode of {}", state.display())))?;
        let lock = lock_state(&state)?;
        state_dir::check_format(&state)?;
        limits::raise_nofile();
        let dirs = Dirs::new(&state);
        let records = records::Records::open(&dirs.sandboxes)
            .map_err(io(format!("opening {}", dirs.sandboxes.display())))?;
        // A running sandbox's VM outlived the previous run: its QMP socket, console and log
        // (QEMU) or its run directory in `vm/fc/` (Firecracker) stay for the adoption.
        let vm_files = records.load().map(|l| l.vm_files()).unwrap_or_default();
        let mut leftovers = 0;
        for d in dirs.per_run() {
            leftovers += clean_dir(d, &vm_files)?;
        }
        if leftovers > 0 {
            tracing::info!(
                leftovers,
                "removed sockets and scratch files of a previous run"
            );
        }
        std::fs::create_dir_all(&dirs.cache)
            .map_err(io(format!("creating {}", dirs.cache.display())))?;
        let remote = match &config.store_url {
            Some(url) => Some(remote::connect(url, &dirs, config.store_cache_bytes)?),
            None => None,
        };
        let builds = builds::Builds::new(&dirs.store, config.store_max_layers, remote);
        let templates = TemplateStore::open(&dirs.templates, builds.store(), builds.resolver())?;
        std::fs::create_dir_all(&dirs.paused)
            .map_err(io(format!("creating {}", dirs.paused.display())))?;
        let core = Arc::new(Core::new(
            config.clone(),
            dirs.clone(),
            builds,
            templates,
            records,
        ));
        let restored = persist::restore(&core).await?;
        if restored > 0 {
            tracing::info!(restored, "restored the sandboxes of a previous run");
        }
        if core.templates.is_empty() && config.demo_template {
            let c = core.clone();
            let scratch = dirs.tmp.join("demo");
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&scratch)
                    .map_err(|e| crate::error::DaemonError::io("creating scratch dir", e))?;
                demo::build(&c.templates, &scratch)
            })
            .await
            .map_err(|e| crate::error::DaemonError::task("building the demo template", e))??;
        }
        core.kernel.check_lock_dir().map_err(StartError::LockDir)?;
        {
            // In the background: reclaim waits for the kernel's teardowns, and the API need not.
            // After `restore`: the devices of adopted kernel sandboxes are claimed again by now
            // (reclaim passes over them), those that could not be adopted were released.
            let c = core.clone();
            drop(tokio::task::spawn_blocking(move || c.kernel.reclaim_dead()));
        }
        if let Some(why) = core.kernel.unavailable_reason() {
            tracing::info!("kernel provider unavailable: {why}");
        }

        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let api = Api::new(core.clone());

        // The Unix socket API.
        let sock = config.api_socket.clone();
        if let Some(parent) = sock.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        if sock.exists() {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                return Err(StartError::InUse(sock));
            }
            std::fs::remove_file(&sock)
                .map_err(io(format!("removing stale socket {}", sock.display())))?;
        }
        let listener = crate::unix_listener::bind_with_mode(&sock, 0o600)
            .map_err(io(format!("binding {}", sock.display())))?;
        {
            let (api, mut rx) = (api.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(async move {
                let incoming = PacedIncoming::new("api (unix)", UnixListenerStream::new(listener));
                let stop = async move {
                    let _ = rx.changed().await;
                };
                if let Err(e) = service::serve(api, Access::Local, incoming, stop).await {
                    tracing::error!("API server (unix) failed: {e}");
                }
            }));
        }

        // TCP, with a bearer token.
        let mut tcp = None;
        if let Some(addr) = config.api_tcp {
            let token_file = config
                .token_file
                .clone()
                .unwrap_or_else(|| state.join("api.token"));
            let generated = config.token_file.as_deref() == Some(&state.join("api.token"));
            let token = read_or_make_token(&token_file, generated)?;
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(format!("binding TCP {addr}")))?;
            let bound = l.local_addr().map_err(io("TCP local address"))?;
            tcp = Some(bound);
            let mut rx = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let incoming = PacedIncoming::new("api (tcp)", TcpListenerStream::new(l));
                let stop = async move {
                    let _ = rx.changed().await;
                };
                if let Err(e) = service::serve(api, Access::bearer(&token), incoming, stop).await {
                    tracing::error!("API server (tcp) failed: {e}");
                }
            }));
            tracing::info!(%bound, token_file = %token_file.display(), "API also on TCP (bearer token required)");
        }

        // Unused builds are removed in the background after pauses and deletes.
        // Pauses go up to the object store in the background (with --store).
        tasks.push(tokio::spawn(remote::uploader(
            core.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(remote::gc::periodic(
            core.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(builds::collector(
            core.clone(),
            stop_rx.clone(),
        )));

        let metrics = match metrics_http::start(&config.metrics, core.clone(), stop_rx.clone())
            .await
            .map_err(io("starting the metrics endpoint"))?
        {
            Some((bound, task)) => {
                tasks.push(task);
                tracing::info!(endpoint = ?bound, "Prometheus metrics at /metrics");
                Some(bound)
            }
            None => None,
        };

        if let Some(stock) = &core.warm {
            if core.kernel.unavailable_reason().is_none() {
                tasks.push(tokio::spawn(warm::run(
                    core.clone(),
                    stock.clone(),
                    stop_rx.clone(),
                )));
            }
        }
        let (heartbeat, health_heartbeat) = watch::channel(std::time::Instant::now());
        tasks.push(tokio::spawn(health::run(
            core.clone(),
            config.health_interval,
            heartbeat,
            stop_rx,
        )));

        tracing::info!(api = %sock.display(), state_dir = %state.display(), "rootfork daemon ready");
        let default_sock = crate::client::default_api_socket();
        let api_flag = if default_sock == sock {
            String::new()
        } else {
            format!("--api {} ", sock.display())
        };
        let names: Vec<String> = core.templates.list().into_iter().map(|t| t.name).collect();
        let example = names.first().cloned().unwrap_or_else(|| "NAME".into());
        tracing::info!(
            "templates: [{}]; create a sandbox with: rootfork {api_flag}sandbox create --template {example}",
            names.join(", ")
        );
        Ok(Daemon {
            core,
            stop,
            tasks,
            api_socket: sock,
            tcp,
            metrics,
            health_heartbeat,
            _lock: lock,
        })
    }

    /// The API's Unix socket.
    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    /// The TCP API address, if on.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The metrics endpoint, if on.
    pub fn metrics_endpoint(&self) -> Option<&Bound> {
        self.metrics.as_ref()
    }

    /// When the health loop last showed progress (the end of a sandbox's check or of a round):
    /// what the service watchdog's keep-alives are tied to (`notify.rs`).
    pub fn health_heartbeat(&self) -> watch::Receiver<std::time::Instant> {
        self.health_heartbeat.clone()
    }

    /// The shared state (for tests and embedding).
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Stops serving and keeps every sandbox for the next start (running sandboxes that can be
    /// adopted are handed over with their VMs left running, the others paused; with `delete_on_exit` every sandbox is deleted instead),
    /// then removes the API socket.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(3), t)
                .await
                .is_err()
            {
                // Long-lived streams (event watchers) keep a graceful shutdown waiting.
                abort.abort();
            }
        }
        // The refill task closes the stock when it stops; a task cut short leaves it here.
        if let Some(stock) = &self.core.warm {
            warm::close_all(stock).await;
        }
        if self.core.config.delete_on_exit {
            self.core.delete_all().await;
        } else {
            let (handed_over, paused) = persist::keep_all(&self.core).await;
            tracing::info!(
                handed_over,
                paused,
                "sandboxes kept for the next start (running ones handed over, the rest paused)"
            );
        }
        let _ = std::fs::remove_file(&self.api_socket);
        tracing::info!("rootfork daemon stopped");
    }
}
