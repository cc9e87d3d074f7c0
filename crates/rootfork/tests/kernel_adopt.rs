//! Kernel sandboxes across a daemon restart, through the fake kernel
//! (`Config::seams.kernel_backend`): a stop (`Daemon::shutdown`, the SIGTERM path) hands a running
//! kernel sandbox over — its device stays connected, its overlay files stay, its record names the
//! device — and the next start adopts it: the same slot handed new sockets with RECONFIGURE (no
//! CONNECT, no DISCONNECT), the data written before the stop read back through them. A sandbox
//! whose device is gone is FAILED with its files kept. A kernel sandbox whose record names a
//! running QEMU (a stand-in process, see `common::Fake`) has it adopted with the device, and a
//! delete kills it; when the device is gone, the VM is killed with the sandbox FAILED. The real
//! driver is the VM suite (tests/vm/daemon, section 5).

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::fake_kernel::{fake_kernel, nbd_request, FakeKernel};
use common::{delete, get, import, make_template, record_vm, vm_process, Fake};
use rootfork::api::v1;
use rootfork::config::Config;
use rootfork::daemon::kernel::KernelBackend;
use rootfork::daemon::Daemon;

async fn start(state: &Path, locks: &Path, backend: &KernelBackend) -> Daemon {
    let mut config = Config::with_state_dir(state).unwrap();
    config.demo_template = false;
    config.nbd_lock_dir = locks.to_owned();
    config.health_interval = Duration::from_secs(3600);
    config.seams.kernel_backend = Some(backend.clone());
    Daemon::start(config).await.unwrap()
}

async fn client(d: &Daemon) -> rootfork::client::Clients {
    rootfork::client::connect(&rootfork::client::ApiTarget::Unix(
        d.api_socket().to_owned(),
    ))
    .await
    .unwrap()
}

/// Creates kernel sandbox `id` of template `tpl`; returns its slot.
async fn create_kernel(c: &mut rootfork::client::Clients, id: &str) -> u32 {
    let sb = c
        .sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: "tpl".into(),
            id: id.into(),
            provider: v1::ProviderKind::Kernel as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    sb.device_path
        .rsplit_once("nbd")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("no device in {sb:?}"))
}

async fn request(k: &FakeKernel, i: u32, cmd: u16, offset: u64, data: Vec<u8>) -> (u32, Vec<u8>) {
    let mut s = k.socket(i);
    tokio::task::spawn_blocking(move || nbd_request(&mut s, cmd, 7, offset, &data, 4096))
        .await
        .unwrap()
}

/// What the kernel does when the serving process is gone: it drops its ends of the dead sockets
/// (the real one marks them dead and takes replacements in their place).
fn sockets_die(k: &FakeKernel, i: u32) {
    k.sockets.lock().unwrap().get_mut(&i).unwrap().clear();
}

fn connected(k: &FakeKernel, i: u32) -> bool {
    k.slot(i).join("pid").exists()
}

