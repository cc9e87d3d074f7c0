//! The daemon's errors, each mapped to one gRPC status code and one errno (for metrics). Every
//! case a caller may act on is its own variant with typed fields; the strings that remain are
//! descriptions for people (an I/O step, the kernel's reason for being unavailable).

use std::path::PathBuf;

use crate::daemon::model::SandboxState;
use crate::daemon::spec::SpecError;
use crate::daemon::templates::TEMPLATE_ALIGN;
use crate::names::NameError;

/// A lifecycle operation that needs its sandbox in a given state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Pause (needs `running`).
    Pause,
    /// Resume (needs `paused`).
    Resume,
    /// Fork (needs `paused`).
    Fork,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Fork => "fork",
        })
    }
}

/// Why a template import's source is refused.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The daemon opens the path itself, so it must not depend on the client's directory.
    #[error("source path {} must be absolute (it is opened by the daemon)", .0.display())]
    NotAbsolute(PathBuf),
    /// Nothing at the path.
    #[error("source {} does not exist", .0.display())]
    Missing(PathBuf),
    /// The path could not be opened.
    #[error("cannot open source {}: {source}", .path.display())]
    Unreadable {
        /// The source.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A directory, socket, FIFO, ...
    #[error("source {} is neither a regular file nor a block device", .0.display())]
    NotFileOrDevice(PathBuf),
    /// Block devices are importable only when the configuration allows it.
    #[error("source {} is a block device; importing block devices is off (templates.allow_block_devices)", .0.display())]
    BlockDeviceRefused(PathBuf),
    /// A caller over TCP may import only from the configured directories.
    #[error("over TCP, templates are imported only from templates.import_dirs; {} is not inside one", .0.display())]
    OutsideImportDirs(PathBuf),
    /// Empty or not a whole number of template blocks.
    #[error("source {} is {size} bytes; a template must be a non-empty multiple of {TEMPLATE_ALIGN} bytes", .path.display())]
    BadSize {
        /// The source.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// An error of a daemon operation.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A malformed name or id.
    #[error(transparent)]
    Name(#[from] NameError),
    /// An invalid create request.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// An unusable import source.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// A malformed fork request.
    #[error(transparent)]
    Fork(#[from] crate::daemon::fork::ForkError),
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
    /// Sandboxes still use the template.
    #[error("template {name:?} is used by {users} sandbox(es); delete them first")]
    TemplateInUse {
        /// The template.
        name: String,
        /// How many sandboxes (not deleted) use it.
        users: u32,
    },
    /// The sandbox is not in the state the operation needs.
    #[error("cannot {op} sandbox {id:?}: it is {state}")]
    WrongState {
        /// What was asked.
        op: Operation,
        /// The sandbox.
        id: String,
        /// Its state.
        state: SandboxState,
    },
    /// The sandbox holds a saved VM state but its settings name no VM the daemon runs.
    #[error("sandbox {0:?} has no VM the daemon runs")]
    NoVm(String),
    /// A running sandbox without a device (it failed while serving).
    #[error("sandbox {0:?} has no device")]
    NoDevice(String),
    /// A paused sandbox without its paused disk.
    #[error("sandbox {0:?} holds no paused disk")]
    NoPausedDisk(String),
    /// Not enough free space for what the operation must write.
    #[error("not enough space in {}: {needed} bytes needed, {available} available", .path.display())]
    NoSpace {
        /// Where it would be written.
        path: PathBuf,
        /// Bytes it needs (at most).
        needed: u64,
        /// Bytes free there.
        available: u64,
    },
    /// A limit would be passed.
    #[error("cannot create another sandbox: {0}")]
    ResourceExhausted(#[from] crate::daemon::limits::Exhausted),
    /// The kernel pool cannot be used (the reason is for people).
    #[error("{0}")]
    KernelUnavailable(String),
    /// A provider failed.
    #[error("provider: {0}")]
    Provider(#[from] rootfork_provider::ProviderError),
    /// Booting the sandbox's VM failed.
    #[error("vm: {0}")]
    Vm(#[from] rootfork_vmm::qemu::QemuError),
    /// Launching, pausing or restoring the sandbox's Firecracker failed.
    #[error("firecracker: {0}")]
    Firecracker(Box<rootfork_vmm::firecracker::VmError>),
    /// Writing or reading a build of the store (a template's base build, a pause's layer)
    /// failed: I/O, or a build that is missing or damaged.
    #[error("build store: {0}")]
    Layer(#[source] rootfork_block::layered::LayerError),
    /// Another host holds the sandbox in the object store.
    #[error("sandbox {id:?} is held by host {host} in the object store: it {state}")]
    HeldElsewhere {
        /// The sandbox.
        id: String,
        /// The holder's host name.
        host: String,
        /// What it does there.
        state: &'static str,
    },
    /// The object store cannot be reached, or the sandbox is not there yet.
    #[error("{0}")]
    StoreUnavailable(String),
    /// The sandbox cannot move to this host.
    #[error("{0}")]
    NoMove(String),
    /// The call needs an object store and the daemon has none.
    #[error("this daemon has no object store (start it with --store)")]
    NoStore,
    /// A blocking task of the operation panicked or was cancelled.
    #[error("{what}: {reason}")]
    TaskFailed {
        /// What the task was doing.
        what: &'static str,
        /// The join error.
        reason: String,
    },
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

    /// A blocking task that did not return.
    pub fn task(what: &'static str, e: tokio::task::JoinError) -> Self {
        DaemonError::TaskFailed {
            what,
            reason: e.to_string(),
        }
    }

    /// Whether the caller sent something malformed (logged at a lower level).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            DaemonError::Name(_)
                | DaemonError::Spec(_)
                | DaemonError::Import(_)
                | DaemonError::Fork(_)
        )
    }

    /// The gRPC status code.
    pub fn code(&self) -> tonic::Code {
        use rootfork_provider::ProviderError as P;
        use tonic::Code;
        match self {
            DaemonError::Import(
                ImportError::OutsideImportDirs(_) | ImportError::BlockDeviceRefused(_),
            ) => Code::PermissionDenied,
            DaemonError::Name(_)
            | DaemonError::Spec(_)
            | DaemonError::Import(_)
            | DaemonError::Fork(_) => Code::InvalidArgument,
            DaemonError::TemplateNotFound(_) | DaemonError::SandboxNotFound(_) => Code::NotFound,
            DaemonError::TemplateExists(_) | DaemonError::SandboxExists(_) => Code::AlreadyExists,
            DaemonError::TemplateInUse { .. }
            | DaemonError::WrongState { .. }
            | DaemonError::NoVm(_)
            | DaemonError::NoDevice(_)
            | DaemonError::NoPausedDisk(_)
            | DaemonError::HeldElsewhere { .. }
            | DaemonError::NoMove(_)
            | DaemonError::NoStore => Code::FailedPrecondition,
            DaemonError::StoreUnavailable(_) => Code::Unavailable,
            DaemonError::KernelUnavailable(_) => Code::Unavailable,
            DaemonError::ResourceExhausted(_) | DaemonError::NoSpace { .. } => {
                Code::ResourceExhausted
            }
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
            DaemonError::Firecracker(_)
            | DaemonError::Layer(_)
            | DaemonError::TaskFailed { .. }
            | DaemonError::Io { .. } => Code::Internal,
        }
    }

    /// The errno this error is counted under in metrics.
    pub fn errno(&self) -> i32 {
        match self {
            DaemonError::Import(
                ImportError::OutsideImportDirs(_) | ImportError::BlockDeviceRefused(_),
            ) => libc::EACCES,
            DaemonError::Name(_)
            | DaemonError::Spec(_)
            | DaemonError::Import(_)
            | DaemonError::Fork(_) => libc::EINVAL,
            DaemonError::TemplateNotFound(_) | DaemonError::SandboxNotFound(_) => libc::ENOENT,
            DaemonError::TemplateExists(_) | DaemonError::SandboxExists(_) => libc::EEXIST,
            DaemonError::TemplateInUse { .. }
            | DaemonError::WrongState { .. }
            | DaemonError::NoVm(_)
            | DaemonError::NoDevice(_)
            | DaemonError::NoPausedDisk(_)
            | DaemonError::HeldElsewhere { .. }
            | DaemonError::NoMove(_) => libc::EBUSY,
            DaemonError::NoStore => libc::ENOTSUP,
            DaemonError::StoreUnavailable(_) => libc::EAGAIN,
            DaemonError::KernelUnavailable(_) => libc::ENODEV,
            DaemonError::ResourceExhausted(crate::daemon::limits::Exhausted::Sandboxes {
                ..
            }) => libc::EAGAIN,
            DaemonError::ResourceExhausted(crate::daemon::limits::Exhausted::Disk { .. }) => {
                libc::ENOSPC
            }
            DaemonError::ResourceExhausted(_) => libc::EMFILE,
            DaemonError::NoSpace { .. } => libc::ENOSPC,
            DaemonError::Provider(rootfork_provider::ProviderError::Timeout(_)) => libc::ETIMEDOUT,
            DaemonError::Provider(rootfork_provider::ProviderError::Kernel(k)) => k.errno(),
            DaemonError::Provider(_)
            | DaemonError::Vm(_)
            | DaemonError::Firecracker(_)
            | DaemonError::TaskFailed { .. } => libc::EIO,
            DaemonError::Io { source, .. }
            | DaemonError::Layer(rootfork_block::layered::LayerError::Io { source, .. }) => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            DaemonError::Layer(_) => libc::EIO,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_code_and_errno() {
        let cases: Vec<(DaemonError, tonic::Code, i32)> = vec![
            (
                SpecError::QemuNeedsKernel.into(),
                tonic::Code::InvalidArgument,
                libc::EINVAL,
            ),
            (
                ImportError::Missing("/x".into()).into(),
                tonic::Code::InvalidArgument,
                libc::EINVAL,
            ),
            (
                DaemonError::WrongState {
                    op: Operation::Pause,
                    id: "a".into(),
                    state: SandboxState::Paused,
                },
                tonic::Code::FailedPrecondition,
                libc::EBUSY,
            ),
            (
                DaemonError::TemplateInUse {
                    name: "t".into(),
                    users: 2,
                },
                tonic::Code::FailedPrecondition,
                libc::EBUSY,
            ),
            (
                DaemonError::KernelUnavailable("no module".into()),
                tonic::Code::Unavailable,
                libc::ENODEV,
            ),
            (
                DaemonError::io("x", std::io::Error::from_raw_os_error(libc::ENOSPC)),
                tonic::Code::Internal,
                libc::ENOSPC,
            ),
        ];
        for (e, code, errno) in cases {
            assert_eq!((e.code(), e.errno()), (code, errno), "{e}");
        }
    }

    #[test]
    fn wrong_state_reads_as_before() {
        let e = DaemonError::WrongState {
            op: Operation::Resume,
            id: "sb".into(),
            state: SandboxState::Running,
        };
        assert_eq!(e.to_string(), "cannot resume sandbox \"sb\": it is running");
    }
}
