//! The kernel provider: a copy-on-write overlay served to the Linux `nbd` driver as `/dev/nbdN`.
//!
//! The kernel side (claim a slot host-wide, socketpairs, kernel-mode dispatchers, netlink
//! connect, wait for sysfs, open the device fd, and the ordered close) is rootfork-kernel's
//! [`Attacher`]; this provider adds the overlay underneath and the provider lifecycle on top:
//!
//! * attach (background): open the base read-only → create the overlay → `Attacher::attach` →
//!   verify the device node into a [`ReadyDevice`] → ready;
//! * `export_diff`: `fsync` + `BLKFLSBUF` of the device fd (writeback errors surface here, and the
//!   kernel's page cache holds nothing the overlay lacks) → flush the overlay → freeze → export;
//! * `close`: abandon an attach in progress (its guards unwind it) → [`Attachment::close`] (flush,
//!   drain, disconnect, wait for quiescence, release the slot) → flush and drop the overlay;
//! * drop: the attachment's own drop disconnects and releases without waiting;
//! * [adopting](KernelProvider::adopting) a device a previous daemon process left connected:
//!   reopen the kept overlay (cache file + block state) → `Attacher::adopt` (claim that slot
//!   again, verify size and backend identifier, new sockets with `NBD_CMD_RECONFIGURE`, no
//!   `CONNECT`) → ready;
//! * [`KernelProvider::hand_over`], for a daemon restart: flush the device fd →
//!   `Attachment::hand_over` (dispatchers stopped, the device left connected, the claim kept
//!   until exit) → flush the overlay and close it with its files kept. The kernel holds the
//!   guest's I/O meanwhile, for up to the device's `dead_conn_timeout`.
//!
//! While attached it reports its dispatcher's NBD counters ([`KernelProvider::nbd_stats`], one
//! [`NbdDispatcher`] per attach, shared by every connection, kept as final counts after close),
//! the connections' state ([`KernelProvider::connection_health`]: dead connections, in-flight
//! requests, the oldest request's age) and repairs dead connections with
//! [`KernelProvider::reconnect`] (`NBD_CMD_RECONFIGURE` with fresh sockets, see rootfork-kernel's
//! [`Attachment::reconnect`]).
//!
//! Fault injection (off unless [`KernelProvider::with_fault_injection`]; the daemon's
//! `debug.fault_injection`): the provider keeps a second handle on each connection's socket, and
//! [`KernelProvider::inject_connection_failure`] shuts one down as a crashed dispatcher would —
//! its dispatcher sees end-of-file and finishes, the kernel's receive fails and it marks the
//! socket dead — so the recovery path can be exercised against the real driver.
//!
//! Locking: the running attachment sits behind a std mutex that is never held across an
//! `.await`. A reconnect takes the attachment out, runs in its own task and puts it back, so
//! readers (stats, health, index) never wait for it; a reconnect whose caller went away still
//! finishes, and `close`/`export_diff` wait for it first.

use std::future::Future;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rootfork_block::{BlockDevice, Overlay, OverlayOptions, ReopenReport};
use rootfork_kernel::{
    device_path, peer_gone, AttachError, AttachOptions, Attacher, Attachment, BackendId,
    ConnectionHealth, Dispatch, Dispatcher, NbdDispatcher,
};
use rootfork_nbd::{ServeOptions, StatsSnapshot};
use rootfork_vmm::{DevicePath, ReadyDevice};
use tokio::task::JoinHandle;

use crate::error::{ProviderError, Result};
use crate::pause::{BaseImage, PausedDisk};
use crate::provider::{Provider, ProviderKind};
use crate::readiness::{Readiness, State};
use crate::socket::DeviceWrapper;
use crate::warm::{TakenGuard, WarmDevice, WarmSource};

/// Maps a slot index to its device node; `/dev/nbdN` except under a fake kernel in tests.
pub type NodePath = Arc<dyn Fn(u32) -> PathBuf + Send + Sync>;

