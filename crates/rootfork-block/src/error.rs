//! Errors of the block layer and their errno mapping.
//!
//! Every error that can reach a client carries an errno ([`BlockError::errno`]) so the NBD layer
//! can answer with the code the protocol names instead of dropping the connection.

use std::io;

/// Result alias for the block layer.
pub type Result<T> = std::result::Result<T, BlockError>;

/// An error from a block device operation.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches past the end of the device.
    #[error("range {offset}+{len} is outside the device of {size} bytes")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the device.
        size: u64,
    },
    /// The device does not accept writes.
    #[error("the device is read-only")]
    ReadOnly,
    /// The operation is not supported by this device.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// An argument is invalid (for example a block size that is not a power of two, or a diff
    /// map whose runs overlap).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The device has been shut down (for example while draining before export).
    #[error("the device is shut down")]
    Shutdown,
    /// An I/O error from the storage underneath, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What the device was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl BlockError {
    /// Wraps an I/O error with a short description of the operation.
    pub fn io(context: &'static str, source: io::Error) -> Self {
        BlockError::Io { context, source }
    }

    /// An I/O error carrying a plain errno, with a short description of the operation.
    pub fn errno_io(context: &'static str, errno: i32) -> Self {
        BlockError::Io {
            context,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// Checks that `len` bytes at `offset` lie inside a device of `size` bytes.
    pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }

    /// The errno that best describes this error on the wire.
    ///
    /// The NBD protocol names `EPERM`, `EIO`, `ENOMEM`, `EINVAL`, `ENOSPC`, `EOVERFLOW`,
    /// `ENOTSUP` and `ESHUTDOWN`; the NBD layer maps any other errno to `EIO`.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } => libc::ENOSPC,
            BlockError::ReadOnly => libc::EPERM,
            BlockError::Unsupported(_) => libc::ENOTSUP,
            BlockError::InvalidArgument(_) => libc::EINVAL,
            BlockError::Shutdown => libc::ESHUTDOWN,
            BlockError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}
