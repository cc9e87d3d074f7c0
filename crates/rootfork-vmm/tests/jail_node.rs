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

/// A stand-in for Firecracker's `jailer`: builds `<base>/<exec name>/<id>/root` with the exec
/// file and its shared libraries, then execs it chrooted as the jail uid/gid (same pid), like
/// the real jailer without `--daemonize`.
const FAKE_JAILER: &str = r#"#!/bin/sh
set -eu
while [ $# -gt 0 ]; do
  case "$1" in
    --id) id=$2; shift 2 ;;
    --exec-file) exe=$2; shift 2 ;;
    --uid) uid=$2; shift 2 ;;
    --gid) gid=$2; shift 2 ;;
    --chroot-base-dir) base=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "fake jailer: unknown argument $1" >&2; exit 2 ;;
  esac
done
root="$base/$(basename "$exe")/$id/root"
mkdir -p "$root/run" "$root/bin"
cp "$exe" "$root/bin/vmm"
for lib in $(ldd "$exe" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# The double uses its built-in API description unless the test names a Swagger document,
# which is copied into the chroot (the host path would not resolve there).
spec="@SPEC@"
unset ROOTFORK_FC_SPEC
if [ -n "$spec" ]; then
  cp "$spec" "$root/spec.yaml"
  set -- --spec /spec.yaml "$@"
fi
touch "$root/report.jsonl"
chown "$uid:$gid" "$root/run" "$root/report.jsonl"
exec chroot --userspec="$uid:$gid" "$root" /bin/vmm --report /report.jsonl "$@"
"#;

#[tokio::test]
async fn jailed_vmm_opens_the_mknod_node_as_the_jail_user() {
    use rootfork_vmm::firecracker::{ColdBootConfig, FirecrackerVm, JailerConfig, VmPhase};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let jailer = dir.path().join("jailer");
    let spec = rootfork_fc_double::external_spec_path().unwrap_or_default();
    let script = FAKE_JAILER.replace("@SPEC@", spec.to_str().unwrap());
    std::fs::write(&jailer, script).unwrap();
    std::fs::set_permissions(&jailer, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dev = LoopDevice::new(dir.path(), "jailed.img", 2 << 20, b"jailed");
    let (_t, template) = template(dir.path());
    let cfg = JailerConfig {
        jailer,
        firecracker: double_binary(),
        id: "jailed_vm".into(),
        owner: JailOwner {
            uid: 40123,
            gid: 40123,
        },
        chroot_base: dir.path().join("srv"),
    };
    let stable = StableDrivePath::new("/rootfs.ext4").unwrap();
    let mut vm = FirecrackerVm::launch_jailed(
        &cfg,
        stable,
        &dir.path().join("jailer.log"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let root = cfg.chroot_root();
    std::fs::write(root.join("vmlinux"), b"kernel").unwrap();
    let boot = ColdBootConfig::new("/vmlinux", None, 1, 128);
    vm.configure_and_start(&dev.ready(), std::slice::from_ref(&template), &boot)
        .await
        .unwrap();
    assert_eq!(vm.phase(), VmPhase::Running);
    // The jailed process (running as the jail user) opened the node inside its chroot.
    let opened = vm.opened_drive().unwrap();
    assert_eq!(opened.identity.unwrap().rdev, dev.rdev());
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid().unwrap())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("40123")),
        "{status}"
    );
    let events = report(&root.join("report.jsonl"));
    let o = opens(&events)
        .into_iter()
        .find(|e| e["purpose"] == "drive")
        .unwrap();
    assert_eq!(o["path"], "/rootfs.ext4");
    assert_eq!(o["rdev"], dev.rdev());
    assert_eq!(o["read_only"], false);
    vm.shutdown(Duration::from_secs(2)).await.unwrap();
}
