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
    /// An overlay's persisted state file (`<cache>.state`) does not exist.
    #[error("the overlay's state file {0} does not exist")]
    StateMissing(std::path::PathBuf),
    /// An overlay's persisted state file cannot be trusted: wrong magic, version or checksum,
    /// impossible fields, or shorter than its map.
    #[error("the overlay's state file is damaged: {0}")]
    StateDamaged(&'static str),
    /// An overlay's state file describes a different disk than the one it is reopened with.
    #[error("the overlay's state file has {field} {in_file}, but the reopen asks for {requested}")]
    StateMismatch {
        /// Which property differs.
        field: StateField,
        /// The value recorded in the state file.
        in_file: u64,
        /// The value of the base and options the overlay is reopened with.
        requested: u64,
    },
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

/// A property of a disk recorded in an overlay's state file and checked on reopen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateField {
    /// The overlay's block size.
    BlockSize,
    /// The overlay's size (the base's, or the grown disk's).
    DeviceSize,
    /// The base device's size.
    BaseSize,
    /// The cache file's length.
    CacheSize,
}

impl std::fmt::Display for StateField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StateField::BlockSize => "block size",
            StateField::DeviceSize => "device size",
            StateField::BaseSize => "base size",
            StateField::CacheSize => "cache size",
        })
    }
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
            BlockError::StateMissing(_) => libc::ENOENT,
            BlockError::StateDamaged(_) => libc::EUCLEAN,
            BlockError::StateMismatch { .. } => libc::EINVAL,
            BlockError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}
