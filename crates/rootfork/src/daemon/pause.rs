//! Pause and resume of a sandbox: its VM and its disk. A pause of a sandbox whose QEMU VM runs
//! first stops the guest and saves its memory and device state (`snapshot.rs`); then it
//! flushes, freezes and exports the overlay's changes as a layer of the build store over the
//! build the overlay sat on (`builds.rs`), stops the VM and releases the device. A resume serves
//! a fresh overlay over that layer and, when the pause saved a VM, restores the VM on it: the
//! guest continues.

use std::path::Path;

use rootfork_block::layered::{BuildId, BuildResolver, LayerResult, LocalStore};
use rootfork_block::{BlockDevice, Overlay};
use rootfork_provider::{PausedDisk, Provider};

use crate::daemon::builds::Layer;
use crate::daemon::core::Core;
use crate::daemon::model::{SandboxInfo, SandboxState};
use crate::daemon::records::RecordState;
use crate::daemon::sandbox::{overlay_of, Sandbox};
use crate::daemon::start::{self, VmStart};
use crate::daemon::{disk, persist, remote, shared, snapshot, vm};
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

/// Pauses a running sandbox, or a failed one that still holds its disk (so its data is saved):
/// stop its VM and save the VM's state (when one runs), flush, freeze, export its changes and
/// write them as a layer over the build its overlay sat on (flattening the chain into one layer
/// over the template's base build when it would grow deeper than `store.max_layers`), and only
/// once they are all on disk and the record names the layer stop the VM and release the device.
///
/// Failure-atomic: a pause refused for lack of space changes nothing, and one that fails after
/// the VM stopped or the disk froze (no space after all, an I/O error, a failed migration)
/// thaws the overlay, lets the guest continue and leaves the sandbox in the state it had, its
/// disk served and writable; a layer it wrote is named by no record and collected.
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
    let parent = match &live.layer {
        Some(l) => l.id,
        None => core
            .templates
            .build(&sb.template)
            .ok_or_else(|| DaemonError::TemplateNotFound(sb.template.clone()))?,
    };
    let store_dir = core.builds.store().root().to_owned();
    std::fs::create_dir_all(&store_dir)
        .map_err(|e| DaemonError::io(format!("creating {}", store_dir.display()), e))?;
    let mut needed = space_needed(&overlay, live.layer.as_ref(), core.builds.max_layers());
    if live.vm.is_some() {
        needed = needed.saturating_add(snapshot::space_needed(sb.vm.as_ref()));
    }
    check_space(&store_dir, needed)?;
    core.set_state(&sb, SandboxState::Pausing, None);
    // The VM first: once its state is saved the guest is stopped and QEMU has flushed and let
    // go of the disk, so the export below sees every write the guest made.
    let vm_state = match snapshot::save(core, &sb, &mut live).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(sandbox = id, "pause failed, the VM runs on: {e}");
            core.set_state(&sb, before, Some(format!("pause failed: {e}")));
            return Err(no_space_if_enospc(e, &store_dir, needed));
        }
    };
    // No collection until the record names the new layer.
    let pin = core.builds.pin().await;
    // (Named by sandbox and generation, like every file the daemon gives a sandbox.)
    let scratch = store_dir.join(format!(".export-{id}.{}", live.generation));
    live.generation += 1;
    let provider = live.provider.as_mut().expect("checked above");
    let saved = match provider.export_diff(&scratch).await {
        // The export removes what it wrote when it fails.
        Err(e) => Err(DaemonError::from(e)),
        Ok(diff) => {
            let (builds, max, base) = (
                core.builds.resolver_arc(),
                core.builds.max_layers(),
                core.templates.build(&sb.template),
            );
            let store = core.builds.store().clone();
            let r = tokio::task::spawn_blocking(move || {
                write_layer(&store, builds.as_ref(), parent, base, max, &diff)
            })
            .await
            .map_err(|e| DaemonError::task("writing the layer", e))
            .and_then(|r| r.map_err(DaemonError::Layer));
            let _ = std::fs::remove_file(&scratch);
            r
        }
    };
    let undo = |e: DaemonError, overlay: &Overlay| {
        overlay.thaw();
        tracing::warn!(sandbox = id, "pause failed, the disk is served again: {e}");
        core.set_state(&sb, before, Some(format!("pause failed: {e}")));
        e
    };
    let layer = match saved {
        Ok(l) => l,
        Err(e) => {
            drop(pin);
            core.builds.collect_soon();
            let e = undo(no_space_if_enospc(e, &store_dir, needed), &overlay);
            if let Some(v) = vm_state {
                snapshot::discard(&sb, &mut live, v).await;
            }
            return Err(e);
        }
    };
    // The record says paused, with the new layer and VM state, before the device goes: a crash
    // from here on finds the pause complete.
    let old = live.layer.replace(layer.clone());
    let old_link = live.store.clone();
    if core.remote.is_some() {
        // Uploaded in the background; the record keeps it pending until then.
        live.store.pending = Some(layer.id.to_string());
        live.store.published = false;
    }
    live.vm_state.clone_from(&vm_state);
    sb.update(|s| s.pause_count += 1);
    if let Err(e) = persist::save(core, &sb, &live, RecordState::Paused) {
        live.layer = old;
        live.store = old_link;
        live.vm_state = None;
        sb.update(|s| s.pause_count -= 1);
        drop(pin);
        core.builds.collect_soon();
        let e = undo(e, &overlay);
        if let Some(v) = vm_state {
            snapshot::discard(&sb, &mut live, v).await;
        }
        return Err(e);
    }
    core.builds.track(id, Some(layer.id));
    drop(pin);
    // The chain below may have been flattened away.
    core.builds.collect_or_defer(core.templates.builds()).await;
    // Every byte of the pause is on disk: the VM (stopped, its state saved) and the device can
    // go. The console stays for the restored VM to go on writing.
    if let Some(v) = live.vm.take() {
        vm::halt(&sb, v).await;
    }
    let mut provider = live.provider.take().expect("checked above");
    if let Err(e) = disk::retire(core, &sb, &mut provider).await {
        tracing::warn!(sandbox = id, "closing after pause: {e}");
    }
    let bytes = layer.diff_bytes;
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
    if live.store.pending.is_some() {
        remote::enqueue(core, &sb);
    }
    remote::boot::publish(core, live.boot.take()).await;
    drop(live);
    tracing::info!(
        sandbox = id,
        layer = %layer.id,
        generation = layer.generation,
        diff_bytes = bytes,
        vm_state_bytes = state_bytes,
        "sandbox paused"
    );
    Ok(sb.info())
}

