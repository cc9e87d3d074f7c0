//! What outlives the daemon process. Every lifecycle change writes the sandbox's record
//! (`records.rs`); a start restores every recorded sandbox and adopts the running ones, with
//! their QEMU or Firecracker VMs (`adopt.rs`); a stop (SIGTERM) hands the running sandboxes over
//! to the next start (a VM left running; socket: served until every request read is answered; kernel:
//! the device fd flushed, the device left connected for the kernel to hold the guest's I/O; then
//! the overlay flushed, its files kept, the record still saying running) and pauses the others.
//!
//! A running sandbox that cannot be adopted (a kernel sandbox without a `dead_conn_timeout`, a
//! record of an older daemon) comes back at its last pause after a crash or SIGKILL (paused, with a message saying that later writes were lost), or `FAILED` when it
//! never paused.
//!
//! At start, files in `cache/` and `paused/` are removed only when provably orphaned: no record
//! names them, and no record file of their sandbox was refused (a damaged or newer record may
//! own them). Files whose names the daemon does not give are reported and kept. Builds of the
//! store that no template and no record uses are removed too, unless a record could not be read.
//! The records of daemons before the build store (a paused diff each) are migrated first
//! (`migrate.rs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rootfork_provider::ProviderKind;

use crate::daemon::builds::Layer;
use crate::daemon::core::Core;
use crate::daemon::model::SandboxState;
use crate::daemon::records::{
    provider_kind, RecordState, RecordedVm, SandboxRecord, Served, RECORD_VERSION,
};
use crate::daemon::sandbox::{Live, Sandbox};
use crate::daemon::{adopt, disk, migrate, pause, vm};
use crate::error::{DaemonError, Result};
use crate::events::{EventBus, EventKind};

/// The record of `sb` in `state`, served from `served` with its VM process `vm` when running.
fn record_of(
    sb: &Sandbox,
    live: &Live,
    state: RecordState,
    served: Option<Served>,
    vm: Option<RecordedVm>,
) -> SandboxRecord {
    let vm = vm.filter(|_| state == RecordState::Running && served.is_some());
    let (vm_process, fc_process) = match vm {
        Some(RecordedVm::Qemu(q)) => (Some(q), None),
        Some(RecordedVm::Firecracker(f)) => (None, Some(f)),
        None => (None, None),
    };
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
        paused: None,
        layer: live.layer.as_ref().map(|l| l.id.to_string()),
        pause_count: sb.status().pause_count,
        generation: live.generation,
        vm_process,
        fc_process,
        served: served.filter(|_| state == RecordState::Running),
        vm_state: live.vm_state.clone(),
        store: live.store.clone(),
    }
}

/// Writes `sb`'s record (the caller holds its lifecycle lock). A running sandbox's record
/// written here does not say where its disk is served from ([`save_running`] does).
pub fn save(core: &Core, sb: &Sandbox, live: &Live, state: RecordState) -> Result<()> {
    write(core, &record_of(sb, live, state, None, None))
}

/// Writes the record of `sb` running on `provider` with `vm` (the caller holds its lifecycle
/// lock), with where its disk is served from when a restart can adopt it
/// ([`disk::served_disk`]) and which process its VM is ([`vm::process_record`]).
pub fn save_running(
    core: &Core,
    sb: &Sandbox,
    live: &Live,
    provider: &rootfork_provider::AnyProvider,
    vm: Option<&vm::RunningVm>,
) -> Result<()> {
    let served = disk::served_disk(provider);
    let vm_process = vm.and_then(vm::process_record);
    write(
        core,
        &record_of(sb, live, RecordState::Running, served, vm_process),
    )
}

fn write(core: &Core, rec: &SandboxRecord) -> Result<()> {
    core.records
        .write(rec)
        .map_err(|e| DaemonError::io(format!("writing the record of sandbox {}", rec.id), e))
}

/// Removes `id`'s record (a delete's last step).
pub fn forget(core: &Core, id: &str) {
    if let Err(e) = core.records.remove(id) {
        tracing::warn!(sandbox = id, "removing the sandbox record: {e}");
    }
}

/// What a start does with one record.
enum Restored {
    /// Registered as it was (paused, or failed / back at its last pause).
    Done,
    /// Registered; its disk is to be served again (and its VM adopted).
    Adopt(Box<ToAdopt>),
}

/// A sandbox to adopt: it, where its disk was served, the layer it was stacked on, its VM.
struct ToAdopt {
    sb: Arc<Sandbox>,
    served: Served,
    layer: Option<Layer>,
    vm: Option<RecordedVm>,
}