/// What a kernel provider attaches.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// The template (or template + paused diff) the overlay is stacked on.
    pub base: BaseImage,
    /// The overlay's cache file (must not exist yet); recorded in the slot's claim so a reclaim
    /// after a crash can remove it.
    pub cache: PathBuf,
    /// Overlay options.
    pub overlay: OverlayOptions,
    /// Attach options (sandbox name, connections, timeouts). `cache_path` is filled in.
    pub attach: AttachOptions,
    /// Options of the kernel-mode dispatchers.
    pub serve: ServeOptions,
}

/// What serves the device: the [`NbdDispatcher`] (which holds the counters) and, with fault
/// injection on, a handle on each connection's socket.
struct Serving {
    dispatcher: NbdDispatcher,
    sockets: Option<Mutex<Vec<UnixStream>>>,
}

impl Dispatcher for Serving {
    fn size(&self) -> u64 {
        self.dispatcher.size()
    }

    fn server_flags(&self) -> u64 {
        self.dispatcher.server_flags()
    }

    fn spawn(&self, stream: UnixStream) -> std::io::Result<Box<dyn Dispatch>> {
        let Some(sockets) = &self.sockets else {
            return self.dispatcher.spawn(stream);
        };
        let handle = stream.try_clone()?;
        let d = self.dispatcher.spawn(stream)?;
        let mut all = lock(sockets);
        // Handles of connections that ended (or that a reconnect offered and the kernel did not
        // take) go.
        all.retain(|s| !peer_gone(s));
        all.push(handle);
        Ok(d)
    }
}

impl Serving {
    /// Shuts down the first live connection's socket; whether there was one.
    fn kill_one(&self) -> Option<bool> {
        let mut all = lock(self.sockets.as_ref()?);
        all.retain(|s| !peer_gone(s));
        if all.is_empty() {
            return Some(false);
        }
        let s = all.remove(0);
        Some(s.shutdown(std::net::Shutdown::Both).is_ok())
    }
}

struct Running {
    overlay: Arc<Overlay>,
    /// Serves the overlay on every connection (and replacements); holds the counters.
    serving: Arc<Serving>,
    index: u32,
    /// `None` only while a reconnect task holds it.
    attachment: Option<Attachment>,
}

/// Everything the background attach of [`Provider::start`] uses.
struct AttachPlan {
    config: KernelConfig,
    attacher: Attacher,
    node_path: NodePath,
    fault_injection: bool,
    wrap: Option<DeviceWrapper>,
    warm: Option<Arc<dyn WarmSource>>,
    /// The slot to adopt and the sandbox its backend identifier names.
    adopt: Option<(u32, String)>,
    /// Where to put what reopening the kept overlay found.
    reopened: Arc<Mutex<Option<ReopenReport>>>,
}

type ReconnectTask = JoinHandle<std::result::Result<usize, AttachError>>;

/// A sandbox's `/dev/nbdN`.
pub struct KernelProvider {
    config: KernelConfig,
    attacher: Attacher,
    node_path: NodePath,
    readiness: Arc<Readiness<ReadyDevice>>,
    running: Arc<Mutex<Option<Running>>>,
    /// The last attach's NBD counters, once closed.
    closed_stats: Mutex<Option<StatsSnapshot>>,
    task: Option<JoinHandle<()>>,
    /// A reconnect in progress (or finished, not yet collected).
    reconnecting: Option<ReconnectTask>,
    fault_injection: bool,
    wrap: Option<DeviceWrapper>,
    /// Pre-connected devices to take before attaching cold.
    warm: Option<Arc<dyn WarmSource>>,
    /// The slot of a device left connected by a previous process, to adopt instead of attaching,
    /// and the sandbox its backend identifier names.
    adopt: Option<(u32, String)>,
    /// What reopening the kept overlay found, once adopted.
    reopened: Arc<Mutex<Option<ReopenReport>>>,
}

