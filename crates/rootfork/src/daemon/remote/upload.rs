//! Pauses leave their host in the background: the pause writes its layer locally, records it as
//! pending and returns; [`uploader`] then, for each queued sandbox,
//!
//! 1. publishes the manifest as `uploading` (this host holds it: another host answers
//!    `UNAVAILABLE` naming it),
//! 2. uploads the layer's chain (every build its mapping needs that the store lacks, data
//!    before map) and the template's manifest,
//! 3. under the sandbox's lifecycle lock, if it is still paused at that layer, publishes the
//!    manifest as `paused` and records the pause as published. A sandbox resumed or deleted
//!    meanwhile is not published (a resumed one's manifest says `running` here instead).
//!
//! A failure is retried with backoff (1 s doubling to 60 s) for as long as the sandbox waits at
//! that pause; a restart re-queues every recorded pending upload. Progress is the sandbox's
//! `store_status`, events and `rootfork_store_uploads_total` / `_bytes_total`.

use std::sync::Arc;
use std::time::Duration;

use rootfork_block::layered::BuildId;

use super::manifest::Held;
use super::{manifest_of, Remote};
use crate::daemon::core::Core;
use crate::daemon::model::SandboxState;
use crate::daemon::persist;
use crate::daemon::records::RecordState;
use crate::daemon::sandbox::Sandbox;
use crate::events::{EventBus, EventKind};

/// Queues `sb`'s pending upload (after a pause, or at start for a recorded one).
pub fn enqueue(core: &Core, sb: &Sandbox) {
    if let Some(r) = &core.remote {
        sb.update(|s| s.store_status = "upload queued".into());
        r.enqueue(&sb.id);
    }
}

