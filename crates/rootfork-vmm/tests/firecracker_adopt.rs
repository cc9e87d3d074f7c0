//! Adopting a Firecracker VM (the API double, launched in its own mount namespace on a loop
//! device standing in for `/dev/nbdN`) that an earlier owner released, as a restarted daemon
//! does: by pid and start time, its command line naming its API socket, its host link still
//! resolving to the device and its descriptors verified. The adopted VM is paused and
//! snapshotted over a new API client, is seen exiting and is killed through its pidfd; a
//! reused pid, another VM's run directory, another device and a gone process are refused.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use rootfork_vmm::firecracker::models::{InstanceState, SnapshotCreateParams};
use rootfork_vmm::firecracker::{
    ColdBootConfig, FirecrackerVm, LaunchConfig, LinkError, ProcessError, VmError, VmPhase,
    DEFAULT_STABLE_DRIVE_PATH,
};
use rootfork_vmm::{IdentityError, ProcessIdentity, StableDrivePath};

const MIB: u64 = 1 << 20;

/// Kills and reaps `pid` when the test ends however it ends (a released VM is still this test
/// process's child, and no guard owns it until it is adopted).
struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0 as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.contains(") Z ") && !s.contains(") X "))
}

fn stable() -> StableDrivePath {
    StableDrivePath::new(DEFAULT_STABLE_DRIVE_PATH).unwrap()
}

/// A VM booted on `dev` with the double, then released: its identity, run dir and reaper.
async fn released(
    dir: &Path,
    id: &str,
    dev: &LoopDevice,
    template: &rootfork_vmm::firecracker::TemplateIdentity,
) -> (ProcessIdentity, std::path::PathBuf, Reaper) {
    let cfg = LaunchConfig::new(id, dir.join("run"));
    let mut vm = FirecrackerVm::launch(&double_command(&dir.join(format!("{id}.jsonl"))), &cfg)
        .await
        .unwrap();
    let reaper = Reaper(vm.pid().unwrap());
    let boot = ColdBootConfig::new(kernel(dir), None, 1, 128);
    vm.configure_and_start(&dev.ready(), std::slice::from_ref(template), &boot)
        .await
        .unwrap();
    let identity = vm.identity().unwrap();
    let run_dir = vm.run_dir().unwrap().to_owned();
    assert_eq!(run_dir, cfg.vm_dir());
    vm.release();
    (identity, run_dir, reaper)
}