/// Registers every recorded sandbox (at start, before the API listens), adopts the running
/// ones, then removes the files in `cache/` and `paused/` that are provably orphaned.
/// Returns how many were restored.
pub async fn restore(core: &Core) -> Result<usize> {
    let mut loaded = core
        .records
        .load()
        .map_err(|e| DaemonError::io("reading the sandbox records", e))?;
    let mut owners = Owners::default();
    for (path, why) in &loaded.refused {
        tracing::warn!(record = %path.display(), "ignoring a sandbox record (its files are kept): {why}");
        if let Some(id) = path.file_stem().and_then(|s| s.to_str()) {
            owners.refused.insert(id.to_owned());
        }
    }
    migrate::diffs_to_layers(core, &mut loaded.records);
    // Whether every build a record may use is known: else nothing is collected.
    let mut builds_known = loaded.refused.is_empty();
    let mut restored = 0;
    let mut to_adopt = Vec::new();
    for rec in loaded.records {
        // Every file a record names counts that sandbox as a user (forks name their parent's
        // VM state): the users of shared files are rebuilt from the records alone. A diff
        // named by a record that could not be migrated is kept.
        if let Some(d) = &rec.paused {
            owners.named.insert(d.data.clone());
        }
        match rec.layer.as_deref().map(str::parse) {
            None => {}
            Some(Ok(id)) => core.builds.track(&rec.id, Some(id)),
            Some(Err(_)) => builds_known = false,
        }
        if let Some(s) = &rec.served {
            owners.named.extend(disk::overlay_files(s.cache()));
        }
        if let Some(v) = &rec.vm_state {
            owners.named.extend(v.files().cloned());
            for f in v.files() {
                core.shared.add(f, &rec.id);
            }
        }
        match restore_one(core, &rec) {
            Ok(Restored::Done) => restored += 1,
            Ok(Restored::Adopt(a)) => {
                restored += 1;
                to_adopt.push(*a);
            }
            Err(why) => {
                tracing::warn!(sandbox = %rec.id, "not restoring a recorded sandbox (its record is kept): {why}")
            }
        }
    }
    let (mut adopted, mut failed) = (0, 0);
    for a in to_adopt {
        if adopt::adopt(core, &a.sb, &a.served, a.layer, a.vm.as_ref()).await {
            adopted += 1;
        } else {
            failed += 1;
        }
    }
    if adopted + failed > 0 {
        tracing::info!(
            adopted,
            failed,
            "adopted the running sandboxes of a previous run"
        );
    }
    owners.remove_orphans(&core.dirs.paused);
    owners.remove_orphans(&core.dirs.cache);
    // Pauses whose upload to the object store had not finished are uploaded again.
    let pending: Vec<_> = core
        .sandboxes
        .read()
        .values()
        .filter(|s| s.state() == SandboxState::Paused)
        .cloned()
        .collect();
    for sb in pending {
        if sb.live.try_lock().is_ok_and(|l| l.store.pending.is_some()) {
            crate::daemon::remote::enqueue(core, &sb);
        }
    }
    if builds_known {
        core.builds.collect(core.templates.builds()).await;
    } else {
        tracing::warn!(
            "not removing unused builds: a sandbox record could not be read, and it may use some"
        );
    }
    Ok(restored)
}

