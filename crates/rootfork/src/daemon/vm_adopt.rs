//! Adopting a running sandbox's VM at start, once its disk is served again (`adopt.rs`): the
//! process its record names (QEMU: [`VmProcess`]; Firecracker: [`FcProcess`]) must still run,
//! have been started at the recorded time (a pid reused by another process is refused) and name
//! the recorded QMP or API socket on its command line. A Firecracker VM's host link must still
//! resolve to the adopted device, its API must answer and it must hold that device open (the
//! `/proc/PID/fd` check of a launch). It is then this daemon's VM again: watched and killed
//! through a pidfd, paused over QMP or its API (reconnected to the kept socket), killed by a
//! delete.

use std::path::Path;

use rootfork_provider::AnyProvider;
use rootfork_vmm::firecracker::{VerifyError, VmError, VmmProcess};
use rootfork_vmm::qemu::{ProcessIdentity, QemuError, QemuProcess};
use rootfork_vmm::IdentityError;

use crate::daemon::core::Core;
use crate::daemon::firecracker;
use crate::daemon::records::{FcProcess, RecordedVm, VmProcess};
use crate::daemon::sandbox::Sandbox;
use crate::daemon::vm::{self, RunningVm};

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
    /// The Firecracker process is gone, is another process now, does not run on the adopted
    /// device (then it was killed), or could not be checked.
    #[error("its VM (Firecracker pid {pid}) was not adopted: {source}")]
    FcRefused {
        /// The recorded pid.
        pid: u32,
        /// Why.
        source: Box<VmError>,
    },
    /// The adopted disk is not a device a Firecracker VM can hold, or the template to check
    /// its descriptors against cannot be read.
    #[error("its device cannot be checked against its VM: {0}")]
    Device(Box<crate::error::DaemonError>),
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
            VmAdoptError::FcRefused { source, .. } => match &**source {
                VmError::Adopt(IdentityError::Gone(_))
                | VmError::Process(rootfork_vmm::firecracker::ProcessError::AdoptedExited {
                    ..
                }) => "vm_gone",
                VmError::Adopt(IdentityError::PidReused { .. }) => "vm_pid_reused",
                VmError::Adopt(IdentityError::NotOurs { .. }) => "vm_not_ours",
                VmError::Link(_)
                | VmError::Verify(
                    VerifyError::DeviceNotOpened { .. } | VerifyError::Reattached { .. },
                ) => "vm_device_mismatch",
                _ => "vm_check_failed",
            },
            VmAdoptError::Device(_) | VmAdoptError::Task(_) => "vm_check_failed",
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

/// Checks that a Firecracker record's run directory is `STATE/vm/fc/rf-N` and its API socket
/// the one in it; returns `N`.
fn check_fc_paths(rec: &FcProcess, vm_dir: &Path) -> Result<u64, VmAdoptError> {
    let outside = |p: &Path| VmAdoptError::OutsideStateDir(p.to_owned());
    if rec.run_dir.parent() != Some(vm_dir.join("fc").as_path()) {
        return Err(outside(&rec.run_dir));
    }
    if rec.api_socket != rec.run_dir.join("api.sock") {
        return Err(outside(&rec.api_socket));
    }
    rec.run_dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("rf-"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| outside(&rec.run_dir))
}

