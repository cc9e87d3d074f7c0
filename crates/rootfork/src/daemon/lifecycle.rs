//! A sandbox's birth and death: create (register, attach the disk, boot the VM; a failure leaves
//! nothing behind) and delete (its durable record first, then the VM, the disk, the paused diffs
//! and kept overlay files, each only when no other sandbox still uses it (`shared.rs`); the
//! sandbox stays as a tombstone for a while so late calls get a precise answer). A fork
//! (`fork.rs`) registers and unregisters its sandboxes with the same helpers.

use std::collections::VecDeque;
use std::sync::Arc;

use rootfork_provider::ProviderKind;

use crate::daemon::core::Core;
use crate::daemon::model::{SandboxInfo, SandboxState};
use crate::daemon::sandbox::Sandbox;
use crate::daemon::spec::{SandboxSpec, SpecError};
use crate::daemon::start::{self, VmStart};
use crate::daemon::vm;
use crate::daemon::{disk, limits, persist, shared};
use crate::error::{DaemonError, Result};
use crate::events::{EventBus, EventKind};
use crate::names;

/// Deleted sandboxes remembered (state DELETED) so that late calls get a precise answer.
const TOMBSTONES: usize = 1024;

/// The most recently deleted sandboxes, oldest first.
#[derive(Debug, Default)]
pub struct Tombstones(parking_lot::Mutex<VecDeque<Arc<Sandbox>>>);

