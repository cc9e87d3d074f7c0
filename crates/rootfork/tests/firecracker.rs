//! Firecracker sandboxes from the daemon, with the API double (`rootfork-fc-double`) as the
//! Firecracker binary (`vmm.firecracker_bin`) and the fake kernel's device nodes as the
//! sandbox's `/dev/nbdN` (the real device is the daemon kernel VM suite's job). Create launches
//! the binary with Firecracker's own arguments and configures the root drive with the stable path
//! only; a pause is `PATCH /vm Paused` + `PUT /snapshot/create` writing real files next to the
//! diff; a resume launches a new process that loads the snapshot with the stable path now on the
//! new device, has its fds checked and is `Resumed`; delete stops it and removes the files. The
//! double's report (its stdout, in each run directory's `vmm.log`) shows every drive opened at
//! the stable path as the sandbox's device, and the template never opened. A fork of the paused
//! sandbox launches one process per fork, each loading the same snapshot onto its own device.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::fake_kernel::fake_kernel;
use common::{delete, get, import, make_template, pause, resume, TestDaemon};
use rootfork::api::v1;
use serde_json::Value;

/// Every report event of every VMM the daemon started, in launch order.
fn reports(state: &Path) -> Vec<Vec<Value>> {
    let mut dirs: Vec<(u64, PathBuf)> = std::fs::read_dir(state.join("vm/fc"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let n = e
                        .file_name()
                        .to_string_lossy()
                        .strip_prefix("rf-")?
                        .parse()
                        .ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.iter()
        .map(|(_, d)| rootfork_fc_double::read_report(&d.join("vmm.log")).unwrap_or_default())
        .collect()
}

/// The API calls in a report, as `METHOD /path` with the answer's status.
fn calls(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == "request")
        .map(|e| {
            format!(
                "{} {} {}",
                e["method"].as_str().unwrap_or(""),
                e["path"].as_str().unwrap_or(""),
                e["status"]
            )
        })
        .collect()
}

/// The drive opens in a report: (path asked for, dev, ino).
fn drive_opens(events: &[Value]) -> Vec<(String, u64, u64)> {
    events
        .iter()
        .filter(|e| e["event"] == "open" && e["drive_id"] == "rootfs")
        .map(|e| {
            (
                e["path"].as_str().unwrap_or("").to_owned(),
                e["dev"].as_u64().unwrap_or(0),
                e["ino"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn identity(p: &Path) -> (u64, u64) {
    let m = std::fs::metadata(p).unwrap();
    (m.dev(), m.ino())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_firecracker_on_a_kernel_sandbox() {
    let double = rootfork_fc_double::binary_path().expect("building the Firecracker double");
    let root = tempfile::tempdir().unwrap();
    let (_kernel, backend) = fake_kernel(root.path());
    let d = TestDaemon::start_with(false, |c| {
        c.seams.kernel_backend = Some(backend);
        c.firecracker_bin = double.clone();
    })
    .await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let template = identity(
        &d.state()
            .join("store")
            .join(d.template_build("tpl"))
            .join("data"),
    );
    let kernel = d.dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel; the double only opens it").unwrap();
    let settings = v1::VmmSettings {
        kind: v1::vmm_settings::Kind::Firecracker as i32,
        kernel: kernel.display().to_string(),
        memory_mib: 128,
        vcpus: 2,
        ..Default::default()
    };

    // On the socket provider the daemon cannot give Firecracker a block device.
    let e = c
        .sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: "tpl".into(),
            id: "fc-sock".into(),
            provider: v1::ProviderKind::Socket as i32,
            vmm: Some(settings.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    let sb = c
        .sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: "tpl".into(),
            id: "fc".into(),
            provider: v1::ProviderKind::Kernel as i32,
            vmm: Some(settings),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(sb.vm_pid > 0, "{sb:?}");
    let first_device = identity(Path::new(&sb.device_path));
    let r = reports(&d.state());
    assert_eq!(r.len(), 1);
    assert_eq!(
        calls(&r[0]),
        [
            "PUT /boot-source 204",
            "PUT /drives/rootfs 204",
            "PUT /machine-config 204",
            "PUT /entropy 204",
            "PUT /actions 204"
        ]
    );
    let stable = rootfork_vmm::firecracker::DEFAULT_STABLE_DRIVE_PATH;
    assert_eq!(
        drive_opens(&r[0]),
        [(stable.to_owned(), first_device.0, first_device.1)]
    );

    // Pause: Paused, then a snapshot in real files in `paused/`.
    let p = pause(&mut c, "fc").await.unwrap();
    assert_eq!(p.state, v1::SandboxState::Paused as i32);
    assert_eq!(p.vm_pid, 0);
    let mut snap: Vec<String> = d
        .files("paused")
        .into_iter()
        .filter(|f| f.ends_with(".fcstate") || f.ends_with(".fcmem"))
        .collect();
    snap.sort();
    assert_eq!(snap.len(), 2, "{:?}", d.files("paused"));
    let state_name = snap.iter().find(|f| f.ends_with(".fcstate")).unwrap();
    let state_file = d.state().join("paused").join(state_name);
    assert!(rootfork_fc_double::is_double_snapshot(&state_file));
    let bytes: u64 = snap
        .iter()
        .map(|f| {
            std::fs::metadata(d.state().join("paused").join(f))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(p.vm_state_bytes, bytes);
    let r = reports(&d.state());
    assert_eq!(
        calls(&r[0])[5..],
        ["PATCH /vm 204", "PUT /snapshot/create 204"]
    );

    // Fork: two new processes load the one snapshot, each with the stable path on a device of
    // its own.
    let forks = c
        .sandboxes
        .fork_sandbox(v1::ForkSandboxRequest {
            id: "fc".into(),
            count: 2,
            id_prefix: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert_eq!(forks.len(), 2);
    let r = reports(&d.state());
    assert_eq!(r.len(), 3);
    let mut devices = Vec::new();
    for (k, f) in forks.iter().enumerate() {
        assert_eq!(f.state, v1::SandboxState::Running as i32, "{f:?}");
        assert!(f.vm_pid > 0 && f.vm_pid != sb.vm_pid);
        let dev = identity(Path::new(&f.device_path));
        assert_ne!(dev, first_device);
        devices.push(dev);
        assert_eq!(
            calls(&r[1 + k]),
            ["PUT /snapshot/load 204", "PATCH /vm 204"]
        );
        assert_eq!(drive_opens(&r[1 + k]), [(stable.to_owned(), dev.0, dev.1)]);
    }
    assert_ne!(devices[0], devices[1]);
    assert_ne!(forks[0].vm_pid, forks[1].vm_pid);

    // Resume: a new process loads the snapshot; the stable path now resolves to the new device.
    let sb2 = resume(&mut c, "fc").await.unwrap();
    assert_eq!(sb2.state, v1::SandboxState::Running as i32);
    assert!(sb2.vm_pid > 0 && sb2.vm_pid != sb.vm_pid);
    assert_eq!(sb2.vm_state_bytes, 0);
    let second_device = identity(Path::new(&sb2.device_path));
    let r = reports(&d.state());
    assert_eq!(r.len(), 4);
    assert_eq!(calls(&r[3]), ["PUT /snapshot/load 204", "PATCH /vm 204"]);
    assert_eq!(
        drive_opens(&r[3]),
        [(stable.to_owned(), second_device.0, second_device.1)]
    );
    assert!(
        d.files("paused")
            .iter()
            .all(|f| !f.ends_with(".fcstate") && !f.ends_with(".fcmem")),
        "the used snapshot was kept: {:?}",
        d.files("paused")
    );
    // No VMM ever opened the template.
    for events in &r {
        for e in events.iter().filter(|e| e["event"] == "open") {
            let id = (
                e["dev"].as_u64().unwrap_or(0),
                e["ino"].as_u64().unwrap_or(0),
            );
            assert_ne!(id, template, "a VMM opened the template: {e}");
        }
    }

    // Delete stops the VMM before the disk goes, and leaves nothing.
    assert!(delete(&mut c, "fc").await.unwrap());
    assert!(
        !Path::new(&format!("/proc/{}", sb2.vm_pid))
            .join("exe")
            .exists()
            || {
                std::fs::read_link(format!("/proc/{}/exe", sb2.vm_pid))
                    .map(|l| !l.to_string_lossy().contains("fc-double"))
                    .unwrap_or(true)
            }
    );
    // The forks still use the parent's layer; it is collected after the last one's delete.
    let base = d.template_build("tpl");
    assert!(d.builds().len() > 1, "{:?}", d.builds());
    for f in &forks {
        assert!(delete(&mut c, &f.id).await.unwrap());
    }
    assert!(d.files("paused").is_empty(), "{:?}", d.files("paused"));
    assert_eq!(
        d.builds_settle(std::slice::from_ref(&base)).await,
        vec![base]
    );
    assert_eq!(
        get(&mut c, "fc").await.state,
        v1::SandboxState::Deleted as i32
    );
    d.daemon.shutdown().await;
}

/// The Firecracker process starts while the sandbox's device is still being attached: with the
/// fake kernel's connect held, the VMM's API socket appears in its run directory; once the
/// connect goes through the create finishes with that same process as the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_is_launched_while_the_device_attaches() {
    let double = rootfork_fc_double::binary_path().expect("building the Firecracker double");
    let root = tempfile::tempdir().unwrap();
    let (kernel, backend) = fake_kernel(root.path());
    let d = TestDaemon::start_with(false, |c| {
        c.seams.kernel_backend = Some(backend);
        c.firecracker_bin = double.clone();
    })
    .await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let vmlinux = d.dir.path().join("vmlinux");
    std::fs::write(&vmlinux, b"not a kernel; the double only opens it").unwrap();
    let (release, held) = std::sync::mpsc::channel();
    *kernel.hold_connect.lock().unwrap() = Some(held);
    let mut creator = c.clone();
    let create = tokio::spawn(async move {
        creator
            .sandboxes
            .create_sandbox(v1::CreateSandboxRequest {
                template: "tpl".into(),
                id: "fc-early".into(),
                provider: v1::ProviderKind::Kernel as i32,
                vmm: Some(v1::VmmSettings {
                    kind: v1::vmm_settings::Kind::Firecracker as i32,
                    kernel: vmlinux.display().to_string(),
                    memory_mib: 128,
                    vcpus: 1,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
    });
    let fc_dir = d.state().join("vm/fc");
    let api_socket = || {
        std::fs::read_dir(&fc_dir).ok().and_then(|dirs| {
            dirs.filter_map(|e| e.ok().map(|e| e.path().join("api.sock")))
                .find(|p| p.exists())
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let socket = loop {
        if let Some(s) = api_socket() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no Firecracker API socket while the attach was held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        !create.is_finished(),
        "the create finished with its connect held"
    );
    release.send(()).unwrap();
    let sb = create.await.unwrap().unwrap().into_inner();
    assert!(sb.vm_pid > 0, "{sb:?}");
    assert!(socket.exists());
    assert_eq!(calls(&reports(&d.state())[0]).len(), 5);
    assert!(delete(&mut c, "fc-early").await.unwrap());
}
