//! Firecracker sandboxes across a daemon restart, with the API double
//! (`rootfork-fc-double`) as `vmm.firecracker_bin` and the fake kernel's device nodes as the
//! sandbox's `/dev/nbdN`. A stop (`Daemon::shutdown`, the SIGTERM path) hands the kernel device
//! over and releases the VM: the double's process runs on, its run directory (API socket, host
//! link) stays and the record names it. The next start adopts the device, then the VM by pid and
//! start time (the host link still resolving to the device, the process holding it open): the
//! sandbox is RUNNING with the same `vm_pid`, a pause snapshots it over the reconnected API, a
//! resume starts a new VM, and a delete kills an adopted one. A VM that is gone, or a record
//! whose pid now belongs to a process started at another time, leaves the sandbox FAILED with
//! its device kept. The real device is the daemon kernel VM suite's job (tests/vm/daemon).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::fake_kernel::{fake_kernel, FakeKernel};
use common::{create_firecracker, delete, get, import, make_template, pause, resume};
use rootfork::api::v1;
use rootfork::config::Config;
use rootfork::daemon::kernel::KernelBackend;
use rootfork::daemon::Daemon;
use serde_json::Value;

/// Kills and reaps a VM process when the test ends however it ends (the in-process daemon's
/// VMs are this test process's children; a released one has no guard until it is adopted).
struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0 as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.contains(") Z ") && !s.contains(") X "))
}

async fn start(state: &Path, locks: &Path, backend: &KernelBackend) -> Daemon {
    let mut config = Config::with_state_dir(state).unwrap();
    config.demo_template = false;
    config.nbd_lock_dir = locks.to_owned();
    config.health_interval = Duration::from_secs(3600);
    config.seams.kernel_backend = Some(backend.clone());
    config.firecracker_bin = rootfork_fc_double::binary_path().expect("building the double");
    Daemon::start(config).await.unwrap()
}

async fn client(d: &Daemon) -> rootfork::client::Clients {
    rootfork::client::connect(&rootfork::client::ApiTarget::Unix(
        d.api_socket().to_owned(),
    ))
    .await
    .unwrap()
}

/// The kernel drops its ends of a dead server's sockets (as in kernel_adopt.rs).
fn sockets_die(k: &FakeKernel, i: u32) {
    k.sockets.lock().unwrap().get_mut(&i).unwrap().clear();
}

fn slot(sb: &v1::Sandbox) -> u32 {
    sb.device_path
        .rsplit_once("nbd")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("no device in {sb:?}"))
}

/// A daemon with template `tpl` and Firecracker sandbox `fc`, stopped the SIGTERM way; returns
/// the sandbox as created and the reaper of its VM.
async fn run_and_stop(
    state: &Path,
    locks: &Path,
    root: &Path,
    backend: &KernelBackend,
) -> (v1::Sandbox, Reaper) {
    let d = start(state, locks, backend).await;
    let mut c = client(&d).await;
    let src = make_template(root, "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create_firecracker(&mut c, "fc", root).await;
    assert!(sb.vm_pid > 0, "{sb:?}");
    let reaper = Reaper(sb.vm_pid);
    drop(c);
    d.shutdown().await;
    (sb, reaper)
}

/// The record of `fc`.
fn record(state: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(state.join("sandboxes/fc.json")).unwrap()).unwrap()
}

