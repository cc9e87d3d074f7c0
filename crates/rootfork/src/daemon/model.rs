//! The daemon's own vocabulary: lifecycle and health states, and the views its operations
//! return (sandboxes, templates, devices). The gRPC edge (`crate::service::convert`) maps these
//! to and from the wire types; nothing under `daemon/` builds or reads a proto message.

use std::path::PathBuf;
use std::time::Duration;

use rootfork_provider::ProviderKind;

use crate::daemon::spec::VmSpec;

/// Where a sandbox is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SandboxState {
    /// Its disk is being attached (and its VM booted).
    Creating,
    /// Its disk is served.
    Running,
    /// Its disk is being flushed, frozen and exported.
    Pausing,
    /// Its changes are held; no device.
    Paused,
    /// A fresh overlay over template + changes is being attached.
    Resuming,
    /// The health check found the device dead and could not recover it.
    Failed,
    /// Its resources are being released.
    Deleting,
    /// Gone; remembered for a while so late calls get a precise answer.
    Deleted,
}

impl SandboxState {
    /// Every state, in lifecycle order.
    pub const ALL: [SandboxState; 8] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Pausing,
        SandboxState::Paused,
        SandboxState::Resuming,
        SandboxState::Failed,
        SandboxState::Deleting,
        SandboxState::Deleted,
    ];

    /// The lower-case name used in messages and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Pausing => "pausing",
            SandboxState::Paused => "paused",
            SandboxState::Resuming => "resuming",
            SandboxState::Failed => "failed",
            SandboxState::Deleting => "deleting",
            SandboxState::Deleted => "deleted",
        }
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the last health checks found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Health {
    /// Not checked (or no device to check).
    #[default]
    Unknown,
    /// The last check passed.
    Healthy,
    /// A check failed once; the next one decides.
    Degraded,
    /// Checks failed in a row.
    Failed,
}

/// A sandbox's observable status (behind a short lock in its record).
#[derive(Debug, Clone)]
pub struct Status {
    /// Lifecycle state.
    pub state: SandboxState,
    /// When it entered that state.
    pub since_unix_ms: i64,
    /// Health.
    pub health: Health,
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
    /// Bytes of VM memory and device state held by the last pause (0: none, the VM was not
    /// running or the sandbox has none).
    pub vm_state_bytes: u64,
    /// Kernel provider: devices repaired by a health-check reconnect.
    pub recoveries: u32,
    /// The VM generation ID (GUID) of the last QEMU VM started for it; empty: none.
    pub vm_generation_id: String,
    /// Its VM was lost across a daemon restart (gone, or its pid another process's): it stays
    /// `FAILED` however healthy its disk, until it is paused or deleted.
    pub vm_lost: bool,
    /// With an object store: where the sandbox stands there (see `remote/`); empty: nowhere.
    pub store_status: String,
}

impl Status {
    /// The status of a sandbox that has just been registered.
    pub fn new(now_unix_ms: i64) -> Status {
        Status {
            state: SandboxState::Creating,
            since_unix_ms: now_unix_ms,
            health: Health::Unknown,
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
            vm_state_bytes: 0,
            recoveries: 0,
            vm_generation_id: String::new(),
            vm_lost: false,
            store_status: String::new(),
        }
    }

    /// Forgets the device (after a pause or delete).
    pub fn clear_device(&mut self) {
        self.nbd_uri.clear();
        self.device_path.clear();
        self.device_index = None;
        self.health = Health::Unknown;
    }
}

/// What `get` and `list` show of a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxInfo {
    /// Its id.
    pub id: String,
    /// Its template.
    pub template: String,
    /// Its provider.
    pub provider: ProviderKind,
    /// Its VM settings, if given.
    pub vm: Option<VmSpec>,
    /// Its disk's size.
    pub disk_size: u64,
    /// Its quota, if any.
    pub quota: Option<u64>,
    /// Creation time.
    pub created_unix_ms: i64,
    /// Its status.
    pub status: Status,
    /// Overlay counters while the disk is served (0 otherwise).
    pub overlay_bytes_written: u64,
    /// Data blocks of the overlay while the disk is served (0 otherwise).
    pub overlay_data_blocks: u64,
}

/// Who is calling: the API listener a request came in on. Local callers could open the socket,
/// whose mode is the check; remote ones (TCP, bearer token) are held to narrower rules, e.g.
/// which files they may import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The Unix socket.
    Local,
    /// TCP.
    Remote,
}

/// What a template image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateFormat {
    /// Any raw disk image.
    Raw,
    /// A raw image holding an ext2/3/4 file system.
    Ext4,
}

impl TemplateFormat {
    /// The name kept in template records.
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateFormat::Raw => "raw",
            TemplateFormat::Ext4 => "ext4",
        }
    }

    /// The format a record names (`raw` for anything unknown).
    pub fn from_name(name: &str) -> TemplateFormat {
        match name {
            "ext4" => TemplateFormat::Ext4,
            _ => TemplateFormat::Raw,
        }
    }
}

/// What `list` shows of a template.
#[derive(Debug, Clone)]
pub struct TemplateInfo {
    /// Its name.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// What it holds.
    pub format: TemplateFormat,
    /// Bytes its image occupies on disk.
    pub allocated_bytes: u64,
    /// When it was imported.
    pub created_unix_ms: i64,
    /// Sandboxes (not deleted) that use it.
    pub sandboxes: u32,
    /// The read-only image every sandbox opens.
    pub path: PathBuf,
}

/// One kernel `/dev/nbdN` slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The slot index.
    pub index: u32,
    /// Its device node.
    pub path: PathBuf,
    /// free | cooling | claimed | connected | orphaned | busy.
    pub state: String,
    /// The sandbox holding it, if any.
    pub sandbox: Option<String>,
    /// `/sys/block/nbdN/backend`, if set.
    pub backend: Option<String>,
    /// When it entered its state.
    pub since_unix_ms: i64,
    /// The process holding its claim.
    pub owner_pid: Option<u32>,
}

/// The kernel slots, or why there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceList {
    /// The pool is usable.
    Available(Vec<DeviceInfo>),
    /// Why kernel devices cannot be used (socket sandboxes still work).
    Unavailable(String),
}