impl std::fmt::Debug for KernelProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelProvider")
            .field("config", &self.config)
            .field("state", &self.readiness.current())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl KernelProvider {
    /// A provider attaching through `attacher` (nothing happens until [`Provider::start`]).
    pub fn new(config: KernelConfig, attacher: Attacher) -> Self {
        KernelProvider {
            config,
            attacher,
            node_path: Arc::new(device_path),
            readiness: Arc::new(Readiness::new()),
            running: Arc::new(Mutex::new(None)),
            closed_stats: Mutex::new(None),
            task: None,
            reconnecting: None,
            fault_injection: false,
            wrap: None,
            warm: None,
            adopt: None,
            reopened: Arc::new(Mutex::new(None)),
        }
    }

    /// Serves the device of slot `index` again instead of attaching a new one: a device this
    /// daemon instance connected before a restart, its overlay reopened from the kept cache file
    /// and block state (`config.cache`). `config.attach.connections` must be the number it was
    /// connected with, and `backend_sandbox` the sandbox its backend identifier names
    /// ([`KernelProvider::backend_sandbox`] of the provider that attached it). See the module
    /// docs.
    pub fn adopting(mut self, index: u32, backend_sandbox: &str) -> Self {
        self.adopt = Some((index, backend_sandbox.to_owned()));
        self
    }

    /// The slot this provider adopts, if it adopts one ([`KernelProvider::adopting`]).
    pub fn adopts(&self) -> Option<u32> {
        self.adopt.as_ref().map(|(i, _)| *i)
    }

    /// While attached, the sandbox the device's backend identifier names: this provider's
    /// sandbox, or the warm slot the device was connected as.
    pub fn backend_sandbox(&self) -> Option<String> {
        lock(&self.running)
            .as_ref()
            .and_then(|r| r.attachment.as_ref())
            .and_then(|a| BackendId::parse(a.backend()))
            .map(|b| b.sandbox)
    }

    /// What reopening the kept overlay found, once adopted (`None` for a new overlay).
    pub fn reopen_report(&self) -> Option<ReopenReport> {
        *lock(&self.reopened)
    }

    /// Ends the attach (waiting for one under way), lets a reconnect in progress settle, and
    /// takes what runs; `None` when nothing does (never attached, or already closed).
    async fn stop_running(&mut self) -> Option<Running> {
        if !self.readiness.close_attach(&mut self.task).await {
            return None;
        }
        self.settle_reconnect().await;
        lock(&self.running).take()
    }

    /// Stops serving for a daemon restart (see the module docs): the device stays connected and
    /// its overlay's files stay for the next daemon process, which adopts it. Needs an overlay
    /// that keeps its cache (`OverlayOptions::keep_cache`). The provider is closed afterwards.
    pub async fn hand_over(&mut self) -> Result<()> {
        if !self.config.overlay.keep_cache {
            return Err(ProviderError::Unsupported {
                op: "a hand-over to the next daemon",
                kind: "kernel (its overlay does not keep its cache)",
            });
        }
        let Some(Running {
            overlay,
            serving,
            attachment,
            ..
        }) = self.stop_running().await
        else {
            return Ok(());
        };
        let handle = tokio::runtime::Handle::current();
        let r = tokio::task::spawn_blocking(move || {
            let handed = match attachment {
                Some(a) => handle
                    .block_on(a.hand_over())
                    .map_err(ProviderError::Kernel),
                None => Ok(()),
            };
            // Every answered write is in the overlay now: make it durable, keep the files.
            let flushed = overlay.flush().map_err(ProviderError::from);
            drop(overlay);
            handed.and(flushed)
        })
        .await
        .map_err(|e| ProviderError::Task(e.to_string()))?;
        *lock(&self.closed_stats) = Some(serving.dispatcher.stats());
        drop(serving);
        r
    }

    /// Takes a pre-connected device of the disk's size from `source` when it has one (then the
    /// attach is a bind, see [`WarmSource`]), else attaches cold. Not combined with fault
    /// injection (a warm device's sockets were not kept): with it on, every attach is cold.
    pub fn with_warm_source(mut self, source: Arc<dyn WarmSource>) -> Self {
        self.warm = Some(source);
        self
    }

    /// Serves `wrap(overlay)` instead of the overlay itself. A test seam (for making requests
    /// hang on purpose); production code never sets it.
    #[doc(hidden)]
    pub fn with_device_wrapper(mut self, wrap: DeviceWrapper) -> Self {
        self.wrap = Some(wrap);
        self
    }

    /// Turns fault injection on (see the module docs): [`Self::inject_connection_failure`]
    /// works. For exercising recovery; costs one extra fd per connection.
    pub fn with_fault_injection(mut self) -> Self {
        self.fault_injection = true;
        self
    }

    /// Fault injection: shuts down the socket of one live connection, as a crashed dispatcher
    /// would (its dispatcher finishes; the kernel marks the socket dead). `Ok(false)` when not
    /// attached or no connection is live; `Unsupported` unless [`Self::with_fault_injection`].
    pub fn inject_connection_failure(&self) -> Result<bool> {
        if !self.fault_injection {
            return Err(ProviderError::Unsupported {
                op: "inject_connection_failure",
                kind: "kernel (fault injection off)",
            });
        }
        let serving = lock(&self.running).as_ref().map(|r| r.serving.clone());
        Ok(serving.and_then(|s| s.kill_one()).unwrap_or(false))
    }

    /// Replaces the slot → device node mapping (for a fake kernel whose nodes live elsewhere).
    pub fn with_node_path(mut self, node_path: NodePath) -> Self {
        self.node_path = node_path;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &KernelConfig {
        &self.config
    }

    /// The overlay, while attached.
    pub fn overlay(&self) -> Option<Arc<Overlay>> {
        lock(&self.running).as_ref().map(|r| r.overlay.clone())
    }

    /// The attached slot's index, while attached.
    pub fn index(&self) -> Option<u32> {
        lock(&self.running).as_ref().map(|r| r.index)
    }

    /// The NBD counters of every connection of this attach (per command: requests, errors,
    /// bytes, latency), replaced connections included; after close, the final counts. `None`
    /// before the device was ready.
    pub fn nbd_stats(&self) -> Option<StatsSnapshot> {
        if let Some(r) = lock(&self.running).as_ref() {
            return Some(r.serving.dispatcher.stats());
        }
        lock(&self.closed_stats).clone()
    }

    /// The connections' state while attached: how many there are, how many are dead (their
    /// dispatcher finished), requests in flight and the oldest one's age. `None` when not
    /// attached or while a reconnect runs.
    pub fn connection_health(&self) -> Option<ConnectionHealth> {
        lock(&self.running)
            .as_ref()
            .and_then(|r| r.attachment.as_ref())
            .map(Attachment::connection_health)
    }

    /// How long the oldest NBD request received from the kernel and not yet answered has
    /// waited (for "request stuck" health checks); `None` when none is waiting.
    pub fn oldest_request_age(&self) -> Option<Duration> {
        self.connection_health().and_then(|h| h.oldest_request_age)
    }

    /// Replaces every dead connection of the attached device with a fresh socketpair and
    /// dispatcher, handed to the kernel with `NBD_CMD_RECONFIGURE`; returns how many were
    /// replaced (0 when none was dead). The attachment stays attached whether or not it
    /// succeeds. Runs in its own task: if this future is dropped the reconnect still finishes,
    /// and the next `reconnect`, `export_diff` or `close` waits for it.
    pub async fn reconnect(&mut self) -> Result<usize> {
        if self.reconnecting.is_none() {
            let (mut attachment, serving) = {
                let mut guard = lock(&self.running);
                let r = guard.as_mut().ok_or_else(|| self.not_running())?;
                let a = r.attachment.take().ok_or(ProviderError::NotReady)?;
                (a, r.serving.clone())
            };
            let running = self.running.clone();
            self.reconnecting = Some(tokio::spawn(async move {
                let replaced = attachment.reconnect(&*serving).await;
                // Back in place; if the provider was dropped meanwhile, the attachment's own
                // drop disconnects and releases the slot.
                if let Some(r) = lock(&running).as_mut() {
                    r.attachment = Some(attachment);
                }
                replaced
            }));
        }
        let task = self.reconnecting.as_mut().expect("set above");
        let r = task.await;
        self.reconnecting = None;
        r.map_err(|e| ProviderError::Task(e.to_string()))?
            .map_err(ProviderError::Kernel)
    }

    /// Waits for a reconnect whose caller went away (its outcome was logged by the kernel
    /// layer; only the attachment's return matters here).
    async fn settle_reconnect(&mut self) {
        if let Some(task) = self.reconnecting.take() {
            match task.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("an abandoned reconnect failed: {e}"),
                Err(e) => tracing::warn!("an abandoned reconnect task failed: {e}"),
            }
        }
    }

    fn not_running(&self) -> ProviderError {
        match self.readiness.current() {
            State::Idle => ProviderError::NotStarted,
            State::Attaching => ProviderError::NotReady,
            State::Failed(e) => ProviderError::AttachFailed(e),
            State::Ready(_) | State::Closed => ProviderError::Closed,
        }
    }

    /// What the background attach needs, taken from the provider at start.
    fn plan(&self) -> AttachPlan {
        AttachPlan {
            config: self.config.clone(),
            attacher: self.attacher.clone(),
            node_path: self.node_path.clone(),
            fault_injection: self.fault_injection,
            wrap: self.wrap.clone(),
            warm: self.warm.clone(),
            adopt: self.adopt.clone(),
            reopened: self.reopened.clone(),
        }
    }

    /// The background attach: the running attachment, its verified device, and the guard of a
    /// warm device taken for it (to drop once the provider is marked ready).
    async fn attach(plan: AttachPlan) -> Result<(Running, ReadyDevice, Option<TakenGuard>)> {
        let AttachPlan {
            config,
            attacher,
            node_path,
            fault_injection,
            wrap,
            warm,
            adopt,
            reopened,
        } = plan;
        let t0 = std::time::Instant::now();
        let cfg = config.clone();
        let reopen = adopt.is_some();
        let (overlay, report) =
            tokio::task::spawn_blocking(move || -> Result<(Arc<Overlay>, Option<ReopenReport>)> {
                let base = cfg.base.open()?;
                if reopen {
                    let (o, report) = Overlay::reopen(base, &cfg.cache, cfg.overlay)?;
                    return Ok((Arc::new(o), Some(report)));
                }
                Ok((
                    Arc::new(Overlay::create(base, &cfg.cache, cfg.overlay)?),
                    None,
                ))
            })
            .await
            .map_err(|e| ProviderError::Task(e.to_string()))??;
        *lock(&reopened) = report;
        stage_done("overlay", t0);
        let mut device: Arc<dyn BlockDevice> = overlay.clone();
        if let Some(w) = wrap {
            device = (w.0)(device);
        }
        let warm = warm
            .filter(|_| !fault_injection && adopt.is_none())
            .and_then(|source| source.take(device.size()));
        // Dropped (the stock told to refill) once the provider is ready, or on an error here.
        let mut taken = None;
        let (serving, attachment) = match warm {
            Some(WarmDevice {
                slot,
                dispatcher,
                taken: guard,
            }) => {
                taken = guard;
                stage_done("warm_taken", t0);
                let attachment =
                    slot.bind_with_cache(device, &config.attach.sandbox, Some(&config.cache))?;
                stage_done("warm_bound", t0);
                let serving = Arc::new(Serving {
                    dispatcher,
                    sockets: None,
                });
                (serving, attachment)
            }
            None => {
                let serving = Arc::new(Serving {
                    dispatcher: NbdDispatcher::new(device, config.serve.clone()),
                    sockets: fault_injection.then(Mutex::default),
                });
                let mut opts = config.attach.clone();
                opts.cache_path = Some(config.cache.clone());
                let attachment = match &adopt {
                    Some((index, b)) => attacher.adopt(&*serving, *index, b, &opts).await?,
                    None => attacher.attach(&*serving, &opts).await?,
                };
                (serving, attachment)
            }
        };
        let index = attachment.index();
        let ready = ReadyDevice::verify(DevicePath::new(node_path(index)))?;
        stage_done("verified", t0);
        Ok((
            Running {
                overlay,
                serving,
                index,
                attachment: Some(attachment),
            },
            ready,
            taken,
        ))
    }
}

