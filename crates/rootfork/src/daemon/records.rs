//! Durable sandbox records: `STATE/sandboxes/ID.json`, one per sandbox that is not deleted,
//! written atomically (a temporary file, fsync, rename, fsync of the directory) at every
//! lifecycle change, so a restart finds every paused sandbox with its layer (a build of the
//! store, `builds.rs`), knows which
//! sandboxes were running when the daemon went away, and for a running sandbox where its disk was
//! served from ([`Served`]: a socket sandbox's Unix socket, a kernel sandbox's `/dev/nbdN`) and
//! which QEMU or Firecracker process runs its VM ([`VmProcess`], [`FcProcess`]), so the next
//! daemon can serve it again and adopt the VM.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rootfork_block::{DiffKind, DiffMap, DiffRun};
use rootfork_provider::{PausedDisk, ProviderKind};
use serde::{Deserialize, Serialize};

use crate::daemon::spec::VmSpec;

/// The record format this daemon writes and reads.
pub const RECORD_VERSION: u32 = 1;

/// Where a sandbox's lifecycle stood when its record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    /// Its disk was served (by this daemon process).
    Running,
    /// Its changes were held in its paused diff.
    Paused,
}

/// One run of a recorded diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// First byte on the device.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// Where its bytes start in the data file; `None`: it reads as zeroes.
    pub data_offset: Option<u64>,
}

/// A paused diff: its map and its data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffRecord {
    /// The device size.
    pub size: u64,
    /// The overlay block size it came from.
    pub block_size: u32,
    /// Its runs, ascending.
    pub runs: Vec<RunRecord>,
    /// The packed data file.
    pub data: PathBuf,
}

/// Where a running socket sandbox's disk is served from: what a restarted daemon needs to
/// reopen its overlay and serve it again at the same NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedDisk {
    /// The overlay's cache file (its block state beside it, `rootfork_block` names it).
    pub cache: PathBuf,
    /// The Unix socket the export is served on.
    pub socket: PathBuf,
    /// The export name.
    pub export: String,
    /// The overlay's block size.
    pub block_size: u32,
}

/// Where a running kernel sandbox's disk is served: what a restarted daemon needs to reopen its
/// overlay and hand the still-connected `/dev/nbdN` new sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedDevice {
    /// The overlay's cache file (its block state beside it).
    pub cache: PathBuf,
    /// The overlay's block size.
    pub block_size: u32,
    /// The slot (`/dev/nbdN`).
    pub device: u32,
    /// The sandbox its backend identifier names (the sandbox itself, or the warm slot the
    /// device was connected as).
    pub backend_sandbox: String,
    /// The connections it was connected with (the kernel takes a new socket only in place of
    /// a dead one).
    pub connections: usize,
}

/// The QEMU process a running sandbox's VM is (the `vm_process` field of its record): what a
/// restarted daemon needs to adopt it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProcess {
    /// Its pid.
    pub pid: u32,
    /// Its start time (`/proc/PID/stat` field 22): a reused pid has another.
    pub start_time: u64,
    /// Its QMP socket (in `STATE/vm/`; its command line names it).
    pub qmp: PathBuf,
    /// The guest's console file.
    pub console: PathBuf,
    /// QEMU's own log file.
    pub log: PathBuf,
}

/// The Firecracker process a running kernel sandbox's VM is (the `fc_process` field of its
/// record): what a restarted daemon needs to adopt it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FcProcess {
    /// Its pid.
    pub pid: u32,
    /// Its start time (`/proc/PID/stat` field 22): a reused pid has another.
    pub start_time: u64,
    /// Its API socket (in its run directory; its command line names it).
    pub api_socket: PathBuf,
    /// Its run directory in `STATE/vm/fc/` (`api.sock`, `rootfs.link`, `vmm.log`).
    pub run_dir: PathBuf,
}

/// The VM process a running sandbox's record names, of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedVm {
    /// A QEMU process.
    Qemu(VmProcess),
    /// A Firecracker process.
    Firecracker(FcProcess),
}

impl RecordedVm {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        match self {
            RecordedVm::Qemu(q) => q.pid,
            RecordedVm::Firecracker(f) => f.pid,
        }
    }
}

/// Where a running sandbox's disk is served from (the `served` field of its record). A socket
/// sandbox's is the object older daemons wrote; a kernel sandbox's has `device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Served {
    /// A kernel sandbox's `/dev/nbdN`.
    Kernel(ServedDevice),
    /// A socket sandbox's Unix socket.
    Socket(ServedDisk),
}

impl Served {
    /// The overlay's cache file.
    pub fn cache(&self) -> &Path {
        match self {
            Served::Kernel(d) => &d.cache,
            Served::Socket(d) => &d.cache,
        }
    }
}

