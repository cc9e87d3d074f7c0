//! The socket provider: a copy-on-write overlay served by rootfork's NBD server on a per-sandbox
//! Unix socket.
//!
//! This is the provider for QEMU (its built-in NBD client connects to the socket) and for hosts
//! without the `nbd` kernel module. `path()` returns an [`NbdEndpoint`], which is not a file path,
//! so it cannot be confused with the template's path or a device node.
//!
//! Attach (in the background): open the base read-only → create the overlay's cache file (or,
//! for a provider [reopening](SocketProvider::reopening_cache) a kept one, reopen it with its
//! block state) → bind the socket and start serving → ready. Close: stop accepting and drain the
//! connections → flush the overlay → drop it (its cache file is removed unless kept) → remove
//! the socket. A [hand-over](SocketProvider::hand_over) stops the same way for a daemon restart,
//! without refusing any request.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rootfork_block::{BlockDevice, Overlay, OverlayOptions, ReopenReport};
use rootfork_nbd::{ServeOptions, StatsSnapshot};
use rootfork_vmm::qemu::NbdEndpoint;
use tokio::task::JoinHandle;

use crate::error::{ProviderError, Result};
use crate::export::ExportServer;
use crate::pause::{BaseImage, PausedDisk};
use crate::provider::{Provider, ProviderKind};
use crate::readiness::{Readiness, State};

/// What a socket provider serves and where.
#[derive(Debug, Clone)]
pub struct SocketConfig {
    /// The template (or template + paused diff) the overlay is stacked on.
    pub base: BaseImage,
    /// The Unix socket to serve on (must not exist yet).
    pub socket: PathBuf,
    /// The export name (usually the sandbox id).
    pub export: String,
    /// The overlay's cache file (must not exist yet).
    pub cache: PathBuf,
    /// Overlay options.
    pub overlay: OverlayOptions,
}

/// The function a [`DeviceWrapper`] applies.
pub type WrapFn = dyn Fn(Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> + Send + Sync;

/// Wraps the overlay before it is served (a test seam: e.g. a device whose reads can be held).
#[derive(Clone)]
pub struct DeviceWrapper(pub Arc<WrapFn>);

impl std::fmt::Debug for DeviceWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceWrapper")
    }
}

/// The live parts of an attached socket provider.
struct Running {
    overlay: Arc<Overlay>,
    server: ExportServer,
}

/// A per-sandbox NBD export on a Unix socket.
pub struct SocketProvider {
    config: Box<SocketConfig>,
    readiness: Arc<Readiness<NbdEndpoint>>,
    running: Arc<Mutex<Option<Running>>>,
    /// The NBD server's final counters, kept after a graceful close.
    closed_stats: Mutex<Option<StatsSnapshot>>,
    task: Option<JoinHandle<()>>,
    wrap: Option<DeviceWrapper>,
    serve: Box<ServeOptions>,
    /// Reopen the kept cache file instead of creating one.
    reopen: bool,
    /// What the reopen found, once attached.
    reopened: Arc<Mutex<Option<ReopenReport>>>,
}

impl std::fmt::Debug for SocketProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketProvider")
            .field("config", &self.config)
            .field("state", &self.readiness.current())
            .finish_non_exhaustive()
    }
}

impl SocketProvider {
    /// A provider for `config` (nothing happens until [`Provider::start`]).
    pub fn new(config: SocketConfig) -> Self {
        SocketProvider {
            config: Box::new(config),
            readiness: Arc::new(Readiness::new()),
            running: Arc::new(Mutex::new(None)),
            closed_stats: Mutex::new(None),
            task: None,
            wrap: None,
            serve: Box::default(),
            reopen: false,
            reopened: Arc::new(Mutex::new(None)),
        }
    }

    /// Reopens the overlay kept at the configured cache path (cache file and block state, as a
    /// provider whose overlay kept them left them: [`SocketProvider::hand_over`], or a process
    /// that died) instead of creating a new one: a restarted daemon serving a running sandbox's
    /// disk again. The base must be the one the overlay was created over.
    pub fn reopening_cache(mut self) -> Self {
        self.reopen = true;
        self
    }

