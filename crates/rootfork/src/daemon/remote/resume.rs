//! Resuming through the object store: taking over a sandbox another host paused
//! ([`resume_from_store`]), making sure this host still holds one it paused itself
//! ([`claim_for_resume`]), and listing what the store holds ([`list_in_store`]).

use std::sync::Arc;
use std::time::Instant;

use super::manifest::Held;
use super::{manifest_of, unavailable, Remote, SandboxManifest, RESUME_WAIT};
use crate::daemon::builds::Layer;
use crate::daemon::core::Core;
use crate::daemon::lifecycle::{register, unregister};
use crate::daemon::model::{SandboxInfo, SandboxState, Status};
use crate::daemon::persist;
use crate::daemon::records::{provider_kind, RecordState};
use crate::daemon::sandbox::{Live, Sandbox};
use crate::error::{DaemonError, Result};

/// Before a local resume of `sb` (its lifecycle lock held): when the store has this host's
/// manifest of it, the store must still name this host as its holder (another host may have
/// taken it over from the store), and it is marked `running` here before the disk is served.
/// A pause still waiting for its upload needs no store: its upload is dropped (the uploader sees
/// the sandbox resumed and marks the manifest `running`).
pub async fn claim_for_resume(core: &Core, sb: &Sandbox, live: &mut Live) -> Result<()> {
    let Some(remote) = &core.remote else {
        return Ok(());
    };
    if live.store.pending.take().is_some() || !live.store.manifest {
        return Ok(());
    }
    match remote.manifest(&sb.id).await {
        Ok(Some(m)) if m.holder != remote.holder.id && m.state == Held::Paused => {
            // Another host took it over and paused it again: this host's copy is stale; it
            // takes the store's over instead.
            take_back(core, remote, sb, live, m).await?;
            return Ok(());
        }
        Ok(Some(m)) if m.holder != remote.holder.id => {
            sb.update(|s| s.store_status = format!("held by {}", m.holder_host));
            return Err(held_elsewhere(&m));
        }
        Ok(_) => {}
        Err(e) => return Err(unavailable("checking who holds it in the object store", e)),
    }
    // (Naming the layer it runs on: the store keeps that chain while it runs.)
    let on = live.layer.as_ref().map(|l| l.id.to_string());
    let running = manifest_of(core, remote, sb, Held::Running, on, None)?;
    remote
        .put_manifest(running)
        .await
        .map_err(|e| unavailable("marking it running in the object store", e))?;
    live.store.published = false;
    sb.update(|s| s.store_status = "running here (held in the store)".into());
    Ok(())
}

/// Replaces `sb`'s stale local pause with the one the store holds (`m`, paused by another
/// host), taking it over.
async fn take_back(
    core: &Core,
    remote: &Remote,
    sb: &Sandbox,
    live: &mut Live,
    m: SandboxManifest,
) -> Result<()> {
    let layer_id = m
        .layer
        .as_deref()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| DaemonError::NoMove(format!("its manifest names no layer: {m:?}")))?;
    let builds = core.builds.resolver_arc();
    let layer = tokio::task::spawn_blocking(move || Layer::load(builds.as_ref(), &layer_id))
        .await
        .map_err(|e| DaemonError::task("reading the layer's map", e))?
        .map_err(DaemonError::Layer)?;
    let claim = SandboxManifest {
        state: Held::Running,
        holder: remote.holder.id.clone(),
        holder_host: remote.holder.host.clone(),
        updated_unix_ms: crate::events::now_unix_ms(),
        ..m.clone()
    };
    take_over(core, remote, claim).await?;
    // This host's VM state of its older pause is stale: the store's replaces it.
    for f in live
        .vm_state
        .take()
        .iter()
        .flat_map(|v| v.files().cloned().collect::<Vec<_>>())
    {
        crate::daemon::shared::release_and_remove(&core.shared, &f, &sb.id);
        live.files.retain(|x| x != &f);
    }
    if let Some(vm) = &m.vm_state {
        let v = fetch_vm_state(core, remote, &sb.id, live, vm).await?;
        live.files.extend(v.files().cloned());
        live.vm_state = Some(v);
    }
    live.layer = Some(layer.clone());
    live.store.published = false;
    core.builds.track(&sb.id, Some(layer.id));
    let vm_bytes = live.vm_state.as_ref().map_or(0, |v| v.bytes);
    sb.update(|s| {
        s.pause_count = m.pause_count;
        s.paused_diff_bytes = layer.diff_bytes;
        s.vm_state_bytes = vm_bytes;
        s.store_status = format!("taken back from host {}", m.holder_host);
    });
    tracing::info!(sandbox = %sb.id, from = %m.holder_host, layer = %layer.id, "took a sandbox back from the object store (this host's pause of it was older)");
    Ok(())
}