/// `sb-` and 16 random hex digits.
fn random_id() -> String {
    let mut b = [0u8; 8];
    if read_urandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        b = t.to_le_bytes();
    }
    format!("sb-{}", hex(&b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read_urandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Creates a sandbox from `spec` and waits until its disk is served and its VM (if any) booted.
pub async fn create(core: &Core, spec: SandboxSpec) -> Result<SandboxInfo> {
    let spec = spec.validated()?;
    names::template_name(&spec.template)?;
    let id = spec.id.clone().unwrap_or_else(random_id);
    names::sandbox_id(&id)?;
    if spec.provider == ProviderKind::Kernel {
        if let Some(why) = core.kernel.unavailable_reason() {
            return Err(DaemonError::KernelUnavailable(why));
        }
    }
    limits::admit_fds()?;
    let template_size = core
        .templates
        .get(&spec.template)
        .ok_or_else(|| DaemonError::TemplateNotFound(spec.template.clone()))?
        .size_bytes;
    let disk_size = match spec.disk_size {
        Some(disk) if disk < template_size => {
            return Err(SpecError::DiskSmallerThanTemplate {
                disk,
                template: template_size,
            }
            .into())
        }
        Some(disk) => disk,
        None => template_size,
    };
    limits::admit_disk(core, spec.quota.unwrap_or(disk_size).min(disk_size))?;
    // The new sandbox's lifecycle lock is taken before it is published, so a concurrent
    // delete (or pause) of the same id waits for this create to finish or fail.
    let sb = Sandbox::new(
        id.clone(),
        spec.template.clone(),
        spec.provider,
        spec.vm,
        disk_size,
        spec.quota,
    );
    let mut live = sb
        .live
        .try_lock()
        .expect("nobody else holds the lock of a sandbox not yet published");
    register(core, &sb)?;
    // Registered, the sandbox counts as a user of its template, which can no longer go.
    let Some(template_build) = core.templates.build(&sb.template) else {
        drop(live);
        unregister(core, &sb, "its template is gone");
        return Err(DaemonError::TemplateNotFound(sb.template.clone()));
    };
    let (base, boot) = crate::daemon::remote::boot::base_for_create(core, template_build).await;
    live.boot = boot;
    let r = start::serve_and_start(core, &sb, &live, base, 0, VmStart::Boot, "create").await;
    match r {
        Ok((provider, vm)) => {
            live.provider = Some(provider);
            live.vm = vm;
            live.generation = 1;
            core.set_state(&sb, SandboxState::Running, None);
            drop(live);
            tracing::info!(sandbox = %id, template = %sb.template, provider = %sb.kind, "sandbox created");
            Ok(sb.info())
        }
        Err(e) => {
            drop(live);
            unregister(core, &sb, &format!("create failed: {e}"));
            Err(e)
        }
    }
}

/// Publishes the new sandbox `sb` (state `Creating`, its lifecycle lock held by the caller):
/// its template must still exist, its id must not name a live sandbox, and the sandbox count
/// must stay within `limits.max_sandboxes`.
pub(crate) fn register(core: &Core, sb: &Arc<Sandbox>) -> Result<()> {
    {
        let templates = core.templates.map.lock();
        if !templates.contains_key(&sb.template) {
            return Err(DaemonError::TemplateNotFound(sb.template.clone()));
        }
        let mut map = core.sandboxes.write();
        if map.get(&sb.id).is_some_and(|s| s.is_live()) {
            return Err(DaemonError::SandboxExists(sb.id.clone()));
        }
        limits::admit_count(core, map.values().filter(|s| s.is_live()).count())?;
        map.insert(sb.id.clone(), sb.clone());
    }
    core.events.emit(
        EventBus::event(EventKind::Sandbox)
            .sandbox(&sb.id)
            .template(&sb.template)
            .state(SandboxState::Creating),
    );
    Ok(())
}

/// Forgets a [`register`]ed sandbox whose start failed (it holds nothing any more), as if it
/// had never been, and reports `why` on the event feed.
pub(crate) fn unregister(core: &Core, sb: &Arc<Sandbox>, why: &str) {
    sb.update(|s| s.state = SandboxState::Deleted);
    let mut map = core.sandboxes.write();
    if map.get(&sb.id).is_some_and(|s| Arc::ptr_eq(s, sb)) {
        map.remove(&sb.id);
    }
    drop(map);
    core.events.emit(
        EventBus::event(EventKind::Error)
            .sandbox(&sb.id)
            .message(why.to_owned()),
    );
}

/// Deletes a sandbox and everything it holds. `Ok(false)` when there was nothing to delete.
pub async fn delete(core: &Core, id: &str) -> Result<bool> {
    names::sandbox_id(id)?;
    let Some(sb) = core.lookup(id) else {
        return Ok(false);
    };
    let mut live = sb.live.lock().await;
    if sb.state() == SandboxState::Deleted {
        return Ok(false);
    }
    core.set_state(&sb, SandboxState::Deleting, None);
    // The record goes first: a daemon that dies during the delete leaves files no record
    // owns, which the next start removes, rather than a record of a half-deleted sandbox.
    persist::forget(core, id);
    if let Some(v) = live.vm.take() {
        // The VM goes first: the disk is closed under nobody.
        vm::stop(core, &sb, v).await;
    }
    if let Some(mut p) = live.provider.take() {
        if let Err(e) = disk::retire(core, &sb, &mut p).await {
            tracing::warn!(sandbox = id, "closing the provider: {e}");
            core.metrics
                .error("delete_sandbox", DaemonError::from(e).errno());
        }
    }
    live.layer = None;
    crate::daemon::remote::boot::publish(core, live.boot.take()).await;
    let link = std::mem::take(&mut live.store);
    crate::daemon::remote::release_on_delete(core, &sb, &link).await;
    // Its layer goes with the next collection unless a fork (or its parent) still uses it.
    core.builds.track(id, None);
    core.builds.collect_or_defer(core.templates.builds()).await;
    // A file a fork still uses (its parent's VM state) stays until its last user goes.
    for f in live.files.drain(..) {
        shared::release_and_remove(&core.shared, &f, id);
    }
    sb.update(|s| s.clear_device());
    core.set_state(&sb, SandboxState::Deleted, None);
    drop(live);
    remember_deleted(core, sb);
    tracing::info!(sandbox = id, "sandbox deleted");
    Ok(true)
}

/// Keeps `sb` as a tombstone, forgetting the oldest beyond [`TOMBSTONES`].
fn remember_deleted(core: &Core, sb: Arc<Sandbox>) {
    let mut t = core.tombstones.0.lock();
    t.push_back(sb);
    while t.len() > TOMBSTONES {
        let Some(old) = t.pop_front() else {
            break;
        };
        let mut map = core.sandboxes.write();
        if map.get(&old.id).is_some_and(|s| Arc::ptr_eq(s, &old)) {
            map.remove(&old.id);
        }
    }
}

/// Deletes every sandbox (shutdown).
pub async fn delete_all(core: &Core) {
    let ids: Vec<String> = core.sandboxes.read().keys().cloned().collect();
    for id in ids {
        if let Err(e) = core.delete_sandbox(&id).await {
            tracing::warn!(sandbox = %id, "deleting at shutdown: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = random_id();
        let b = random_id();
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert!(names::sandbox_id(id).is_ok(), "{id}");
            assert_eq!(id.len(), 3 + 16);
        }
    }
}