/// A sandbox as kept on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// Its id.
    pub id: String,
    /// Its template.
    pub template: String,
    /// `socket` or `kernel`.
    pub provider: String,
    /// Its VM settings.
    pub vm: Option<VmSpec>,
    /// Its disk's size.
    pub disk_size: u64,
    /// Its quota.
    pub quota: Option<u64>,
    /// When it was created.
    pub created_unix_ms: i64,
    /// Where it stood.
    pub state: RecordState,
    /// Its last pause's diff, in records of daemons before the build store (state format 3 and
    /// older); migrated to a layer at start, never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<DiffRecord>,
    /// Its layer in the build store (a build id): paused, its disk; running, what its overlay is
    /// stacked on. Absent: its template's base build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    /// Pauses so far.
    pub pause_count: u32,
    /// The next generation number for its file names.
    pub generation: u64,
    /// While running on a provider that a restart can adopt: where its disk is served from.
    /// Absent in records of older daemons and of sandboxes that cannot be adopted (a VM the
    /// daemon started, a kernel sandbox without a `dead_conn_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<Served>,
    /// While running with a QEMU VM the daemon started and a restart can adopt: that process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_process: Option<VmProcess>,
    /// While running with a Firecracker VM the daemon started and a restart can adopt: that
    /// process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fc_process: Option<FcProcess>,
    /// Paused with a running VM: its saved state (absent in records written before it existed).
    #[serde(default)]
    pub vm_state: Option<crate::daemon::snapshot::VmState>,
    /// With an object store: where it stands there (absent: nowhere).
    #[serde(
        default,
        skip_serializing_if = "crate::daemon::remote::StoreLink::is_nowhere"
    )]
    pub store: crate::daemon::remote::StoreLink,
}

impl SandboxRecord {
    /// The VM process it names, of either kind.
    pub fn recorded_vm(&self) -> Option<RecordedVm> {
        match (&self.vm_process, &self.fc_process) {
            (Some(q), _) => Some(RecordedVm::Qemu(q.clone())),
            (None, Some(f)) => Some(RecordedVm::Firecracker(f.clone())),
            (None, None) => None,
        }
    }
}

impl DiffRecord {
    /// The record of `p`.
    pub fn of(p: &PausedDisk) -> DiffRecord {
        DiffRecord {
            size: p.map.size,
            block_size: p.map.block_size,
            runs: p
                .map
                .runs
                .iter()
                .map(|r| RunRecord {
                    offset: r.offset,
                    len: r.len,
                    data_offset: match r.kind {
                        DiffKind::Data { data_offset } => Some(data_offset),
                        DiffKind::Zero => None,
                    },
                })
                .collect(),
            data: p.data.clone(),
        }
    }

    /// The paused disk it describes.
    pub fn to_paused(&self) -> PausedDisk {
        PausedDisk {
            map: DiffMap {
                size: self.size,
                block_size: self.block_size,
                runs: self
                    .runs
                    .iter()
                    .map(|r| DiffRun {
                        offset: r.offset,
                        len: r.len,
                        kind: match r.data_offset {
                            Some(data_offset) => DiffKind::Data { data_offset },
                            None => DiffKind::Zero,
                        },
                    })
                    .collect(),
            },
            data: self.data.clone(),
        }
    }
}

/// The provider kind a record names.
pub fn provider_kind(name: &str) -> Option<ProviderKind> {
    match name {
        "socket" => Some(ProviderKind::Socket),
        "kernel" => Some(ProviderKind::Kernel),
        _ => None,
    }
}

/// What a directory of records holds: the readable records, and the files that are not one
/// (with why).
#[derive(Debug, Default)]
pub struct Loaded {
    /// The records, by id.
    pub records: Vec<SandboxRecord>,
    /// Unreadable, newer or misnamed record files.
    pub refused: Vec<(PathBuf, String)>,
}

impl Loaded {
    /// The files in `STATE/vm/` that running records' VMs use (QMP socket, console, log; a
    /// Firecracker VM's run directory).
    pub fn vm_files(&self) -> std::collections::BTreeSet<PathBuf> {
        let running = || {
            self.records
                .iter()
                .filter(|r| r.state == RecordState::Running)
        };
        running()
            .filter_map(|r| r.vm_process.as_ref())
            .flat_map(|v| [v.qmp.clone(), v.console.clone(), v.log.clone()])
            .chain(
                running()
                    .filter_map(|r| r.fc_process.as_ref())
                    .map(|f| f.run_dir.clone()),
            )
            .collect()
    }
}

