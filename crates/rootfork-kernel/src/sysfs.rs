//! Reading a slot's state from sysfs (`/sys/block/nbdN/{pid,size,inflight,holders/,backend}` and
//! `/sys/module/nbd/parameters/nbds_max`) under a configurable root, and the quiescence rule a
//! slot must pass before it is handed out again.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::identity::{device_name, parse_device_name};

/// Sysfs under a root directory (`/sys` on a real host, a tempdir in tests).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

/// What sysfs says about one slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SlotSysfs {
    /// The pid in `pid` (present only while the kernel has a configured, started device).
    pub pid: Option<u32>,
    /// `size` in 512-byte sectors.
    pub size_sectors: u64,
    /// `inflight`: reads and writes in flight.
    pub inflight: (u64, u64),
    /// Number of entries in `holders/` (device-mapper, md, ... stacked on this device).
    pub holders: usize,
    /// `backend`, if the device was connected with a backend identifier.
    pub backend: Option<String>,
}

/// Why a slot is not quiescent (the first rule it breaks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub enum NotQuiescent {
    /// The kernel still has a task serving it.
    #[error("pid file shows {0}")]
    Pid(u32),
    /// It still has a size.
    #[error("size is {0} sectors")]
    Size(u64),
    /// Requests are in flight.
    #[error("inflight is {0} {1}")]
    Inflight(u64, u64),
    /// Something is stacked on it.
    #[error("{0} holders")]
    Holders(usize),
}

impl SlotSysfs {
    /// A slot may be (re)used only when it has no pid, size 0, `inflight` `0 0` and no holders.
    pub fn check_quiescent(&self) -> Result<(), NotQuiescent> {
        if let Some(pid) = self.pid {
            return Err(NotQuiescent::Pid(pid));
        }
        if self.size_sectors != 0 {
            return Err(NotQuiescent::Size(self.size_sectors));
        }
        if self.inflight != (0, 0) {
            return Err(NotQuiescent::Inflight(self.inflight.0, self.inflight.1));
        }
        if self.holders != 0 {
            return Err(NotQuiescent::Holders(self.holders));
        }
        Ok(())
    }

    /// Whether the kernel shows the device as connected and started.
    pub fn connected(&self) -> bool {
        self.pid.is_some()
    }
}

/// Whether a sysfs read failed because the slot or one of its attributes went away while it was
/// read (`NotFound`, or `ENODEV` from an attribute a teardown is removing): the slot is changing,
/// look again later; it is no reason to give up on the other slots.
pub fn vanishing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

fn read_opt(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn bad(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: unexpected contents ({what})", path.display()),
    )
}

