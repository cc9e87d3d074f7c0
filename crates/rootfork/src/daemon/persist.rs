//! What outlives the daemon process. Every lifecycle change writes the sandbox's record
//! (`records.rs`); a start restores every recorded sandbox; a stop (SIGTERM) pauses the running
//! ones, so they come back paused with every byte they had, instead of being deleted.
//!
//! A running sandbox cannot be adopted across a restart yet (its overlay's block state lives in
//! the daemon's memory): after a crash or SIGKILL it comes back at its last pause (paused, with a
//! message saying that later writes were lost), or `FAILED` when it never paused.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::daemon::core::Core;
use crate::daemon::model::SandboxState;
use crate::daemon::records::{
    provider_kind, DiffRecord, RecordState, SandboxRecord, RECORD_VERSION,
};
use crate::daemon::sandbox::{Live, Sandbox};
use crate::daemon::{pause, vm};
use crate::error::{DaemonError, Result};
use crate::events::{EventBus, EventKind};

/// The record of `sb` in `state`.
fn record_of(sb: &Sandbox, live: &Live, state: RecordState) -> SandboxRecord {
    SandboxRecord {
        version: RECORD_VERSION,
        id: sb.id.clone(),
        template: sb.template.clone(),
        provider: sb.kind.as_str().to_owned(),
        vm: sb.vm.clone(),
        disk_size: sb.disk_size,
        quota: sb.quota,
        created_unix_ms: sb.created_unix_ms,
        state,
        paused: live.paused.as_ref().map(DiffRecord::of),
        pause_count: sb.status().pause_count,
        generation: live.generation,
        vm_state: live.vm_state.clone(),
    }
}

/// Writes `sb`'s record (the caller holds its lifecycle lock).
pub fn save(core: &Core, sb: &Sandbox, live: &Live, state: RecordState) -> Result<()> {
    core.records
        .write(&record_of(sb, live, state))
        .map_err(|e| DaemonError::io(format!("writing the record of sandbox {}", sb.id), e))
}

/// Removes `id`'s record (a delete's last step).
pub fn forget(core: &Core, id: &str) {
    if let Err(e) = core.records.remove(id) {
        tracing::warn!(sandbox = id, "removing the sandbox record: {e}");
    }
}

/// Registers every recorded sandbox (at start, before the API listens), then removes paused
/// diffs no record names. Returns how many were restored.
pub fn restore(core: &Core) -> Result<usize> {
    let loaded = core
        .records
        .load()
        .map_err(|e| DaemonError::io("reading the sandbox records", e))?;
    for (path, why) in loaded.refused {
        tracing::warn!(record = %path.display(), "ignoring a sandbox record: {why}");
    }
    let mut kept: BTreeSet<PathBuf> = BTreeSet::new();
    let mut restored = 0;
    for rec in loaded.records {
        if let Some(d) = &rec.paused {
            kept.insert(d.data.clone());
        }
        if let Some(v) = &rec.vm_state {
            kept.extend(v.files().cloned());
        }
        match restore_one(core, &rec) {
            Ok(()) => restored += 1,
            Err(why) => {
                tracing::warn!(sandbox = %rec.id, "not restoring a recorded sandbox (its record is kept): {why}")
            }
        }
    }
    remove_orphan_diffs(core, &kept);
    Ok(restored)
}