/// Records in one directory.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Records {
    /// The records in `dir` (created if missing).
    pub fn open(dir: &Path) -> std::io::Result<Records> {
        std::fs::create_dir_all(dir)?;
        Ok(Records {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `rec` so that a crash leaves either the old record or the new one.
    pub fn write(&self, rec: &SandboxRecord) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{}.json.tmp", rec.id));
        let bytes = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?;
        let r = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.path(&rec.id))?;
            sync_dir(&self.dir)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    /// Removes `id`'s record (durably).
    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every record, and the files that could not be read as one (with why). Leftover
    /// temporary files of interrupted writes are removed.
    pub fn load(&self) -> std::io::Result<Loaded> {
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for ent in std::fs::read_dir(&self.dir)?.flatten() {
            let p = ent.path();
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&p);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let rec = std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<SandboxRecord>(&b).map_err(|e| e.to_string())
                })
                .and_then(|r| match r.version {
                    RECORD_VERSION => Ok(r),
                    v => Err(format!(
                        "record version {v}; this daemon reads {RECORD_VERSION}"
                    )),
                });
            match rec {
                Ok(r) if p == self.path(&r.id) => good.push(r),
                Ok(r) => bad.push((p, format!("names sandbox {:?}", r.id))),
                Err(why) => bad.push((p, why)),
            }
        }
        good.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Loaded {
            records: good,
            refused: bad,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            version: RECORD_VERSION,
            id: id.into(),
            template: "t".into(),
            provider: "socket".into(),
            vm: None,
            disk_size: 1 << 20,
            quota: Some(4096),
            created_unix_ms: 7,
            state: RecordState::Paused,
            paused: Some(DiffRecord::of(&PausedDisk {
                map: DiffMap {
                    size: 1 << 20,
                    block_size: 4096,
                    runs: vec![
                        DiffRun {
                            offset: 0,
                            len: 4096,
                            kind: DiffKind::Data { data_offset: 0 },
                        },
                        DiffRun {
                            offset: 8192,
                            len: 4096,
                            kind: DiffKind::Zero,
                        },
                    ],
                },
                data: "/s/paused/a.1.diff".into(),
            })),
            layer: Some("0123456789abcdef0123456789abcdef".into()),
            pause_count: 1,
            generation: 3,
            served: None,
            vm_process: None,
            fc_process: None,
            vm_state: None,
            store: Default::default(),
        }
    }

    #[test]
    fn records_round_trip_and_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let r = Records::open(dir.path()).unwrap();
        let mut a = record("a");
        r.write(&a).unwrap();
        a.state = RecordState::Running;
        r.write(&a).unwrap();
        r.write(&record("b")).unwrap();
        let l = r.load().unwrap();
        assert!(l.refused.is_empty(), "{:?}", l.refused);
        assert_eq!(l.records, vec![a.clone(), record("b")]);
        let paused = a.paused.as_ref().unwrap().to_paused();
        assert_eq!(DiffRecord::of(&paused), *a.paused.as_ref().unwrap());
        r.remove("a").unwrap();
        r.remove("a").unwrap();
        assert_eq!(r.load().unwrap().records.len(), 1);
    }

    #[test]
    fn a_served_disk_round_trips_and_records_without_one_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let r = Records::open(dir.path()).unwrap();
        let mut a = record("a");
        a.state = RecordState::Running;
        a.served = Some(Served::Socket(ServedDisk {
            cache: "/s/cache/a.3.cache".into(),
            socket: "/s/nbd/7.sock".into(),
            export: "a".into(),
            block_size: 4096,
        }));
        a.vm_process = Some(VmProcess {
            pid: 4242,
            start_time: 987654,
            qmp: "/s/vm/3.qmp".into(),
            console: "/s/vm/a.console".into(),
            log: "/s/vm/a.qemu.log".into(),
        });
        r.write(&a).unwrap();
        let mut k = record("k");
        k.state = RecordState::Running;
        k.served = Some(Served::Kernel(ServedDevice {
            cache: "/s/cache/k.1.cache".into(),
            block_size: 4096,
            device: 3,
            backend_sandbox: "k".into(),
            connections: 2,
        }));
        k.fc_process = Some(FcProcess {
            pid: 77,
            start_time: 1234,
            api_socket: "/s/vm/fc/rf-4/api.sock".into(),
            run_dir: "/s/vm/fc/rf-4".into(),
        });
        r.write(&k).unwrap();
        // A record of a daemon from before adoption has no `served`.
        let mut old = serde_json::to_value(record("b")).unwrap();
        old.as_object_mut().unwrap().remove("served");
        std::fs::write(dir.path().join("b.json"), old.to_string()).unwrap();
        let l = r.load().unwrap();
        assert!(l.refused.is_empty(), "{:?}", l.refused);
        assert!(matches!(
            l.records[0].recorded_vm(),
            Some(RecordedVm::Qemu(_))
        ));
        assert!(matches!(
            l.records[2].recorded_vm(),
            Some(RecordedVm::Firecracker(ref f)) if f.pid == 77
        ));
        assert!(l.vm_files().contains(Path::new("/s/vm/fc/rf-4")));
        assert_eq!(l.records, vec![a, record("b"), k]);
    }

    #[test]
    fn damaged_newer_and_misnamed_records_are_reported_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let r = Records::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("x.json"), b"{not json").unwrap();
        let mut newer = record("n");
        newer.version = RECORD_VERSION + 1;
        std::fs::write(
            dir.path().join("n.json"),
            serde_json::to_vec(&newer).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("other.json"),
            serde_json::to_vec(&record("m")).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join(".q.json.tmp"), b"half").unwrap();
        let l = r.load().unwrap();
        assert!(l.records.is_empty());
        assert_eq!(l.refused.len(), 3, "{:?}", l.refused);
        assert!(!dir.path().join(".q.json.tmp").exists());
    }
}
