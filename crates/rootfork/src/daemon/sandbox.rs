//! One sandbox's record: its fixed identity, its observable status (behind a short lock, read by
//! `get`/`list`/metrics at any time) and its live resources (behind an async lock that every
//! lifecycle operation holds for its whole duration, so operations on one sandbox are serialized
//! while different sandboxes proceed in parallel).

use std::sync::Arc;

use rootfork_provider::{AnyProvider, ProviderKind};

use crate::daemon::builds::Layer;

use crate::daemon::model::{SandboxInfo, SandboxState, Status};
use crate::daemon::spec::VmSpec;
use crate::events::now_unix_ms;

/// The live resources.
#[derive(Debug, Default)]
pub struct Live {
    /// The provider while the disk is served.
    pub provider: Option<AnyProvider>,
    /// Its layer in the build store: while paused, its disk as the last pause saved it; while
    /// running, what its overlay is stacked on (`None`: its template's base build).
    pub layer: Option<Layer>,
    /// Files to remove on delete (VM states; the kept overlay files of a failed adoption).
    pub files: Vec<std::path::PathBuf>,
    /// Generation counter for file names.
    pub generation: u64,
    /// The VM booted on the disk (killed on drop).
    pub vm: Option<crate::daemon::vm::RunningVm>,
    /// While paused: the VM's saved memory and device state (a VM paused live).
    pub vm_state: Option<crate::daemon::snapshot::VmState>,
    /// Where it stands in the object store (`--store`).
    pub store: crate::daemon::remote::StoreLink,
    /// Its first boot's reads of a template from the object store, being recorded.
    pub boot: Option<crate::daemon::remote::boot::BootRecording>,
}

/// A sandbox.
#[derive(Debug)]
pub struct Sandbox {
    /// Its id.
    pub id: String,
    /// Its template.
    pub template: String,
    /// Its provider kind.
    pub kind: ProviderKind,
    /// Its VM settings, if given.
    pub vm: Option<VmSpec>,
    /// Its disk's size (the template's, or larger when asked).
    pub disk_size: u64,
    /// The most bytes its writes may occupy.
    pub quota: Option<u64>,
    /// Creation time.
    pub created_unix_ms: i64,
    status: parking_lot::Mutex<Status>,
    /// The live resources; held across each lifecycle operation.
    pub live: tokio::sync::Mutex<Live>,
}

impl Sandbox {
    /// A new sandbox in state `Creating`.
    pub fn new(
        id: String,
        template: String,
        kind: ProviderKind,
        vm: Option<VmSpec>,
        disk_size: u64,
        quota: Option<u64>,
    ) -> Arc<Sandbox> {
        let now = now_unix_ms();
        Arc::new(Sandbox {
            id,
            template,
            kind,
            vm,
            disk_size,
            quota,
            created_unix_ms: now,
            status: parking_lot::Mutex::new(Status::new(now)),
            live: tokio::sync::Mutex::new(Live::default()),
        })
    }

    /// A copy of the status.
    pub fn status(&self) -> Status {
        self.status.lock().clone()
    }

    /// The current state.
    pub fn state(&self) -> SandboxState {
        self.status.lock().state
    }

    /// Changes the status under its lock; a state change also updates `since`.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.status.lock();
        let before = s.state;
        f(&mut s);
        if s.state != before {
            s.since_unix_ms = now_unix_ms();
        }
    }

    /// Whether the sandbox still holds (or may hold) resources or a template reference.
    pub fn is_live(&self) -> bool {
        self.state() != SandboxState::Deleted
    }

    /// What `get` shows; overlay counters are read from `live` when it is free.
    pub fn info(&self) -> SandboxInfo {
        let (mut written, mut data_blocks) = (0, 0);
        if let Ok(live) = self.live.try_lock() {
            if let Some(stats) = live.provider.as_ref().and_then(overlay_stats) {
                written = stats.bytes_written;
                data_blocks = stats.blocks_data;
            }
        }
        SandboxInfo {
            id: self.id.clone(),
            template: self.template.clone(),
            provider: self.kind,
            vm: self.vm.clone(),
            disk_size: self.disk_size,
            quota: self.quota,
            created_unix_ms: self.created_unix_ms,
            status: self.status(),
            overlay_bytes_written: written,
            overlay_data_blocks: data_blocks,
        }
    }
}

/// The overlay of a served provider.
pub fn overlay_of(p: &AnyProvider) -> Option<Arc<rootfork_block::Overlay>> {
    match p {
        AnyProvider::Socket(s) => s.overlay(),
        AnyProvider::Kernel(k) => k.overlay(),
        AnyProvider::Direct(_) => None,
    }
}

/// The overlay counters of a served provider.
pub fn overlay_stats(p: &AnyProvider) -> Option<rootfork_block::OverlayStats> {
    match p {
        AnyProvider::Socket(s) => s.overlay().map(|o| o.stats()),
        AnyProvider::Kernel(k) => k.overlay().map(|o| o.stats()),
        AnyProvider::Direct(_) => None,
    }
}
