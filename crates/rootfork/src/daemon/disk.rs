//! A sandbox's disk: building its provider (socket or kernel) over a base image, bringing it up
//! until the device is served, and retiring it (close, keep its final counters, report the
//! release). Create, pause, resume and delete all go through these three.

use std::path::PathBuf;
use std::time::Instant;

use rootfork_block::OverlayOptions;
use rootfork_kernel::AttachOptions;
use rootfork_nbd::ServeOptions;
use rootfork_provider::{
    AnyProvider, BaseImage, KernelConfig, KernelProvider, Provider, ProviderDevice, ProviderError,
    ProviderKind, SocketConfig, SocketProvider,
};

use crate::daemon::core::Core;
use crate::daemon::model::Health;
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
    let seams = &core.config.seams;
    let overlay = OverlayOptions {
        disk_size: Some(sb.disk_size),
        quota: sb.quota,
        ..OverlayOptions::default()
    };
    match sb.kind {
        ProviderKind::Socket => {
            let mut p = SocketProvider::new(SocketConfig {
                base,
                socket: next_socket(core),
                export: sb.id.clone(),
                cache,
                overlay,
            });
            if let Some(w) = seams.socket_device_wrapper.clone() {
                p = p.with_device_wrapper(w);
            }
            p = p.with_serve_options(ServeOptions {
                max_connections: core.config.max_connections_per_export,
                connection_budget: Some(core.nbd_connections.clone()),
                byte_budget: Some(core.nbd_bytes.clone()),
                ..ServeOptions::default()
            });
            Ok(AnyProvider::Socket(p))
        }
        ProviderKind::Kernel => {
            let attacher = core.kernel.attacher()?;
            let config = &core.config;
            let mut p = KernelProvider::new(
                KernelConfig {
                    base,
                    cache,
                    overlay,
                    attach: AttachOptions {
                        sandbox: sb.id.clone(),
                        connections: config.kernel_connections,
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
            if let Some(w) = seams.kernel_device_wrapper.clone() {
                p = p.with_device_wrapper(w);
            }
            if let Some(stock) = &core.warm {
                p = p.with_warm_source(stock.clone());
            }
            Ok(AnyProvider::Kernel(Box::new(p)))
        }
        ProviderKind::Direct => Err(SpecError::ProviderNotOffered.into()),
    }
}

fn next_socket(core: &Core) -> PathBuf {
    core.dirs.nbd.join(format!("{}.sock", core.next_seq()))
}

/// Starts `provider` and waits for its device; records the device and the latency in `sb`'s
/// status. On failure the provider is closed again.
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
            if let Err(ce) = provider.close().await {
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

/// Closes `sb`'s provider for good: drains and releases the device, keeps the provider's final
/// template-read and NBD counters for the metrics, and reports the release. The close's error
/// is returned for the caller to judge; the counters are kept either way.
pub async fn retire(
    core: &Core,
    sb: &Sandbox,
    provider: &mut AnyProvider,
) -> std::result::Result<(), ProviderError> {
    let read = crate::daemon::sandbox::overlay_stats(provider).map_or(0, |s| s.bytes_read_base);
    let closed = provider.close().await;
    core.closed.add(read, provider);
    if sb.kind == ProviderKind::Socket {
        // The kernel pool reports its own releases.
        core.events
            .emit(EventBus::event(EventKind::Released).sandbox(&sb.id));
    }
    closed
}
