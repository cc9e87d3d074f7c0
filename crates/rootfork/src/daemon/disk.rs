//! A sandbox's disk: building its provider (socket or kernel) over a base image, bringing it up
//! until the device is served, and retiring it (close, keep its final counters, report the
//! release, remove its files). Create, pause, resume and delete all go through these three; a
//! start adopting a running sandbox builds its provider with [`adopted_provider`] (socket) or
//! [`adopted_kernel_provider`] (kernel).
//!
//! A socket sandbox's overlay, and a kernel sandbox's when the kernel holds I/O for a restart
//! (`kernel.dead_conn_timeout_secs` not 0), keeps its cache file (and its block state) when it is
//! dropped, so that a daemon that dies or stops for a restart leaves them for the next one; the
//! daemon removes them itself when it is done with a disk ([`retire`], [`discard`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use rootfork_block::{Durability, OverlayOptions};
use rootfork_kernel::AttachOptions;
use rootfork_nbd::ServeOptions;
use rootfork_provider::{
    AnyProvider, BaseImage, KernelConfig, KernelProvider, Provider, ProviderDevice, ProviderError,
    ProviderKind, SocketConfig, SocketProvider,
};

use crate::daemon::core::Core;
use crate::daemon::model::Health;
use crate::daemon::records::{Served, ServedDevice, ServedDisk};
use crate::daemon::sandbox::Sandbox;
use crate::daemon::spec::SpecError;
use crate::error::Result;
use crate::events::{EventBus, EventKind};

/// The provider of `sb`'s disk over `base`; `generation` keeps its cache file apart from the
/// sandbox's earlier ones.
pub fn provider_for(
    core: &Core,
    sb: &Sandbox,
    base: BaseImage,
    generation: u64,
) -> Result<AnyProvider> {
    let cache = core
        .dirs
        .cache
        .join(format!("{}.{generation}.cache", sb.id));
    let overlay = OverlayOptions {
        disk_size: Some(sb.disk_size),
        quota: sb.quota,
        ..OverlayOptions::default()
    };
    match sb.kind {
        ProviderKind::Socket => Ok(AnyProvider::Socket(socket_provider(
            core,
            SocketConfig {
                base,
                socket: next_socket(core),
                export: sb.id.clone(),
                cache,
                overlay: kept_overlay(overlay),
            },
        ))),
        ProviderKind::Kernel => {
            let overlay = if kernel_adoptable(core) {
                kept_overlay(overlay)
            } else {
                overlay
            };
            let p = kernel_provider(
                core,
                sb,
                base,
                cache,
                overlay,
                core.config.kernel_connections,
            )?;
            Ok(AnyProvider::Kernel(Box::new(p)))
        }
        ProviderKind::Direct => Err(SpecError::ProviderNotOffered.into()),
    }
}

/// Whether a running kernel sandbox can be adopted by the next daemon process: the kernel holds
/// its I/O while no process serves it only with a `dead_conn_timeout`.
pub fn kernel_adoptable(core: &Core) -> bool {
    core.config.kernel_dead_conn_timeout.is_some()
}

/// A kernel provider for `sb` with the daemon's attach and serve options and test seams.
fn kernel_provider(
    core: &Core,
    sb: &Sandbox,
    base: BaseImage,
    cache: PathBuf,
    overlay: OverlayOptions,
    connections: usize,
) -> Result<KernelProvider> {
    let attacher = core.kernel.attacher()?;
    let config = &core.config;
    let mut p = KernelProvider::new(
        KernelConfig {
            base,
            cache,
            overlay,
            attach: AttachOptions {
                sandbox: sb.id.clone(),
                connections,
                timeout: config.kernel_request_timeout,
                dead_conn_timeout: config.kernel_dead_conn_timeout,
                ..AttachOptions::default()
            },
            serve: ServeOptions {
                byte_budget: Some(core.nbd_bytes.clone()),
                ..ServeOptions::default()
            },
        },
        attacher,
    );
    if let Some(node_path) = core.kernel.node_path() {
        p = p.with_node_path(node_path);
    }
    if config.fault_injection {
        p = p.with_fault_injection();
    }
    if let Some(w) = config.seams.kernel_device_wrapper.clone() {
        p = p.with_device_wrapper(w);
    }
    if let Some(stock) = &core.warm {
        p = p.with_warm_source(stock.clone());
    }
    Ok(p)
}

