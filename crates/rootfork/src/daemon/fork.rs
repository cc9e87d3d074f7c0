//! Fork: `count` new sandboxes from one paused sandbox. Each fork serves an overlay of its own
//! over the parent's layer in the build store (immutable, so shared as it is: each fork's record
//! names it, which keeps it from collection while any of them uses it; `builds.rs`) and, when the parent's pause saved a running VM, runs a VM of
//! its own restored from that snapshot (`vm::restore`; QEMU gives each a fresh VM generation
//! ID). A fork's writes go to its own overlay only, so no fork sees another's or the parent's.
//!
//! The parent's lifecycle lock is held for the whole call, so it stays paused and unchanged.
//! All or nothing: when fork `k` fails, the forks `0..k` this call made are deleted again.

use std::sync::Arc;

use rootfork_provider::ProviderKind;

use crate::daemon::builds::Layer;
use crate::daemon::core::Core;
use crate::daemon::lifecycle::{self, register, unregister};
use crate::daemon::limits;
use crate::daemon::model::{SandboxInfo, SandboxState};
use crate::daemon::sandbox::Sandbox;
use crate::daemon::snapshot::VmState;
use crate::daemon::start::{self, VmStart};
use crate::error::{DaemonError, Operation, Result};
use crate::names::{self, NameError};

/// The most forks one call makes.
pub const MAX_FORKS: u32 = 64;

/// Why a fork request is malformed.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// `count` out of range.
    #[error("a fork count must be 1 to {MAX_FORKS}, not {0}")]
    Count(u32),
    /// The prefix makes an invalid sandbox id.
    #[error("id prefix {prefix:?} makes fork id {id:?} invalid: {source}")]
    Id {
        /// The prefix.
        prefix: String,
        /// The first invalid id it makes.
        id: String,
        /// Why that id is invalid.
        source: NameError,
    },
}

/// The ids of `count` forks of `parent` named with `prefix` (default `PARENT-fork`):
/// `PREFIX-0` .. `PREFIX-(count-1)`.
pub fn fork_ids(parent: &str, count: u32, prefix: Option<&str>) -> Result<Vec<String>> {
    if count == 0 || count > MAX_FORKS {
        return Err(ForkError::Count(count).into());
    }
    let prefix = match prefix.filter(|p| !p.is_empty()) {
        Some(p) => p.to_owned(),
        None => format!("{parent}-fork"),
    };
    let ids: Vec<String> = (0..count).map(|k| format!("{prefix}-{k}")).collect();
    for id in &ids {
        names::sandbox_id(id).map_err(|source| ForkError::Id {
            prefix: prefix.clone(),
            id: id.clone(),
            source,
        })?;
    }
    Ok(ids)
}

/// Forks the paused sandbox `id` `count` times; returns the forks, running, in order.
pub async fn fork(
    core: &Core,
    id: &str,
    count: u32,
    prefix: Option<&str>,
) -> Result<Vec<SandboxInfo>> {
    names::sandbox_id(id)?;
    let ids = fork_ids(id, count, prefix)?;
    let parent = core.find(id)?;
    let plive = parent.live.lock().await;
    if parent.state() != SandboxState::Paused {
        return Err(DaemonError::WrongState {
            op: Operation::Fork,
            id: id.into(),
            state: parent.state(),
        });
    }
    let Some(paused) = plive.layer.clone() else {
        return Err(DaemonError::NoPausedDisk(id.into()));
    };
    if parent.kind == ProviderKind::Kernel {
        if let Some(why) = core.kernel.unavailable_reason() {
            return Err(DaemonError::KernelUnavailable(why));
        }
    }
    // Refused before any work (registration checks again: a create may race).
    {
        let map = core.sandboxes.read();
        if let Some(taken) = ids
            .iter()
            .find(|f| map.get(*f).is_some_and(|s| s.is_live()))
        {
            return Err(DaemonError::SandboxExists(taken.clone()));
        }
    }
    let started = std::time::Instant::now();
    let mut made: Vec<Arc<Sandbox>> = Vec::with_capacity(ids.len());
    for fid in &ids {
        match fork_one(core, &parent, &paused, plive.vm_state.as_ref(), fid).await {
            Ok(sb) => made.push(sb),
            Err(e) => {
                tracing::warn!(sandbox = id, fork = %fid, "fork failed: {e}; deleting the {} fork(s) made", made.len());
                for sb in made {
                    if let Err(de) = lifecycle::delete(core, &sb.id).await {
                        tracing::warn!(sandbox = %sb.id, "deleting a fork after a failed fork: {de}");
                    }
                }
                return Err(e);
            }
        }
    }
    drop(plive);
    tracing::info!(
        sandbox = id,
        forks = made.len(),
        ms = started.elapsed().as_millis() as u64,
        "sandbox forked"
    );
    Ok(made.iter().map(|s| s.info()).collect())
}