/// A debug event at the end of a stage of the background attach, with the time since it began
/// (for profiling create-to-ready: `RUST_LOG=rootfork_provider::kernel=debug`).
fn stage_done(stage: &'static str, since: std::time::Instant) {
    tracing::debug!(
        stage,
        elapsed_us = since.elapsed().as_micros() as u64,
        "kernel provider stage done"
    );
}

impl Provider for KernelProvider {
    type Device = ReadyDevice;

    fn kind(&self) -> ProviderKind {
        ProviderKind::Kernel
    }

    fn start(&mut self) -> Result<()> {
        self.config.overlay.validate()?;
        self.readiness.begin()?;
        let plan = self.plan();
        let (readiness, running) = (self.readiness.clone(), self.running.clone());
        self.task = Some(tokio::spawn(async move {
            match Self::attach(plan).await {
                Ok((r, ready, taken)) => {
                    *lock(&running) = Some(r);
                    readiness.set(State::Ready(ready));
                    drop(taken);
                }
                Err(e) => {
                    tracing::warn!("kernel provider attach failed: {e}");
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
    ) -> impl Future<Output = Result<ReadyDevice>> + Send
    where
        C: Future<Output = ()> + Send,
    {
        let readiness = self.readiness.clone();
        async move { readiness.wait(timeout, cancel).await }
    }

    async fn close(&mut self) -> Result<()> {
        let Some(Running {
            overlay,
            serving,
            attachment,
            ..
        }) = self.stop_running().await
        else {
            return Ok(());
        };
        // The close runs to completion on a blocking thread (its waits are short sleeps),
        // driven by this runtime's timers, so a dropped `close` future cannot cut it short.
        let handle = tokio::runtime::Handle::current();
        let r = tokio::task::spawn_blocking(move || {
            let detached = match attachment {
                Some(a) => handle.block_on(a.close()).map_err(ProviderError::Kernel),
                None => Ok(()),
            };
            let flushed = overlay.flush().map_err(ProviderError::from);
            drop(overlay);
            detached.and(flushed)
        })
        .await
        .map_err(|e| ProviderError::Task(e.to_string()))?;
        // Final counts (every connection has ended); the dispatcher's device reference goes.
        *lock(&self.closed_stats) = Some(serving.dispatcher.stats());
        drop(serving);
        r
    }

    async fn export_diff(&mut self, data_out: &Path) -> Result<PausedDisk> {
        match self.readiness.current() {
            State::Ready(_) => {}
            State::Idle => return Err(ProviderError::NotStarted),
            State::Attaching => return Err(ProviderError::NotReady),
            State::Failed(e) => return Err(ProviderError::AttachFailed(e)),
            State::Closed => return Err(ProviderError::Closed),
        }
        self.settle_reconnect().await;
        let running = self.running.clone();
        let data_out = data_out.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let guard = lock(&running);
            let r = guard.as_ref().ok_or(ProviderError::Closed)?;
            // Flush before export: the device fd first (the kernel's dirty pages reach the
            // overlay, writeback errors surface), then the overlay itself.
            r.attachment
                .as_ref()
                .ok_or(ProviderError::NotReady)?
                .flush()
                .map_err(ProviderError::Kernel)?;
            r.overlay.flush()?;
            r.overlay.freeze();
            let map = r.overlay.export_diff(&data_out)?;
            Ok(PausedDisk {
                map,
                data: data_out,
            })
        })
        .await
        .map_err(|e| ProviderError::Task(e.to_string()))?
    }
}

impl Drop for KernelProvider {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // A reconnect task still holding the attachment finds no `Running` to return it to and
        // drops it.
        drop(self.reconnecting.take());
        // Attachment's drop disconnects, stops the dispatchers and releases the slot; the
        // overlay's drop removes its cache file.
        drop(lock(&self.running).take());
        self.readiness.set(State::Closed);
    }
}
