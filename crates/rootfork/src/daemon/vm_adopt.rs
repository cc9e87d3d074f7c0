//! Adopting a running sandbox's QEMU VM at start, once its disk is served again (`adopt.rs`):
//! the process its record names ([`VmProcess`]) must still run, have been started at the
//! recorded time (a pid reused by another process is refused) and name the recorded QMP socket
//! on its command line. It is then this daemon's VM again: watched and killed through a pidfd,
//! paused over QMP (reconnected to the kept socket when first needed), killed by a delete.

use std::path::Path;

use rootfork_vmm::qemu::{ProcessIdentity, QemuError, QemuProcess};

use crate::daemon::core::Core;
use crate::daemon::records::VmProcess;
use crate::daemon::sandbox::Sandbox;
use crate::daemon::vm::RunningVm;

/// Why a running sandbox's VM was not adopted.
#[derive(Debug, thiserror::Error)]
pub enum VmAdoptError {
    /// The record names a file outside the state directory's `vm/`.
    #[error("its record names {0}, outside this state directory's vm/")]
    OutsideStateDir(std::path::PathBuf),
    /// The process is gone, is another process now, or could not be checked.
    #[error("its VM (QEMU pid {pid}) was not adopted: {source}")]
    Refused {
        /// The recorded pid.
        pid: u32,
        /// Why.
        source: QemuError,
    },
    /// The blocking task checking the process failed.
    #[error("checking its VM failed: {0}")]
    Task(String),
}

impl VmAdoptError {
    /// The `reason` label of `rootfork_adoptions_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            VmAdoptError::OutsideStateDir(_) => "record_invalid",
            VmAdoptError::Refused { source, .. } => match source {
                QemuError::ProcessGone(_) => "vm_gone",
                QemuError::PidReused { .. } => "vm_pid_reused",
                QemuError::NotOurVm { .. } => "vm_not_ours",
                _ => "vm_check_failed",
            },
            VmAdoptError::Task(_) => "vm_check_failed",
        }
    }
}

/// Checks that each of `rec`'s paths lies directly in `dir`.
fn check_paths(rec: &VmProcess, dir: &Path) -> Result<(), VmAdoptError> {
    for p in [&rec.qmp, &rec.console, &rec.log] {
        if p.parent() != Some(dir) || p.file_name().is_none() {
            return Err(VmAdoptError::OutsideStateDir(p.clone()));
        }
    }
    Ok(())
}

/// Takes the process `rec` names back (blocking checks run off the runtime).
async fn take(core: &Core, rec: &VmProcess) -> Result<QemuProcess, VmAdoptError> {
    check_paths(rec, &core.dirs.vm)?;
    let rec = rec.clone();
    let pid = rec.pid;
    tokio::task::spawn_blocking(move || {
        QemuProcess::adopt(
            ProcessIdentity {
                pid: rec.pid,
                start_time: rec.start_time,
            },
            &rec.qmp,
            Some(rec.console.clone()),
            &rec.log,
        )
    })
    .await
    .map_err(|e| VmAdoptError::Task(e.to_string()))?
    .map_err(|source| VmAdoptError::Refused { pid, source })
}

/// Adopts the VM `rec` names as `sb`'s; `None` when the record names none (its VM had exited
/// before the daemon went: the disk is adopted alone, as it was served alone).
pub async fn adopt(
    core: &Core,
    sb: &Sandbox,
    rec: Option<&VmProcess>,
) -> Result<Option<RunningVm>, VmAdoptError> {
    let Some(rec) = rec else {
        return Ok(None);
    };
    let q = take(core, rec).await?;
    sb.update(|s| {
        s.vm_pid = rec.pid;
        s.vm_console = rec.console.display().to_string();
    });
    Ok(Some(RunningVm::Qemu(q)))
}

/// Kills the VM `rec` names if it is still the process recorded (its sandbox's disk could not
/// be served again: its guest would only see I/O errors). Returns the pid killed.
pub async fn kill_recorded(core: &Core, rec: &VmProcess) -> Option<u32> {
    let mut q = take(core, rec).await.ok()?;
    let pid = q.pid();
    let qmp = rec.qmp.clone();
    tokio::task::spawn_blocking(move || {
        q.kill();
        let _ = std::fs::remove_file(qmp);
    })
    .await
    .ok()?;
    Some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(dir: &str) -> VmProcess {
        VmProcess {
            pid: 1,
            start_time: 2,
            qmp: format!("{dir}/3.qmp").into(),
            console: format!("{dir}/a.console").into(),
            log: format!("{dir}/a.qemu.log").into(),
        }
    }

    #[test]
    fn recorded_paths_must_lie_in_the_vm_directory() {
        assert!(check_paths(&rec("/s/vm"), Path::new("/s/vm")).is_ok());
        let mut r = rec("/s/vm");
        r.qmp = "/tmp/evil.qmp".into();
        assert!(matches!(
            check_paths(&r, Path::new("/s/vm")),
            Err(VmAdoptError::OutsideStateDir(_))
        ));
    }

    #[test]
    fn refusals_have_their_own_reasons() {
        let refused = |source| VmAdoptError::Refused { pid: 9, source };
        assert_eq!(refused(QemuError::ProcessGone(9)).reason(), "vm_gone");
        assert_eq!(
            refused(QemuError::PidReused {
                pid: 9,
                expected: 1,
                found: 2
            })
            .reason(),
            "vm_pid_reused"
        );
        assert_eq!(
            refused(QemuError::NotOurVm {
                pid: 9,
                qmp: "/s/vm/1.qmp".into()
            })
            .reason(),
            "vm_not_ours"
        );
        assert_eq!(
            VmAdoptError::OutsideStateDir("/x".into()).reason(),
            "record_invalid"
        );
    }
}
