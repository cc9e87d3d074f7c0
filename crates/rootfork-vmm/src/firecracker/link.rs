//! The per-instance host link: `<run dir>/<vm id>/rootfs.link`, the symlink the stable drive path
//! inside the VMM's mount namespace points at.
//!
//! It points at `/dev/null` until the provider's device is ready, and is then retargeted
//! atomically (a symlink under a temporary name renamed over the link) to the device, before the
//! drive is configured or a snapshot is loaded. The VMM therefore either finds nothing useful
//! (`/dev/null`) or the right device — never a
//! half-written link and never the template. `/dev/null` opens fine but is an empty disk, and
//! the run-time check (`verify_opened`) refuses a VMM holding it instead of the device.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::drive::ReadyDevice;
use crate::identity::FileIdentity;

/// Where the link points while no device is ready.
pub const PARKED_TARGET: &str = "/dev/null";

/// Errors managing the host link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A filesystem operation on the link failed.
    #[error("host link {path}: {op}: {source}")]
    Io {
        /// The link path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// After retargeting, the link does not resolve to the device.
    #[error("host link {path} resolves to {found}, expected the device {device} ({expected})")]
    Mismatch {
        /// The link path.
        path: PathBuf,
        /// The device it should point at.
        device: PathBuf,
        /// The device's identity.
        expected: FileIdentity,
        /// What the link resolves to.
        found: FileIdentity,
    },
}

/// The per-instance symlink; removed on drop (unless [`release`](HostLink::release)d).
#[derive(Debug)]
pub struct HostLink {
    path: PathBuf,
    target: PathBuf,
    /// Left in place on drop: a released VM still resolves its drive through it.
    kept: bool,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn replace_symlink(link: &Path, target: &Path) -> io::Result<()> {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}.{n}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

impl HostLink {
    /// Creates (or atomically replaces) the link at `path`, parked on `/dev/null`.
    pub fn create(path: impl Into<PathBuf>) -> Result<Self, LinkError> {
        let path = path.into();
        replace_symlink(&path, Path::new(PARKED_TARGET)).map_err(|source| LinkError::Io {
            path: path.clone(),
            op: "create",
            source,
        })?;
        Ok(HostLink {
            path,
            target: PathBuf::from(PARKED_TARGET),
            kept: false,
        })
    }

    /// Takes back the link at `path` that an earlier process created for a VM that outlived
    /// it, checking that it still resolves to `device` (the VM's drive must stay that device):
    /// nothing is changed on disk.
    pub fn existing(path: impl Into<PathBuf>, device: &ReadyDevice) -> Result<Self, LinkError> {
        let path = path.into();
        let target = std::fs::read_link(&path).map_err(|source| LinkError::Io {
            path: path.clone(),
            op: "read",
            source,
        })?;
        // Kept until checked: a link that resolves elsewhere is not this value's to remove.
        let mut link = HostLink {
            path,
            target,
            kept: true,
        };
        link.check(device, "stat")?;
        link.kept = false;
        Ok(link)
    }

    /// Leaves the link in place when this value goes (the VM using it runs on).
    pub fn release(mut self) {
        self.kept = true;
    }

    /// Checks that the link resolves to `device`.
    fn check(&self, device: &ReadyDevice, op: &'static str) -> Result<(), LinkError> {
        let found = FileIdentity::of(&self.path).map_err(|source| LinkError::Io {
            path: self.path.clone(),
            op,
            source,
        })?;
        if !found.same_disk(device.identity()) {
            return Err(LinkError::Mismatch {
                path: self.path.clone(),
                device: device.path().to_owned(),
                expected: *device.identity(),
                found,
            });
        }
        Ok(())
    }

    /// The link's own path (what the stable drive path points at).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The target the link was last set to.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Whether the link is parked on `/dev/null`.
    pub fn is_parked(&self) -> bool {
        self.target == Path::new(PARKED_TARGET)
    }

    /// Retargets the link atomically to `device` and checks that it now resolves to it.
    pub fn point_at(&mut self, device: &ReadyDevice) -> Result<(), LinkError> {
        replace_symlink(&self.path, device.path()).map_err(|source| LinkError::Io {
            path: self.path.clone(),
            op: "retarget",
            source,
        })?;
        self.target = device.path().to_owned();
        self.check(device, "stat after retarget")
    }

    /// Parks the link on `/dev/null` again (after a pause, before the device is released).
    pub fn park(&mut self) -> Result<(), LinkError> {
        replace_symlink(&self.path, Path::new(PARKED_TARGET)).map_err(|source| LinkError::Io {
            path: self.path.clone(),
            op: "park",
            source,
        })?;
        self.target = PathBuf::from(PARKED_TARGET);
        Ok(())
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drive::DevicePath;

    #[test]
    fn parks_retargets_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        std::fs::write(&disk, b"data").unwrap();
        let link_path = dir.path().join("rootfs.link");
        {
            let mut link = HostLink::create(&link_path).unwrap();
            assert!(link.is_parked());
            assert_eq!(
                std::fs::read_link(&link_path).unwrap(),
                Path::new("/dev/null")
            );
            let dev = ReadyDevice::verify(DevicePath::new(&disk)).unwrap();
            link.point_at(&dev).unwrap();
            assert_eq!(std::fs::read_link(&link_path).unwrap(), disk);
            assert_eq!(std::fs::read(&link_path).unwrap(), b"data");
            link.park().unwrap();
            assert!(link.is_parked());
            // No temporary names are left behind.
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names.len(), 2, "{names:?}");
        }
        assert!(std::fs::symlink_metadata(&link_path).is_err());
    }

    #[test]
    fn an_existing_link_is_taken_back_only_on_its_device_and_a_released_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, other) = (dir.path().join("disk"), dir.path().join("other"));
        std::fs::write(&disk, b"d").unwrap();
        std::fs::write(&other, b"o").unwrap();
        let dev = ReadyDevice::verify(DevicePath::new(&disk)).unwrap();
        let odev = ReadyDevice::verify(DevicePath::new(&other)).unwrap();
        let link_path = dir.path().join("rootfs.link");
        let mut link = HostLink::create(&link_path).unwrap();
        link.point_at(&dev).unwrap();
        link.release();
        assert_eq!(std::fs::read_link(&link_path).unwrap(), disk);

        // Resolving elsewhere: refused, and the link is left as it was.
        assert!(matches!(
            HostLink::existing(&link_path, &odev),
            Err(LinkError::Mismatch { .. })
        ));
        assert_eq!(std::fs::read_link(&link_path).unwrap(), disk);
        assert!(matches!(
            HostLink::existing(dir.path().join("missing.link"), &dev),
            Err(LinkError::Io { op: "read", .. })
        ));

        let link = HostLink::existing(&link_path, &dev).unwrap();
        assert_eq!(link.target(), disk);
        assert!(!link.is_parked());
        drop(link);
        assert!(std::fs::symlink_metadata(&link_path).is_err());
    }
}
