//! Typed request and response bodies of the Firecracker API. The tests check every model against
//! the API description of the dev crate `rootfork-fc-double` (`src/api/`).
//!
//! Optional fields are `Option`s skipped when `None`, so a request never carries a JSON `null`
//! (Firecracker's parser rejects `null` for most fields). Field names follow Firecracker's API
//! exactly.

use serde::{Deserialize, Serialize};

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BootSource {
    /// Host path of the guest kernel.
    pub kernel_image_path: String,
    /// Kernel command line.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub boot_args: Option<String>,
    /// Host path of the initrd.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub initrd_path: Option<String>,
}

/// Block device caching strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are ignored.
    Unsafe,
    /// Flushes reach the host file.
    Writeback,
}

/// Block device I/O engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking I/O on the VMM thread.
    Sync,
    /// io_uring.
    Async,
}

/// A token bucket of a rate limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    /// Bucket capacity.
    pub size: i64,
    /// Milliseconds to refill the bucket.
    pub refill_time: i64,
    /// Initial extra budget.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub one_time_burst: Option<i64>,
}

/// An I/O rate limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RateLimiter {
    /// Bytes per refill period.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bandwidth: Option<TokenBucket>,
    /// Operations per refill period.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ops: Option<TokenBucket>,
}

/// `PUT /entropy`: a virtio-rng device feeding the guest host entropy (pre-boot only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EntropyDevice {
    /// Its rate limiter.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /drives/{drive_id}`.
///
/// Build the root drive's body with [`crate::RootDrive`] via
/// [`crate::firecracker::FirecrackerClient::put_root_drive`]; this struct is public so that
/// additional, non-root drives can be described.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// Drive id; must equal the id in the URL.
    pub drive_id: String,
    /// Whether the guest boots from it.
    pub is_root_device: bool,
    /// Host path (virtio-block).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path_on_host: Option<String>,
    /// Read-only drive (virtio-block).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub is_read_only: Option<bool>,
    /// Boot partition UUID.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub partuuid: Option<String>,
    /// Caching strategy.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cache_type: Option<CacheType>,
    /// I/O engine.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub io_engine: Option<IoEngine>,
    /// Rate limiter.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rate_limiter: Option<RateLimiter>,
    /// vhost-user-block socket (instead of `path_on_host`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}` (post-boot: new backing path or rate limiter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialDrive {
    /// Drive id; must equal the id in the URL.
    pub drive_id: String,
    /// New host path.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path_on_host: Option<String>,
    /// New rate limiter.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// Huge page backing of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// 4 KiB pages.
    None,
    /// Transparent huge pages.
    Transparent,
    /// hugetlbfs 2 MiB pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `PUT /machine-config` (and the body of `GET /machine-config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    /// Number of vCPUs (1 or even, at most 32).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub smt: Option<bool>,
    /// Dirty page tracking (for diff snapshots).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub track_dirty_pages: Option<bool>,
    /// Huge pages.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub huge_pages: Option<HugePages>,
    /// Deprecated static CPU template name (`C3`, `T2`, ..., `None`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cpu_template: Option<String>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    /// Interface id; must equal the id in the URL.
    pub iface_id: String,
    /// Host TAP device name.
    pub host_dev_name: String,
    /// Guest MAC address.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub guest_mac: Option<String>,
    /// MTU advertised to the guest.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mtu: Option<u16>,
    /// Receive rate limiter.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialNetworkInterface {
    /// Interface id; must equal the id in the URL.
    pub iface_id: String,
    /// Receive rate limiter.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// The synchronous actions of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Send Ctrl+Alt+Del to the guest (x86).
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// Snapshot kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All guest memory.
    Full,
    /// Only memory dirtied since the last snapshot.
    Diff,
}

/// `PUT /snapshot/create` (VM must be paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    /// File for the VM state.
    pub snapshot_path: String,
    /// File for guest memory.
    pub mem_file_path: String,
    /// Full (default) or diff.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub snapshot_type: Option<SnapshotType>,
}