/// Writes an exported diff as a layer over `parent`; when that makes the chain deeper than
/// `max_layers`, flattens it into one layer over the template's base build `base`.
fn write_layer(
    store: &LocalStore,
    builds: &dyn BuildResolver,
    parent: BuildId,
    base: Option<BuildId>,
    max_layers: u64,
    diff: &PausedDisk,
) -> LayerResult<Layer> {
    let map = store.create_layer_from_export_over(builds, &parent, &diff.map, &diff.data)?;
    match base {
        Some(base) if map.header.generation > max_layers => {
            let flat = store.flatten_over(builds, &map.header.id, &base)?;
            tracing::info!(layers = map.header.generation, build = %flat.header.id, "flattened a chain of layers");
            Layer::of(builds, &flat)
        }
        _ => Layer::of(builds, &map),
    }
}

/// Bytes a pause may write: the overlay's data as a new layer, and when the chain is flattened,
/// the whole chain's changes once more.
fn space_needed(overlay: &Overlay, layer: Option<&Layer>, max_layers: u64) -> u64 {
    let new = overlay
        .stats()
        .blocks_data
        .saturating_mul(u64::from(overlay.block_size()));
    match layer {
        Some(l) if l.generation + 1 > max_layers => {
            new.saturating_mul(2).saturating_add(l.diff_bytes)
        }
        _ => new,
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

/// Resumes a paused sandbox on a fresh overlay over its template and paused changes, and
/// restores its VM there when the pause saved one. A failure leaves it paused as it was. With
/// an object store, a sandbox this host does not know is taken over from the store when it is
/// paused there (`wait`: one still being uploaded by another host is waited for), and one this
/// host paused is resumed only while the store still names this host as its holder.
pub async fn resume(core: &Core, id: &str, wait: bool) -> Result<SandboxInfo> {
    names::sandbox_id(id)?;
    let sb = match core.find(id) {
        Ok(sb) if sb.is_live() => sb,
        found => match remote::resume_from_store(core, id, wait).await? {
            Some(sb) => sb,
            None => found?,
        },
    };
    let mut live = sb.live.lock().await;
    expect_state(&sb, Operation::Resume, &[SandboxState::Paused])?;
    remote::claim_for_resume(core, &sb, &mut live).await?;
    let Some(layer) = live.layer.clone() else {
        return Err(DaemonError::NoPausedDisk(id.into()));
    };
    core.set_state(&sb, SandboxState::Resuming, None);
    let base = core.builds.base(layer.id);
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