/// `opts` for an overlay that outlives the daemon process (a socket sandbox's): its cache file
/// and block state are kept when it is dropped, every acknowledged write survives the process
/// (`persist_state`), and a flush makes the writes before it survive a power loss too
/// (`Durable`: the cache outlives the process, so a client's flush must mean what it says).
fn kept_overlay(opts: OverlayOptions) -> OverlayOptions {
    OverlayOptions {
        keep_cache: true,
        persist_state: true,
        durability: Durability::Durable,
        ..opts
    }
}

/// A socket provider for `config` with the daemon's serve options and test seams.
fn socket_provider(core: &Core, config: SocketConfig) -> SocketProvider {
    let mut p = SocketProvider::new(config);
    if let Some(w) = core.config.seams.socket_device_wrapper.clone() {
        p = p.with_device_wrapper(w);
    }
    p.with_serve_options(ServeOptions {
        max_connections: core.config.max_connections_per_export,
        connection_budget: Some(core.nbd_connections.clone()),
        byte_budget: Some(core.nbd_bytes.clone()),
        ..ServeOptions::default()
    })
}

/// The provider that serves a running socket sandbox's disk again after a restart: its overlay
/// reopened from the cache file and block state `served` names, over `base`, on the same socket
/// and export name.
pub fn adopted_provider(
    core: &Core,
    sb: &Sandbox,
    base: BaseImage,
    served: &ServedDisk,
) -> AnyProvider {
    let p = socket_provider(
        core,
        SocketConfig {
            base,
            socket: served.socket.clone(),
            export: served.export.clone(),
            cache: served.cache.clone(),
            overlay: kept_overlay(OverlayOptions {
                block_size: served.block_size,
                disk_size: Some(sb.disk_size),
                quota: sb.quota,
                ..OverlayOptions::default()
            }),
        },
    );
    AnyProvider::Socket(p.reopening_cache())
}

/// The provider that serves a running kernel sandbox's disk again after a restart: its overlay
/// reopened from the cache file and block state `served` names, over `base`, on the same
/// still-connected `/dev/nbdN` (adopted, see `KernelProvider::adopting`).
pub fn adopted_kernel_provider(
    core: &Core,
    sb: &Sandbox,
    base: BaseImage,
    served: &ServedDevice,
) -> Result<AnyProvider> {
    let overlay = kept_overlay(OverlayOptions {
        block_size: served.block_size,
        disk_size: Some(sb.disk_size),
        quota: sb.quota,
        ..OverlayOptions::default()
    });
    let p = kernel_provider(
        core,
        sb,
        base,
        served.cache.clone(),
        overlay,
        served.connections,
    )?;
    Ok(AnyProvider::Kernel(Box::new(
        p.adopting(served.device, &served.backend_sandbox),
    )))
}

/// Where `provider` serves `sb`'s disk, when a restarted daemon can adopt it (with its VM, QEMU
/// or Firecracker, which outlives the daemon): socket ones, and attached kernel ones whose
/// overlay is kept (see [`kernel_adoptable`]).
pub fn served_disk(provider: &AnyProvider) -> Option<Served> {
    match provider {
        AnyProvider::Socket(p) => {
            let c = p.config();
            Some(Served::Socket(ServedDisk {
                cache: c.cache.clone(),
                socket: c.socket.clone(),
                export: c.export.clone(),
                block_size: c.overlay.block_size,
            }))
        }
        AnyProvider::Kernel(p) if p.config().overlay.keep_cache => {
            let c = p.config();
            Some(Served::Kernel(ServedDevice {
                cache: c.cache.clone(),
                block_size: c.overlay.block_size,
                device: p.index()?,
                backend_sandbox: p.backend_sandbox()?,
                connections: c.attach.connections,
            }))
        }
        _ => None,
    }
}

/// The files an overlay on `cache` keeps: the cache file and its block state.
pub fn overlay_files(cache: &Path) -> [PathBuf; 2] {
    [cache.to_owned(), rootfork_block::state_path(cache)]
}

/// Removes the files of a provider's kept overlay (after it is closed).
fn remove_files(provider: &AnyProvider) {
    let cache = match provider {
        AnyProvider::Socket(p) => &p.config().cache,
        AnyProvider::Kernel(p) if p.config().overlay.keep_cache => &p.config().cache,
        // Any other overlay removes its cache when dropped.
        _ => return,
    };
    for f in overlay_files(cache) {
        if let Err(e) = std::fs::remove_file(&f) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %f.display(), "removing an overlay file: {e}");
            }
        }
    }
}

