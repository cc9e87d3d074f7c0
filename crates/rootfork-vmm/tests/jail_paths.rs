//! A compromised VMM owns its chroot and can plant symlinks there: the jail node is made through
//! directory descriptors, so each attack below ends in a clear error (or is simply not followed)
//! and the file outside the jail is unchanged. Uses regular files (the hard-link path); the
//! block-node path shares every step but the `mknodat` (`jail_node.rs` covers it).

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rootfork_vmm::firecracker::{JailError, JailOwner, JailPathError, JailedDeviceNode};
use rootfork_vmm::{DevicePath, ReadyDevice, StableDrivePath};

const OWNER: JailOwner = JailOwner {
    uid: 43210,
    gid: 43210,
};

/// A scratch directory with a disk file, an empty chroot and a secret file outside it.
struct Scene {
    _dir: tempfile::TempDir,
    root: PathBuf,
    secret: PathBuf,
    disk: ReadyDevice,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, b"disk").unwrap();
        let secret = dir.path().join("outside/secret");
        std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
        std::fs::write(&secret, b"secret").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let root = dir.path().join("srv/firecracker/vm/root");
        std::fs::create_dir_all(&root).unwrap();
        Scene {
            disk: ReadyDevice::verify(DevicePath::new(&disk)).unwrap(),
            _dir: dir,
            root,
            secret,
        }
    }

    fn create(&self, stable: &str) -> Result<JailedDeviceNode, JailError> {
        JailedDeviceNode::create(
            &self.root,
            &StableDrivePath::new(stable).unwrap(),
            &self.disk,
            OWNER,
        )
    }

    /// The secret is exactly as made: content, owner, mode, one link.
    fn assert_secret_unchanged(&self) {
        let m = std::fs::symlink_metadata(&self.secret).unwrap();
        assert_eq!(std::fs::read(&self.secret).unwrap(), b"secret");
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777, m.nlink()),
            (0, 0, 0o600, 1)
        );
    }
}

fn is_escape(e: &JailError, at: &Path) -> bool {
    matches!(e, JailError::Path(JailPathError::Escape { path }) if path == at)
}

#[test]
fn a_symlinked_parent_directory_is_refused() {
    let s = Scene::new();
    let outside = s.secret.parent().unwrap();
    symlink(outside, s.root.join("fc-vm")).unwrap();
    let e = s.create("/fc-vm/rootfs.ext4").unwrap_err();
    assert!(is_escape(&e, &s.root.join("fc-vm")), "{e}");
    assert!(e.to_string().contains("symlink"), "{e}");
    let entries: Vec<_> = std::fs::read_dir(outside).unwrap().collect();
    assert_eq!(entries.len(), 1, "something was made outside the jail");
    s.assert_secret_unchanged();
}

#[test]
fn a_symlink_at_the_node_name_is_refused() {
    let s = Scene::new();
    let at = s.root.join("rootfs.ext4");
    symlink(&s.secret, &at).unwrap();
    let e = s.create("/rootfs.ext4").unwrap_err();
    assert!(is_escape(&e, &at), "{e}");
    assert!(std::fs::symlink_metadata(&at)
        .unwrap()
        .file_type()
        .is_symlink());
    let leftovers: Vec<_> = std::fs::read_dir(&s.root).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "a temporary node was left behind");
    s.assert_secret_unchanged();
}

#[test]
fn a_symlink_at_the_old_fixed_temporary_name_is_never_used() {
    let s = Scene::new();
    let planted = s.root.join("rootfs.ext4.tmp");
    symlink(&s.secret, &planted).unwrap();
    let node = s.create("/rootfs.ext4").unwrap();
    let m = std::fs::symlink_metadata(node.path()).unwrap();
    assert_eq!((m.uid(), m.gid()), (OWNER.uid, OWNER.gid));
    assert!(std::fs::symlink_metadata(&planted)
        .unwrap()
        .file_type()
        .is_symlink());
    drop(node);
    s.assert_secret_unchanged();
}

#[test]
fn a_node_swapped_for_a_symlink_is_refused_on_retarget_and_not_followed_on_drop() {
    let s = Scene::new();
    let mut node = s.create("/dir/rootfs.ext4").unwrap();
    std::fs::remove_file(node.path()).unwrap();
    symlink(&s.secret, node.path()).unwrap();
    let e = node.retarget(&s.disk).unwrap_err();
    assert!(is_escape(&e, node.path()), "{e}");
    s.assert_secret_unchanged();
    // The directory swapped for a symlink as well: the node's directory descriptor still names
    // the jail's directory, so the drop unlinks only inside it.
    let path = node.path().to_owned();
    let dir = path.parent().unwrap().to_owned();
    std::fs::rename(&dir, s.root.join("moved")).unwrap();
    symlink(s.secret.parent().unwrap(), &dir).unwrap();
    std::fs::write(s.secret.parent().unwrap().join("rootfs.ext4"), b"host file").unwrap();
    drop(node);
    assert_eq!(
        std::fs::read(s.secret.parent().unwrap().join("rootfs.ext4")).unwrap(),
        b"host file"
    );
    assert!(!s.root.join("moved/rootfs.ext4").exists());
    s.assert_secret_unchanged();
}

#[test]
fn a_chroot_that_is_itself_a_symlink_is_refused() {
    let s = Scene::new();
    std::fs::remove_dir(&s.root).unwrap();
    symlink(s.secret.parent().unwrap(), &s.root).unwrap();
    let e = s.create("/rootfs.ext4").unwrap_err();
    assert!(is_escape(&e, &s.root), "{e}");
    s.assert_secret_unchanged();
}