/// The API calls of the VM whose run directory is `dir`, as `METHOD /path status`.
fn calls(dir: &Path) -> Vec<String> {
    rootfork_fc_double::read_report(&dir.join("vmm.log"))
        .unwrap_or_default()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firecracker_vm_runs_on_across_a_stop_and_is_adopted_paused_and_deleted() {
    let root = tempfile::tempdir().unwrap();
    let (state, locks) = (root.path().join("s"), root.path().join("locks"));
    let (k, backend) = fake_kernel(root.path());
    let (sb, _reaper) = run_and_stop(&state, &locks, root.path(), &backend).await;
    let (pid, i) = (sb.vm_pid, slot(&sb));

    // Released, not paused: the VM runs on, the record names it and its run directory.
    assert!(alive(pid), "the stop killed the VM");
    let rec = record(&state);
    assert_eq!(rec["state"], "running", "{rec}");
    assert_eq!(rec["served"]["device"], i, "{rec}");
    assert_eq!(rec["fc_process"]["pid"], pid, "{rec}");
    let run_dir = PathBuf::from(rec["fc_process"]["run_dir"].as_str().unwrap());
    assert!(run_dir.starts_with(state.join("vm/fc")), "{rec}");
    assert_eq!(
        std::fs::read_link(run_dir.join("rootfs.link")).unwrap(),
        PathBuf::from(&sb.device_path)
    );
    assert!(!calls(&run_dir).iter().any(|c| c.starts_with("PATCH /vm")));
    sockets_die(&k, i);

    let d = start(&state, &locks, &backend).await;
    let mut c = client(&d).await;
    let got = get(&mut c, "fc").await;
    assert_eq!(got.state, v1::SandboxState::Running as i32, "{got:?}");
    assert_eq!(got.vm_pid, pid);
    assert_eq!(got.device_path, sb.device_path);
    assert!(
        got.message.contains(&format!(
            "its VM (Firecracker pid {pid}) ran on and is adopted"
        )),
        "{}",
        got.message
    );
    assert_eq!(k.reconfigured.load(Ordering::SeqCst), 1);
    // The adoption asked the kept API socket what the instance is doing.
    assert_eq!(
        calls(&run_dir).last().map(String::as_str),
        Some("GET / 200")
    );
    let m = d.core().render_metrics();
    assert!(
        m.contains("rootfork_adoptions_total{result=\"adopted\",reason=\"none\"} 1"),
        "{m}"
    );

    // A pause of the adopted VM: Paused and a snapshot over the reconnected API, then stopped.
    let p = pause(&mut c, "fc").await.unwrap();
    assert_eq!(p.state, v1::SandboxState::Paused as i32, "{p:?}");
    assert!(p.vm_state_bytes > 0);
    let tail: Vec<String> = calls(&run_dir).into_iter().rev().take(2).collect();
    assert_eq!(tail, ["PUT /snapshot/create 204", "PATCH /vm 204"]);
    assert!(!alive(pid), "the paused sandbox's VM still runs");

    // A resume starts a new VM from the snapshot; a second stop + start adopts that one, and a
    // delete kills it.
    let r = resume(&mut c, "fc").await.unwrap();
    assert_eq!(r.state, v1::SandboxState::Running as i32, "{r:?}");
    let pid2 = r.vm_pid;
    let _reaper2 = Reaper(pid2);
    assert!(pid2 > 0 && pid2 != pid);
    drop(c);
    d.shutdown().await;
    assert!(alive(pid2));
    sockets_die(&k, slot(&r));
    let d = start(&state, &locks, &backend).await;
    let mut c = client(&d).await;
    let got = get(&mut c, "fc").await;
    assert_eq!(got.state, v1::SandboxState::Running as i32, "{got:?}");
    assert_eq!(got.vm_pid, pid2);
    assert!(delete(&mut c, "fc").await.unwrap());
    assert!(!alive(pid2), "delete left the adopted VM running");
    assert!(k.quiescent(slot(&r)));
    drop(c);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_or_reused_firecracker_pid_fails_the_sandbox_with_its_device_kept() {
    let root = tempfile::tempdir().unwrap();
    let (state, locks) = (root.path().join("s"), root.path().join("locks"));
    let (k, backend) = fake_kernel(root.path());
    let (sb, reaper) = run_and_stop(&state, &locks, root.path(), &backend).await;
    let (pid, i) = (sb.vm_pid, slot(&sb));

    // The recorded pid now belongs to a process started at another time (as after a reboot of
    // the pid space): refused, and that process is not touched.
    let mut rec = record(&state);
    let t = rec["fc_process"]["start_time"].as_u64().unwrap();
    rec["fc_process"]["start_time"] = (t + 1).into();
    std::fs::write(
        state.join("sandboxes/fc.json"),
        serde_json::to_vec(&rec).unwrap(),
    )
    .unwrap();
    sockets_die(&k, i);
    let d = start(&state, &locks, &backend).await;
    let mut c = client(&d).await;
    let got = get(&mut c, "fc").await;
    assert_eq!(got.state, v1::SandboxState::Failed as i32, "{got:?}");
    assert!(
        got.message.contains("is another process now"),
        "{}",
        got.message
    );
    assert_eq!(got.device_path, sb.device_path, "the device was not kept");
    assert!(alive(pid), "another process was killed");
    let m = d.core().render_metrics();
    assert!(
        m.contains("rootfork_adoptions_total{result=\"failed\",reason=\"vm_pid_reused\"} 1"),
        "{m}"
    );

    // (A FAILED sandbox is paused by a stop: deleted here instead.)
    assert!(delete(&mut c, "fc").await.unwrap());
    assert!(k.quiescent(i));
    drop(c);
    d.shutdown().await;
    drop(reaper);

    // Another run whose VM is gone by the next start: FAILED with `vm_gone`, the device kept.
    let root = tempfile::tempdir().unwrap();
    let (state, locks) = (root.path().join("s"), root.path().join("locks"));
    let (k, backend) = fake_kernel(root.path());
    let (sb, reaper) = run_and_stop(&state, &locks, root.path(), &backend).await;
    let (pid, i) = (sb.vm_pid, slot(&sb));
    drop(reaper);
    assert!(!alive(pid));
    sockets_die(&k, i);
    let d = start(&state, &locks, &backend).await;
    let mut c = client(&d).await;
    let got = get(&mut c, "fc").await;
    assert_eq!(got.state, v1::SandboxState::Failed as i32, "{got:?}");
    assert!(got.message.contains("is gone"), "{}", got.message);
    assert_eq!(got.device_path, sb.device_path, "the device was not kept");
    let m = d.core().render_metrics();
    assert!(
        m.contains("rootfork_adoptions_total{result=\"failed\",reason=\"vm_gone\"} 1"),
        "{m}"
    );
    assert!(delete(&mut c, "fc").await.unwrap());
    assert!(k.quiescent(i));
    drop(c);
    d.shutdown().await;
}
