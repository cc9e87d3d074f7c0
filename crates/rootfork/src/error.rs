//! The daemon's errors, each mapped to one gRPC status code and one errno (for metrics).

use crate::names::NameError;

/// An error of a daemon operation.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A malformed name or id.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Other bad input.
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown template.
    #[error("template {0:?} not found")]
    TemplateNotFound(String),
    /// Unknown sandbox.
    #[error("sandbox {0:?} not found")]
    SandboxNotFound(String),
    /// Duplicate template.
    #[error("template {0:?} already exists")]
    TemplateExists(String),
    /// Duplicate live sandbox.
    #[error("sandbox {0:?} already exists")]
    SandboxExists(String),
    /// The object is in the wrong state for the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The kernel pool is absent or exhausted.
    #[error("{0}")]
    Unavailable(String),
    /// A device was not ready in time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A provider failed.
    #[error("provider: {0}")]
    Provider(#[from] rootfork_provider::ProviderError),
    /// Booting the sandbox's VM failed.
    #[error("vm: {0}")]
    Vm(#[from] rootfork_vmm::qemu::QemuError),
    /// Host I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

impl DaemonError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DaemonError::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC status code.
    pub fn code(&self) -> tonic::Code {
        use rootfork_provider::ProviderError as P;
        use tonic::Code;
        match self {
            DaemonError::Name(_) | DaemonError::InvalidArgument(_) => Code::InvalidArgument,
            DaemonError::TemplateNotFound(_) | DaemonError::SandboxNotFound(_) => Code::NotFound,
            DaemonError::TemplateExists(_) | DaemonError::SandboxExists(_) => Code::AlreadyExists,
            DaemonError::FailedPrecondition(_) => Code::FailedPrecondition,
            DaemonError::Unavailable(_) => Code::Unavailable,
            DaemonError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            DaemonError::Provider(p) => match p {
                P::Timeout(_) => Code::DeadlineExceeded,
                P::InvalidArgument(_) => Code::InvalidArgument,
                P::Unsupported { .. } => Code::FailedPrecondition,
                P::AttachFailed(inner) if matches!(**inner, P::Kernel(_)) => Code::Unavailable,
                P::Kernel(_) => Code::Unavailable,
                _ => Code::Internal,
            },
            DaemonError::Vm(v) => match v {
                rootfork_vmm::qemu::QemuError::Missing { .. }
                | rootfork_vmm::qemu::QemuError::InvalidConfig(_) => Code::InvalidArgument,
                _ => Code::Internal,
            },
            DaemonError::Io { .. } => Code::Internal,
        }
    }

    /// The errno this error is counted under in metrics.
    pub fn errno(&self) -> i32 {
        match self {
            DaemonError::Name(_) | DaemonError::InvalidArgument(_) => libc::EINVAL,
            DaemonError::TemplateNotFound(_) | DaemonError::SandboxNotFound(_) => libc::ENOENT,
            DaemonError::TemplateExists(_) | DaemonError::SandboxExists(_) => libc::EEXIST,
            DaemonError::FailedPrecondition(_) => libc::EBUSY,
            DaemonError::Unavailable(_) => libc::ENODEV,
            DaemonError::DeadlineExceeded(_) => libc::ETIMEDOUT,
            DaemonError::Provider(rootfork_provider::ProviderError::Timeout(_)) => libc::ETIMEDOUT,
            DaemonError::Provider(rootfork_provider::ProviderError::Kernel(k)) => k.errno(),
            DaemonError::Provider(_) | DaemonError::Vm(_) => libc::EIO,
            DaemonError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

impl From<DaemonError> for tonic::Status {
    fn from(e: DaemonError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, DaemonError>;
