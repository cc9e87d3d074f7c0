//! Adoption at start: a sandbox that was running when the previous daemon went away (SIGKILL,
//! OOM, a crash, or a SIGTERM for a restart) is served again: its overlay is reopened from the
//! cache file and block state its record names, over the same base (template, or template + its
//! last pause's diff), and
//!
//! * a socket sandbox's on the same Unix socket and export name, so a client that reconnects
//!   (QEMU's NBD driver with `reconnect-delay`, a libnbd client retrying) carries on;
//! * a kernel sandbox's on the same `/dev/nbdN`, which the kernel kept connected: the device must
//!   be among this instance's own devices ([`KernelSide::own_devices`]), for that sandbox and
//!   orphaned; its claim is taken again and it is handed new sockets with `NBD_CMD_RECONFIGURE`
//!   (rootfork-kernel's `Attacher::adopt`). The kernel holds the guest's I/O meanwhile for up to
//!   the device's `dead_conn_timeout`; a daemon down longer than that fails it.
//!
//! A sandbox with a VM the daemon started (QEMU, or Firecracker on a kernel sandbox's device)
//! has its VM adopted too, once its disk is served again (`vm_adopt.rs`: by pid and start time;
//! a Firecracker VM's drive must still resolve to the adopted device and be held open by it). A VM that is gone or is not the recorded
//! process leaves the sandbox `FAILED` with its disk served, so it can still be paused; a VM
//! whose disk could not be served again is killed.
//!
//! An adoption that fails leaves the sandbox `FAILED`, with a message saying why and which files
//! are kept; nothing is removed at start (a delete removes them, a later start tries again). A
//! kernel sandbox's device that could not be adopted is disconnected and its slot released.
//! Each adoption is reported in the log, as an event, in the sandbox's status message and in
//! `rootfork_adoptions_total` (result, reason).
//!
//! [`KernelSide::own_devices`]: crate::daemon::kernel::KernelSide::own_devices

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rootfork_block::{ReopenReport, StateCopy};
use rootfork_provider::AnyProvider;

use crate::daemon::builds::Layer;

use crate::daemon::core::Core;
use crate::daemon::disk;
use crate::daemon::model::SandboxState;
use crate::daemon::records::{RecordedVm, Served, ServedDevice};
use crate::daemon::sandbox::Sandbox;
use crate::daemon::vm::RunningVm;
use crate::daemon::vm_adopt;
use crate::error::DaemonError;
use crate::events::{EventBus, EventKind};

/// Why a running sandbox was not served again.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The record names a file outside the state directory's `cache/` or `nbd/` (the record was
    /// edited or the directory moved): it is not trusted.
    #[error("its record names {0}, outside this state directory")]
    OutsideStateDir(PathBuf),
    /// The overlay's cache file is gone.
    #[error("its overlay cache {0} is missing")]
    CacheMissing(PathBuf),
    /// The overlay's block state is gone.
    #[error("its overlay block state {0} is missing")]
    StateMissing(PathBuf),
    /// The overlay could not be reopened: `reason` is the label (a damaged block state, one
    /// describing another disk, an I/O error).
    #[error("its overlay could not be reopened: {source}")]
    Reopen {
        /// The `reason` label.
        reason: &'static str,
        /// Why.
        source: DaemonError,
    },
    /// The reopened overlay could not be served.
    #[error("its disk could not be served again: {0}")]
    Serve(DaemonError),
    /// The kernel device its record names is not one of this instance's connected devices for
    /// the sandbox (disconnected meanwhile, or the host rebooted).
    #[error("its device /dev/nbd{0} is no longer connected for it")]
    DeviceMissing(u32),
    /// The kernel device is connected with another size than the sandbox's disk.
    #[error("its device /dev/nbd{index} has {got} bytes, its disk {expected}")]
    DeviceResized {
        /// The slot.
        index: u32,
        /// The disk size.
        expected: u64,
        /// What the kernel shows.
        got: u64,
    },
}

impl AdoptError {
    /// The `reason` label of `rootfork_adoptions_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AdoptError::OutsideStateDir(_) => "record_invalid",
            AdoptError::CacheMissing(_) => "cache_missing",
            AdoptError::StateMissing(_) => "state_missing",
            AdoptError::Reopen { reason, .. } => reason,
            AdoptError::Serve(_) => "serve_failed",
            AdoptError::DeviceMissing(_) => "device_missing",
            AdoptError::DeviceResized { .. } => "device_resized",
        }
    }
}

/// Why a running sandbox of a previous run is not even tried (it comes back at its last pause,
/// or `FAILED`, as `persist.rs` says): the `reason` label of a failed adoption.
pub fn not_adoptable_reason() -> &'static str {
    "no_served_disk"
}

