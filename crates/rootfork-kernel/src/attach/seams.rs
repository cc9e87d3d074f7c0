//! The seams an attachment talks through besides netlink: the kernel-mode NBD dispatcher that
//! serves our ends of the socketpairs ([`Dispatcher`]/[`Dispatch`]) and the device nodes
//! ([`DeviceNodes`]); [`HostNodes`] is the real `/dev/nbdN`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::identity::device_path;

/// Starts kernel-mode serving of one device on connected streams.
pub trait Dispatcher: Send + Sync {
    /// The export size in bytes (`NBD_ATTR_SIZE_BYTES`).
    fn size(&self) -> u64;
    /// The transmission flags (`NBD_ATTR_SERVER_FLAGS`).
    fn server_flags(&self) -> u64;
    /// Serves `stream` (our end of one socketpair) until the kernel disconnects or
    /// [`Dispatch::shutdown`] is called.
    fn spawn(&self, stream: UnixStream) -> io::Result<Box<dyn Dispatch>>;
}

/// One running kernel-mode connection.
pub trait Dispatch: Send + Sync {
    /// Stops taking new requests (they are answered `ESHUTDOWN`); in-flight ones finish.
    fn drain(&self);
    /// Shuts the socket down; returns at once.
    fn shutdown(&self);
    /// Requests received and not yet answered.
    fn in_flight(&self) -> usize;
    /// How long the oldest request received and not yet answered has waited; `None` when
    /// there is none. For "request stuck" health checks.
    fn oldest_request_age(&self) -> Option<Duration>;
    /// Whether the connection has ended.
    fn is_finished(&self) -> bool;
    /// Joins the connection (after it ended or was shut down).
    fn wait(self: Box<Self>);
}

/// Opens and flushes device nodes.
pub trait DeviceNodes: Send + Sync {
    /// Opens the device of slot `index` (read-only: the fd is for flushing and checks, and closing
    /// a device opened for writing makes udev's watch probe it again).
    fn open(&self, index: u32) -> io::Result<File>;
    /// Makes completed writes durable and drops cached pages: `fsync`, then `BLKFLSBUF`.
    fn flush(&self, file: &File) -> io::Result<()>;
    /// Drops cached pages (writing back dirty ones first) without asking the device to make
    /// anything durable: `BLKFLSBUF` alone (no `NBD_CMD_FLUSH` round trip). For a warm slot's
    /// bind, where the device never accepted a write. By default [`DeviceNodes::flush`].
    fn drop_cache(&self, file: &File) -> io::Result<()> {
        self.flush(file)
    }
}

/// The host's `/dev/nbdN` nodes.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostNodes;

nix::ioctl_none!(blkflsbuf, 0x12, 97);

impl DeviceNodes for HostNodes {
    fn open(&self, index: u32) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(device_path(index))
    }

    fn flush(&self, file: &File) -> io::Result<()> {
        // Writeback errors of the block device surface here.
        file.sync_all()?;
        self.drop_cache(file)
    }

    fn drop_cache(&self, file: &File) -> io::Result<()> {
        // BLKFLSBUF writes dirty pages back (errors surface) and then invalidates the clean
        // ones.
        // SAFETY: BLKFLSBUF takes no argument; the fd is a valid open block device owned by
        // `file` for the duration of the call.
        unsafe { blkflsbuf(file.as_raw_fd()) }.map_err(io::Error::from)?;
        Ok(())
    }
}
