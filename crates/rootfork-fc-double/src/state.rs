//! The double's model of a Firecracker process: what has been configured, in which phase the
//! "guest" is, and which files are held open. Bodies arrive already validated against the spec;
//! this layer enforces Firecracker's *semantic* rules (pre-boot/post-boot, InstanceStart needs a
//! kernel and a root drive, snapshot load only on a fresh process, ids in the URL and the body
//! agree) and opens files the way Firecracker does.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::report::Reporter;
use rootfork_vmm::FileIdentity;

/// Marker key of the double's snapshot files (they are not real Firecracker snapshots).
pub const SNAPSHOT_MAGIC: &str = "rootfork_fc_double_snapshot";

/// The operation ids the model answers (the others are valid per the description but refused
/// with "does not model").
pub const MODELLED_OPERATIONS: &[&str] = &[
    "describeInstance",
    "getFirecrackerVersion",
    "createSyncAction",
    "putGuestBootSource",
    "putGuestDriveByID",
    "patchGuestDriveByID",
    "getMachineConfiguration",
    "putMachineConfiguration",
    "patchMachineConfiguration",
    "putGuestNetworkInterfaceByID",
    "patchGuestNetworkInterfaceByID",
    "createSnapshot",
    "loadSnapshot",
    "patchVm",
    "putLogger",
    "putMetrics",
    "putMmds",
    "patchMmds",
    "getMmds",
    "putMmdsConfig",
    "getExportVmConfig",
    "putGuestVsock",
    "putEntropyDevice",
    "putSerialDevice",
    "putCpuConfiguration",
    "putBalloon",
    "putMemoryHotplug",
    "putGuestPmemByID",
    "describeBalloonConfig",
];

/// The guest phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not booted.
    NotStarted,
    /// Running.
    Running,
    /// Paused.
    Paused,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// 204.
    NoContent,
    /// 200 with a JSON body.
    Json(Value),
}

type Outcome = Result<Reply, String>;

#[derive(Debug)]
struct OpenDrive {
    body: Value,
    _file: File,
}

/// The state of one double instance.
#[derive(Debug)]
pub struct DoubleState {
    id: String,
    version: String,
    phase: Phase,
    boot_source: Option<(Value, Vec<File>)>,
    drives: BTreeMap<String, OpenDrive>,
    machine: Value,
    machine_set: bool,
    ifaces: BTreeMap<String, Value>,
    mmds_config: Option<Value>,
    mmds: Option<Value>,
    logger: Option<File>,
    metrics: Option<File>,
    other: BTreeMap<String, Value>,
    report: Reporter,
}

fn field<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body.get(name)
}

fn str_field<'a>(body: &'a Value, name: &str) -> Option<&'a str> {
    field(body, name).and_then(Value::as_str)
}