/// `path` when its parent is `dir` exactly.
fn inside(path: &Path, dir: &Path) -> Result<(), AdoptError> {
    if path.parent() == Some(dir) && path.file_name().is_some() {
        Ok(())
    } else {
        Err(AdoptError::OutsideStateDir(path.to_owned()))
    }
}

/// The number in `STATE/nbd/N.sock`, if it is named so.
fn socket_number(socket: &Path) -> Option<u64> {
    socket
        .file_name()?
        .to_str()?
        .strip_suffix(".sock")?
        .parse()
        .ok()
}

/// The provider error under `e`, through any `AttachFailed` wrappers.
fn root_provider_error(e: &DaemonError) -> Option<&rootfork_provider::ProviderError> {
    use rootfork_provider::ProviderError;
    let DaemonError::Provider(first) = e else {
        return None;
    };
    let mut p: &ProviderError = first;
    while let ProviderError::AttachFailed(inner) = p {
        p = inner;
    }
    Some(p)
}

/// When `e` is an overlay error (the reopen failed rather than the serving): the `reason` label.
fn reopen_reason(e: &DaemonError) -> Option<&'static str> {
    use rootfork_block::BlockError;
    let rootfork_provider::ProviderError::Block(b) = root_provider_error(e)? else {
        return None;
    };
    Some(match b {
        BlockError::StateMissing(_) => "state_missing",
        BlockError::StateDamaged(_) => "state_damaged",
        BlockError::StateMismatch { .. } => "state_mismatch",
        _ => "reopen_failed",
    })
}

/// What a reopen found, for the status message.
fn describe(r: &ReopenReport) -> String {
    let copy = match r.copy {
        StateCopy::Live => "the live block state (the previous daemon process ended)",
        StateCopy::Checkpoint => {
            "the last flush's checkpoint (the host restarted: writes after that flush may read old data)"
        }
    };
    format!(
        "reopened from {copy}: {} data and {} zero blocks, opened {} times before",
        r.blocks_data, r.blocks_zero, r.generation
    )
}

/// When `e` says the adopted device has another size than the disk: the error.
fn resized(e: &DaemonError) -> Option<AdoptError> {
    use rootfork_kernel::AttachError;
    let rootfork_provider::ProviderError::Kernel(AttachError::SizeMismatch {
        index,
        expected,
        got,
    }) = root_provider_error(e)?
    else {
        return None;
    };
    Some(AdoptError::DeviceResized {
        index: *index,
        expected: *expected,
        got: *got,
    })
}

/// Checks that the overlay's files are where a record may name them, and there.
fn check_files(core: &Core, cache: &Path) -> Result<(), AdoptError> {
    inside(cache, &core.dirs.cache)?;
    let [cache, state] = disk::overlay_files(cache);
    if !cache.exists() {
        return Err(AdoptError::CacheMissing(cache));
    }
    if !state.exists() {
        return Err(AdoptError::StateMissing(state));
    }
    Ok(())
}

/// Checks that the device `served` names is this instance's, for that sandbox, and orphaned.
fn check_device(core: &Core, served: &ServedDevice) -> Result<(), AdoptError> {
    let own = core.kernel.own_devices().map_err(|e| {
        AdoptError::Serve(DaemonError::KernelUnavailable(format!(
            "listing this instance's nbd devices: {e}"
        )))
    })?;
    own.iter()
        .find(|d| d.index == served.device && d.sandbox == served.backend_sandbox && d.orphaned)
        .map(|_| ())
        .ok_or(AdoptError::DeviceMissing(served.device))
}

/// Serves `sb`'s disk again (its lifecycle lock is free: it is not published yet). `layer` is
/// the build its overlay lies over (`None`: its template's base build).
async fn serve_again(
    core: &Core,
    sb: &Sandbox,
    served: &Served,
    layer: Option<Layer>,
) -> Result<AnyProvider, AdoptError> {
    check_files(core, served.cache())?;
    if let Served::Socket(s) = served {
        inside(&s.socket, &core.dirs.nbd)?;
        if let Some(n) = socket_number(&s.socket) {
            // New sandboxes must not be handed this socket's name.
            core.skip_seq_past(n);
        }
    }
    let top = match layer {
        Some(l) => l.id,
        None => core
            .templates
            .build(&sb.template)
            .ok_or_else(|| AdoptError::Serve(DaemonError::TemplateNotFound(sb.template.clone())))?,
    };
    let base = core.builds.base(top);
    let provider = match served {
        Served::Socket(s) => disk::adopted_provider(core, sb, base, s),
        Served::Kernel(d) => {
            check_device(core, d)?;
            disk::adopted_kernel_provider(core, sb, base, d).map_err(AdoptError::Serve)?
        }
    };
    disk::bring_up(core, sb, provider)
        .await
        .map_err(|e| match (reopen_reason(&e), resized(&e)) {
            (Some(reason), _) => AdoptError::Reopen { reason, source: e },
            (None, Some(r)) => r,
            (None, None) => AdoptError::Serve(e),
        })
}