/// The upload task: uploads queued pauses one at a time until `stop`.
pub async fn uploader(core: Arc<Core>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let Some(remote) = core.remote.as_ref() else {
        return;
    };
    let Some(mut rx) = remote.queue_rx.lock().take() else {
        return;
    };
    loop {
        let id = tokio::select! {
            id = rx.recv() => match id { Some(id) => id, None => return },
            _ = stop.changed() => return,
        };
        let mut backoff = Duration::from_secs(1);
        loop {
            match upload_one(&core, remote, &id).await {
                Ok(()) => break,
                Err(why) => {
                    if let Some(sb) = core.lookup(&id) {
                        sb.update(|s| {
                            s.store_status =
                                format!("upload failed: {why} (retrying in {}s)", backoff.as_secs())
                        });
                    }
                    core.metrics.store_upload(false, 0);
                    tracing::warn!(sandbox = %id, "uploading a pause: {why}; retrying in {backoff:?}");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
}

/// Whether `sb` still waits at the pause that left `layer`.
fn waits_at(sb: &Sandbox, store: &super::StoreLink, layer: &str) -> bool {
    sb.state() == SandboxState::Paused && store.pending.as_deref() == Some(layer)
}

/// Uploads `id`'s pending pause. `Ok` when it is done or no longer wanted.
async fn upload_one(core: &Core, remote: &Remote, id: &str) -> Result<(), String> {
    let Some(sb) = core.lookup(id) else {
        return Ok(());
    };
    let (layer, uploading, vm) = {
        let live = sb.live.lock().await;
        let Some(layer) = live.store.pending.clone() else {
            return Ok(());
        };
        if !waits_at(&sb, &live.store, &layer) {
            return Ok(());
        }
        let m = manifest_of(
            core,
            remote,
            &sb,
            Held::Uploading,
            Some(layer.clone()),
            None,
        )
        .map_err(|e| e.to_string())?;
        (layer, m, live.vm_state.clone())
    };
    let top: BuildId = layer.parse().map_err(|e| format!("layer {layer}: {e}"))?;
    sb.update(|s| s.store_status = "uploading".into());
    remote
        .put_manifest(uploading)
        .await
        .map_err(|e| e.to_string())?;
    {
        let mut live = sb.live.lock().await;
        if !live.store.manifest {
            live.store.manifest = true;
            let _ = persist::save(core, &sb, &live, record_state(&sb));
        }
    }
    // The VM states of earlier pauses are of no use once this host holds it uploading.
    remote
        .delete_vm_states(id)
        .await
        .map_err(|e| e.to_string())?;
    let (store, local) = (remote.store.clone(), core.builds.store().clone());
    let report = tokio::task::spawn_blocking(move || store.upload(&local, &top))
        .await
        .map_err(|e| format!("the upload task failed: {e}"))?
        .map_err(|e| e.to_string())?;
    let vm_manifest = match vm {
        Some(v) => {
            let (store_id, layer2) = (id.to_owned(), layer.clone());
            let up = remote.store.clone();
            Some(
                tokio::task::spawn_blocking(move || {
                    super::upload_vm_state(&up, &store_id, &layer2, &v)
                })
                .await
                .map_err(|e| format!("the upload task failed: {e}"))?
                .map_err(|e| format!("uploading the VM state: {e}"))?,
            )
        }
        None => None,
    };
    if let Some(t) = core.templates.get(&sb.template) {
        let m = super::TemplateManifest {
            name: t.name.clone(),
            build: t.build.clone().unwrap_or_default(),
            size_bytes: t.size_bytes,
            format: t.format.clone(),
        };
        remote
            .publish_template(m)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut live = sb.live.lock().await;
    if !waits_at(&sb, &live.store, &layer) {
        // Resumed here (or paused again) meanwhile: this host holds it running.
        if sb.state() != SandboxState::Paused && sb.state() != SandboxState::Deleted {
            let on = live.layer.as_ref().map(|l| l.id.to_string());
            let m = manifest_of(core, remote, &sb, Held::Running, on, None)
                .map_err(|e| e.to_string())?;
            remote.put_manifest(m).await.map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    let paused = manifest_of(
        core,
        remote,
        &sb,
        Held::Paused,
        Some(layer.clone()),
        vm_manifest,
    )
    .map_err(|e| e.to_string())?;
    remote
        .put_manifest(paused)
        .await
        .map_err(|e| e.to_string())?;
    live.store.pending = None;
    live.store.published = true;
    if let Err(e) = persist::save(core, &sb, &live, RecordState::Paused) {
        tracing::warn!(sandbox = id, "recording the published pause: {e}");
    }
    drop(live);
    core.metrics.store_upload(true, report.bytes);
    sb.update(|s| s.store_status = "in the store".into());
    tracing::info!(sandbox = id, layer = %layer, uploaded = report.uploaded.len(), skipped = report.skipped.len(), bytes = report.bytes, "pause uploaded to the object store");
    core.events.emit(
        EventBus::event(EventKind::Sandbox)
            .sandbox(id)
            .template(&sb.template)
            .message(format!(
                "uploaded to the object store ({} bytes); any host sharing it can resume it",
                report.bytes
            )),
    );
    Ok(())
}

/// The record state matching `sb`'s lifecycle state.
fn record_state(sb: &Sandbox) -> RecordState {
    if sb.state() == SandboxState::Paused {
        RecordState::Paused
    } else {
        RecordState::Running
    }
}

/// At a delete: removes the store's manifest of `sb` when this host holds it (best effort; the
/// sandbox's builds go with the store's garbage collection).
pub async fn release_on_delete(core: &Core, sb: &Sandbox, link: &super::StoreLink) {
    let Some(remote) = &core.remote else {
        return;
    };
    if !link.manifest {
        return;
    }
    match remote.manifest(&sb.id).await {
        Ok(Some(m)) if m.holder == remote.holder.id => {
            if let Err(e) = remote.delete_manifest(&sb.id).await {
                tracing::warn!(sandbox = %sb.id, "removing its manifest from the object store: {e}");
            }
            if let Err(e) = remote.delete_vm_states(&sb.id).await {
                tracing::warn!(sandbox = %sb.id, "removing its VM states from the object store: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(sandbox = %sb.id, "reading its manifest in the object store at delete: {e}")
        }
    }
}