fn restore_one(core: &Core, rec: &SandboxRecord) -> std::result::Result<Restored, String> {
    crate::names::sandbox_id(&rec.id).map_err(|e| e.to_string())?;
    let kind = provider_kind(&rec.provider)
        .ok_or_else(|| format!("unknown provider {:?}", rec.provider))?;
    if core.templates.get(&rec.template).is_none() {
        return Err(format!("its template {:?} is missing", rec.template));
    }
    if rec.paused.is_some() {
        return Err("its paused diff could not be migrated to a layer".into());
    }
    let layer = match &rec.layer {
        Some(l) => {
            let id = l
                .parse()
                .map_err(|e| format!("its layer {l:?} is not a build id: {e}"))?;
            Some(
                Layer::load(core.builds.resolver(), &id)
                    .map_err(|e| format!("its layer {id}: {e}"))?,
            )
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
    let adoptable = match (&rec.state, &rec.served) {
        (RecordState::Running, Some(s)) => match (kind, s) {
            (ProviderKind::Socket, Served::Socket(_))
            | (ProviderKind::Kernel, Served::Kernel(_)) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    };
    if rec.state == RecordState::Running && adoptable.is_none() {
        core.metrics.adoption(Some(adopt::not_adoptable_reason()));
    }
    let (state, message) = match (rec.state, &layer) {
        // Its state and message are set by the adoption.
        (RecordState::Running, _) if adoptable.is_some() => {
            (SandboxState::Resuming, String::new())
        }
        (RecordState::Paused, Some(_)) => (SandboxState::Paused, String::new()),
        (RecordState::Running, Some(p)) => (
            SandboxState::Paused,
            format!(
                "the daemon stopped while this sandbox ran: it is back at its last pause ({} bytes of changes); writes after that pause were lost ({})",
                p.diff_bytes,
                NOT_ADOPTED_WHY
            ),
        ),
        (_, None) => (
            SandboxState::Failed,
            format!(
                "the daemon stopped while this sandbox ran and it had never paused: its disk was not kept ({}); delete it",
                NOT_ADOPTED_WHY
            ),
        ),
    };
    let vm_state_bytes = {
        let mut live = sb
            .live
            .try_lock()
            .expect("nobody else holds the lock of a sandbox not yet published");
        live.generation = rec.generation;
        live.layer = layer.clone();
        live.store = rec.store.clone();
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
        s.paused_diff_bytes = layer.as_ref().map_or(0, |p| p.diff_bytes);
        s.vm_state_bytes = vm_state_bytes;
    });
    core.sandboxes.write().insert(rec.id.clone(), sb.clone());
    if let Some(served) = adoptable {
        return Ok(Restored::Adopt(Box::new(ToAdopt {
            sb,
            served,
            layer,
            vm: rec.recorded_vm(),
        })));
    }
    tracing::info!(sandbox = %rec.id, state = %state, "restored a recorded sandbox");
    let mut ev = EventBus::event(EventKind::Sandbox)
        .sandbox(&rec.id)
        .template(&rec.template)
        .state(state);
    if !message.is_empty() {
        ev = ev.message(message);
    }
    core.events.emit(ev);
    Ok(Restored::Done)
}

/// Why a running sandbox was not adopted.
const NOT_ADOPTED_WHY: &str = "its record does not say where its disk was served from (an older daemon's record, or a kernel sandbox without kernel.dead_conn_timeout_secs)";

/// Which files in `cache/` and `paused/` a start must keep.
#[derive(Debug, Default)]
struct Owners {
    /// Files the loaded records name.
    named: BTreeSet<PathBuf>,
    /// Sandbox ids with a record file that could not be read (it may own files).
    refused: BTreeSet<String>,
}

/// The sandbox id in a file name the daemon gives (`ID.G.cache`, `ID.G.cache.state`,
/// `ID.G.diff`: the id is what precedes the generation number).
fn owner_id(name: &str) -> Option<&str> {
    let parts: Vec<&str> = name.split('.').collect();
    let g = parts
        .iter()
        .rposition(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))?;
    let kind = parts.get(g + 1)?;
    if g == 0 || !matches!(*kind, "cache" | "diff") {
        return None;
    }
    let id_len = parts[..g].iter().map(|p| p.len() + 1).sum::<usize>() - 1;
    Some(&name[..id_len])
}

impl Owners {
    /// Removes the files in `dir` no record owns: not named by a loaded record, and of a
    /// sandbox without a refused record. Files named otherwise are reported and kept.
    fn remove_orphans(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut removed = 0;
        for ent in entries.flatten() {
            let p = ent.path();
            if self.named.contains(&p) {
                continue;
            }
            let name = ent.file_name().to_string_lossy().into_owned();
            match owner_id(&name) {
                Some(id) if self.refused.contains(id) => {}
                Some(_) => match std::fs::remove_file(&p) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!(file = %p.display(), "cannot remove an orphan: {e}"),
                },
                None => {
                    tracing::warn!(file = %p.display(), "kept a file the daemon did not name (remove it by hand if it is not needed)")
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, dir = %dir.display(), "removed files no sandbox record owns");
        }
    }
}

/// SIGTERM: keeps every sandbox for the next start. A running sandbox whose record says where it
/// is served ([`disk::served_disk`]) is handed over: its VM (QEMU or Firecracker), if any, runs
/// on (the next start adopts it); a socket sandbox's export
/// stops reading requests and answers every one it read; a kernel sandbox's device fd is
/// flushed, its dispatchers stopped and the device left connected (the kernel holds the guest's
/// I/O until the next start adopts it, up to its `dead_conn_timeout`); either way the overlay is
/// flushed and closed with its files kept, and the record still says running, so the next start
/// serves it again. Every other sandbox that holds a disk (a kernel sandbox without a
/// `dead_conn_timeout`, a failed one) is paused as before (its VM stopped first). Returns how many were kept
/// (handed over, paused).
pub async fn keep_all(core: &Core) -> (usize, usize) {
    let all: Vec<Arc<Sandbox>> = core.sandboxes.read().values().cloned().collect();
    let (mut handed, mut paused) = (0, 0);
    for sb in all {
        if !matches!(sb.state(), SandboxState::Running | SandboxState::Failed) {
            continue;
        }
        {
            let mut live = sb.live.lock().await;
            let Some(provider) = live.provider.as_ref() else {
                continue;
            };
            if sb.state() == SandboxState::Running && disk::served_disk(provider).is_some() {
                let mut provider = live.provider.take().expect("checked above");
                if let Some(v) = live.vm.take() {
                    vm::release(&sb, v).await;
                }
                match disk::hand_over(core, &sb, &mut provider).await {
                    Ok(()) => handed += 1,
                    Err(e) => tracing::warn!(
                        sandbox = %sb.id,
                        "handing over at shutdown: {e} (its record says running; the next start reopens what was flushed)"
                    ),
                }
                continue;
            }
            if let Some(v) = live.vm.take() {
                // The VM dies with the daemon anyway; stopping it first makes the pause see
                // a quiet disk.
                vm::stop(core, &sb, v).await;
            }
        }
        match pause::pause(core, &sb.id).await {
            Ok(_) => paused += 1,
            Err(e) => {
                tracing::warn!(sandbox = %sb.id, "could not pause at shutdown (its record says it was running): {e}")
            }
        }
    }
    core.events
        .emit(EventBus::event(EventKind::Sandbox).message(format!(
            "daemon stopping: {handed} running sandbox(es) handed over to the next start, {paused} paused; all kept"
        )));
    (handed, paused)
}