/// Disconnects and releases the device of a kernel sandbox that was not adopted, if it is still
/// connected for it and nobody holds it (its files are kept).
async fn release_device(core: &Core, sb: &Sandbox, served: &ServedDevice) {
    let still = core.kernel.own_devices().is_ok_and(|own| {
        own.iter()
            .any(|d| d.index == served.device && d.sandbox == served.backend_sandbox && d.orphaned)
    });
    if !still {
        return;
    }
    let r = match core.kernel.attacher() {
        Ok(a) => a
            .disconnect_own(
                served.device,
                &served.backend_sandbox,
                &rootfork_kernel::AttachOptions::default(),
            )
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match r {
        Ok(()) => {
            tracing::info!(sandbox = %sb.id, index = served.device, "disconnected the device of a sandbox that was not adopted")
        }
        Err(e) => {
            tracing::warn!(sandbox = %sb.id, index = served.device, "cannot disconnect the device of a sandbox that was not adopted (the start-up reclaim tries again): {e}")
        }
    }
}

/// Whether `sb` runs a VM that is adopted with it (QEMU or Firecracker).
fn has_vm(sb: &Sandbox) -> bool {
    sb.vm
        .as_ref()
        .is_some_and(|v| v.boots_qemu() || v.runs_firecracker())
}

/// Adopts `sb`, a running sandbox of a previous run, and its VM (`vm`: the process its record
/// names), and reports the outcome. Returns whether it runs again.
pub async fn adopt(
    core: &Core,
    sb: &Arc<Sandbox>,
    served: &Served,
    layer: Option<Layer>,
    vm: Option<&RecordedVm>,
) -> bool {
    let mut live = sb
        .live
        .try_lock()
        .expect("nobody else holds the lock of a sandbox not yet published");
    match serve_again(core, sb, served, layer).await {
        Ok(provider) => {
            let adopted_vm = if has_vm(sb) {
                match vm_adopt::adopt(core, sb, &provider, vm).await {
                    Ok(v) => v,
                    Err(e) => {
                        live.provider = Some(provider);
                        drop(live);
                        vm_failed(core, sb, served, &e);
                        return false;
                    }
                }
            } else {
                None
            };
            let vm_said = match &adopted_vm {
                Some(RunningVm::Qemu(q)) => {
                    format!("; its VM (QEMU pid {}) ran on and is adopted", q.pid())
                }
                Some(RunningVm::Firecracker(f)) => format!(
                    "; its VM (Firecracker pid {}) ran on and is adopted",
                    f.pid().unwrap_or(0)
                ),
                None => String::new(),
            };
            live.vm = adopted_vm;
            let found = match &provider {
                AnyProvider::Socket(p) => p.reopen_report().map(|r| describe(&r)),
                AnyProvider::Kernel(p) => p.reopen_report().map(|r| describe(&r)),
                AnyProvider::Direct(_) => None,
            };
            live.provider = Some(provider);
            drop(live);
            let (where_, served_at) = match served {
                Served::Socket(s) => ("at the same NBD URI", s.socket.display().to_string()),
                Served::Kernel(d) => (
                    "on the same device (the kernel kept it connected)",
                    format!("/dev/nbd{}", d.device),
                ),
            };
            let message = format!(
                "adopted after a daemon restart: its disk is served again {where_}{}{vm_said}",
                found.map(|f| format!(" ({f})")).unwrap_or_default()
            );
            tracing::info!(sandbox = %sb.id, served = %served_at, "{message}");
            core.metrics.adoption(None);
            core.set_state(sb, SandboxState::Running, Some(message));
            true
        }
        Err(e) => {
            // Nothing is removed at start: a delete removes the files, a later start tries again.
            live.files.extend(disk::overlay_files(served.cache()));
            drop(live);
            // Its VM would only see I/O errors: it is stopped (before the device goes).
            let killed = match vm.filter(|_| has_vm(sb)) {
                Some(rec) => vm_adopt::kill_recorded(core, rec)
                    .await
                    .map(|pid| (rec, pid)),
                None => None,
            };
            if let Served::Kernel(d) = served {
                release_device(core, sb, d).await;
            }
            let message = format!(
                "the daemon restarted while this sandbox ran and {e}; its files are kept ({}){}; delete it to remove them",
                served.cache().display(),
                killed
                    .map(|(rec, pid)| format!(
                        "; its VM ({} pid {pid}) was stopped",
                        match rec {
                            RecordedVm::Qemu(_) => "QEMU",
                            RecordedVm::Firecracker(_) => "Firecracker",
                        }
                    ))
                    .unwrap_or_default()
            );
            tracing::warn!(sandbox = %sb.id, reason = e.reason(), "not adopted: {message}");
            core.metrics.adoption(Some(e.reason()));
            core.events.emit(
                EventBus::event(EventKind::Error)
                    .sandbox(&sb.id)
                    .message(format!("adoption failed: {e}")),
            );
            sb.update(|s| s.clear_device());
            core.set_state(sb, SandboxState::Failed, Some(message));
            false
        }
    }
}

/// Reports a sandbox whose disk is served again but whose VM was not adopted: `FAILED`, its disk
/// kept served so it can still be paused.
fn vm_failed(core: &Core, sb: &Sandbox, served: &Served, e: &vm_adopt::VmAdoptError) {
    let message = format!(
        "the daemon restarted while this sandbox ran: its disk is served again ({}) but {e}; pause it to keep its disk, or delete it",
        match served {
            Served::Socket(s) => s.socket.display().to_string(),
            Served::Kernel(d) => format!("/dev/nbd{}", d.device),
        }
    );
    tracing::warn!(sandbox = %sb.id, reason = e.reason(), "VM not adopted: {message}");
    core.metrics.adoption(Some(e.reason()));
    core.events.emit(
        EventBus::event(EventKind::Error)
            .sandbox(&sb.id)
            .message(format!("VM adoption failed: {e}")),
    );
    sb.update(|s| {
        s.vm_pid = 0;
        s.vm_lost = true;
    });
    core.set_state(sb, SandboxState::Failed, Some(message));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_directly_in_their_directory_are_trusted() {
        let dir = Path::new("/s/cache");
        assert!(inside(Path::new("/s/cache/a.1.cache"), dir).is_ok());
        for bad in ["/s/cache/x/../../etc/passwd", "/etc/passwd", "/s/cache"] {
            assert!(
                matches!(
                    inside(Path::new(bad), dir),
                    Err(AdoptError::OutsideStateDir(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn reopen_failures_are_told_apart_from_serving_failures() {
        use rootfork_block::BlockError;
        use rootfork_provider::ProviderError;
        let attach = |e: ProviderError| DaemonError::from(ProviderError::AttachFailed(Arc::new(e)));
        let cases = [
            (BlockError::StateMissing("/s".into()), "state_missing"),
            (BlockError::StateDamaged("bad magic"), "state_damaged"),
            (
                BlockError::StateMismatch {
                    field: rootfork_block::StateField::BlockSize,
                    in_file: 512,
                    requested: 4096,
                },
                "state_mismatch",
            ),
            (BlockError::Shutdown, "reopen_failed"),
        ];
        for (b, reason) in cases {
            assert_eq!(
                reopen_reason(&attach(ProviderError::Block(b))),
                Some(reason)
            );
        }
        assert_eq!(
            reopen_reason(&attach(ProviderError::Exists("/s/nbd/1.sock".into()))),
            None
        );
    }

    #[test]
    fn a_resized_kernel_device_is_told_apart() {
        use rootfork_kernel::AttachError;
        use rootfork_provider::ProviderError;
        let e = DaemonError::from(ProviderError::AttachFailed(Arc::new(
            ProviderError::Kernel(AttachError::SizeMismatch {
                index: 3,
                expected: 1 << 20,
                got: 4096,
            }),
        )));
        let r = resized(&e).unwrap();
        assert!(matches!(
            r,
            AdoptError::DeviceResized {
                index: 3,
                expected: 1048576,
                got: 4096
            }
        ));
        assert_eq!(r.reason(), "device_resized");
        assert_eq!(reopen_reason(&e), None);
        let other = DaemonError::from(ProviderError::AttachFailed(Arc::new(
            ProviderError::Kernel(AttachError::NotConnected { index: 3 }),
        )));
        assert!(resized(&other).is_none());
    }

    #[test]
    fn socket_numbers_are_read_from_the_names_the_daemon_gives() {
        assert_eq!(socket_number(Path::new("/s/nbd/17.sock")), Some(17));
        assert_eq!(socket_number(Path::new("/s/nbd/x.sock")), None);
        assert_eq!(socket_number(Path::new("/s/nbd/17")), None);
    }
}
