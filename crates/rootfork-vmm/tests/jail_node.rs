//! Jailer mode: the device node made inside a chroot from the ready device's `st_rdev`, owned by
//! the jail's uid/gid, replaced atomically on resume onto another device, removed on drop.

mod common;

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use common::*;
use rootfork_vmm::firecracker::{JailOwner, JailedDeviceNode};
use rootfork_vmm::StableDrivePath;

#[test]
fn jail_node_is_the_device_owned_by_the_jail_user() {
    let dir = tempfile::tempdir().unwrap();
    let a = LoopDevice::new(dir.path(), "a.img", 1 << 20, b"device-a");
    let b = LoopDevice::new(dir.path(), "b.img", 1 << 20, b"device-b");
    let root = dir.path().join("jail/firecracker/vm1/root");
    let stable = StableDrivePath::new("/rootfs.ext4").unwrap();
    let owner = JailOwner {
        uid: 12345,
        gid: 23456,
    };
    let mut node = JailedDeviceNode::create(&root, &stable, &a.ready(), owner).unwrap();
    assert_eq!(node.path(), root.join("rootfs.ext4"));
    let meta = std::fs::symlink_metadata(node.path()).unwrap();
    assert!(meta.file_type().is_block_device());
    assert_eq!(meta.rdev(), a.rdev());
    assert_eq!((meta.uid(), meta.gid()), (12345, 23456));
    assert_eq!(meta.mode() & 0o777, 0o600);
    let mut buf = [0u8; 8];
    std::fs::File::open(node.path())
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    assert_eq!(&buf, b"device-a");

    // Resume onto another device: same path in the jail, new device number.
    node.retarget(&b.ready()).unwrap();
    let meta = std::fs::symlink_metadata(node.path()).unwrap();
    assert_eq!(meta.rdev(), b.rdev());
    assert_eq!((meta.uid(), meta.gid()), (12345, 23456));
    std::fs::File::open(node.path())
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    assert_eq!(&buf, b"device-b");
    let leftovers: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
    assert_eq!(leftovers.len(), 1);

    let path = node.path().to_owned();
    drop(node);
    assert!(std::fs::symlink_metadata(&path).is_err());
    assert!(b.path.exists(), "the host device is untouched");
}