/// Starts one fork `fid` of `parent` (whose lock the caller holds): registered, its disk served
/// over the parent's layers, its VM restored from `vm_state`, its record written. A failure
/// leaves nothing behind.
async fn fork_one(
    core: &Core,
    parent: &Sandbox,
    paused: &Layer,
    vm_state: Option<&VmState>,
    fid: &str,
) -> Result<Arc<Sandbox>> {
    limits::admit_fds()?;
    limits::admit_disk(
        core,
        parent
            .quota
            .unwrap_or(parent.disk_size)
            .min(parent.disk_size),
    )?;
    let sb = Sandbox::new(
        fid.to_owned(),
        parent.template.clone(),
        parent.kind,
        parent.vm.clone(),
        parent.disk_size,
        parent.quota,
    );
    let mut live = sb
        .live
        .try_lock()
        .expect("nobody else holds the lock of a sandbox not yet published");
    register(core, &sb)?;
    // The fork's record names the parent's layer as its own: that makes it a user (here, and
    // after a restart), and it is collected only once no record uses it.
    live.layer = Some(paused.clone());
    core.builds.track(fid, Some(paused.id));
    live.generation = 1;
    let base = core.builds.base(paused.id);
    let r = start::serve_and_start(
        core,
        &sb,
        &live,
        base,
        0,
        VmStart::Restore(vm_state),
        "fork",
    )
    .await;
    match r {
        Ok((provider, vm)) => {
            live.provider = Some(provider);
            live.vm = vm;
            core.set_state(&sb, SandboxState::Running, None);
            drop(live);
            tracing::info!(sandbox = %fid, parent = %parent.id, "fork started");
            Ok(sb)
        }
        Err(e) => {
            live.layer = None;
            live.files.clear();
            drop(live);
            // The parent still uses the layer: this never removes it.
            core.builds.track(fid, None);
            if sb.vm.is_some() {
                // A VM that failed to start may have left its console and log.
                for ext in ["console", "qemu.log"] {
                    let _ = std::fs::remove_file(core.dirs.vm.join(format!("{fid}.{ext}")));
                }
            }
            unregister(core, &sb, &format!("fork of {} failed: {e}", parent.id));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_numbered_from_the_prefix_or_the_parent() {
        assert_eq!(
            fork_ids("p", 3, None).unwrap(),
            ["p-fork-0", "p-fork-1", "p-fork-2"]
        );
        assert_eq!(fork_ids("p", 1, Some("")).unwrap(), ["p-fork-0"]);
        assert_eq!(fork_ids("p", 2, Some("x")).unwrap(), ["x-0", "x-1"]);
    }

    #[test]
    fn bad_counts_and_prefixes_are_invalid_arguments() {
        for count in [0, MAX_FORKS + 1] {
            let e = fork_ids("p", count, None).unwrap_err();
            assert!(matches!(e, DaemonError::Fork(ForkError::Count(c)) if c == count));
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        }
        for prefix in ["a/b", "x y", &"x".repeat(63)] {
            let e = fork_ids("p", 2, Some(prefix)).unwrap_err();
            assert!(matches!(e, DaemonError::Fork(ForkError::Id { .. })), "{e}");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        }
        // A parent id near the length limit makes a default prefix that is too long.
        let e = fork_ids(&"p".repeat(60), 1, None).unwrap_err();
        assert!(matches!(e, DaemonError::Fork(ForkError::Id { .. })), "{e}");
    }
}
