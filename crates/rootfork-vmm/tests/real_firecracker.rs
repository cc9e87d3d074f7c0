//! The same flow against a real Firecracker binary. Runs only when `ROOTFORK_FIRECRACKER_BIN`
//! is set (no Firecracker can be installed on the CI hosts); it then also needs
//! `ROOTFORK_FC_KERNEL` (an uncompressed `vmlinux`) and `/dev/kvm`. `ROOTFORK_FC_ROOTFS` may
//! name an ext4 image copied onto the devices; otherwise an empty ext4 is made with mkfs.ext4
//! (the guest then panics for lack of an init, which leaves Firecracker running and pausable).
//!
//! It boots on one loop device, checks that Firecracker itself holds the device open (and not
//! the template), pauses, snapshots, stops, then resumes a fresh Firecracker from the snapshot
//! on a second loop device through the same stable path.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use rootfork_vmm::firecracker::models::{InstanceState, SnapshotCreateParams, SnapshotType};
use rootfork_vmm::firecracker::{
    ColdBootConfig, FirecrackerVm, LaunchConfig, ResumeConfig, VmPhase, VmmCommand,
};

fn disk(dir: &Path, name: &str) -> LoopDevice {
    let img = dir.join(format!("{name}.src"));
    match std::env::var_os("ROOTFORK_FC_ROOTFS") {
        Some(src) => {
            std::fs::copy(src, &img).expect("copy ROOTFORK_FC_ROOTFS");
        }
        None => {
            std::fs::File::create(&img)
                .unwrap()
                .set_len(64 << 20)
                .unwrap();
            let ok = Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&img)
                .status()
                .unwrap()
                .success();
            assert!(ok, "mkfs.ext4 failed");
        }
    }
    let size = std::fs::metadata(&img).unwrap().len();
    let dev = LoopDevice::new(dir, name, size, b"");
    // Put the image's content on the loop device's backing file.
    std::fs::copy(&img, &dev.backing).unwrap();
    dev
}

#[tokio::test]
async fn real_firecracker_cold_boot_pause_snapshot_and_resume_on_a_new_device() {
    let Some(bin) = std::env::var_os("ROOTFORK_FIRECRACKER_BIN") else {
        println!("ROOTFORK_FIRECRACKER_BIN is not set: the real-Firecracker test did NOT run");
        eprintln!("ROOTFORK_FIRECRACKER_BIN is not set: the real-Firecracker test did NOT run");
        return;
    };
    let kernel = std::env::var("ROOTFORK_FC_KERNEL")
        .expect("ROOTFORK_FIRECRACKER_BIN is set, so ROOTFORK_FC_KERNEL (a vmlinux) is required");
    assert!(Path::new("/dev/kvm").exists(), "Firecracker needs /dev/kvm");

    let dir = tempfile::tempdir().unwrap();
    let (_t, template) = template(dir.path());
    let first = disk(dir.path(), "gen1.img");
    let second = disk(dir.path(), "gen2.img");
    let cmd = VmmCommand::new(&bin);
    let boot = ColdBootConfig::new(
        kernel,
        Some("console=ttyS0 reboot=k panic=0 pci=off root=/dev/vda rw".into()),
        1,
        128,
    );

    let cfg = LaunchConfig::new("rootfork-real-1", dir.path().join("run"));
    let mut vm = FirecrackerVm::launch(&cmd, &cfg).await.unwrap();
    vm.configure_and_start(&first.ready(), std::slice::from_ref(&template), &boot)
        .await
        .unwrap();
    let opened = vm.opened_drive().unwrap().clone();
    assert_eq!(opened.identity.unwrap().rdev, first.rdev());
    let info = vm.client().describe_instance().await.unwrap();
    assert_eq!(info.state, InstanceState::Running);
    println!("real Firecracker {} holds {opened}", info.vmm_version);

    tokio::time::sleep(Duration::from_millis(500)).await;
    vm.pause().await.unwrap();
    let snap = dir.path().join("vm.snap");
    let mem = dir.path().join("vm.mem");
    vm.snapshot(&SnapshotCreateParams {
        snapshot_path: snap.to_string_lossy().into(),
        mem_file_path: mem.to_string_lossy().into(),
        snapshot_type: Some(SnapshotType::Full),
    })
    .await
    .unwrap();
    vm.shutdown(Duration::from_secs(2)).await.unwrap();

    let cfg = LaunchConfig::new("rootfork-real-2", dir.path().join("run"));
    let mut vm = FirecrackerVm::launch(&cmd, &cfg).await.unwrap();
    vm.resume(
        &second.ready(),
        std::slice::from_ref(&template),
        &ResumeConfig::from_files(snap.to_string_lossy(), mem.to_string_lossy()),
    )
    .await
    .unwrap();
    assert_eq!(vm.phase(), VmPhase::Running);
    assert_eq!(
        vm.opened_drive().unwrap().identity.unwrap().rdev,
        second.rdev()
    );
    assert_eq!(
        vm.client().describe_instance().await.unwrap().state,
        InstanceState::Running
    );
    vm.shutdown(Duration::from_secs(2)).await.unwrap();
}
