//! Pause and resume of a sandbox's disk. A pause flushes, freezes and exports the overlay's
//! changes, then releases the device; a sandbox that was resumed from an earlier pause has its
//! new changes folded with the old diff into one diff against the template (`diffmerge.rs`). A
//! resume serves a fresh overlay over template + diff.

use std::path::{Path, PathBuf};

use rootfork_block::TemplatePath;
use rootfork_provider::{BaseImage, PausedDisk, Provider};

use crate::daemon::core::Core;
use crate::daemon::disk;
use crate::daemon::model::{SandboxInfo, SandboxState};
use crate::daemon::sandbox::{Live, Sandbox};
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
    let p = core
        .dirs
        .paused
        .join(format!("{id}.{}.diff", live.generation));
    live.generation += 1;
    p
}

/// Pauses a running sandbox, or a failed one that still holds its disk (so its data is saved):
/// flush, freeze, export its changes, release the device.
pub async fn pause(core: &Core, id: &str) -> Result<SandboxInfo> {
    names::sandbox_id(id)?;
    let sb = core.find(id)?;
    let mut live = sb.live.lock().await;
    expect_state(
        &sb,
        Operation::Pause,
        &[SandboxState::Running, SandboxState::Failed],
    )?;
    if live.vm.is_some() {
        return Err(DaemonError::VmRunning(id.into()));
    }
    let Some(mut provider) = live.provider.take() else {
        return Err(DaemonError::NoDevice(id.into()));
    };
    core.set_state(&sb, SandboxState::Pausing, None);
    let data = next_diff(core, id, &mut live);
    let exported = provider.export_diff(&data).await;
    let closed = disk::retire(core, &sb, &mut provider).await;
    // A sandbox resumed from a pause exported its changes relative to template + the old diff:
    // fold the two into one diff relative to the template.
    let exported = match (exported, live.paused.take()) {
        (Ok(new), Some(old)) => {
            live.files.push(new.data.clone());
            let out = next_diff(core, id, &mut live);
            match fold(&old, &new, &out).await {
                Ok(folded) => {
                    // The folded diff replaces both.
                    for f in [&old.data, &new.data] {
                        let _ = std::fs::remove_file(f);
                    }
                    live.files.retain(|f| f != &old.data && f != &new.data);
                    Ok(folded)
                }
                Err(e) => {
                    live.paused = Some(old);
                    Err(e)
                }
            }
        }
        (r, old) => {
            live.paused = old;
            r.map_err(DaemonError::from)
        }
    };
    match exported {
        Ok(paused) => {
            if let Err(e) = closed {
                tracing::warn!(sandbox = id, "closing after pause: {e}");
            }
            let bytes = paused.map.data_len();
            live.files.push(paused.data.clone());
            live.paused = Some(paused);
            sb.update(|s| {
                s.pause_count += 1;
                s.paused_diff_bytes = bytes;
                s.clear_device();
            });
            core.set_state(&sb, SandboxState::Paused, None);
            drop(live);
            tracing::info!(sandbox = id, diff_bytes = bytes, "sandbox paused");
            Ok(sb.info())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&data);
            core.set_state(
                &sb,
                SandboxState::Failed,
                Some(format!("pause failed: {e}")),
            );
            Err(e)
        }
    }
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

/// Resumes a paused sandbox on a fresh overlay over its template and paused changes.
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
    let r = match disk::provider_for(core, &sb, base, generation) {
        Ok(p) => disk::bring_up(core, &sb, p).await,
        Err(e) => Err(e),
    };
    match r {
        Ok(p) => {
            live.provider = Some(p);
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