fn restore_one(core: &Core, rec: &SandboxRecord) -> std::result::Result<(), String> {
    crate::names::sandbox_id(&rec.id).map_err(|e| e.to_string())?;
    let kind = provider_kind(&rec.provider)
        .ok_or_else(|| format!("unknown provider {:?}", rec.provider))?;
    if core.templates.get(&rec.template).is_none() {
        return Err(format!("its template {:?} is missing", rec.template));
    }
    let paused = match &rec.paused {
        Some(d) => {
            let p = d.to_paused();
            let len = std::fs::metadata(&p.data)
                .map_err(|e| format!("its diff {}: {e}", p.data.display()))?
                .len();
            if len < p.map.data_len() {
                return Err(format!(
                    "its diff {} is {len} bytes, shorter than its map says",
                    p.data.display()
                ));
            }
            Some(p)
        }
        None => None,
    };
    let sb = Sandbox::new(
        rec.id.clone(),
        rec.template.clone(),
        kind,
        rec.vm.clone(),
        rec.disk_size,
        rec.quota,
    );
    let (state, message) = match (rec.state, &paused) {
        (RecordState::Paused, Some(_)) => (SandboxState::Paused, String::new()),
        (RecordState::Running, Some(p)) => (
            SandboxState::Paused,
            format!(
                "the daemon stopped while this sandbox ran: it is back at its last pause ({} bytes of changes); writes after that pause were lost",
                p.map.data_len()
            ),
        ),
        (_, None) => (
            SandboxState::Failed,
            "the daemon stopped while this sandbox ran and it had never paused: its disk was not kept (running sandboxes are not adopted across a restart yet); delete it".to_owned(),
        ),
    };
    let vm_state_bytes = {
        let mut live = sb
            .live
            .try_lock()
            .expect("nobody else holds the lock of a sandbox not yet published");
        live.generation = rec.generation;
        if let Some(p) = &paused {
            live.files.push(p.data.clone());
        }
        live.paused = paused.clone();
        // A VM state goes with the pause it was saved by: only a paused record's is used.
        if let Some(v) = rec
            .vm_state
            .as_ref()
            .filter(|v| v.files().all(|f| f.is_file()))
        {
            live.files.extend(v.files().cloned());
            if state == SandboxState::Paused && rec.state == RecordState::Paused {
                live.vm_state = Some(v.clone());
            }
        }
        live.vm_state.as_ref().map_or(0, |v| v.bytes)
    };
    sb.update(|s| {
        s.state = state;
        s.message.clone_from(&message);
        s.pause_count = rec.pause_count;
        s.paused_diff_bytes = paused.as_ref().map_or(0, |p| p.map.data_len());
        s.vm_state_bytes = vm_state_bytes;
    });
    core.sandboxes.write().insert(rec.id.clone(), sb.clone());
    tracing::info!(sandbox = %rec.id, state = %state, "restored a recorded sandbox");
    let mut ev = EventBus::event(EventKind::Sandbox)
        .sandbox(&rec.id)
        .template(&rec.template)
        .state(state);
    if !message.is_empty() {
        ev = ev.message(message);
    }
    core.events.emit(ev);
    Ok(())
}

/// Removes files in `STATE/paused` that no record names (a pause interrupted before its record
/// was written, or a delete interrupted after it): nothing else can own them, since the state
/// directory's lock keeps other daemons out.
fn remove_orphan_diffs(core: &Core, kept: &BTreeSet<PathBuf>) {
    let Ok(dir) = std::fs::read_dir(&core.dirs.paused) else {
        return;
    };
    let mut removed = 0;
    for ent in dir.flatten() {
        let p = ent.path();
        if !kept.contains(&p) && std::fs::remove_file(&p).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, dir = %core.dirs.paused.display(), "removed paused diffs no sandbox record names");
    }
}

/// SIGTERM: pauses every sandbox that holds a disk (its VM stopped first), so its record says
/// paused and a restarted daemon can resume it. Returns how many were kept.
pub async fn keep_all(core: &Core) -> usize {
    let all: Vec<Arc<Sandbox>> = core.sandboxes.read().values().cloned().collect();
    let mut kept = 0;
    for sb in all {
        if !matches!(sb.state(), SandboxState::Running | SandboxState::Failed) {
            continue;
        }
        {
            let mut live = sb.live.lock().await;
            if live.provider.is_none() {
                continue;
            }
            if let Some(v) = live.vm.take() {
                // The VM dies with the daemon anyway; stopping it first makes the pause see
                // a quiet disk.
                vm::stop(core, &sb, v).await;
            }
        }
        match pause::pause(core, &sb.id).await {
            Ok(_) => kept += 1,
            Err(e) => {
                tracing::warn!(sandbox = %sb.id, "could not pause at shutdown (its record says it was running): {e}")
            }
        }
    }
    core.events
        .emit(EventBus::event(EventKind::Sandbox).message(format!(
            "daemon stopping: {kept} sandbox(es) paused and kept"
        )));
    kept
}
