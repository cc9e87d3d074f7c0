//! Errors of the providers.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rootfork_block::BlockError;
use rootfork_kernel::AttachError;
use rootfork_nbd::ServerError;
use rootfork_vmm::qemu::QemuError;
use rootfork_vmm::DriveError;

/// Result alias for providers.
pub type Result<T> = std::result::Result<T, ProviderError>;

/// An error from a provider.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// `path()`/`export_diff()` before `start()`.
    #[error("the provider has not been started")]
    NotStarted,
    /// `start()` called twice.
    #[error("the provider has already been started")]
    AlreadyStarted,
    /// The provider has been closed.
    #[error("the provider is closed")]
    Closed,
    /// The device is still attaching (an operation that needs it ready was called too early).
    #[error("the device is still attaching")]
    NotReady,
    /// `path()` gave up waiting.
    #[error("the device was not ready within {0:?}")]
    Timeout(Duration),
    /// `path()` was cancelled by the caller.
    #[error("waiting for the device was cancelled")]
    Cancelled,
    /// The background attach failed; every waiter sees the same error.
    #[error("attaching failed: {0}")]
    AttachFailed(Arc<ProviderError>),
    /// The operation does not exist for this kind of provider.
    #[error("{op} is not supported by the {kind} provider")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The provider kind.
        kind: &'static str,
    },
    /// A destination that must be new already exists.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// Bad input.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The block layer (template, overlay, diff) failed.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The layered build a sandbox is stacked on could not be opened (missing, damaged, or not
    /// of the chain its map names).
    #[error("opening the layered base: {0}")]
    Layer(#[from] rootfork_block::layered::LayerError),
    /// The device could not be verified as ready.
    #[error(transparent)]
    Drive(#[from] DriveError),
    /// The NBD endpoint is not valid.
    #[error(transparent)]
    Endpoint(#[from] QemuError),
    /// Attaching to or detaching from the kernel's `nbd` driver failed.
    #[error("kernel NBD: {0}")]
    Kernel(#[from] AttachError),
    /// The NBD server failed.
    #[error("NBD server: {0}")]
    Nbd(#[from] ServerError),
    /// A host I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A background task panicked or was aborted.
    #[error("background task failed: {0}")]
    Task(String),
}

impl ProviderError {
    /// The errno that best describes this error (for metrics and for callers that answer over
    /// a wire): the underlying layer's errno where there is one.
    pub fn errno(&self) -> i32 {
        match self {
            ProviderError::NotStarted | ProviderError::NotReady => libc::EAGAIN,
            ProviderError::AlreadyStarted => libc::EALREADY,
            ProviderError::Closed => libc::ESHUTDOWN,
            ProviderError::Timeout(_) => libc::ETIMEDOUT,
            ProviderError::Cancelled => libc::ECANCELED,
            ProviderError::AttachFailed(inner) => inner.errno(),
            ProviderError::Unsupported { .. } => libc::ENOTSUP,
            ProviderError::Exists(_) => libc::EEXIST,
            ProviderError::InvalidArgument(_) | ProviderError::Endpoint(_) => libc::EINVAL,
            ProviderError::Block(e) => e.errno(),
            ProviderError::Layer(rootfork_block::layered::LayerError::Io { source, .. }) => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            ProviderError::Layer(rootfork_block::layered::LayerError::MissingBuild(_)) => {
                libc::ENOENT
            }
            ProviderError::Layer(_) => libc::EIO,
            ProviderError::Drive(_) => libc::ENODEV,
            ProviderError::Kernel(e) => e.errno(),
            ProviderError::Nbd(rootfork_nbd::ServerError::AddressInUse(_)) => libc::EADDRINUSE,
            ProviderError::Nbd(rootfork_nbd::ServerError::Io { source, .. })
            | ProviderError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ProviderError::Nbd(_) | ProviderError::Task(_) => libc::EIO,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ProviderError::Io {
            context: context.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_follows_the_cause() {
        assert_eq!(
            ProviderError::Timeout(Duration::ZERO).errno(),
            libc::ETIMEDOUT
        );
        assert_eq!(ProviderError::Cancelled.errno(), libc::ECANCELED);
        assert_eq!(ProviderError::Closed.errno(), libc::ESHUTDOWN);
        let nested = ProviderError::AttachFailed(Arc::new(ProviderError::Exists("/x".into())));
        assert_eq!(nested.errno(), libc::EEXIST);
        let io = ProviderError::io("x", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(io.errno(), libc::ENOSPC);
        assert_eq!(
            ProviderError::Block(BlockError::ReadOnly).errno(),
            libc::EPERM
        );
    }
}
