//! The Firecracker flow against the API double, launched through the real launcher in its own
//! mount namespace, with loop devices standing in for `/dev/nbdN`: cold boot, resume onto a new
//! device through the same stable path, link retarget ordering, and the reference bug
//! (template configured as the root drive) refused by the `/proc/<pid>/fd` check.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use rootfork_vmm::firecracker::models::{InstanceState, SnapshotCreateParams, SnapshotType};
use rootfork_vmm::firecracker::{
    verify_opened, ColdBootConfig, FirecrackerVm, LaunchConfig, ResumeConfig, RootDriveOptions,
    VerifyError, VmError, VmPhase,
};
use rootfork_vmm::{DevicePath, ReadyDevice, RootDrive};

const MIB: u64 = 1 << 20;

fn launch_config(dir: &Path, id: &str) -> LaunchConfig {
    LaunchConfig::new(id, dir.join("run"))
}

fn cold(dir: &Path) -> ColdBootConfig {
    ColdBootConfig::new(
        kernel(dir),
        Some("console=ttyS0 root=/dev/vda rw".into()),
        2,
        256,
    )
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test]
async fn cold_boot_configures_the_stable_path_resolving_to_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let dev = LoopDevice::new(dir.path(), "overlay-a", 8 * MIB, b"sandbox-a");
    let (_t, template) = template(dir.path());
    let report_path = dir.path().join("report.jsonl");
    let cfg = launch_config(dir.path(), "vm_cold");

    let mut vm = FirecrackerVm::launch(&double_command(&report_path), &cfg)
        .await
        .unwrap();
    assert_eq!(vm.phase(), VmPhase::Launched);
    let ready = dev.ready();
    vm.configure_and_start(&ready, std::slice::from_ref(&template), &cold(dir.path()))
        .await
        .unwrap();
    assert_eq!(vm.phase(), VmPhase::Running);
    let info = vm.client().describe_instance().await.unwrap();
    assert_eq!(info.state, InstanceState::Running);
    assert_eq!(info.id, "vm_cold");

    // The calls, in order, all accepted by the spec-validating double.
    let events = report(&report_path);
    assert_eq!(
        requests(&events),
        [
            "PUT /boot-source 204",
            "PUT /drives/rootfs 204",
            "PUT /machine-config 204",
            "PUT /actions 204",
            "GET / 200",
        ]
    );
    // The double opened the stable path, and it resolved to the loop device, read-write.
    let drive_opens: Vec<_> = opens(&events)
        .into_iter()
        .filter(|e| e["purpose"] == "drive")
        .collect();
    assert_eq!(drive_opens.len(), 1, "{drive_opens:?}");
    let open = drive_opens[0];
    assert_eq!(open["path"], "/fc-vm/rootfs.ext4");
    assert_eq!(open["resolved"], dev.path.to_str().unwrap());
    assert_eq!(open["kind"], "block device");
    assert_eq!(open["rdev"], dev.rdev());
    assert_eq!(open["read_only"], false);
    assert_eq!(open["size"], 8 * MIB);
    // The verification found the same descriptor.
    let opened = vm.opened_drive().unwrap();
    assert_eq!(opened.fd as i64, open["fd"].as_i64().unwrap());
    assert_eq!(opened.target, dev.path);
    // The stable path exists only inside the VMM's namespace.
    assert!(!Path::new("/fc-vm/rootfs.ext4").exists());
    let inside = std::fs::read_link(format!(
        "/proc/{}/root/fc-vm/rootfs.ext4",
        vm.pid().unwrap()
    ))
    .unwrap();
    assert_eq!(inside, vm.host_link().unwrap().path());

    let pid = vm.pid().unwrap();
    vm.shutdown(Duration::from_secs(2)).await.unwrap();
    assert!(!pid_alive(pid));
}

