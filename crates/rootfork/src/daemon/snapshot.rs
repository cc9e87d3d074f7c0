//! A running VM's memory and device state kept with a paused sandbox. A pause stops the guest
//! and writes its state next to the sandbox's paused diff before the disk is exported: QEMU's
//! migration stream into `STATE/paused/ID.GEN.vmstate`, or Firecracker's snapshot into
//! `ID.GEN.fcstate` + `ID.GEN.fcmem`; a pause that fails later lets the guest continue and
//! removes the files. A resume restores a new VMM from them on the resumed disk and then removes
//! them; a delete removes them with the diff.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::daemon::core::Core;
use crate::daemon::firecracker::{self, SnapshotFiles};
use crate::daemon::sandbox::{Live, Sandbox};
use crate::daemon::spec::VmSpec;
use crate::daemon::vm::RunningVm;
use crate::error::{DaemonError, Result};

/// A saved VM state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The state file (in the pause directory): QEMU's migration stream, or Firecracker's
    /// `snapshot_path`.
    pub path: PathBuf,
    /// Firecracker's guest memory file (`mem_file_path`); `None` for QEMU, whose stream holds
    /// the memory.
    #[serde(default)]
    pub memory: Option<PathBuf>,
    /// The files' total size.
    pub bytes: u64,
    /// QEMU: the saved machine has a VM generation ID device (a restore must add one too,
    /// and gets a fresh GUID); absent in records written before the device was added.
    #[serde(default)]
    pub vmgenid: bool,
}

impl VmState {
    /// Its files.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.path).chain(self.memory.as_ref())
    }
}

/// Device state on top of guest memory that a state file may hold (QEMU's is a few hundred
/// KiB; the video RAM of a display the daemon never adds would be more).
const DEVICE_STATE_BYTES: u64 = 64 << 20;

/// QEMU's default guest memory when the spec names none (`QemuConfig::new`).
const DEFAULT_MEMORY_MIB: u64 = 256;

/// The most bytes the state of a VM of `spec` may take: all its memory (QEMU writes zero pages
/// as a few bytes each, so a real file is usually much smaller) and its devices.
pub fn space_needed(spec: Option<&VmSpec>) -> u64 {
    let mib = spec
        .and_then(|s| s.memory_mib)
        .map_or(DEFAULT_MEMORY_MIB, u64::from);
    (mib << 20).saturating_add(DEVICE_STATE_BYTES)
}

/// A file of the next generation of `id` with extension `ext` in the pause directory
/// (generations never repeat, and a name a shared file has is skipped: a deleted sandbox's
/// diff may live on for its forks while a new sandbox has its id).
pub(crate) fn next_file(core: &Core, id: &str, live: &mut Live, ext: &str) -> PathBuf {
    loop {
        let p = core
            .dirs
            .paused
            .join(format!("{id}.{}.{ext}", live.generation));
        live.generation += 1;
        if core.shared.users(&p).is_empty() {
            return p;
        }
    }
}

/// Stops `sb`'s running VM and writes its state; `None` when no VM runs. The VM stays in
/// `live.vm`, stopped, with its disk released (flushed to the provider). On failure it runs on
/// as before and nothing is left on disk.
pub async fn save(core: &Core, sb: &Sandbox, live: &mut Live) -> Result<Option<VmState>> {
    let vm = match live.vm.take() {
        None => return Ok(None),
        Some(RunningVm::Firecracker(mut fc)) => {
            let files = SnapshotFiles {
                state: next_file(core, &sb.id, live, "fcstate"),
                memory: next_file(core, &sb.id, live, "fcmem"),
            };
            let saved = firecracker::save(&mut fc, &files).await;
            live.vm = Some(RunningVm::Firecracker(fc));
            let bytes = saved?;
            tracing::info!(sandbox = %sb.id, bytes, "Firecracker paused and its snapshot written");
            return Ok(Some(VmState {
                path: files.state,
                memory: Some(files.memory),
                bytes,
                vmgenid: false,
            }));
        }
        Some(RunningVm::Qemu(q)) => q,
    };
    let mut vm = vm;
    let path = next_file(core, &sb.id, live, "vmstate");
    let target = path.clone();
    let (vm, saved) = tokio::task::spawn_blocking(move || {
        let r = vm.save_state(&target);
        (vm, r)
    })
    .await
    .map_err(|e| {
        // The task owned the VM: it was killed when the task unwound.
        sb.update(|s| s.vm_pid = 0);
        DaemonError::task("saving the VM's state", e)
    })?;
    let vmgenid = vm.has_vmgenid();
    live.vm = Some(RunningVm::Qemu(vm));
    let saved = saved?;
    tracing::info!(
        sandbox = %sb.id,
        bytes = saved.bytes,
        ms = saved.elapsed.as_millis() as u64,
        "VM stopped and its state saved"
    );
    Ok(Some(VmState {
        path,
        memory: None,
        bytes: saved.bytes,
        vmgenid,
    }))
}

/// Undoes a [`save`] whose pause failed later: the guest continues and the state file goes.
pub async fn discard(sb: &Sandbox, live: &mut Live, state: VmState) {
    for f in state.files() {
        remove(f);
    }
    let mut vm = match live.vm.take() {
        None => return,
        Some(RunningVm::Firecracker(mut fc)) => {
            if let Err(e) = fc.unpause().await {
                tracing::warn!(sandbox = %sb.id, "Firecracker could not be resumed after a failed pause: {e}");
            }
            live.vm = Some(RunningVm::Firecracker(fc));
            return;
        }
        Some(RunningVm::Qemu(q)) => q,
    };
    let continued = tokio::task::spawn_blocking(move || {
        let r = vm.continue_guest();
        (vm, r)
    })
    .await;
    match continued {
        Ok((vm, r)) => {
            if let Err(e) = r {
                tracing::warn!(sandbox = %sb.id, "the VM could not be continued after a failed pause: {e}");
            }
            live.vm = Some(RunningVm::Qemu(vm));
        }
        Err(e) => {
            // The task owned the VM: it was killed when the task unwound.
            sb.update(|s| s.vm_pid = 0);
            tracing::warn!(sandbox = %sb.id, "continuing the VM after a failed pause: {e}; the VM is gone");
        }
    }
}

/// Removes a state file that is no longer needed (a missing one is fine).
pub fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(file = %path.display(), "removing a VM state file: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::spec::VmmKind;

    #[test]
    fn space_is_the_memory_and_device_state() {
        let spec = VmSpec {
            kind: VmmKind::Qemu,
            kernel: Some("/k".into()),
            initrd: None,
            kernel_args: None,
            memory_mib: Some(512),
            vcpus: None,
        };
        assert_eq!(space_needed(Some(&spec)), (512 << 20) + DEVICE_STATE_BYTES);
        assert_eq!(space_needed(None), (256 << 20) + DEVICE_STATE_BYTES);
    }
}
