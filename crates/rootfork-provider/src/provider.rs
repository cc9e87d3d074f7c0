//! The [`Provider`] trait: one lifecycle for every way of giving a VM its root disk.
//!
//! ```text
//!   new ──start()──▶ attaching ──(background)──▶ ready ──export_diff()──▶ frozen
//!                        │                         │                       │
//!                        └────────── close() ──────┴───────────────────────┴──▶ closed
//! ```
//!
//! * `start()` only validates and spawns the attach on the current Tokio runtime; it never
//!   blocks, so a sandbox can start its VMM process while the disk attaches.
//! * `path()` waits for the attach, bounded by a timeout and a caller-supplied cancel future
//!   (for example `CancellationToken::cancelled()` or a oneshot receiver). It is cancel-safe and
//!   can be called any number of times, from many tasks.
//! * `close()` flushes, drains, detaches and releases; it is idempotent, and it works in every
//!   state, including during the attach. Dropping a provider without `close()` still releases
//!   everything (best effort, without flushing).
//! * `export_diff()` flushes, freezes the disk (further guest writes fail) and writes its dirty
//!   blocks for a pause.
//!
//! The set of kinds is closed (socket NBD, kernel NBD, direct file) and each returns a different
//! device type, so the trait has an associated `Device` and [`crate::AnyProvider`] is the enum a
//! sandbox holds when the kind is chosen at run time.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use crate::error::Result;
use crate::pause::PausedDisk;

/// The kinds of provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// An NBD export on a per-sandbox Unix socket (QEMU, libnbd; no kernel module needed).
    Socket,
    /// A kernel NBD device, `/dev/nbdN`.
    Kernel,
    /// A plain writable file holding a full copy of the template.
    Direct,
}

impl ProviderKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Socket => "socket",
            ProviderKind::Kernel => "kernel",
            ProviderKind::Direct => "direct",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sandbox's root disk provider.
pub trait Provider: Send {
    /// What `path()` hands to the VMM layer.
    type Device: Clone + Send + Sync + fmt::Debug + 'static;

    /// Which kind this is.
    fn kind(&self) -> ProviderKind;

    /// Starts attaching in the background and returns at once. Must be called inside a Tokio
    /// runtime. A second call fails with `AlreadyStarted`; after `close()`, with `Closed`.
    fn start(&mut self) -> Result<()>;

    /// Waits until the device is ready and returns it; fails with `Timeout` after `timeout`,
    /// with `Cancelled` when `cancel` completes first, or with the attach's error.
    fn path<C>(
        &self,
        timeout: Duration,
        cancel: C,
    ) -> impl Future<Output = Result<Self::Device>> + Send
    where
        C: Future<Output = ()> + Send;

    /// Flushes, drains, detaches and releases. Idempotent.
    fn close(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Flushes, freezes the disk and writes its dirty blocks to `data_out` (a new file), for a
    /// pause. The returned [`PausedDisk`] plus the template is enough to resume.
    fn export_diff(&mut self, data_out: &Path) -> impl Future<Output = Result<PausedDisk>> + Send;
}
