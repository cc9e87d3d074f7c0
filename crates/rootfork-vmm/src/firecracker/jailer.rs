//! Jailer mode: Firecracker runs chrooted (and as an unprivileged uid) under `jailer`, so the
//! host link cannot be reached from inside. Instead the device node itself is created inside the
//! chroot at the stable drive path with `mknod`, from the ready device's `st_rdev`, and chowned
//! to the jail's uid/gid. A resume onto a different `/dev/nbdN` replaces the node atomically
//! (`mknod` under a random temporary name, then `rename`).
//!
//! A direct provider's regular file is hard-linked into the chroot instead (same filesystem
//! only); anything else is refused.
//!
//! The chroot belongs to the jail user, so nothing under it is trusted: every step goes through
//! directory descriptors and refuses symlinks (`jail_dir.rs`).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use crate::drive::{ReadyDevice, StableDrivePath};
use crate::identity::FileKind;

pub use super::jail_dir::JailPathError;
use super::jail_dir::{file_name, JailDir, NodeSource};

/// Errors making the device node inside the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A path under the jail was refused (a planted symlink, an entry swapped mid-way) or an
    /// operation under it failed.
    #[error("jail node: {0}")]
    Path(#[from] JailPathError),
    /// The device cannot be placed in a jail.
    #[error("device {device} is a {kind}; only block devices and regular files can be jailed")]
    Unsupported {
        /// The device path.
        device: PathBuf,
        /// Its kind.
        kind: FileKind,
    },
}

/// The owner of files inside the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailOwner {
    /// The jail's uid.
    pub uid: u32,
    /// The jail's gid.
    pub gid: u32,
}

/// A device node (or hard link) inside a jail's chroot; unlinked on drop.
#[derive(Debug)]
pub struct JailedDeviceNode {
    path: PathBuf,
    dir: JailDir,
    name: OsString,
    owner: JailOwner,
}

/// The host path of `stable` inside the chroot `root`.
pub fn path_in_chroot(root: &Path, stable: &StableDrivePath) -> PathBuf {
    root.join(
        stable
            .as_path()
            .strip_prefix("/")
            .expect("stable paths are absolute"),
    )
}

impl JailedDeviceNode {
    /// Creates the node for `device` at `stable` inside the chroot `root`, owned by `owner`.
    /// Directories on the way are created (mode 0755) or opened without following symlinks; a
    /// symlink anywhere under `root` is refused with [`JailPathError::Escape`].
    pub fn create(
        root: &Path,
        stable: &StableDrivePath,
        device: &ReadyDevice,
        owner: JailOwner,
    ) -> Result<Self, JailError> {
        let path = path_in_chroot(root, stable);
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let name = file_name(rel).to_owned();
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir = JailDir::open_root(root)?.create_dirs(parent)?;
        // Placed before the guard exists: a refused name is not ours to unlink.
        place(&dir, &name, device, owner)?;
        Ok(JailedDeviceNode {
            path,
            dir,
            name,
            owner,
        })
    }

    /// Replaces the node with one for `device` (resume onto another device).
    pub fn retarget(&mut self, device: &ReadyDevice) -> Result<(), JailError> {
        place(&self.dir, &self.name, device, self.owner)
    }

    /// The node's host path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Puts the node for `device` at `name` in `dir`, owned by `owner`.
fn place(
    dir: &JailDir,
    name: &OsStr,
    device: &ReadyDevice,
    owner: JailOwner,
) -> Result<(), JailError> {
    let id = device.identity();
    let source = match id.kind {
        FileKind::Block => NodeSource::Block(id.rdev),
        FileKind::Regular => NodeSource::HardLink(device.path()),
        kind => {
            return Err(JailError::Unsupported {
                device: device.path().to_owned(),
                kind,
            })
        }
    };
    dir.place(name, source, owner.uid, owner.gid)?;
    Ok(())
}

impl Drop for JailedDeviceNode {
    fn drop(&mut self) {
        self.dir.remove(&self.name);
    }
}

/// How to start Firecracker under the jailer.
#[derive(Debug, Clone)]
pub struct JailerConfig {
    /// The `jailer` binary.
    pub jailer: PathBuf,
    /// The `firecracker` binary (`--exec-file`).
    pub firecracker: PathBuf,
    /// The VM id (`--id`).
    pub id: String,
    /// Jail uid and gid.
    pub owner: JailOwner,
    /// `--chroot-base-dir`.
    pub chroot_base: PathBuf,
}

impl JailerConfig {
    /// The API socket's path inside the jail.
    pub const API_SOCKET_IN_JAIL: &'static str = "/run/firecracker.socket";

    /// The chroot the jailer builds: `<base>/<exec file name>/<id>/root`.
    pub fn chroot_root(&self) -> PathBuf {
        let exec = self
            .firecracker
            .file_name()
            .map(Path::new)
            .unwrap_or(Path::new("firecracker"));
        self.chroot_base.join(exec).join(&self.id).join("root")
    }

    /// The API socket's host path.
    pub fn host_api_socket(&self) -> PathBuf {
        self.chroot_root()
            .join(Self::API_SOCKET_IN_JAIL.trim_start_matches('/'))
    }

    /// The jailer command line. The jailer execs Firecracker in place (no `--daemonize`, no new
    /// pid namespace), so the spawned pid is the one whose descriptors are verified.
    pub fn command(&self) -> super::process::VmmCommand {
        super::process::VmmCommand::new(&self.jailer)
            .arg("--id")
            .arg(&self.id)
            .arg("--exec-file")
            .arg(&self.firecracker)
            .arg("--uid")
            .arg(self.owner.uid.to_string())
            .arg("--gid")
            .arg(self.owner.gid.to_string())
            .arg("--chroot-base-dir")
            .arg(&self.chroot_base)
            .arg("--")
            .arg("--api-sock")
            .arg(Self::API_SOCKET_IN_JAIL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jailer_layout_and_command() {
        let cfg = JailerConfig {
            jailer: "/usr/bin/jailer".into(),
            firecracker: "/usr/bin/firecracker".into(),
            id: "vm1".into(),
            owner: JailOwner { uid: 123, gid: 456 },
            chroot_base: "/srv/jailer".into(),
        };
        assert_eq!(
            cfg.chroot_root(),
            Path::new("/srv/jailer/firecracker/vm1/root")
        );
        assert_eq!(
            cfg.host_api_socket(),
            Path::new("/srv/jailer/firecracker/vm1/root/run/firecracker.socket")
        );
        let args: Vec<_> = cfg
            .command()
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "--id vm1 --exec-file /usr/bin/firecracker --uid 123 --gid 456 \
             --chroot-base-dir /srv/jailer -- --api-sock /run/firecracker.socket"
        );
    }

    #[test]
    fn regular_file_is_hard_linked_and_chowned() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        std::fs::write(&disk, b"x").unwrap();
        let root = dir.path().join("root");
        let stable = StableDrivePath::new("/fc-vm/rootfs.ext4").unwrap();
        let dev = ReadyDevice::verify(crate::drive::DevicePath::new(&disk)).unwrap();
        let owner = JailOwner {
            uid: 4321,
            gid: 8765,
        };
        let node = JailedDeviceNode::create(&root, &stable, &dev, owner).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(node.path()).unwrap();
        assert_eq!(meta.ino(), std::fs::metadata(&disk).unwrap().ino());
        assert_eq!((meta.uid(), meta.gid()), (4321, 8765));
        let p = node.path().to_owned();
        drop(node);
        assert!(!p.exists());
        assert!(disk.exists());
    }
}
