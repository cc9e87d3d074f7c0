//! Rootfs providers: one lifecycle over kernel NBD, socket NBD and direct files.
//!
//! A provider turns a read-only template (or a template plus a paused sandbox's diff) into the
//! device a VMM boots from:
//!
//! | kind | device (`path()`) | for |
//! |---|---|---|
//! | [`SocketProvider`] | [`NbdEndpoint`](rootfork_vmm::qemu::NbdEndpoint): a per-sandbox Unix socket served by rootfork's NBD server over a COW overlay | QEMU, libnbd clients, hosts without the `nbd` module |
//! | [`KernelProvider`] | [`ReadyDevice`](rootfork_vmm::ReadyDevice) for `/dev/nbdN` | Firecracker |
//! | [`DirectProvider`] | [`ReadyDevice`](rootfork_vmm::ReadyDevice) for a full writable copy | building templates |
//!
//! See [`provider`] for the lifecycle and `docs/providers.md` for the whole picture.

mod any;
mod copy;
mod direct;
mod error;
mod export;
mod kernel;
mod pause;
pub mod provider;
mod readiness;
mod socket;
mod warm;

pub use any::{AnyProvider, ProviderDevice};
pub use copy::CopyMethod;
pub use direct::DirectProvider;
pub use error::{ProviderError, Result};
pub use kernel::{KernelConfig, KernelProvider, NodePath};
pub use pause::{BaseImage, BuildSource, PausedDisk};
pub use provider::{Provider, ProviderKind};
pub use readiness::{Readiness, State};
pub use socket::{DeviceWrapper, SocketConfig, SocketProvider};
pub use warm::{TakenGuard, WarmDevice, WarmSource};
