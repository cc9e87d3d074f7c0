//! VMM backends for rootfork: the Firecracker API client and process launcher, and QEMU.
//!
//! The root drive's path types ([`DevicePath`], [`ReadyDevice`], [`StableDrivePath`],
//! [`RootDrive`]) make configuring a VMM with a template path a compile error; the
//! [`firecracker`] module adds the run-time check on what the VMM process really opened.
//! The tests run Firecracker's API against a double, the development crate
//! `rootfork-fc-double`, which is not part of what ships.

mod attachment;
mod drive;
pub mod firecracker;
mod identity;
pub mod procstat;
pub mod qemu;

pub use attachment::block_attachment;
pub use drive::{DevicePath, DriveAccess, DriveError, ReadyDevice, RootDrive, StableDrivePath};
pub use identity::{FileIdentity, FileKind};
pub use procstat::{IdentityError, ProcessIdentity};
