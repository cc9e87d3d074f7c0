//! QEMU backend: boots a kernel whose root disk is a rootfork provider's device.
//!
//! The pieces, one concern each:
//! - [`disk`]: what QEMU's root disk may be — an NBD endpoint on a Unix socket or a ready block
//!   device — and how each becomes a `-blockdev`/`-device` pair;
//! - [`accel`]: choosing KVM or TCG (KVM only when asked for or proven to work by a real probe);
//! - [`config`]: the typed VM description and its command line;
//! - [`process`]: the running QEMU as an RAII guard (killed and reaped on drop) with timed waits;
//!   [`QemuProcess::spawn_verified`] starts it paused and lets the guest run only after
//!   [`verify`] has checked what the process opened (over [`qmp`]);
//! - a process's pid and start time (the crate's `procstat`, shared with Firecracker), by which
//!   a restarted daemon adopts a VM it started ([`QemuProcess::adopt`]);
//! - `snapshot`: the guest's memory and device state to a file and back (a migration stream
//!   over a descriptor passed through QMP): [`QemuProcess::save_state`] and
//!   [`QemuProcess::spawn_restored`].
//!
//! The root disk is never a bare path: it is built from an [`NbdEndpoint`] (a socket, not a file)
//! or from the `drive` module's ready device, so a template image cannot be handed to QEMU by
//! mistake.

pub mod accel;
pub mod config;
pub mod disk;
pub mod error;
pub mod process;
pub mod qmp;
mod snapshot;
pub mod verify;

pub use crate::procstat::ProcessIdentity;
pub use accel::{probe_kvm, Accel, AccelPolicy};
pub use config::{QemuBinary, QemuConfig, DISK_SERIAL_MAX};
pub use disk::{NbdEndpoint, RootDisk};
pub use error::QemuError;
pub use process::{QemuExit, QemuProcess, SavedState};
pub use qmp::Qmp;
pub use verify::verify_root;
