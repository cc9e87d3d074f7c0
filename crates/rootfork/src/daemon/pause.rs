//! Pause and resume of a sandbox: its VM and its disk. A pause of a sandbox whose QEMU VM runs
//! first stops the guest and saves its memory and device state (`snapshot.rs`); then it
//! flushes, freezes and exports the overlay's changes, stops the VM and releases the device; a
//! sandbox that was resumed from an earlier pause has its new changes folded with the old diff
//! into one diff against the template (`diffmerge.rs`). A resume serves a fresh overlay over
//! template + diff and, when the pause saved a VM, restores the VM on it: the guest continues.

use std::path::{Path, PathBuf};

use rootfork_block::{BlockDevice, Overlay, TemplatePath};
use rootfork_provider::{BaseImage, PausedDisk, Provider};

use crate::daemon::core::Core;
use crate::daemon::model::{SandboxInfo, SandboxState};
use crate::daemon::records::RecordState;
use crate::daemon::sandbox::{overlay_of, Live, Sandbox};
use crate::daemon::start::{self, VmStart};
use crate::daemon::{disk, persist, shared, snapshot, vm};
use crate::error::{DaemonError, Operation, Result};
use crate::names;

/// `Ok` when `sb` is in one of the states `want`, else the precondition error for `op`.
fn expect_state(sb: &Sandbox, op: Operation, want: &[SandboxState]) -> Result<()> {
    match sb.state() {
        s if want.contains(&s) => Ok(()),
        state => Err(DaemonError::WrongState {
            op,
            id: sb.id.clone(),
            state,
        }),
    }
}

/// A new diff file name of `sb` (generations never repeat within the sandbox).
fn next_diff(core: &Core, id: &str, live: &mut Live) -> PathBuf {
    snapshot::next_file(core, id, live, "diff")
}

/// Pauses a running sandbox, or a failed one that still holds its disk (so its data is saved):
/// stop its VM and save the VM's state (when one runs), flush, freeze, export its changes
/// (folded with an earlier pause's), and only once they are all on disk stop the VM and release
/// the device.
///
/// Failure-atomic: a pause refused for lack of space changes nothing, and one that fails after
/// the VM stopped or the disk froze (no space after all, an I/O error, a failed migration or
/// fold) removes what it wrote, thaws the overlay, lets the guest continue and leaves the
/// sandbox in the state it had, its disk served and writable.
pub async fn pause(core: &Core, id: &str) -> Result<SandboxInfo> {
    names::sandbox_id(id)?;
    let sb = core.find(id)?;
    let mut live = sb.live.lock().await;
    let before = sb.state();
    expect_state(
        &sb,
        Operation::Pause,
        &[SandboxState::Running, SandboxState::Failed],
    )?;
    let Some(overlay) = live.provider.as_ref().and_then(overlay_of) else {
        return Err(DaemonError::NoDevice(id.into()));
    };
    let mut needed = space_needed(&overlay, live.paused.as_ref());
    if live.vm.is_some() {
        needed = needed.saturating_add(snapshot::space_needed(sb.vm.as_ref()));
    }
    check_space(&core.dirs.paused, needed)?;
    core.set_state(&sb, SandboxState::Pausing, None);
    // The VM first: once its state is saved the guest is stopped and QEMU has flushed and let
    // go of the disk, so the export below sees every write the guest made.
    let vm_state = match snapshot::save(core, &sb, &mut live).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(sandbox = id, "pause failed, the VM runs on: {e}");
            core.set_state(&sb, before, Some(format!("pause failed: {e}")));
            return Err(no_space_if_enospc(e, &core.dirs.paused, needed));
        }
    };
    let data = next_diff(core, id, &mut live);
    let folded_out = next_diff(core, id, &mut live);
    let provider = live.provider.as_mut().expect("checked above");
    let saved = match provider.export_diff(&data).await {
        // The export removes what it wrote when it fails.
        Err(e) => Err(DaemonError::from(e)),
        Ok(new) => match live.paused.clone() {
            None => Ok(new),
            // A sandbox resumed from a pause exported its changes relative to template + the
            // old diff: fold the two into one diff relative to the template.
            Some(old) => {
                let r = fold(&old, &new, &folded_out).await;
                if r.is_err() {
                    for f in [&data, &folded_out] {
                        let _ = std::fs::remove_file(f);
                    }
                }
                r
            }
        },
    };
    let undo = |e: DaemonError, overlay: &Overlay| {
        overlay.thaw();
        tracing::warn!(sandbox = id, "pause failed, the disk is served again: {e}");
        core.set_state(&sb, before, Some(format!("pause failed: {e}")));
        e
    };
    let paused = match saved {
        Ok(p) => p,
        Err(e) => {
            let e = undo(no_space_if_enospc(e, &core.dirs.paused, needed), &overlay);
            if let Some(v) = vm_state {
                snapshot::discard(&sb, &mut live, v).await;
            }
            return Err(e);
        }
    };
    // The record says paused, with the new diff and VM state, before the device goes: a crash
    // from here on finds the pause complete.
    let old = live.paused.replace(paused.clone());
    live.vm_state.clone_from(&vm_state);
    sb.update(|s| s.pause_count += 1);
    if let Err(e) = persist::save(core, &sb, &live, RecordState::Paused) {
        live.paused = old;
        live.vm_state = None;
        sb.update(|s| s.pause_count -= 1);
        for f in [&data, &folded_out] {
            let _ = std::fs::remove_file(f);
        }
        let e = undo(e, &overlay);
        if let Some(v) = vm_state {
            snapshot::discard(&sb, &mut live, v).await;
        }
        return Err(e);
    }
    // Every byte of the pause is on disk: the VM (stopped, its state saved) and the device can
    // go. The console stays for the restored VM to go on writing.
    if let Some(v) = live.vm.take() {
        vm::halt(&sb, v).await;
    }
    let mut provider = live.provider.take().expect("checked above");
    if let Err(e) = disk::retire(core, &sb, &mut provider).await {
        tracing::warn!(sandbox = id, "closing after pause: {e}");
    }
    if let Some(old) = old {
        // The folded diff replaces both (the old one stays while forks read it).
        let _ = std::fs::remove_file(&data);
        shared::release_and_remove(&core.shared, &old.data, id);
        live.files.retain(|f| f != &old.data);
    }
    let bytes = paused.map.data_len();
    live.files.push(paused.data.clone());
    if let Some(v) = &vm_state {
        live.files.extend(v.files().cloned());
    }
    let state_bytes = vm_state.as_ref().map_or(0, |v| v.bytes);
    sb.update(|s| {
        s.paused_diff_bytes = bytes;
        s.vm_state_bytes = state_bytes;
        s.message.clear();
        s.failed_checks = 0;
        s.clear_device();
    });
    core.set_state(&sb, SandboxState::Paused, None);
    drop(live);
    tracing::info!(
        sandbox = id,
        diff_bytes = bytes,
        vm_state_bytes = state_bytes,
        "sandbox paused"
    );
    Ok(sb.info())
}