/// Takes the process `rec` names back (blocking checks run off the runtime).
async fn take(core: &Core, rec: &VmProcess) -> Result<QemuProcess, VmAdoptError> {
    check_paths(rec, &core.dirs.vm)?;
    if let Some(n) = rec
        .qmp
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
    {
        // New VMs must not be handed this QMP socket's name.
        core.skip_seq_past(n);
    }
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

/// Takes the Firecracker process `rec` names back, on `provider`'s (adopted) device.
async fn take_fc(
    core: &Core,
    sb: &Sandbox,
    provider: &AnyProvider,
    rec: &FcProcess,
) -> Result<rootfork_vmm::firecracker::FirecrackerVm, VmAdoptError> {
    let n = check_fc_paths(rec, &core.dirs.vm)?;
    // New VMs must not be handed this run directory.
    core.skip_seq_past(n);
    let device = vm::ready_device(provider)
        .await
        .map_err(|e| VmAdoptError::Device(Box::new(e)))?;
    let template =
        vm::template_identity(core, sb).map_err(|e| VmAdoptError::Device(Box::new(e)))?;
    firecracker::adopt(
        ProcessIdentity {
            pid: rec.pid,
            start_time: rec.start_time,
        },
        &rec.run_dir,
        &device,
        &template,
    )
    .await
    .map_err(|source| VmAdoptError::FcRefused {
        pid: rec.pid,
        source: Box::new(source),
    })
}

/// Adopts the VM `rec` names as `sb`'s, its disk served by `provider`; `None` when the record
/// names none (its VM had exited before the daemon went: the disk is adopted alone, as it was
/// served alone).
pub async fn adopt(
    core: &Core,
    sb: &Sandbox,
    provider: &AnyProvider,
    rec: Option<&RecordedVm>,
) -> Result<Option<RunningVm>, VmAdoptError> {
    match rec {
        None => Ok(None),
        Some(RecordedVm::Qemu(rec)) => {
            let q = take(core, rec).await?;
            sb.update(|s| {
                s.vm_pid = rec.pid;
                s.vm_console = rec.console.display().to_string();
            });
            Ok(Some(RunningVm::Qemu(q)))
        }
        Some(RecordedVm::Firecracker(rec)) => {
            let f = take_fc(core, sb, provider, rec).await?;
            sb.update(|s| s.vm_pid = rec.pid);
            Ok(Some(RunningVm::Firecracker(Box::new(f))))
        }
    }
}

/// Kills the VM `rec` names if it is still the process recorded (its sandbox's disk could not
/// be served again: its guest would only see I/O errors). Returns the pid killed.
pub async fn kill_recorded(core: &Core, rec: &RecordedVm) -> Option<u32> {
    match rec {
        RecordedVm::Qemu(rec) => {
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
        RecordedVm::Firecracker(rec) => {
            check_fc_paths(rec, &core.dirs.vm).ok()?;
            let identity = ProcessIdentity {
                pid: rec.pid,
                start_time: rec.start_time,
            };
            let log = rec.run_dir.join("vmm.log");
            let p = VmmProcess::adopt(identity, &rec.api_socket, &log).ok()?;
            // Dropping the guard kills it through its pidfd and waits until it is gone.
            tokio::task::spawn_blocking(move || drop(p)).await.ok()?;
            Some(rec.pid)
        }
    }
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
    fn firecracker_records_must_name_a_run_directory_in_vm_fc() {
        let fc = |dir: &str, sock: &str| FcProcess {
            pid: 1,
            start_time: 2,
            api_socket: sock.into(),
            run_dir: dir.into(),
        };
        let vm = Path::new("/s/vm");
        assert_eq!(
            check_fc_paths(&fc("/s/vm/fc/rf-7", "/s/vm/fc/rf-7/api.sock"), vm).unwrap(),
            7
        );
        for (dir, sock) in [
            ("/tmp/rf-7", "/tmp/rf-7/api.sock"),
            ("/s/vm/fc/rf-7", "/s/vm/fc/rf-8/api.sock"),
            ("/s/vm/fc/other", "/s/vm/fc/other/api.sock"),
        ] {
            assert!(
                matches!(
                    check_fc_paths(&fc(dir, sock), vm),
                    Err(VmAdoptError::OutsideStateDir(_))
                ),
                "{dir} {sock}"
            );
        }
        let refused = |source| VmAdoptError::FcRefused {
            pid: 9,
            source: Box::new(source),
        };
        assert_eq!(
            refused(VmError::Adopt(IdentityError::Gone(9))).reason(),
            "vm_gone"
        );
        assert_eq!(
            refused(VmError::Adopt(IdentityError::PidReused {
                pid: 9,
                expected: 1,
                found: 2
            }))
            .reason(),
            "vm_pid_reused"
        );
        assert_eq!(
            refused(VmError::Adopt(IdentityError::NotOurs {
                pid: 9,
                marker: "/s/vm/fc/rf-1/api.sock".into()
            }))
            .reason(),
            "vm_not_ours"
        );
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