#[tokio::test]
async fn resume_loads_the_snapshot_onto_a_new_device_through_the_same_path() {
    let dir = tempfile::tempdir().unwrap();
    let first = LoopDevice::new(dir.path(), "overlay-gen1", 4 * MIB, b"gen1");
    let second = LoopDevice::new(dir.path(), "overlay-gen2", 6 * MIB, b"gen2");
    let (_t, template) = template(dir.path());
    let snap = dir.path().join("vm.snap");
    let mem = dir.path().join("vm.mem");

    // Generation 1: boot, pause, snapshot, stop.
    let report1 = dir.path().join("report1.jsonl");
    let mut vm = FirecrackerVm::launch(
        &double_command(&report1),
        &launch_config(dir.path(), "vm_r"),
    )
    .await
    .unwrap();
    vm.configure_and_start(
        &first.ready(),
        std::slice::from_ref(&template),
        &cold(dir.path()),
    )
    .await
    .unwrap();
    vm.pause().await.unwrap();
    vm.snapshot(&SnapshotCreateParams {
        snapshot_path: snap.to_string_lossy().into(),
        mem_file_path: mem.to_string_lossy().into(),
        snapshot_type: Some(SnapshotType::Full),
    })
    .await
    .unwrap();
    vm.shutdown(Duration::from_secs(2)).await.unwrap();

    // Generation 2: a fresh process, the same stable path, a different device.
    let report2 = dir.path().join("report2.jsonl");
    let mut vm = FirecrackerVm::launch(
        &double_command(&report2),
        &launch_config(dir.path(), "vm_r"),
    )
    .await
    .unwrap();
    let resume = ResumeConfig::from_files(snap.to_string_lossy(), mem.to_string_lossy());
    vm.resume(&second.ready(), std::slice::from_ref(&template), &resume)
        .await
        .unwrap();
    assert_eq!(vm.phase(), VmPhase::Running);
    assert_eq!(
        vm.client().describe_instance().await.unwrap().state,
        InstanceState::Running
    );

    let events = report(&report2);
    assert_eq!(
        requests(&events),
        ["PUT /snapshot/load 204", "PATCH /vm 204", "GET / 200"]
    );
    let drive = opens(&events)
        .into_iter()
        .find(|e| e["purpose"] == "snapshot_drive")
        .expect("the snapshot load reopened the drive");
    assert_eq!(drive["path"], "/fc-vm/rootfs.ext4");
    assert_eq!(drive["resolved"], second.path.to_str().unwrap());
    assert_eq!(drive["rdev"], second.rdev());
    assert_eq!(drive["size"], 6 * MIB);
    assert_ne!(first.rdev(), second.rdev());
    assert_eq!(vm.opened_drive().unwrap().target, second.path);
    vm.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn the_link_is_parked_until_the_device_is_ready_and_retargeted_before_the_drive() {
    let dir = tempfile::tempdir().unwrap();
    let dev = LoopDevice::new(dir.path(), "overlay-l", 4 * MIB, b"l");
    let (_t, template) = template(dir.path());
    let report_path = dir.path().join("report.jsonl");
    let mut vm = FirecrackerVm::launch(
        &double_command(&report_path),
        &launch_config(dir.path(), "vm_l"),
    )
    .await
    .unwrap();
    // Before the provider's device is ready, the stable path resolves to /dev/null.
    let link = vm.host_link().unwrap();
    assert!(link.is_parked());
    assert_eq!(
        std::fs::read_link(link.path()).unwrap(),
        Path::new("/dev/null")
    );
    let in_ns = format!("/proc/{}/root/fc-vm/rootfs.ext4", vm.pid().unwrap());
    let meta = std::fs::metadata(&in_ns).unwrap();
    assert_eq!(
        rootfork_vmm::FileIdentity::from_metadata(&meta),
        rootfork_vmm::FileIdentity::of(Path::new("/dev/null")).unwrap()
    );

    vm.configure_and_start(
        &dev.ready(),
        std::slice::from_ref(&template),
        &cold(dir.path()),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_link(vm.host_link().unwrap().path()).unwrap(),
        dev.path
    );

    // When the drive was configured the double saw the device, never /dev/null.
    let events = report(&report_path);
    let drive_opens: Vec<_> = opens(&events)
        .into_iter()
        .filter(|e| e["drive_id"] == "rootfs")
        .collect();
    assert!(!drive_opens.is_empty());
    for o in &drive_opens {
        assert_eq!(o["kind"], "block device", "{o}");
        assert_eq!(o["rdev"], dev.rdev(), "{o}");
        assert_ne!(o["resolved"], "/dev/null", "{o}");
    }
    vm.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn configuring_the_drive_while_the_link_is_parked_is_caught() {
    // The ordering the flow prevents, done by hand: PUT /drives before the retarget. The VMM
    // opens /dev/null, and the descriptor check refuses it.
    let dir = tempfile::tempdir().unwrap();
    let dev = LoopDevice::new(dir.path(), "overlay-p", 4 * MIB, b"p");
    let (_t, template) = template(dir.path());
    let report_path = dir.path().join("report.jsonl");
    let vm = FirecrackerVm::launch(
        &double_command(&report_path),
        &launch_config(dir.path(), "vm_p"),
    )
    .await
    .unwrap();
    let drive = RootDrive::new(&dev.ready(), vm.stable_path().clone());
    vm.client()
        .put_root_drive(&drive, &RootDriveOptions::default())
        .await
        .unwrap();
    let err = verify_opened(vm.pid().unwrap(), &dev.ready(), &[template]).unwrap_err();
    match &err {
        VerifyError::DeviceNotOpened { opened, .. } => {
            assert!(
                opened.iter().any(|f| f.target == Path::new("/dev/null")),
                "{err}"
            );
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("/dev/null"), "{err}");
    vm.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn regression_a_template_handed_over_as_the_device_is_refused_before_start() {
    // The reference bug: the provider's "device" is really the template's cache file.
    let dir = tempfile::tempdir().unwrap();
    let (template_path, template) = template(dir.path());
    let report_path = dir.path().join("report.jsonl");
    let mut vm = FirecrackerVm::launch(
        &double_command(&report_path),
        &launch_config(dir.path(), "vm_bug"),
    )
    .await
    .unwrap();
    let pid = vm.pid().unwrap();
    let wrong = ReadyDevice::verify(DevicePath::new(template_path.as_path())).unwrap();
    let err = vm
        .configure_and_start(&wrong, std::slice::from_ref(&template), &cold(dir.path()))
        .await
        .unwrap_err();
    match &err {
        VmError::Verify(VerifyError::TemplateOpened {
            template: t,
            opened,
            ..
        }) => {
            assert_eq!(t, template_path.as_path());
            assert_eq!(opened.target, template_path.as_path());
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("template.ext4"), "{err}");
    // The VMM was killed and never asked to start the guest.
    assert_eq!(vm.phase(), VmPhase::Failed);
    assert!(vm.pid().is_none());
    assert!(!pid_alive(pid));
    let events = report(&report_path);
    assert!(events.iter().all(|e| e["event"] != "instance_start"));
    assert!(!requests(&events)
        .iter()
        .any(|r| r.starts_with("PUT /actions")));
}

#[tokio::test]
async fn regression_a_link_pointing_at_the_template_is_refused() {
    // The reference bug in its wiring form: the path Firecracker is given resolves to the
    // template (here: the host link is retargeted behind the flow's back).
    let dir = tempfile::tempdir().unwrap();
    let dev = LoopDevice::new(dir.path(), "overlay-w", 4 * MIB, b"w");
    let (template_path, template) = template(dir.path());
    let report_path = dir.path().join("report.jsonl");
    let vm = FirecrackerVm::launch(
        &double_command(&report_path),
        &launch_config(dir.path(), "vm_w"),
    )
    .await
    .unwrap();
    let link = vm.host_link().unwrap().path().to_owned();
    let tmp = link.with_extension("evil");
    std::os::unix::fs::symlink(template_path.as_path(), &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    let drive = RootDrive::new(&dev.ready(), vm.stable_path().clone());
    vm.client()
        .put_root_drive(&drive, &RootDriveOptions::default())
        .await
        .unwrap();
    let err = verify_opened(vm.pid().unwrap(), &dev.ready(), &[template]).unwrap_err();
    assert!(matches!(err, VerifyError::TemplateOpened { .. }), "{err}");
    let events = report(&report_path);
    let o = opens(&events)
        .into_iter()
        .find(|e| e["purpose"] == "drive")
        .unwrap();
    assert_eq!(o["resolved"], template_path.as_path().to_str().unwrap());
    vm.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn two_vms_share_the_stable_path_with_different_devices() {
    let dir = tempfile::tempdir().unwrap();
    let a = LoopDevice::new(dir.path(), "overlay-1", 4 * MIB, b"1");
    let b = LoopDevice::new(dir.path(), "overlay-2", 4 * MIB, b"2");
    let (_t, template) = template(dir.path());
    let ra = dir.path().join("ra.jsonl");
    let rb = dir.path().join("rb.jsonl");
    let mut va = FirecrackerVm::launch(&double_command(&ra), &launch_config(dir.path(), "vm_a"))
        .await
        .unwrap();
    let mut vb = FirecrackerVm::launch(&double_command(&rb), &launch_config(dir.path(), "vm_b"))
        .await
        .unwrap();
    let (da, db, boot) = (a.ready(), b.ready(), cold(dir.path()));
    let (x, y) = tokio::join!(
        va.configure_and_start(&da, std::slice::from_ref(&template), &boot),
        vb.configure_and_start(&db, std::slice::from_ref(&template), &boot),
    );
    x.unwrap();
    y.unwrap();
    for (r, d) in [(&ra, &a), (&rb, &b)] {
        let events = report(r);
        let o = opens(&events)
            .into_iter()
            .find(|e| e["purpose"] == "drive")
            .unwrap()
            .clone();
        assert_eq!(o["path"], "/fc-vm/rootfs.ext4");
        assert_eq!(o["rdev"], d.rdev());
    }
    va.shutdown(Duration::from_secs(2)).await.unwrap();
    vb.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn a_live_vm_moves_to_another_device_through_the_same_path() {
    let dir = tempfile::tempdir().unwrap();
    let first = LoopDevice::new(dir.path(), "overlay-m1", 4 * MIB, b"m1");
    let second = LoopDevice::new(dir.path(), "overlay-m2", 4 * MIB, b"m2");
    let (_t, template) = template(dir.path());
    let report_path = dir.path().join("report.jsonl");
    let mut vm = FirecrackerVm::launch(
        &double_command(&report_path),
        &launch_config(dir.path(), "vm_m"),
    )
    .await
    .unwrap();
    vm.configure_and_start(
        &first.ready(),
        std::slice::from_ref(&template),
        &cold(dir.path()),
    )
    .await
    .unwrap();
    vm.pause().await.unwrap();
    vm.replace_device(&second.ready(), std::slice::from_ref(&template))
        .await
        .unwrap();
    assert_eq!(vm.phase(), VmPhase::Paused);
    assert_eq!(vm.opened_drive().unwrap().target, second.path);
    let events = report(&report_path);
    let patch = opens(&events)
        .into_iter()
        .find(|e| e["purpose"] == "drive_patch")
        .unwrap();
    assert_eq!(patch["path"], "/fc-vm/rootfs.ext4");
    assert_eq!(patch["rdev"], second.rdev());
    assert!(requests(&events).contains(&"PATCH /drives/rootfs 204".to_owned()));
    vm.shutdown(Duration::from_secs(2)).await.unwrap();
}
