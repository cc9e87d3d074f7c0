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
//! * drop: the attachment's own drop disconnects and releases without waiting.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rootfork_block::{BlockDevice, Overlay, OverlayOptions};
use rootfork_kernel::{device_path, AttachOptions, Attacher, Attachment, NbdDispatcher};
use rootfork_nbd::ServeOptions;
use rootfork_vmm::{DevicePath, ReadyDevice};
use tokio::task::JoinHandle;

use crate::error::{ProviderError, Result};
use crate::pause::{BaseImage, PausedDisk};
use crate::provider::{Provider, ProviderKind};
use crate::readiness::{Readiness, State};

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

struct Running {
    overlay: Arc<Overlay>,
    attachment: Attachment,
}

/// A sandbox's `/dev/nbdN`.
pub struct KernelProvider {
    config: KernelConfig,
    attacher: Attacher,
    node_path: NodePath,
    readiness: Arc<Readiness<ReadyDevice>>,
    running: Arc<Mutex<Option<Running>>>,
    task: Option<JoinHandle<()>>,
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
            task: None,
        }
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
        lock(&self.running).as_ref().map(|r| r.attachment.index())
    }

    async fn attach(
        config: KernelConfig,
        attacher: Attacher,
        node_path: NodePath,
    ) -> Result<(Running, ReadyDevice)> {
        let cfg = config.clone();
        let overlay = tokio::task::spawn_blocking(move || -> Result<Arc<Overlay>> {
            let base = cfg.base.open()?;
            Ok(Arc::new(Overlay::create(base, &cfg.cache, cfg.overlay)?))
        })
        .await
        .map_err(|e| ProviderError::Task(e.to_string()))??;
        let device: Arc<dyn BlockDevice> = overlay.clone();
        let dispatcher = NbdDispatcher::new(device, config.serve.clone());
        let mut opts = config.attach.clone();
        opts.cache_path = Some(config.cache.clone());
        let attachment = attacher.attach(&dispatcher, &opts).await?;
        let ready = ReadyDevice::verify(DevicePath::new(node_path(attachment.index())))?;
        Ok((
            Running {
                overlay,
                attachment,
            },
            ready,
        ))
    }
}

impl Provider for KernelProvider {
    type Device = ReadyDevice;

    fn kind(&self) -> ProviderKind {
        ProviderKind::Kernel
    }

    fn start(&mut self) -> Result<()> {
        self.config.overlay.validate()?;
        self.readiness.begin()?;
        let (config, attacher, node_path) = (
            self.config.clone(),
            self.attacher.clone(),
            self.node_path.clone(),
        );
        let (readiness, running) = (self.readiness.clone(), self.running.clone());
        self.task = Some(tokio::spawn(async move {
            match Self::attach(config, attacher, node_path).await {
                Ok((r, ready)) => {
                    *lock(&running) = Some(r);
                    readiness.set(State::Ready(ready));
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
        if !self.readiness.close_attach(&mut self.task).await {
            return Ok(());
        }
        let Some(Running {
            overlay,
            attachment,
        }) = lock(&self.running).take()
        else {
            return Ok(());
        };
        // `Attachment::close` is not `Send` (its dispatch handles are not `Sync`), so it runs to
        // completion on a blocking thread, driven by this runtime's timers.
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let detached = handle
                .block_on(attachment.close())
                .map_err(ProviderError::Kernel);
            let flushed = overlay.flush().map_err(ProviderError::from);
            drop(overlay);
            detached.and(flushed)
        })
        .await
        .map_err(|e| ProviderError::Task(e.to_string()))?
    }

    async fn export_diff(&mut self, data_out: &Path) -> Result<PausedDisk> {
        match self.readiness.current() {
            State::Ready(_) => {}
            State::Idle => return Err(ProviderError::NotStarted),
            State::Attaching => return Err(ProviderError::NotReady),
            State::Failed(e) => return Err(ProviderError::AttachFailed(e)),
            State::Closed => return Err(ProviderError::Closed),
        }
        let running = self.running.clone();
        let data_out = data_out.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let guard = lock(&running);
            let r = guard.as_ref().ok_or(ProviderError::Closed)?;
            // Flush before export: the device fd first (the kernel's dirty pages reach the
            // overlay, writeback errors surface), then the overlay itself.
            r.attachment.flush().map_err(ProviderError::Kernel)?;
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
        // Attachment's drop disconnects, stops the dispatchers and releases the slot; the
        // overlay's drop removes its cache file.
        drop(lock(&self.running).take());
        self.readiness.set(State::Closed);
    }
}
