//! Rootfs providers: one trait over kernel NBD, socket NBD and direct files.