/// A daemon with template `tpl` and kernel sandbox `k1` written at 8 KiB, stopped; returns its
/// slot.
async fn run_and_stop(
    state: &Path,
    locks: &Path,
    root: &Path,
    backend: &KernelBackend,
    k: &FakeKernel,
) -> u32 {
    let d = start(state, locks, backend).await;
    let mut c = client(&d).await;
    let src = make_template(root, "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let i = create_kernel(&mut c, "k1").await;
    assert_eq!(request(k, i, 1, 8192, vec![0x5A; 4096]).await.0, 0);
    drop(c);
    d.shutdown().await;
    i
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_daemon_hands_its_kernel_sandbox_over_and_the_next_start_adopts_it() {
    let root = tempfile::tempdir().unwrap();
    let (state, locks) = (root.path().join("s"), root.path().join("locks"));
    let (k, backend) = fake_kernel(root.path());
    let i = run_and_stop(&state, &locks, root.path(), &backend, &k).await;
    // Handed over: still connected, its files and its record kept.
    assert!(connected(&k, i), "the device was disconnected at stop");
    let record = std::fs::read_to_string(state.join("sandboxes/k1.json")).unwrap();
    assert!(record.contains(&format!("\"device\": {i}")), "{record}");
    assert!(std::fs::read_dir(state.join("cache")).unwrap().count() >= 2);
    sockets_die(&k, i);

    let d = start(&state, &locks, &backend).await;
    let mut c = client(&d).await;
    let sb = get(&mut c, "k1").await;
    assert_eq!(sb.state, v1::SandboxState::Running as i32, "{sb:?}");
    assert!(
        sb.message.starts_with("adopted after a daemon restart"),
        "{}",
        sb.message
    );
    assert_eq!(
        sb.device_path,
        backend.node_path.as_ref()(i).display().to_string()
    );
    // One new socket with RECONFIGURE, never a DISCONNECT: the same device.
    assert_eq!(k.reconfigured.load(Ordering::SeqCst), 1);
    assert!(connected(&k, i));
    let (err, data) = request(&k, i, 0, 8192, Vec::new()).await;
    assert_eq!(err, 0);
    assert_eq!(data, vec![0x5A; 4096]);
    let m = d.core().render_metrics();
    assert!(
        m.contains("rootfork_adoptions_total{result=\"adopted\",reason=\"none\"} 1"),
        "{m}"
    );
    // Deleting it disconnects the device and removes its files.
    assert!(delete(&mut c, "k1").await.unwrap());
    assert!(k.quiescent(i));
    assert_eq!(std::fs::read_dir(state.join("cache")).unwrap().count(), 0);
    drop(c);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_sandbox_whose_device_is_gone_fails_with_its_files_kept() {
    let root = tempfile::tempdir().unwrap();
    let (state, locks) = (root.path().join("s"), root.path().join("locks"));
    let (k, backend) = fake_kernel(root.path());
    let i = run_and_stop(&state, &locks, root.path(), &backend, &k).await;
    // The device went away while no daemon ran (an operator, another instance's reclaim after
    // dead_conn_timeout).
    rootfork_kernel::NbdControl::disconnect(&*k, i).unwrap();

    let d = start(&state, &locks, &backend).await;
    let mut c = client(&d).await;
    let sb = get(&mut c, "k1").await;
    assert_eq!(sb.state, v1::SandboxState::Failed as i32, "{sb:?}");
    assert!(
        sb.message.contains("no longer connected") && sb.message.contains("files are kept"),
        "{}",
        sb.message
    );
    assert_eq!(k.reconfigured.load(Ordering::SeqCst), 0);
    assert!(std::fs::read_dir(state.join("cache")).unwrap().count() >= 2);
    let m = d.core().render_metrics();
    assert!(
        m.contains("rootfork_adoptions_total{result=\"failed\",reason=\"device_missing\"} 1"),
        "{m}"
    );
    assert!(delete(&mut c, "k1").await.unwrap());
    assert_eq!(std::fs::read_dir(state.join("cache")).unwrap().count(), 0);
    drop(c);
    d.shutdown().await;
}

/// Waits (bounded) for the stand-in to be killed; its exit status.
fn killed(f: &mut Fake) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = f.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the VM was not killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_sandboxs_qemu_is_adopted_with_its_device_and_killed_by_delete() {
    use std::os::unix::process::ExitStatusExt;
    let root = tempfile::tempdir().unwrap();
    let (state, locks) = (root.path().join("s"), root.path().join("locks"));
    let (k, backend) = fake_kernel(root.path());
    let i = run_and_stop(&state, &locks, root.path(), &backend, &k).await;
    std::fs::create_dir_all(state.join("vm")).unwrap();
    let marker = state.join("vm").join("911.qmp");
    let mut vm = Fake::spawn(&marker);
    record_vm(&state, "k1", vm_process(&state, "k1", &vm, &marker, 0));
    sockets_die(&k, i);

    let d = start(&state, &locks, &backend).await;
    let mut c = client(&d).await;
    let sb = get(&mut c, "k1").await;
    assert_eq!(sb.state, v1::SandboxState::Running as i32, "{sb:?}");
    assert_eq!(sb.vm_pid, vm.pid());
    assert!(
        sb.message.contains(&format!(
            "its VM (QEMU pid {}) ran on and is adopted",
            vm.pid()
        )),
        "{}",
        sb.message
    );
    assert_eq!(k.reconfigured.load(Ordering::SeqCst), 1);
    assert_eq!(
        request(&k, i, 0, 8192, Vec::new()).await.1,
        vec![0x5A; 4096]
    );
    assert!(delete(&mut c, "k1").await.unwrap());
    assert_eq!(killed(&mut vm).signal(), Some(9));
    assert!(k.quiescent(i));
    drop(c);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_whose_kernel_device_is_gone_is_killed_and_its_sandbox_fails() {
    use std::os::unix::process::ExitStatusExt;
    let root = tempfile::tempdir().unwrap();
    let (state, locks) = (root.path().join("s"), root.path().join("locks"));
    let (k, backend) = fake_kernel(root.path());
    let i = run_and_stop(&state, &locks, root.path(), &backend, &k).await;
    std::fs::create_dir_all(state.join("vm")).unwrap();
    let marker = state.join("vm").join("912.qmp");
    let mut vm = Fake::spawn(&marker);
    record_vm(&state, "k1", vm_process(&state, "k1", &vm, &marker, 0));
    rootfork_kernel::NbdControl::disconnect(&*k, i).unwrap();

    let d = start(&state, &locks, &backend).await;
    let mut c = client(&d).await;
    let sb = get(&mut c, "k1").await;
    assert_eq!(sb.state, v1::SandboxState::Failed as i32, "{sb:?}");
    assert!(
        sb.message.contains("no longer connected")
            && sb
                .message
                .contains(&format!("its VM (QEMU pid {}) was stopped", vm.pid())),
        "{}",
        sb.message
    );
    assert_eq!(killed(&mut vm).signal(), Some(9));
    assert!(delete(&mut c, "k1").await.unwrap());
    drop(c);
    d.shutdown().await;
}