/// How guest memory is restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// Mapped from a file.
    File,
    /// Served by a userfaultfd handler listening on a Unix socket.
    Uffd,
}

/// The memory backend of a snapshot load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    /// Kind of backend.
    pub backend_type: MemoryBackendType,
    /// Memory file, or the UFFD handler's socket.
    pub backend_path: String,
}

/// Replaces a TAP device on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new TAP device.
    pub host_dev_name: String,
}

/// `PUT /snapshot/load` (fresh process only).
///
/// Drives are reopened at the `path_on_host` recorded in the snapshot, which is why rootfork
/// always uses the stable drive path: it resolves to whichever device the resumed sandbox has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    /// VM state file.
    pub snapshot_path: String,
    /// Memory backend (preferred over the deprecated `mem_file_path`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated: memory file.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mem_file_path: Option<String>,
    /// Dirty page tracking after restore.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub track_dirty_pages: Option<bool>,
    /// Resume right after loading. rootfork leaves this unset and resumes with `PATCH /vm`
    /// after verifying the opened drive.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resume_vm: Option<bool>,
    /// TAP replacements.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub network_overrides: Option<Vec<NetworkOverride>>,
}

/// VM run state for `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Run the vCPUs again.
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// Desired state.
    pub state: VmState,
}

/// Log level of the VMM's logger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warning,
    /// Informational.
    Info,
    /// Debug.
    Debug,
    /// Everything.
    Trace,
    /// Nothing.
    Off,
}

/// `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Logger {
    /// File or named pipe for the log.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub log_path: Option<String>,
    /// Level.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub level: Option<LogLevel>,
    /// Print the level.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub show_level: Option<bool>,
    /// Print file and line.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub show_log_origin: Option<bool>,
    /// Module filter.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// File or named pipe for the metrics lines.
    pub metrics_path: String,
    /// Emit the instance id on each line.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub emit_id: Option<bool>,
}

/// MMDS version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Unauthenticated.
    V1,
    /// Session tokens.
    V2,
}

/// `PUT /mmds/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmdsConfig {
    /// Interfaces that may reach the MMDS.
    pub network_interfaces: Vec<String>,
    /// Version.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<MmdsVersion>,
    /// Link-local address of the MMDS.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ipv4_address: Option<String>,
}

/// Instance state reported by `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configured but not booted.
    #[serde(rename = "Not started")]
    NotStarted,
    /// Running.
    Running,
    /// Paused.
    Paused,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Application name (`Firecracker`).
    pub app_name: String,
    /// Instance id.
    pub id: String,
    /// State.
    pub state: InstanceState,
    /// VMM version.
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    /// Version string.
    pub firecracker_version: String,
}

/// The error body Firecracker answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ApiErrorBody {
    /// Human-readable reason.
    #[serde(default)]
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_fields_are_omitted_not_null() {
        let d = Drive {
            drive_id: "rootfs".into(),
            is_root_device: true,
            path_on_host: Some("/fc-vm/rootfs.ext4".into()),
            is_read_only: Some(false),
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
            socket: None,
        };
        let s = serde_json::to_string(&d).unwrap();
        assert!(!s.contains("null"), "{s}");
        assert_eq!(
            s,
            r#"{"drive_id":"rootfs","is_root_device":true,"path_on_host":"/fc-vm/rootfs.ext4","is_read_only":false}"#
        );
    }

    #[test]
    fn enums_use_the_spec_spelling() {
        assert_eq!(
            serde_json::to_string(&InstanceState::NotStarted).unwrap(),
            "\"Not started\""
        );
        assert_eq!(
            serde_json::to_string(&HugePages::Hugetlbfs2M).unwrap(),
            "\"2M\""
        );
        assert_eq!(
            serde_json::to_string(&InstanceActionInfo {
                action_type: ActionType::InstanceStart
            })
            .unwrap(),
            r#"{"action_type":"InstanceStart"}"#
        );
    }
}
