//! Errors of the QEMU backend.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// An error from building, starting or waiting for a QEMU process.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A configuration value cannot be expressed on QEMU's command line.
    #[error("invalid QEMU configuration: {0}")]
    InvalidConfig(String),
    /// `ROOTFORK_QEMU_ACCEL` (or an explicit policy string) is not `tcg`, `kvm` or `auto`.
    #[error("unknown accelerator policy {0:?} (expected tcg, kvm or auto)")]
    UnknownAccel(String),
    /// A file QEMU needs (binary, kernel, initrd) does not exist.
    #[error("{what} not found at {path}")]
    Missing {
        /// What the file is.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// Spawning QEMU failed.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// The QEMU binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating or reading a console/log file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The QMP monitor answered something unexpected or an error.
    #[error("QMP: {0}")]
    Qmp(String),
    /// QEMU opened a template or not the provider's device; the VM was killed before it ran.
    #[error(transparent)]
    Verify(#[from] crate::firecracker::VerifyError),
    /// Writing the VM's state to a file, or loading it, failed.
    #[error("VM state migration: {0}")]
    Migration(String),
    /// The VM has no QMP monitor (it was not started by [`super::QemuProcess::spawn_verified`]
    /// or [`super::QemuProcess::spawn_restored`]).
    #[error("the VM has no QMP monitor")]
    NoMonitor,
    /// The process a record names no longer runs (it exited, or is a zombie).
    #[error("process {0} is gone")]
    ProcessGone(u32),
    /// The recorded pid belongs to a process started at another time: the pid was reused.
    #[error("pid {pid} is another process now (started at tick {found}, the recorded one at {expected})")]
    PidReused {
        /// The pid.
        pid: u32,
        /// The recorded start time.
        expected: u64,
        /// The start time of the process that holds the pid now.
        found: u64,
    },
    /// The process holding the pid is not the VM the daemon started (its command line does not
    /// name the VM's QMP socket).
    #[error("process {pid} is not the VM the daemon started (its command line does not name {})", qmp.display())]
    NotOurVm {
        /// The pid.
        pid: u32,
        /// The QMP socket the VM was started with.
        qmp: PathBuf,
    },
    /// `/proc/PID/stat` could not be parsed.
    #[error("/proc/{pid}/stat: {why}")]
    ProcStat {
        /// The pid.
        pid: u32,
        /// What was wrong.
        why: String,
    },
    /// The VM did not exit within the allowed time (it has been killed).
    #[error("QEMU did not exit within {0:?}")]
    Timeout(Duration),
}

impl QemuError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        QemuError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<crate::procstat::IdentityError> for QemuError {
    fn from(e: crate::procstat::IdentityError) -> Self {
        use crate::procstat::IdentityError as E;
        match e {
            E::Gone(pid) => QemuError::ProcessGone(pid),
            E::PidReused {
                pid,
                expected,
                found,
            } => QemuError::PidReused {
                pid,
                expected,
                found,
            },
            E::NotOurs { pid, marker } => QemuError::NotOurVm { pid, qmp: marker },
            E::Stat { pid, why } => QemuError::ProcStat { pid, why },
            E::Io { context, source } => QemuError::Io { context, source },
        }
    }
}
