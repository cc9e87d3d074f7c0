//! VMM backends for rootfork: the Firecracker API client and process launcher, and QEMU.

pub mod qemu;
