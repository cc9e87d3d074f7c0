//! The daemon: [`Daemon::start`] prepares the state directory, loads (or builds) templates,
//! reclaims dead kernel devices, serves the gRPC API on its Unix socket (and TCP if asked), the
//! metrics endpoint and the health checker; [`Daemon::shutdown`] stops them and deletes every
//! sandbox.
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
//! | `paused/ID.G.diff` | paused sandboxes' exported changes |
//! | `api.token` | generated bearer token when TCP is on and no token file is given |
//!
//! Sandboxes do not survive a daemon restart: a start removes what a previous run left in
//! `nbd/`, `cache/`, `paused/` and `tmp/`.

pub mod core;
pub mod demo;
pub mod diffmerge;
pub mod health;
pub mod kernel;
pub mod sandbox;
pub mod templates;

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use self::core::{Core, Dirs};
use self::templates::TemplateStore;
use crate::api::v1::{devices_server, events_server, sandboxes_server, templates_server};
use crate::config::Config;
use crate::metrics_http::{self, Bound};
use crate::service::{Api, BearerCheck};

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
    /// Templates could not be loaded or built.
    #[error(transparent)]
    Daemon(#[from] crate::error::DaemonError),
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

fn clean_dir(dir: &Path) -> Result<usize, StartError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let mut n = 0;
    for ent in std::fs::read_dir(dir)
        .map_err(io(format!("reading {}", dir.display())))?
        .flatten()
    {
        let p = ent.path();
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match r {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!(path = %p.display(), "cannot remove a leftover: {e}"),
        }
    }
    Ok(n)
}

fn lock_state(state: &Path) -> Result<nix::fcntl::Flock<File>, StartError> {
    let path = state.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(locked) => Ok(locked),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StartError::Locked(state.to_owned())),
        Err((_, e)) => Err(StartError::Io {
            context: format!("locking {}", path.display()),
            source: e.into(),
        }),
    }
}

fn read_or_make_token(path: &Path, generated: bool) -> Result<String, StartError> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {
            if !generated {
                return Err(StartError::Io {
                    context: format!("token file {} is empty", path.display()),
                    source: std::io::ErrorKind::InvalidData.into(),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && generated => {}
        Err(e) => return Err(io(format!("reading token file {}", path.display()))(e)),
    }
    let mut b = [0u8; 32];
    {
        use std::io::Read;
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(io("reading /dev/urandom"))?;
    }
    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes()))
        .map_err(io(format!("writing token file {}", path.display())))?;
    tracing::info!(token_file = %path.display(), "generated a bearer token for the TCP API");
    Ok(token)
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
        let dirs = Dirs::new(&state);
        let mut leftovers = 0;
        for d in [&dirs.nbd, &dirs.cache, &dirs.paused, &dirs.tmp, &dirs.vm] {
            leftovers += clean_dir(d)?;
        }
        if leftovers > 0 {
            tracing::info!(
                leftovers,
                "removed sockets, caches and diffs of a previous run"
            );
        }
        let templates = TemplateStore::open(&dirs.templates)?;
        let core = Arc::new(Core::new(config.clone(), dirs.clone(), templates));
        if core.templates.is_empty() && config.demo_template {
            let c = core.clone();
            let scratch = dirs.tmp.join("demo");
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&scratch)
                    .map_err(|e| crate::error::DaemonError::io("creating scratch dir", e))?;
                demo::build(&c.templates, &scratch)
            })
            .await
            .map_err(|e| StartError::Io {
                context: "building the demo template".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
        }
        {
            let c = core.clone();
            let _ = tokio::task::spawn_blocking(move || c.kernel.reclaim_dead()).await;
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
        let listener = tokio::net::UnixListener::bind(&sock)
            .map_err(io(format!("binding {}", sock.display())))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("setting the mode of {}", sock.display())))?;
        {
            let api = api.clone();
            let mut rx = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let r = tonic::transport::Server::builder()
                    .add_service(templates_server::TemplatesServer::new(api.clone()))
                    .add_service(sandboxes_server::SandboxesServer::new(api.clone()))
                    .add_service(devices_server::DevicesServer::new(api.clone()))
                    .add_service(events_server::EventsServer::new(api))
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                        let _ = rx.changed().await;
                    })
                    .await;
                if let Err(e) = r {
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
            let check = BearerCheck::new(&token);
            let mut rx = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let r = tonic::transport::Server::builder()
                    .add_service(templates_server::TemplatesServer::with_interceptor(
                        api.clone(),
                        check.clone(),
                    ))
                    .add_service(sandboxes_server::SandboxesServer::with_interceptor(
                        api.clone(),
                        check.clone(),
                    ))
                    .add_service(devices_server::DevicesServer::with_interceptor(
                        api.clone(),
                        check.clone(),
                    ))
                    .add_service(events_server::EventsServer::with_interceptor(api, check))
                    .serve_with_incoming_shutdown(TcpListenerStream::new(l), async move {
                        let _ = rx.changed().await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::error!("API server (tcp) failed: {e}");
                }
            }));
            tracing::info!(%bound, token_file = %token_file.display(), "API also on TCP (bearer token required)");
        }

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

        tasks.push(tokio::spawn(health::run(
            core.clone(),
            config.health_interval,
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

    /// The shared state (for tests and embedding).
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Stops serving, deletes every sandbox and removes the API socket.
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
        self.core.delete_all().await;
        let _ = std::fs::remove_file(&self.api_socket);
        tracing::info!("rootfork daemon stopped");
    }
}