/// Downloads a VM state from the store into this host's pause directory, as files of sandbox
/// `id` (named by its next generation, like a pause's own).
async fn fetch_vm_state(
    core: &Core,
    remote: &Remote,
    id: &str,
    live: &mut Live,
    vm: &super::VmStateManifest,
) -> Result<crate::daemon::snapshot::VmState> {
    let (state, memory) = if vm.memory.is_some() {
        (
            crate::daemon::snapshot::next_file(core, id, live, "fcstate"),
            crate::daemon::snapshot::next_file(core, id, live, "fcmem"),
        )
    } else {
        let p = crate::daemon::snapshot::next_file(core, id, live, "vmstate");
        (p.clone(), p.with_extension("unused"))
    };
    for p in [&state, &memory] {
        let _ = std::fs::remove_file(p);
    }
    let (store, vm) = (remote.store.clone(), vm.clone());
    tokio::task::spawn_blocking(move || super::download_vm_state(&store, &vm, &state, &memory))
        .await
        .map_err(|e| DaemonError::task("downloading the VM state", e))?
        .map_err(|e| DaemonError::StoreUnavailable(format!("downloading the VM state: {e}")))
}

fn held_elsewhere(m: &SandboxManifest) -> DaemonError {
    DaemonError::HeldElsewhere {
        id: m.id.clone(),
        host: m.holder_host.clone(),
        state: match m.state {
            Held::Running => "runs there",
            Held::Uploading => "is being uploaded from there",
            Held::Paused => "was paused there",
        },
    }
}

/// Resumes sandbox `id`, which this host does not know, from the object store: its manifest
/// must say paused (with `wait`, one that is being uploaded is waited for); this host writes
/// itself as the holder, registers the sandbox (and its template when missing here) and
/// resumes it over its layer, read lazily from the store.
pub async fn resume_from_store(core: &Core, id: &str, wait: bool) -> Result<Option<Arc<Sandbox>>> {
    let Some(remote) = &core.remote else {
        return Ok(None);
    };
    let started = Instant::now();
    let waiting = |started: Instant| wait && started.elapsed() < RESUME_WAIT;
    let m = loop {
        let m = match remote.manifest(id).await {
            Ok(Some(m)) => m,
            // With `wait`, a sandbox whose pause has not reached the store yet (no manifest, or
            // the store not answering) is waited for too.
            Ok(None) | Err(_) if waiting(started) => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
            Ok(None) => return Ok(None),
            Err(e) => return Err(unavailable("reading its manifest in the object store", e)),
        };
        match m.state {
            Held::Paused => break m,
            Held::Uploading if waiting(started) => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Held::Uploading => {
                return Err(DaemonError::StoreUnavailable(format!(
                    "sandbox {id:?} is being uploaded to the object store by host {} (retry, or resume with --wait)",
                    m.holder_host
                )))
            }
            Held::Running => return Err(held_elsewhere(&m)),
        }
    };
    let kind = provider_kind(&m.provider)
        .ok_or_else(|| DaemonError::NoMove(format!("unknown provider {:?}", m.provider)))?;
    let layer_id = m
        .layer
        .as_deref()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| DaemonError::NoMove(format!("its manifest names no layer: {m:?}")))?;
    core.templates.adopt_from_store(&m.template)?;
    let layer = {
        let builds = core.builds.resolver_arc();
        tokio::task::spawn_blocking(move || Layer::load(builds.as_ref(), &layer_id))
            .await
            .map_err(|e| DaemonError::task("reading the layer's map", e))?
            .map_err(DaemonError::Layer)?
    };
    // This host holds it from now on.
    let sb = Sandbox::new(
        m.id.clone(),
        m.template.name.clone(),
        kind,
        m.vm.clone(),
        m.disk_size,
        m.quota,
    );
    let claim = SandboxManifest {
        holder: remote.holder.id.clone(),
        holder_host: remote.holder.host.clone(),
        updated_unix_ms: crate::events::now_unix_ms(),
        ..m.clone()
    };
    take_over(core, remote, claim).await?;
    {
        let mut live = sb
            .live
            .try_lock()
            .expect("nobody else holds the lock of a sandbox not yet published");
        live.layer = Some(layer.clone());
        live.generation = 1;
        live.store.manifest = true;
        live.store.published = true;
        if let Some(vm) = &m.vm_state {
            // The paused VM's memory and devices, to restore it here.
            match fetch_vm_state(core, remote, &sb.id, &mut live, vm).await {
                Ok(v) => {
                    live.files.extend(v.files().cloned());
                    let bytes = v.bytes;
                    live.vm_state = Some(v);
                    sb.update(|s| s.vm_state_bytes = bytes);
                }
                Err(e) => {
                    drop(live);
                    let _ = remote.put_manifest(m).await;
                    return Err(e);
                }
            }
        }
        sb.update(|s| {
            s.state = SandboxState::Paused;
            s.pause_count = m.pause_count;
            s.paused_diff_bytes = layer.diff_bytes;
            s.store_status = format!("taken over from host {}", m.holder_host);
        });
        core.builds.track(&sb.id, Some(layer.id));
        if let Err(e) =
            register(core, &sb).and_then(|()| persist::save(core, &sb, &live, RecordState::Paused))
        {
            core.builds.track(&sb.id, None);
            drop(live);
            unregister(core, &sb, &format!("taking it over failed: {e}"));
            // Give it back as it was.
            let _ = remote.put_manifest(m).await;
            return Err(e);
        }
    }
    tracing::info!(sandbox = id, from = %m.holder_host, layer = %layer.id, "took a paused sandbox over from the object store");
    // Its template's first reads, fetched while it resumes.
    if let Ok(t) = m.template.build.parse() {
        if !core.builds.exists(&t) {
            super::boot::prefetch(core, t).await;
        }
    }
    Ok(Some(sb))
}

