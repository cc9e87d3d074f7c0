//! [`AnyProvider`]: the closed set of provider kinds as one type, for callers that pick the kind
//! at run time, and [`ProviderDevice`], what any of them hands to a VMM.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use rootfork_kernel::ConnectionHealth;
use rootfork_vmm::qemu::{NbdEndpoint, RootDisk};
use rootfork_vmm::ReadyDevice;

use crate::direct::DirectProvider;
use crate::error::{ProviderError, Result};
use crate::kernel::KernelProvider;
use crate::pause::PausedDisk;
use crate::provider::{Provider, ProviderKind};
use crate::socket::SocketProvider;

/// The device a provider hands to the VMM layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderDevice {
    /// An NBD export on a Unix socket.
    Nbd(NbdEndpoint),
    /// A verified block device or file.
    Device(ReadyDevice),
}

impl ProviderDevice {
    /// QEMU's root disk for this device.
    pub fn into_root_disk(self) -> RootDisk {
        match self {
            ProviderDevice::Nbd(ep) => RootDisk::Nbd(ep),
            ProviderDevice::Device(dev) => RootDisk::Device(dev),
        }
    }
}

/// One of the provider kinds.
#[derive(Debug)]
pub enum AnyProvider {
    /// See [`SocketProvider`].
    Socket(SocketProvider),
    /// See [`KernelProvider`].
    Kernel(Box<KernelProvider>),
    /// See [`DirectProvider`].
    Direct(DirectProvider),
}

impl AnyProvider {
    /// The NBD per-command request counters and latency histograms, for the kinds that serve
    /// NBD: the socket provider's server and the kernel provider's dispatcher (every connection
    /// of the attach, replaced ones included) — live, then final after close. The direct
    /// provider serves no NBD: `None`.
    pub fn nbd_stats(&self) -> Option<rootfork_nbd::StatsSnapshot> {
        match self {
            AnyProvider::Socket(p) => p.nbd_stats(),
            AnyProvider::Kernel(p) => p.nbd_stats(),
            AnyProvider::Direct(_) => None,
        }
    }

    /// How long the oldest NBD request waiting for this provider's dispatcher has waited, for
    /// "request stuck" health checks: the socket provider's server (see
    /// [`SocketProvider::oldest_request_age`]) or the kernel provider's connections (see
    /// [`KernelProvider::oldest_request_age`]). The direct provider serves no NBD: `None`.
    pub fn oldest_request_age(&self) -> Option<Duration> {
        match self {
            AnyProvider::Socket(p) => p.oldest_request_age(),
            AnyProvider::Kernel(p) => p.oldest_request_age(),
            AnyProvider::Direct(_) => None,
        }
    }

    /// The kernel provider's connection state (see [`KernelProvider::connection_health`]);
    /// `None` for the other kinds, which have no kernel connections.
    pub fn connection_health(&self) -> Option<ConnectionHealth> {
        match self {
            AnyProvider::Kernel(p) => p.connection_health(),
            AnyProvider::Socket(_) | AnyProvider::Direct(_) => None,
        }
    }

    /// Fault injection: see [`KernelProvider::inject_connection_failure`]; `Unsupported` for the
    /// other kinds.
    pub fn inject_connection_failure(&self) -> Result<bool> {
        match self {
            AnyProvider::Kernel(p) => p.inject_connection_failure(),
            AnyProvider::Socket(p) => Err(ProviderError::Unsupported {
                op: "inject_connection_failure",
                kind: p.kind().as_str(),
            }),
            AnyProvider::Direct(p) => Err(ProviderError::Unsupported {
                op: "inject_connection_failure",
                kind: p.kind().as_str(),
            }),
        }
    }

    /// Replaces the kernel provider's dead connections with `NBD_CMD_RECONFIGURE` (see
    /// [`KernelProvider::reconnect`]); returns how many. The other kinds have no connections a
    /// provider could re-establish: [`ProviderError::Unsupported`].
    pub async fn reconnect(&mut self) -> Result<usize> {
        match self {
            AnyProvider::Kernel(p) => p.reconnect().await,
            AnyProvider::Socket(p) => Err(ProviderError::Unsupported {
                op: "reconnect",
                kind: p.kind().as_str(),
            }),
            AnyProvider::Direct(p) => Err(ProviderError::Unsupported {
                op: "reconnect",
                kind: p.kind().as_str(),
            }),
        }
    }
}

impl Provider for AnyProvider {
    type Device = ProviderDevice;

    fn kind(&self) -> ProviderKind {
        match self {
            AnyProvider::Socket(p) => p.kind(),
            AnyProvider::Kernel(p) => p.kind(),
            AnyProvider::Direct(p) => p.kind(),
        }
    }

    fn start(&mut self) -> Result<()> {
        match self {
            AnyProvider::Socket(p) => p.start(),
            AnyProvider::Kernel(p) => p.start(),
            AnyProvider::Direct(p) => p.start(),
        }
    }

    async fn path<C>(&self, timeout: Duration, cancel: C) -> Result<ProviderDevice>
    where
        C: Future<Output = ()> + Send,
    {
        match self {
            AnyProvider::Socket(p) => p.path(timeout, cancel).await.map(ProviderDevice::Nbd),
            AnyProvider::Kernel(p) => p.path(timeout, cancel).await.map(ProviderDevice::Device),
            AnyProvider::Direct(p) => p.path(timeout, cancel).await.map(ProviderDevice::Device),
        }
    }

    async fn close(&mut self) -> Result<()> {
        match self {
            AnyProvider::Socket(p) => p.close().await,
            AnyProvider::Kernel(p) => p.close().await,
            AnyProvider::Direct(p) => p.close().await,
        }
    }

    async fn export_diff(&mut self, data_out: &Path) -> Result<PausedDisk> {
        match self {
            AnyProvider::Socket(p) => p.export_diff(data_out).await,
            AnyProvider::Kernel(p) => p.export_diff(data_out).await,
            AnyProvider::Direct(p) => p.export_diff(data_out).await,
        }
    }
}