#[tokio::test]
async fn a_released_vm_is_adopted_paused_snapshotted_and_killed() {
    let dir = tempfile::tempdir().unwrap();
    let dev = LoopDevice::new(dir.path(), "overlay", 8 * MIB, b"sandbox");
    let (_t, template) = template(dir.path());
    let (identity, run_dir, _reaper) = released(dir.path(), "vm_adopt", &dev, &template).await;
    // Released: it runs on, its socket and link stay.
    assert!(alive(identity.pid));
    assert!(run_dir.join("api.sock").exists());
    assert_eq!(
        std::fs::read_link(run_dir.join("rootfs.link")).unwrap(),
        dev.path
    );
    // It runs in a session of its own (not the test's).
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(identity.pid as i32))).unwrap();
    assert_eq!(sid.as_raw() as u32, identity.pid);

    let mut vm = FirecrackerVm::adopt(
        identity,
        &run_dir,
        stable(),
        &dev.ready(),
        std::slice::from_ref(&template),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(vm.pid(), Some(identity.pid));
    assert_eq!(vm.phase(), VmPhase::Running);
    assert_eq!(vm.identity().unwrap(), identity);
    assert_eq!(vm.opened_drive().unwrap().target, dev.path);
    vm.check_running().unwrap();
    // The stable path inside its namespace still leads to the host link, which leads to the
    // device.
    let inside = std::fs::read_link(format!(
        "/proc/{}/root{DEFAULT_STABLE_DRIVE_PATH}",
        identity.pid
    ))
    .unwrap();
    assert_eq!(inside, run_dir.join("rootfs.link"));
    assert_eq!(vm.host_link().unwrap().target(), dev.path);

    // Pause and snapshot over the reconnected API.
    vm.pause().await.unwrap();
    assert_eq!(
        vm.client().describe_instance().await.unwrap().state,
        InstanceState::Paused
    );
    let params = SnapshotCreateParams {
        snapshot_path: dir.path().join("vm.state").display().to_string(),
        mem_file_path: dir.path().join("vm.mem").display().to_string(),
        snapshot_type: None,
    };
    vm.snapshot(&params).await.unwrap();
    assert!(dir.path().join("vm.state").is_file());
    vm.unpause().await.unwrap();

    // Released again and adopted again (a second restart), then stopped through the pidfd.
    vm.release();
    let vm = FirecrackerVm::adopt(
        identity,
        &run_dir,
        stable(),
        &dev.ready(),
        std::slice::from_ref(&template),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(vm.phase(), VmPhase::Running);
    let status = vm.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(status.is_none(), "an adopted VM's status is its parent's");
    assert!(!alive(identity.pid));
}

#[tokio::test]
async fn an_adopted_vm_that_exits_is_seen_and_dropping_one_kills_it() {
    let dir = tempfile::tempdir().unwrap();
    let dev = LoopDevice::new(dir.path(), "overlay", 8 * MIB, b"sandbox");
    let (_t, template) = template(dir.path());
    let (identity, run_dir, _reaper) = released(dir.path(), "vm_exit", &dev, &template).await;
    let mut vm = FirecrackerVm::adopt(
        identity,
        &run_dir,
        stable(),
        &dev.ready(),
        std::slice::from_ref(&template),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(identity.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut seen = None;
    for _ in 0..1000 {
        match vm.check_running() {
            Ok(()) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => {
                seen = Some(e);
                break;
            }
        }
    }
    assert!(
        matches!(
            seen,
            Some(VmError::Process(ProcessError::AdoptedExited { pid, .. })) if pid == identity.pid
        ),
        "{seen:?}"
    );
    drop(vm);

    let (identity, run_dir, _reaper2) = released(dir.path(), "vm_drop", &dev, &template).await;
    let vm = FirecrackerVm::adopt(
        identity,
        &run_dir,
        stable(),
        &dev.ready(),
        std::slice::from_ref(&template),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    drop(vm);
    assert!(!alive(identity.pid));
}

#[tokio::test]
async fn adoption_refuses_a_reused_pid_another_vm_a_gone_process_and_kills_one_on_another_device() {
    let dir = tempfile::tempdir().unwrap();
    let dev = LoopDevice::new(dir.path(), "overlay", 8 * MIB, b"sandbox");
    let other = LoopDevice::new(dir.path(), "other", 8 * MIB, b"other");
    let (_t, template) = template(dir.path());
    let (identity, run_dir, _reaper) = released(dir.path(), "vm_refuse", &dev, &template).await;
    let adopt =
        |id: ProcessIdentity, run: std::path::PathBuf, device: rootfork_vmm::ReadyDevice| {
            let template = template.clone();
            async move {
                FirecrackerVm::adopt(
                    id,
                    &run,
                    stable(),
                    &device,
                    &[template],
                    Duration::from_secs(10),
                )
                .await
            }
        };
    let older = ProcessIdentity {
        start_time: identity.start_time.saturating_sub(1),
        ..identity
    };
    let r = adopt(older, run_dir.clone(), dev.ready()).await;
    assert!(
        matches!(r, Err(VmError::Adopt(IdentityError::PidReused { .. }))),
        "{r:?}"
    );
    let r = adopt(identity, dir.path().join("run/vm_other"), dev.ready()).await;
    assert!(
        matches!(r, Err(VmError::Adopt(IdentityError::NotOurs { .. }))),
        "{r:?}"
    );
    assert!(
        alive(identity.pid),
        "a refused process that is not ours is left alone"
    );
    // Its link resolves to another device than the one handed over: refused and killed (it is
    // the recorded VM, but nothing vouches for its disk); the link is left as it was.
    let r = adopt(identity, run_dir.clone(), other.ready()).await;
    assert!(
        matches!(r, Err(VmError::Link(LinkError::Mismatch { .. }))),
        "{r:?}"
    );
    assert!(!alive(identity.pid));
    assert_eq!(
        std::fs::read_link(run_dir.join("rootfs.link")).unwrap(),
        dev.path
    );
    // Gone.
    drop(_reaper);
    let r = adopt(identity, run_dir.clone(), dev.ready()).await;
    assert!(
        matches!(r, Err(VmError::Adopt(IdentityError::Gone(p))) if p == identity.pid),
        "{r:?}"
    );
}