/// Closes a provider nobody will use again (a failed create or resume) and removes its files.
pub async fn discard(provider: &mut AnyProvider) -> std::result::Result<(), ProviderError> {
    let closed = provider.close().await;
    remove_files(provider);
    closed
}

fn next_socket(core: &Core) -> PathBuf {
    core.dirs.nbd.join(format!("{}.sock", core.next_seq()))
}

/// Closes a provider whose attach failed: a new overlay's files go, an adopted one's stay (the
/// sandbox is marked failed with them kept).
async fn close_failed(provider: &mut AnyProvider) -> std::result::Result<(), ProviderError> {
    match provider {
        AnyProvider::Socket(p) if p.reopens_cache() => provider.close().await,
        AnyProvider::Kernel(p) if p.adopts().is_some() => provider.close().await,
        _ => discard(provider).await,
    }
}

/// Starts `provider` and waits for its device; records the device and the latency in `sb`'s
/// status. On failure the provider is closed again (its files removed, unless it was reopening
/// an adopted sandbox's).
pub async fn bring_up(core: &Core, sb: &Sandbox, mut provider: AnyProvider) -> Result<AnyProvider> {
    let started = Instant::now();
    if let AnyProvider::Socket(p) = &provider {
        // The kernel pool reports its own claims.
        core.events.emit(
            EventBus::event(EventKind::Claimed)
                .sandbox(&sb.id)
                .message(p.config().socket.display().to_string()),
        );
    }
    let r = async {
        provider.start()?;
        provider
            .path(core.config.ready_timeout, std::future::pending())
            .await
    }
    .await;
    let device = match r {
        Ok(d) => d,
        Err(e) => {
            if let Err(ce) = close_failed(&mut provider).await {
                tracing::warn!(sandbox = %sb.id, "closing a provider that failed to attach: {ce}");
            }
            return Err(e.into());
        }
    };
    let latency = started.elapsed();
    core.metrics.attach_latency(sb.kind.as_str(), latency);
    let index = match &provider {
        AnyProvider::Kernel(k) => k.index(),
        _ => None,
    };
    sb.update(|s| {
        s.ready_latency = latency;
        s.health = Health::Healthy;
        s.failed_checks = 0;
        s.device_index = index;
        match &device {
            ProviderDevice::Nbd(ep) => s.nbd_uri = ep.uri(),
            ProviderDevice::Device(d) => s.device_path = d.path().display().to_string(),
        }
    });
    if let ProviderDevice::Nbd(ep) = &device {
        // The kernel pool reports its own claims and connections.
        core.events.emit(
            EventBus::event(EventKind::Connected)
                .sandbox(&sb.id)
                .message(ep.uri()),
        );
    }
    Ok(provider)
}

/// Closes `sb`'s provider for good: drains and releases the device, removes its files, keeps
/// the provider's final template-read and NBD counters for the metrics, and reports the
/// release. The close's error is returned for the caller to judge; the counters are kept and
/// the files removed either way.
pub async fn retire(
    core: &Core,
    sb: &Sandbox,
    provider: &mut AnyProvider,
) -> std::result::Result<(), ProviderError> {
    let read = crate::daemon::sandbox::overlay_stats(provider).map_or(0, |s| s.bytes_read_base);
    let closed = discard(provider).await;
    core.closed.add(read, provider);
    if sb.kind == ProviderKind::Socket {
        // The kernel pool reports its own releases.
        core.events
            .emit(EventBus::event(EventKind::Released).sandbox(&sb.id));
    }
    closed
}

/// Stops serving `sb`'s socket disk for a daemon restart (see [`SocketProvider::hand_over`]):
/// its files stay for the next daemon. Counters are kept as by [`retire`].
pub async fn hand_over(
    core: &Core,
    sb: &Sandbox,
    provider: &mut AnyProvider,
) -> std::result::Result<(), ProviderError> {
    let read = crate::daemon::sandbox::overlay_stats(provider).map_or(0, |s| s.bytes_read_base);
    let stopped = match provider {
        AnyProvider::Socket(p) => p.hand_over().await,
        AnyProvider::Kernel(p) => p.hand_over().await,
        _ => {
            return Err(ProviderError::Unsupported {
                op: "a hand-over to the next daemon",
                kind: provider.kind().as_str(),
            })
        }
    };
    core.closed.add(read, provider);
    if sb.kind == ProviderKind::Socket {
        // The kernel pool reports its own releases (a handed-over device stays claimed).
        core.events
            .emit(EventBus::event(EventKind::Released).sandbox(&sb.id));
    }
    stopped
}