    /// Whether this provider reopens a kept cache ([`SocketProvider::reopening_cache`]).
    pub fn reopens_cache(&self) -> bool {
        self.reopen
    }

    /// What reopening the kept cache found, once attached (`None` for a new cache).
    pub fn reopen_report(&self) -> Option<ReopenReport> {
        *lock(&self.reopened)
    }

    /// Serves the export with `opts` (connection limits, a shared connection budget, ...)
    /// instead of the defaults.
    pub fn with_serve_options(mut self, opts: ServeOptions) -> Self {
        self.serve = Box::new(opts);
        self
    }

    /// Serves `wrap(overlay)` instead of the overlay itself. A test seam (for making requests
    /// hang on purpose); production code never sets it.
    #[doc(hidden)]
    pub fn with_device_wrapper(mut self, wrap: DeviceWrapper) -> Self {
        self.wrap = Some(wrap);
        self
    }

    /// How long the oldest NBD request waiting for this export's server (queued or executing,
    /// reply not yet queued) has waited, over all its connections; `None` when none is or the
    /// provider is not attached.
    pub fn oldest_request_age(&self) -> Option<Duration> {
        lock(&self.running)
            .as_ref()
            .and_then(|r| r.server.oldest_request_age())
    }

    /// The configuration.
    pub fn config(&self) -> &SocketConfig {
        &self.config
    }

    /// The overlay, while attached (for statistics and tests).
    pub fn overlay(&self) -> Option<Arc<Overlay>> {
        lock(&self.running).as_ref().map(|r| r.overlay.clone())
    }

    /// The NBD server's per-command request counters and latency histograms: live while
    /// attached, final after a graceful [`Provider::close`]; `None` before the attach finished.
    pub fn nbd_stats(&self) -> Option<StatsSnapshot> {
        if let Some(r) = lock(&self.running).as_ref() {
            return Some(r.server.stats());
        }
        lock(&self.closed_stats).clone()
    }

    fn attach_blocking(
        config: &SocketConfig,
        reopen: bool,
    ) -> Result<(Arc<Overlay>, Option<ReopenReport>)> {
        let base = config.base.open()?;
        if reopen {
            let (overlay, report) = Overlay::reopen(base, &config.cache, config.overlay)?;
            return Ok((Arc::new(overlay), Some(report)));
        }
        let overlay = Overlay::create(base, &config.cache, config.overlay)?;
        Ok((Arc::new(overlay), None))
    }

    /// Releases the live parts; returns the NBD server's final counters unless abrupt.
    fn release(
        running: Option<Running>,
        socket: &Path,
        how: Stop,
    ) -> Result<Option<StatsSnapshot>> {
        let Some(Running { overlay, server }) = running else {
            return Ok(None);
        };
        // Stop the server first, so nothing writes while we flush.
        let stopped = match how {
            Stop::Graceful => server.shutdown().map(Some),
            Stop::HandOver => Ok(Some(server.hand_over())),
            Stop::Abrupt => {
                drop(server);
                Ok(None)
            }
        };
        let flushed = overlay.flush().map_err(ProviderError::from);
        drop(overlay);
        let _ = std::fs::remove_file(socket);
        flushed.and(stopped)
    }

    /// Stops serving for a daemon restart: stops listening and reading requests, answers every
    /// request already read (none is refused: clients reconnect to the next server and send
    /// again what was not answered), flushes the overlay and closes it. The cache file stays
    /// when the overlay keeps it ([`OverlayOptions::keep_cache`]), for the next daemon to
    /// reopen. The provider is closed afterwards.
    pub async fn hand_over(&mut self) -> Result<()> {
        self.stop(Stop::HandOver).await
    }