/// Writes `claim` (this host as the holder of a paused sandbox) and reads it back: another host
/// that claimed it at the same moment wins only if its write came last, and then this one
/// refuses.
async fn take_over(core: &Core, remote: &Remote, claim: SandboxManifest) -> Result<()> {
    let _ = core;
    remote
        .put_manifest(claim.clone())
        .await
        .map_err(|e| unavailable("taking it over in the object store", e))?;
    match remote.manifest(&claim.id).await {
        Ok(Some(m)) if m.holder == remote.holder.id => Ok(()),
        Ok(Some(m)) => Err(held_elsewhere(&m)),
        Ok(None) => Err(DaemonError::SandboxNotFound(claim.id)),
        Err(e) => Err(unavailable("reading back its manifest", e)),
    }
}

/// The sandboxes the object store holds, as `list` shows them: state paused (resumable here),
/// pausing (being uploaded) or running (held by another host), the holder in `message`.
pub async fn list_in_store(core: &Core) -> Result<Vec<SandboxInfo>> {
    let Some(remote) = &core.remote else {
        return Err(DaemonError::NoStore);
    };
    let all = remote
        .manifests()
        .await
        .map_err(|e| unavailable("listing the object store", e))?;
    Ok(all
        .into_iter()
        .map(|m| {
            let mut status = Status::new(m.updated_unix_ms);
            status.state = match m.state {
                Held::Paused => SandboxState::Paused,
                Held::Uploading => SandboxState::Pausing,
                Held::Running => SandboxState::Running,
            };
            status.pause_count = m.pause_count;
            status.message = format!(
                "held by host {}{}",
                m.holder_host,
                if m.holder == remote.holder.id {
                    " (this host)"
                } else {
                    ""
                }
            );
            status.store_status = match m.state {
                Held::Paused => "in the store".into(),
                Held::Uploading => "uploading".into(),
                Held::Running => "running".into(),
            };
            SandboxInfo {
                id: m.id,
                template: m.template.name,
                provider: provider_kind(&m.provider)
                    .unwrap_or(rootfork_provider::ProviderKind::Socket),
                vm: m.vm,
                disk_size: m.disk_size,
                quota: m.quota,
                created_unix_ms: m.created_unix_ms,
                status,
                overlay_bytes_written: 0,
                overlay_data_blocks: 0,
            }
        })
        .collect())
}