impl Sysfs {
    /// Sysfs mounted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    /// The host's `/sys`.
    pub fn host() -> Self {
        Sysfs::new("/sys")
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of slot `index`.
    pub fn slot_dir(&self, index: u32) -> PathBuf {
        self.root.join("block").join(device_name(index))
    }

    /// Whether the `nbd` module is loaded (its sysfs directory exists).
    pub fn module_loaded(&self) -> bool {
        self.root.join("module/nbd").is_dir()
    }

    /// `nbds_max`: how many devices the module created at load time.
    pub fn nbds_max(&self) -> io::Result<u32> {
        let p = self.root.join("module/nbd/parameters/nbds_max");
        let s = fs::read_to_string(&p)?;
        s.trim().parse().map_err(|_| bad(&p, "not a number"))
    }

    /// The indices of the slots that exist, ascending.
    pub fn indices(&self) -> io::Result<Vec<u32>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.root.join("block"))? {
            let e = e?;
            if let Some(i) = e.file_name().to_str().and_then(parse_device_name) {
                out.push(i);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The pool's slots: indices below `nbds_max` that exist (devices the kernel created later on
    /// demand, above `nbds_max`, are left alone).
    pub fn pool_indices(&self) -> io::Result<Vec<u32>> {
        let max = self.nbds_max()?;
        Ok(self.indices()?.into_iter().filter(|&i| i < max).collect())
    }

    /// Reads a slot's state. A missing slot directory is `NotFound`.
    pub fn slot(&self, index: u32) -> io::Result<SlotSysfs> {
        let dir = self.slot_dir(index);
        let size_path = dir.join("size");
        let size = fs::read_to_string(&size_path)?;
        let size_sectors = size.trim().parse().map_err(|_| bad(&size_path, "size"))?;
        let pid = match read_opt(&dir.join("pid"))? {
            Some(s) if !s.trim().is_empty() => {
                let p: u32 = s.trim().parse().map_err(|_| bad(&dir.join("pid"), "pid"))?;
                // The kernel prints 0 when no receive task is attached.
                (p != 0).then_some(p)
            }
            _ => None,
        };
        let inflight_path = dir.join("inflight");
        let inflight = match read_opt(&inflight_path)? {
            None => (0, 0),
            Some(s) => {
                let mut it = s.split_whitespace().map(str::parse::<u64>);
                match (it.next(), it.next(), it.next()) {
                    (Some(Ok(r)), Some(Ok(w)), None) => (r, w),
                    _ => return Err(bad(&inflight_path, "inflight")),
                }
            }
        };
        let holders = match fs::read_dir(dir.join("holders")) {
            Ok(rd) => rd.count(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let backend = read_opt(&dir.join("backend"))?
            .map(|s| s.trim_end_matches(['\n', '\0']).to_owned())
            .filter(|s| !s.is_empty());
        Ok(SlotSysfs {
            pid,
            size_sectors,
            inflight,
            holders,
            backend,
        })
    }
}

/// Builds fake sysfs trees for tests (also used by the attachment tests' fake kernel).
#[cfg(test)]
pub mod fake {
    use super::*;

    /// Replaces a file atomically (sysfs reads never see a half-written value; neither may the
    /// fake's readers).
    fn put(path: &Path, contents: &str) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, contents).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    /// Creates `root/module/nbd/parameters/nbds_max` and `n` quiescent slots.
    pub fn tree(root: &Path, n: u32) {
        fs::create_dir_all(root.join("module/nbd/parameters")).unwrap();
        fs::write(
            root.join("module/nbd/parameters/nbds_max"),
            format!("{n}\n"),
        )
        .unwrap();
        for i in 0..n {
            let d = root.join("block").join(device_name(i));
            fs::create_dir_all(d.join("holders")).unwrap();
            fs::write(d.join("size"), "0\n").unwrap();
            fs::write(d.join("inflight"), "       0        0\n").unwrap();
        }
    }

    /// Writes what the kernel shows for a connected device.
    pub fn connect(root: &Path, i: u32, pid: u32, size_bytes: u64, backend: Option<&str>) {
        let d = root.join("block").join(device_name(i));
        put(&d.join("pid"), &format!("{pid}\n"));
        put(&d.join("size"), &format!("{}\n", size_bytes / 512));
        if let Some(b) = backend {
            put(&d.join("backend"), &format!("{b}\n"));
        }
    }

    /// Writes what the kernel shows after a device's teardown finished.
    pub fn disconnect(root: &Path, i: u32) {
        let d = root.join("block").join(device_name(i));
        let _ = fs::remove_file(d.join("pid"));
        let _ = fs::remove_file(d.join("backend"));
        put(&d.join("size"), "0\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_slots_and_applies_every_quiescence_rule() {
        let t = tempfile::tempdir().unwrap();
        fake::tree(t.path(), 4);
        let s = Sysfs::new(t.path());
        assert_eq!(s.nbds_max().unwrap(), 4);
        assert_eq!(s.pool_indices().unwrap(), vec![0, 1, 2, 3]);
        let q = s.slot(0).unwrap();
        assert_eq!(q, SlotSysfs::default());
        assert_eq!(q.check_quiescent(), Ok(()));

        fake::connect(t.path(), 1, 99, 1 << 20, Some("rootfork:h:1:s"));
        let c = s.slot(1).unwrap();
        assert_eq!(c.pid, Some(99));
        assert_eq!(c.size_sectors, 2048);
        assert_eq!(c.backend.as_deref(), Some("rootfork:h:1:s"));
        assert_eq!(c.check_quiescent(), Err(NotQuiescent::Pid(99)));

        // Each rule on its own.
        let d = s.slot_dir(2);
        fs::write(d.join("size"), "8\n").unwrap();
        assert_eq!(
            s.slot(2).unwrap().check_quiescent(),
            Err(NotQuiescent::Size(8))
        );
        fs::write(d.join("size"), "0\n").unwrap();
        fs::write(d.join("inflight"), "       0        3\n").unwrap();
        assert_eq!(
            s.slot(2).unwrap().check_quiescent(),
            Err(NotQuiescent::Inflight(0, 3))
        );
        fs::write(d.join("inflight"), "0 0\n").unwrap();
        fs::create_dir(d.join("holders/dm-0")).unwrap();
        assert_eq!(
            s.slot(2).unwrap().check_quiescent(),
            Err(NotQuiescent::Holders(1))
        );
        fs::remove_dir(d.join("holders/dm-0")).unwrap();
        fs::write(d.join("pid"), "\n").unwrap();
        assert_eq!(s.slot(2).unwrap().check_quiescent(), Ok(()));
    }

    #[test]
    fn malformed_sysfs_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        fake::tree(t.path(), 1);
        let s = Sysfs::new(t.path());
        fs::write(s.slot_dir(0).join("inflight"), "x\n").unwrap();
        assert_eq!(s.slot(0).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(s.slot(5).unwrap_err().kind(), io::ErrorKind::NotFound);
        fs::write(t.path().join("module/nbd/parameters/nbds_max"), "lots").unwrap();
        assert!(s.nbds_max().is_err());
    }

    #[test]
    fn slots_above_nbds_max_are_not_in_the_pool() {
        let t = tempfile::tempdir().unwrap();
        fake::tree(t.path(), 3);
        fs::write(t.path().join("module/nbd/parameters/nbds_max"), "2\n").unwrap();
        fs::create_dir_all(t.path().join("block/loop0")).unwrap();
        let s = Sysfs::new(t.path());
        assert_eq!(s.indices().unwrap(), vec![0, 1, 2]);
        assert_eq!(s.pool_indices().unwrap(), vec![0, 1]);
    }
}
