//! Errors of the template store.
//!
//! [`FetchError`] is what one chunk or map fetch can end in; it is `Clone` because a single
//! flight hands the same outcome to every waiting reader. On the block read path every
//! [`FetchError`] becomes `EIO` for that request only (see [`FetchError::to_io`]).

use std::io;
use std::time::Duration;

use rootfork_block::layered::LayerError;

/// How a fetch from the object store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The object does not exist.
    #[error("{key}: not found in the object store")]
    NotFound {
        /// Object key.
        key: String,
    },
    /// No attempt succeeded before the fetch deadline.
    #[error("{key}: no answer within {after:?} ({attempts} attempts; last error: {last})")]
    Timeout {
        /// Object key.
        key: String,
        /// The deadline.
        after: Duration,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error, if any.
        last: String,
    },
    /// Every attempt failed.
    #[error("{key}: fetch failed after {attempts} attempts: {last}")]
    Failed {
        /// Object key.
        key: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// The fetched bytes do not match the build's checksums (on every attempt).
    #[error("{key}: chunk at {offset} fails its checksum")]
    Checksum {
        /// Object key.
        key: String,
        /// Offset of the failing checksum chunk in the object.
        offset: u64,
    },
    /// The store's runtime is gone (the store is shutting down).
    #[error("the store's runtime has shut down")]
    Shutdown,
    /// A blocking store call was made from one of the store's own runtime threads.
    #[error("blocking store call from the store's own runtime thread (would deadlock)")]
    StoreThread,
}

impl FetchError {
    /// The error as seen by a block read: `EIO` with this error as its message.
    pub fn to_io(&self) -> io::Error {
        io::Error::other(EioError(self.to_string()))
    }
}

/// An `io::Error` payload that carries `EIO` as its errno for the NBD layer.
#[derive(Debug)]
struct EioError(String);

impl std::fmt::Display for EioError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EioError {}

/// An error of the store's own operations (configuration, upload, open).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration cannot work.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// Building the object store client failed.
    #[error("object store client: {0}")]
    Client(#[source] object_store::Error),
    /// An object store request failed.
    #[error("{context}: {source}")]
    Request {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: object_store::Error,
    },
    /// A fetch failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A build is malformed, mismatched or missing.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A boot trace is damaged or of an unknown version.
    #[error("boot trace: {0}")]
    Trace(#[from] crate::trace::TraceError),
    /// A local I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}