    async fn stop(&mut self, how: Stop) -> Result<()> {
        if !self.readiness.close_attach(&mut self.task).await {
            return Ok(());
        }
        let running = lock(&self.running).take();
        let socket = self.config.socket.clone();
        let stats = tokio::task::spawn_blocking(move || Self::release(running, &socket, how))
            .await
            .map_err(|e| ProviderError::Task(e.to_string()))??;
        if stats.is_some() {
            *lock(&self.closed_stats) = stats;
        }
        Ok(())
    }
}

/// How a provider stops serving.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// Drain (new requests refused), answer what is in flight, close.
    Graceful,
    /// Stop reading, answer what was read, close: for a daemon restart.
    HandOver,
    /// Close at once (a dropped provider).
    Abrupt,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Provider for SocketProvider {
    type Device = NbdEndpoint;

    fn kind(&self) -> ProviderKind {
        ProviderKind::Socket
    }

    fn start(&mut self) -> Result<()> {
        let endpoint = NbdEndpoint::new(&self.config.socket, &self.config.export)?;
        self.config.overlay.validate()?;
        if self.config.socket.exists() {
            return Err(ProviderError::Exists(self.config.socket.clone()));
        }
        self.readiness.begin()?;
        let config = (*self.config).clone();
        let (readiness, running) = (self.readiness.clone(), self.running.clone());
        let wrap = self.wrap.clone();
        let serve = (*self.serve).clone();
        let (reopen, reopened) = (self.reopen, self.reopened.clone());
        self.task = Some(tokio::spawn(async move {
            let attach = async {
                let cfg = config.clone();
                let (overlay, report) =
                    tokio::task::spawn_blocking(move || Self::attach_blocking(&cfg, reopen))
                        .await
                        .map_err(|e| ProviderError::Task(e.to_string()))??;
                *lock(&reopened) = report;
                let mut device: Arc<dyn BlockDevice> = overlay.clone();
                if let Some(w) = &wrap {
                    device = (w.0)(device);
                }
                let server =
                    ExportServer::start(&config.socket, &config.export, device, serve).await?;
                Ok::<_, ProviderError>(Running { overlay, server })
            };
            match attach.await {
                Ok(r) => {
                    *lock(&running) = Some(r);
                    readiness.set(State::Ready(endpoint));
                }
                Err(e) => {
                    tracing::warn!(socket = %config.socket.display(), "socket provider attach failed: {e}");
                    readiness.set(State::Failed(Arc::new(e)));
                }
            }
        }));
        Ok(())
    }

    fn path<C>(
        &self,
        timeout: Duration,
        cancel: C,
    ) -> impl Future<Output = Result<NbdEndpoint>> + Send
    where
        C: Future<Output = ()> + Send,
    {
        let readiness = self.readiness.clone();
        async move { readiness.wait(timeout, cancel).await }
    }

    async fn close(&mut self) -> Result<()> {
        self.stop(Stop::Graceful).await
    }

    async fn export_diff(&mut self, data_out: &Path) -> Result<PausedDisk> {
        let data_out = data_out.to_path_buf();
        let overlay = match self.readiness.current() {
            State::Ready(_) => self.overlay().ok_or(ProviderError::Closed)?,
            State::Idle => return Err(ProviderError::NotStarted),
            State::Attaching => return Err(ProviderError::NotReady),
            State::Failed(e) => return Err(ProviderError::AttachFailed(e)),
            State::Closed => return Err(ProviderError::Closed),
        };
        tokio::task::spawn_blocking(move || {
            // Flush before export, then refuse further writes so the diff is final.
            overlay.flush()?;
            overlay.freeze();
            let map = overlay.export_diff(&data_out)?;
            Ok(PausedDisk {
                map,
                data: data_out,
            })
        })
        .await
        .map_err(|e| ProviderError::Task(e.to_string()))?
    }
}

impl Drop for SocketProvider {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let running = lock(&self.running).take();
        if running.is_some() {
            if let Err(e) = Self::release(running, &self.config.socket, Stop::Abrupt) {
                tracing::warn!("releasing a dropped socket provider: {e}");
            }
        }
        self.readiness.set(State::Closed);
    }
}