/// Bytes a pause may write: the overlay's data, and with an earlier pause's diff to fold, the
/// folded diff too (at most both).
fn space_needed(overlay: &Overlay, old: Option<&PausedDisk>) -> u64 {
    let new = overlay
        .stats()
        .blocks_data
        .saturating_mul(u64::from(overlay.block_size()));
    match old {
        Some(old) => new.saturating_mul(2).saturating_add(old.map.data_len()),
        None => new,
    }
}

/// Bytes free to an unprivileged writer in the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// `Ok` when `dir` has room for `needed` bytes.
fn check_space(dir: &Path, needed: u64) -> Result<()> {
    let available =
        free_bytes(dir).map_err(|e| DaemonError::io("statvfs of the pause directory", e))?;
    if needed > available {
        return Err(DaemonError::NoSpace {
            path: dir.to_owned(),
            needed,
            available,
        });
    }
    Ok(())
}

/// An error whose cause is `ENOSPC` as [`DaemonError::NoSpace`] (with what is free now).
fn no_space_if_enospc(e: DaemonError, dir: &Path, needed: u64) -> DaemonError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::ENOSPC) {
                return DaemonError::NoSpace {
                    path: dir.to_owned(),
                    needed,
                    available: free_bytes(dir).unwrap_or(0),
                };
            }
        }
        cause = c.source();
    }
    e
}

/// Folds the diff `new` (relative to template + `old`) and `old` into one diff at `out`,
/// relative to the template.
async fn fold(old: &PausedDisk, new: &PausedDisk, out: &Path) -> Result<PausedDisk> {
    let (o, n, out2) = (old.clone(), new.clone(), out.to_owned());
    let map = tokio::task::spawn_blocking(move || {
        crate::daemon::diffmerge::merge(&o.map, &o.data, &n.map, &n.data, &out2)
    })
    .await
    .map_err(|e| DaemonError::task("merging the paused diffs", e))?
    .map_err(|e| DaemonError::io("merging the paused diffs", e))?;
    Ok(PausedDisk {
        map,
        data: out.to_owned(),
    })
}

/// Resumes a paused sandbox on a fresh overlay over its template and paused changes, and
/// restores its VM there when the pause saved one. A failure leaves it paused as it was.
pub async fn resume(core: &Core, id: &str) -> Result<SandboxInfo> {
    names::sandbox_id(id)?;
    let sb = core.find(id)?;
    let mut live = sb.live.lock().await;
    expect_state(&sb, Operation::Resume, &[SandboxState::Paused])?;
    let Some(paused) = live.paused.clone() else {
        return Err(DaemonError::NoPausedDisk(id.into()));
    };
    core.set_state(&sb, SandboxState::Resuming, None);
    let base = BaseImage::Resumed {
        template: TemplatePath::new(core.templates.image_path(&sb.template)),
        paused,
    };
    let generation = live.generation;
    live.generation += 1;
    let vm_state = live.vm_state.take();
    // The record of a running sandbox names no VM state: it is used up.
    let r = start::serve_and_start(
        core,
        &sb,
        &live,
        base,
        generation,
        VmStart::Restore(vm_state.as_ref()),
        "resume",
    )
    .await;
    if r.is_err() {
        live.vm_state.clone_from(&vm_state);
        sb.update(|s| s.vm_pid = 0);
    }
    match r {
        Ok((p, vm)) => {
            live.provider = Some(p);
            live.vm = vm;
            if let Some(v) = vm_state {
                for f in v.files() {
                    shared::release_and_remove(&core.shared, f, id);
                    live.files.retain(|x| x != f);
                }
                sb.update(|s| s.vm_state_bytes = 0);
            }
            core.set_state(&sb, SandboxState::Running, Some(String::new()));
            drop(live);
            tracing::info!(sandbox = id, "sandbox resumed");
            Ok(sb.info())
        }
        Err(e) => {
            core.set_state(
                &sb,
                SandboxState::Paused,
                Some(format!("resume failed: {e}")),
            );
            Err(e)
        }
    }
}