fn bool_field(body: &Value, name: &str) -> bool {
    field(body, name).and_then(Value::as_bool).unwrap_or(false)
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

const PRE_BOOT: &str = "The requested operation is not supported after starting the microVM.";
const POST_BOOT: &str = "The requested operation is not supported before starting the microVM.";

impl DoubleState {
    /// A fresh, unconfigured instance.
    pub fn new(id: String, version: String, report: Reporter) -> Self {
        DoubleState {
            id,
            version,
            phase: Phase::NotStarted,
            boot_source: None,
            drives: BTreeMap::new(),
            machine: json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false,
                            "track_dirty_pages": false, "huge_pages": "None"}),
            machine_set: false,
            ifaces: BTreeMap::new(),
            mmds_config: None,
            mmds: None,
            logger: None,
            metrics: None,
            other: BTreeMap::new(),
            report,
        }
    }

    /// The reporter.
    pub fn reporter(&self) -> &Reporter {
        &self.report
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    fn pre_boot(&self) -> Result<(), String> {
        if self.phase == Phase::NotStarted {
            Ok(())
        } else {
            Err(PRE_BOOT.into())
        }
    }

    fn post_boot(&self) -> Result<(), String> {
        if self.phase == Phase::NotStarted {
            Err(POST_BOOT.into())
        } else {
            Ok(())
        }
    }

    /// Opens a file the way Firecracker opens a drive: read-write unless read-only, following
    /// symlinks, size by seeking to the end. Reports what was opened.
    fn open_disk(
        &self,
        purpose: &str,
        drive_id: &str,
        path: &str,
        read_only: bool,
    ) -> Result<File, String> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| format!("Unable to create the block device: cannot open {path}: {e}"))?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("Unable to create the block device: cannot size {path}: {e}"))?;
        self.report_open(purpose, Some(drive_id), path, &file, read_only, Some(size));
        Ok(file)
    }

    fn open_read(&self, purpose: &str, path: &str) -> Result<File, String> {
        let file = File::open(path).map_err(|e| format!("cannot open {purpose} {path}: {e}"))?;
        self.report_open(purpose, None, path, &file, true, None);
        Ok(file)
    }

    fn report_open(
        &self,
        purpose: &str,
        drive_id: Option<&str>,
        path: &str,
        file: &File,
        read_only: bool,
        size: Option<u64>,
    ) {
        let proc_link = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let resolved = std::fs::read_link(&proc_link).unwrap_or_default();
        let id = file
            .metadata()
            .ok()
            .map(|m| FileIdentity::from_metadata(&m));
        self.report.event(json!({
            "event": "open",
            "purpose": purpose,
            "drive_id": drive_id,
            "path": path,
            "resolved": resolved,
            "fd": file.as_raw_fd(),
            "dev": id.map(|i| i.dev),
            "ino": id.map(|i| i.ino),
            "rdev": id.map(|i| i.rdev),
            "kind": id.map(|i| i.kind.to_string()),
            "read_only": read_only,
            "size": size,
        }));
    }

    /// Handles a validated request for operation `op`.
    pub fn handle(
        &mut self,
        op: &str,
        params: &BTreeMap<String, String>,
        body: Option<Value>,
    ) -> Outcome {
        let body = body.unwrap_or(Value::Null);
        match op {
            "describeInstance" => Ok(Reply::Json(json!({
                "app_name": "Firecracker",
                "id": self.id,
                "state": match self.phase {
                    Phase::NotStarted => "Not started",
                    Phase::Running => "Running",
                    Phase::Paused => "Paused",
                },
                "vmm_version": format!("{}-rootfork-fc-double", self.version),
            }))),
            "getFirecrackerVersion" => Ok(Reply::Json(
                json!({"firecracker_version": format!("{}-rootfork-fc-double", self.version)}),
            )),
            "createSyncAction" => self.action(&body),
            "putGuestBootSource" => self.boot_source(body),
            "putGuestDriveByID" => self.put_drive(params, body),
            "patchGuestDriveByID" => self.patch_drive(params, body),
            "getMachineConfiguration" => Ok(Reply::Json(self.machine.clone())),
            "putMachineConfiguration" => self.machine_config(body, false),
            "patchMachineConfiguration" => self.machine_config(body, true),
            "putGuestNetworkInterfaceByID" => self.put_iface(params, body),
            "patchGuestNetworkInterfaceByID" => self.patch_iface(params, body),
            "createSnapshot" => self.create_snapshot(&body),
            "loadSnapshot" => self.load_snapshot(&body),
            "patchVm" => self.patch_vm(&body),
            "putLogger" => self.logger(&body),
            "putMetrics" => self.metrics(&body),
            "putMmds" => {
                self.mmds = Some(body);
                Ok(Reply::NoContent)
            }
            "patchMmds" => {
                let store = self.mmds.get_or_insert_with(|| json!({}));
                merge_patch(store, &body);
                Ok(Reply::NoContent)
            }
            "getMmds" => Ok(Reply::Json(self.mmds.clone().unwrap_or_else(|| json!({})))),
            "putMmdsConfig" => self.mmds_config(body),
            "getExportVmConfig" => Ok(Reply::Json(self.full_config())),
            "putGuestVsock"
            | "putEntropyDevice"
            | "putSerialDevice"
            | "putCpuConfiguration"
            | "putBalloon"
            | "putMemoryHotplug" => {
                self.pre_boot()?;
                self.other.insert(op.to_owned(), body);
                Ok(Reply::NoContent)
            }
            "putGuestPmemByID" => {
                self.pre_boot()?;
                let id = params.values().next().cloned().unwrap_or_default();
                self.other.insert(format!("{op}/{id}"), body);
                Ok(Reply::NoContent)
            }
            "describeBalloonConfig" => self
                .other
                .get("putBalloon")
                .cloned()
                .map(Reply::Json)
                .ok_or_else(|| "Balloon device not configured.".to_owned()),
            other => Err(format!(
                "rootfork-fc-double does not model the operation {other} (it is valid per the spec)"
            )),
        }
    }

    fn action(&mut self, body: &Value) -> Outcome {
        match str_field(body, "action_type") {
            Some("InstanceStart") => {
                self.pre_boot()?;
                if self.boot_source.is_none() {
                    return Err("Cannot start microvm without kernel configuration.".into());
                }
                if !self
                    .drives
                    .values()
                    .any(|d| bool_field(&d.body, "is_root_device"))
                {
                    return Err("rootfork-fc-double: no root drive configured".into());
                }
                self.phase = Phase::Running;
                self.report.event(json!({"event": "instance_start"}));
                Ok(Reply::NoContent)
            }
            Some("SendCtrlAltDel") => {
                if self.phase != Phase::Running {
                    return Err(POST_BOOT.into());
                }
                self.report.event(json!({"event": "ctrl_alt_del"}));
                Ok(Reply::NoContent)
            }
            Some("FlushMetrics") => {
                let Some(m) = self.metrics.as_mut() else {
                    return Err("The metrics system is not initialized.".into());
                };
                writeln!(
                    m,
                    "{}",
                    json!({"utc_timestamp_ms": 0, "double": {"flush": 1}})
                )
                .map_err(|e| format!("Failed to write metrics: {e}"))?;
                Ok(Reply::NoContent)
            }
            other => Err(format!("unknown action {other:?}")),
        }
    }

    fn boot_source(&mut self, body: Value) -> Outcome {
        self.pre_boot()?;
        let kernel = str_field(&body, "kernel_image_path").unwrap_or_default();
        let mut files = vec![self
            .open_read("kernel", kernel)
            .map_err(|e| format!("The kernel file cannot be opened: {e}"))?];
        if let Some(initrd) = str_field(&body, "initrd_path") {
            files.push(
                self.open_read("initrd", initrd)
                    .map_err(|e| format!("The initrd file cannot be opened: {e}"))?,
            );
        }
        self.boot_source = Some((body, files));
        Ok(Reply::NoContent)
    }

    fn check_id(
        params: &BTreeMap<String, String>,
        key: &str,
        body: &Value,
    ) -> Result<String, String> {
        let url = params.get(key).cloned().unwrap_or_default();
        if str_field(body, key) != Some(url.as_str()) {
            return Err("The id from the path does not match the id from the body!".into());
        }
        if !url.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || url.len() > 64 {
            return Err(format!("Invalid ID: {url:?}"));
        }
        Ok(url)
    }

    fn put_drive(&mut self, params: &BTreeMap<String, String>, body: Value) -> Outcome {
        self.pre_boot()?;
        let id = Self::check_id(params, "drive_id", &body)?;
        if field(&body, "socket").is_some() {
            return Err("rootfork-fc-double does not model vhost-user-block drives".into());
        }
        let Some(path) = str_field(&body, "path_on_host") else {
            return Err("path_on_host is required for a virtio-block drive".into());
        };
        if bool_field(&body, "is_root_device")
            && self
                .drives
                .iter()
                .any(|(k, d)| *k != id && bool_field(&d.body, "is_root_device"))
        {
            return Err("A root block device already exists!".into());
        }
        let file = self.open_disk("drive", &id, path, bool_field(&body, "is_read_only"))?;
        self.drives.insert(id, OpenDrive { body, _file: file });
        Ok(Reply::NoContent)
    }

    fn patch_drive(&mut self, params: &BTreeMap<String, String>, body: Value) -> Outcome {
        self.post_boot()?;
        let id = Self::check_id(params, "drive_id", &body)?;
        let Some(existing) = self.drives.get(&id) else {
            return Err(format!("Invalid block device ID: {id}"));
        };
        let read_only = bool_field(&existing.body, "is_read_only");
        let mut merged = existing.body.clone();
        if let Some(path) = str_field(&body, "path_on_host") {
            let file = self.open_disk("drive_patch", &id, path, read_only)?;
            merged["path_on_host"] = json!(path);
            if let Some(r) = field(&body, "rate_limiter") {
                merged["rate_limiter"] = r.clone();
            }
            self.drives.insert(
                id,
                OpenDrive {
                    body: merged,
                    _file: file,
                },
            );
        } else if let Some(r) = field(&body, "rate_limiter") {
            let d = self.drives.get_mut(&id).expect("checked above");
            d.body["rate_limiter"] = r.clone();
        }
        Ok(Reply::NoContent)
    }

    fn machine_config(&mut self, body: Value, patch: bool) -> Outcome {
        self.pre_boot()?;
        let mut next = if patch {
            self.machine.clone()
        } else {
            json!({"smt": false, "track_dirty_pages": false, "huge_pages": "None"})
        };
        merge_patch(&mut next, &body);
        let vcpus = next["vcpu_count"].as_u64().unwrap_or(0);
        if bool_field(&next, "smt") && vcpus > 1 && vcpus % 2 == 1 {
            return Err("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.".into());
        }
        if next["huge_pages"] == "2M" && next["mem_size_mib"].as_u64().unwrap_or(0) % 2 == 1 {
            return Err("The memory size (MiB) must be a multiple of 2 with 2M huge pages.".into());
        }
        self.machine = next;
        self.machine_set = true;
        Ok(Reply::NoContent)
    }

    fn put_iface(&mut self, params: &BTreeMap<String, String>, body: Value) -> Outcome {
        self.pre_boot()?;
        let id = Self::check_id(params, "iface_id", &body)?;
        self.ifaces.insert(id, body);
        Ok(Reply::NoContent)
    }

    fn patch_iface(&mut self, params: &BTreeMap<String, String>, body: Value) -> Outcome {
        self.post_boot()?;
        let id = Self::check_id(params, "iface_id", &body)?;
        let Some(existing) = self.ifaces.get_mut(&id) else {
            return Err(format!("Invalid network interface ID: {id}"));
        };
        merge_patch(existing, &body);
        Ok(Reply::NoContent)
    }

    fn mmds_config(&mut self, body: Value) -> Outcome {
        self.pre_boot()?;
        if let Some(ids) = field(&body, "network_interfaces").and_then(Value::as_array) {
            for id in ids.iter().filter_map(Value::as_str) {
                if !self.ifaces.contains_key(id) {
                    return Err(format!("The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface: {id}"));
                }
            }
        }
        self.mmds_config = Some(body);
        Ok(Reply::NoContent)
    }

    fn patch_vm(&mut self, body: &Value) -> Outcome {
        self.post_boot()?;
        self.phase = match str_field(body, "state") {
            Some("Paused") => Phase::Paused,
            Some("Resumed") => Phase::Running,
            other => return Err(format!("unknown state {other:?}")),
        };
        self.report
            .event(json!({"event": "vm_state", "state": body["state"]}));
        Ok(Reply::NoContent)
    }

    fn logger(&mut self, body: &Value) -> Outcome {
        if self.logger.is_some() {
            return Err("Logger can only be initialized once.".into());
        }
        if let Some(path) = str_field(body, "log_path") {
            let mut f = OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(|e| format!("Failed to open the log file {path}: {e}"))?;
            writeln!(f, "rootfork-fc-double {}: logger initialised", self.id)
                .map_err(|e| format!("Failed to write the log file {path}: {e}"))?;
            self.logger = Some(f);
        }
        Ok(Reply::NoContent)
    }

    fn metrics(&mut self, body: &Value) -> Outcome {
        if self.metrics.is_some() {
            return Err("Reinitialization of metrics not allowed.".into());
        }
        let path = str_field(body, "metrics_path").unwrap_or_default();
        let f = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| format!("Failed to open the metrics file {path}: {e}"))?;
        self.metrics = Some(f);
        Ok(Reply::NoContent)
    }

    fn full_config(&self) -> Value {
        let mut cfg = json!({
            "drives": self.drives.values().map(|d| d.body.clone()).collect::<Vec<_>>(),
            "machine-config": self.machine,
            "network-interfaces": self.ifaces.values().cloned().collect::<Vec<_>>(),
        });
        if let Some((b, _)) = &self.boot_source {
            cfg["boot-source"] = b.clone();
        }
        if let Some(m) = &self.mmds_config {
            cfg["mmds-config"] = m.clone();
        }
        cfg
    }

    fn create_snapshot(&mut self, body: &Value) -> Outcome {
        if self.phase != Phase::Paused {
            return Err("Cannot create a snapshot of a microVM that is not paused.".into());
        }
        let snap = str_field(body, "snapshot_path").unwrap_or_default();
        let mem = str_field(body, "mem_file_path").unwrap_or_default();
        let state = json!({
            SNAPSHOT_MAGIC: 1,
            "config": self.full_config(),
            "mmds": self.mmds,
        });
        std::fs::write(snap, state.to_string())
            .map_err(|e| format!("Cannot write the snapshot file {snap}: {e}"))?;
        let mem_mib = self.machine["mem_size_mib"].as_u64().unwrap_or(0);
        std::fs::write(
            mem,
            format!("rootfork-fc-double guest memory: {mem_mib} MiB\n"),
        )
        .map_err(|e| format!("Cannot write the memory file {mem}: {e}"))?;
        self.report
            .event(json!({"event": "snapshot_created", "snapshot_path": snap}));
        Ok(Reply::NoContent)
    }

    fn is_fresh(&self) -> bool {
        self.phase == Phase::NotStarted
            && self.boot_source.is_none()
            && self.drives.is_empty()
            && !self.machine_set
            && self.ifaces.is_empty()
            && self.mmds_config.is_none()
            && self.other.is_empty()
    }

    fn load_snapshot(&mut self, body: &Value) -> Outcome {
        if !self.is_fresh() {
            return Err(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
                    .into(),
            );
        }
        let mem = match (str_field(body, "mem_file_path"), field(body, "mem_backend")) {
            (Some(p), None) => p.to_owned(),
            (None, Some(b)) => {
                if str_field(b, "backend_type") != Some("File") {
                    return Err("rootfork-fc-double models only the File memory backend".into());
                }
                str_field(b, "backend_path").unwrap_or_default().to_owned()
            }
            _ => return Err("Exactly one of mem_file_path and mem_backend must be given.".into()),
        };
        let _mem = self.open_read("snapshot_memory", &mem)?;
        let snap = str_field(body, "snapshot_path").unwrap_or_default();
        let text = std::fs::read_to_string(snap)
            .map_err(|e| format!("Cannot read the snapshot file {snap}: {e}"))?;
        let state: Value = serde_json::from_str(&text)
            .ok()
            .filter(|v: &Value| v.get(SNAPSHOT_MAGIC).is_some())
            .ok_or_else(|| format!("{snap} is not a rootfork-fc-double snapshot"))?;
        let cfg = &state["config"];
        // Drives are reopened at the paths recorded in the snapshot.
        let mut drives = BTreeMap::new();
        for d in cfg["drives"].as_array().into_iter().flatten() {
            let id = str_field(d, "drive_id").unwrap_or_default().to_owned();
            let path = str_field(d, "path_on_host").unwrap_or_default();
            let file =
                self.open_disk("snapshot_drive", &id, path, bool_field(d, "is_read_only"))?;
            drives.insert(
                id,
                OpenDrive {
                    body: d.clone(),
                    _file: file,
                },
            );
        }
        let mut ifaces: BTreeMap<String, Value> = cfg["network-interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                (
                    str_field(i, "iface_id").unwrap_or_default().to_owned(),
                    i.clone(),
                )
            })
            .collect();
        for o in body["network_overrides"].as_array().into_iter().flatten() {
            let id = str_field(o, "iface_id").unwrap_or_default();
            let Some(i) = ifaces.get_mut(id) else {
                return Err(format!("Invalid network interface ID in override: {id}"));
            };
            i["host_dev_name"] = o["host_dev_name"].clone();
        }
        self.drives = drives;
        self.ifaces = ifaces;
        self.machine = cfg["machine-config"].clone();
        self.mmds_config = cfg.get("mmds-config").cloned();
        self.mmds = state.get("mmds").cloned().filter(|m| !m.is_null());
        self.phase = if bool_field(body, "resume_vm") {
            Phase::Running
        } else {
            Phase::Paused
        };
        self.report
            .event(json!({"event": "snapshot_loaded", "snapshot_path": snap}));
        Ok(Reply::NoContent)
    }
}

/// Whether `path` looks like one of the double's snapshot files.
pub fn is_double_snapshot(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v.get(SNAPSHOT_MAGIC).is_some())
}
