//! One sandbox's record: its fixed identity, its observable status (behind a short lock, read by
//! `get`/`list`/metrics at any time) and its live resources (behind an async lock that every
//! lifecycle operation holds for its whole duration, so operations on one sandbox are serialized
//! while different sandboxes proceed in parallel).

use std::sync::Arc;
use std::time::Duration;

use rootfork_provider::{AnyProvider, PausedDisk, ProviderKind};

use crate::api::v1::{self, HealthState, SandboxState, VmmSettings};
use crate::events::now_unix_ms;

/// What `get` shows.
#[derive(Debug, Clone)]
pub struct Status {
    /// Lifecycle state.
    pub state: SandboxState,
    /// When it entered that state.
    pub since_unix_ms: i64,
    /// Health.
    pub health: HealthState,
    /// The last failure, if any.
    pub message: String,
    /// Socket provider: the NBD URI.
    pub nbd_uri: String,
    /// Kernel provider: the device node.
    pub device_path: String,
    /// Kernel provider: the slot.
    pub device_index: Option<u32>,
    /// Create (or last resume) to ready.
    pub ready_latency: Duration,
    /// Pauses so far.
    pub pause_count: u32,
    /// Bytes of changes held by the last pause.
    pub paused_diff_bytes: u64,
    /// Consecutive failed health checks.
    pub failed_checks: u32,
    /// The VM's pid, while one runs.
    pub vm_pid: u32,
    /// The VM's console file.
    pub vm_console: String,
    /// Kernel provider: devices repaired by a health-check reconnect.
    pub recoveries: u32,
}

/// The live resources.
#[derive(Debug, Default)]
pub struct Live {
    /// The provider while the disk is served.
    pub provider: Option<AnyProvider>,
    /// The last pause's export while paused.
    pub paused: Option<PausedDisk>,
    /// Files to remove on delete (paused diffs).
    pub files: Vec<std::path::PathBuf>,
    /// Generation counter for file names.
    pub generation: u64,
    /// The VM booted on the disk (killed on drop).
    pub vm: Option<rootfork_vmm::qemu::QemuProcess>,
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
    /// Its VMM settings, if given.
    pub vmm: Option<VmmSettings>,
    /// Creation time.
    pub created_unix_ms: i64,
    status: parking_lot::Mutex<Status>,
    /// The live resources; held across each lifecycle operation.
    pub live: tokio::sync::Mutex<Live>,
}

/// The proto enum of a provider kind.
pub fn kind_proto(k: ProviderKind) -> v1::ProviderKind {
    match k {
        ProviderKind::Kernel => v1::ProviderKind::Kernel,
        _ => v1::ProviderKind::Socket,
    }
}

impl Sandbox {
    /// A new sandbox in state `Creating`.
    pub fn new(
        id: String,
        template: String,
        kind: ProviderKind,
        vmm: Option<VmmSettings>,
    ) -> Arc<Sandbox> {
        let now = now_unix_ms();
        Arc::new(Sandbox {
            id,
            template,
            kind,
            vmm,
            created_unix_ms: now,
            status: parking_lot::Mutex::new(Status {
                state: SandboxState::Creating,
                since_unix_ms: now,
                health: HealthState::Unspecified,
                message: String::new(),
                nbd_uri: String::new(),
                device_path: String::new(),
                device_index: None,
                ready_latency: Duration::ZERO,
                pause_count: 0,
                paused_diff_bytes: 0,
                failed_checks: 0,
                vm_pid: 0,
                vm_console: String::new(),
                recoveries: 0,
            }),
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

    /// The API view; overlay counters are read from `live` when it is free.
    pub fn to_proto(&self) -> v1::Sandbox {
        let s = self.status();
        let (mut written, mut data_blocks) = (0, 0);
        if let Ok(live) = self.live.try_lock() {
            if let Some(stats) = live.provider.as_ref().and_then(overlay_stats) {
                written = stats.bytes_written;
                data_blocks = stats.blocks_data;
            }
        }
        v1::Sandbox {
            id: self.id.clone(),
            template: self.template.clone(),
            provider: kind_proto(self.kind) as i32,
            state: s.state as i32,
            nbd_uri: s.nbd_uri,
            device_path: s.device_path,
            created_unix_ms: self.created_unix_ms,
            state_since_unix_ms: s.since_unix_ms,
            health: s.health as i32,
            message: s.message,
            vmm: self.vmm.clone(),
            create_to_ready_us: s.ready_latency.as_micros() as u64,
            overlay_bytes_written: written,
            overlay_data_blocks: data_blocks,
            paused_diff_bytes: s.paused_diff_bytes,
            pause_count: s.pause_count,
            vm_pid: s.vm_pid,
            vm_console: s.vm_console,
            recoveries: s.recoveries,
        }
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
