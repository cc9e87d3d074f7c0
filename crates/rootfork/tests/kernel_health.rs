//! The daemon's kernel-provider path through a fake kernel (a sysfs tree, netlink control and
//! device nodes in a tempdir, injected with the `Config::seams.kernel_backend` test seam). The fake
//! keeps its ends of each device's socketpairs and speaks the kernel's NBD dialect on them, so
//! requests really flow through the daemon's kernel-mode dispatchers. Covers the health round's
//! recovery (a dead connection reconnected with RECONFIGURE: event, status, metric; a refused
//! reconnect ends FAILED) and the kernel sandboxes' NBD metrics. The real `/dev/nbdN` path is the
//! VM suite (tests/vm/daemon).

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fake_kernel::{fake_kernel, nbd_request, FakeKernel};
use common::{delete, import, make_template, TestDaemon};
use rootfork::api::v1;

async fn request(
    k: &FakeKernel,
    i: u32,
    cmd: u16,
    cookie: u64,
    offset: u64,
    data: Vec<u8>,
    read_len: u32,
) -> (u32, Vec<u8>) {
    let mut s = k.socket(i);
    tokio::task::spawn_blocking(move || nbd_request(&mut s, cmd, cookie, offset, &data, read_len))
        .await
        .unwrap()
}

/// The value of one series in the daemon's metrics text (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

async fn create_kernel(c: &mut rootfork::client::Clients, id: &str) -> v1::Sandbox {
    c.sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: "tpl".into(),
            id: id.into(),
            provider: v1::ProviderKind::Kernel as i32,
            vmm: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn index_of(sb: &v1::Sandbox) -> u32 {
    sb.device_path
        .rsplit_once("nbd")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("no device in {sb:?}"))
}

/// Health events and the final SANDBOX state event (if FAILED) of `id` until `stop` is true.
async fn watch_until(
    events: &mut tonic::Streaming<v1::Event>,
    stop: impl Fn(&v1::Event) -> bool,
) -> Vec<v1::Event> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while let Ok(Ok(Some(e))) = tokio::time::timeout_at(deadline, events.message()).await {
        let done = stop(&e);
        seen.push(e);
        if done {
            return seen;
        }
    }
    panic!("the awaited event never came; saw {seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_kernel_connection_is_reconnected_by_the_health_round() {
    let root = tempfile::tempdir().unwrap();
    let (kernel, backend) = fake_kernel(root.path());
    let d = TestDaemon::start_with(false, |c| {
        c.health_interval = Duration::from_millis(100);
        c.seams.kernel_backend = Some(backend);
    })
    .await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create_kernel(&mut c, "k1").await;
    let i = index_of(&sb);
    assert_eq!(sb.health, v1::HealthState::Healthy as i32);
    // The daemon asks the kernel to hold I/O for a dead connection (the default 30 s).
    assert_eq!(*kernel.dead_conn_timeout.lock().unwrap(), Some(Some(30)));

    // Requests through the kernel sandbox's dispatcher are in the NBD metrics.
    let block = vec![0x3Cu8; 4096];
    assert_eq!(request(&kernel, i, 1, 1, 4096, block.clone(), 0).await.0, 0);
    let m = d.daemon.core().render_metrics();
    assert_eq!(
        metric(&m, "rootfork_nbd_requests_total{command=\"write\"}"),
        1,
        "{m}"
    );
    assert_eq!(
        metric(&m, "rootfork_nbd_request_bytes_total{command=\"write\"}"),
        4096
    );
    assert_eq!(
        metric(
            &m,
            "rootfork_health_recoveries_total{result=\"reconnected\"}"
        ),
        0
    );

    let mut events = c
        .events
        .watch_events(v1::WatchEventsRequest {
            sandbox: "k1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    kernel.kill_connection(i);
    let seen = watch_until(&mut events, |e| e.kind == v1::EventKind::Health as i32).await;
    let e = seen.last().unwrap();
    let want = format!(
        "reconnected 1 connection(s) of {} with RECONFIGURE",
        sb.device_path
    );
    assert_eq!(e.message, want);
    assert_eq!(e.health, v1::HealthState::Healthy as i32);
    assert_eq!(kernel.reconfigured.load(Ordering::SeqCst), 1);

    let got = c
        .sandboxes
        .get_sandbox(v1::GetSandboxRequest { id: "k1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, v1::SandboxState::Running as i32);
    assert_eq!(got.health, v1::HealthState::Healthy as i32);
    assert_eq!(got.recoveries, 1);
    assert_eq!(got.message, want);
    assert_eq!(
        got.device_path, sb.device_path,
        "same device after the reconnect"
    );
    // The replacement connection serves the same overlay; the counters carry on.
    let (err, data) = request(&kernel, i, 0, 2, 4096, vec![], 4096).await;
    assert_eq!((err, data), (0, block));
    let m = d.daemon.core().render_metrics();
    assert_eq!(
        metric(&m, "rootfork_nbd_requests_total{command=\"read\"}"),
        1
    );
    assert_eq!(
        metric(&m, "rootfork_nbd_requests_total{command=\"write\"}"),
        1
    );
    assert_eq!(
        metric(
            &m,
            "rootfork_health_recoveries_total{result=\"reconnected\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &m,
            "rootfork_health_recoveries_total{result=\"marked_failed\"}"
        ),
        0
    );

    // Later rounds stay healthy (no second reconnect), and delete releases the device.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(kernel.reconfigured.load(Ordering::SeqCst), 1);
    assert!(delete(&mut c, "k1").await.unwrap());
    assert!(kernel.quiescent(i));
    assert!(d.files("cache").is_empty());
    // A deleted sandbox's counters stay in the totals.
    let m = d.daemon.core().render_metrics();
    assert_eq!(
        metric(&m, "rootfork_nbd_requests_total{command=\"read\"}"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reconnect_marks_the_kernel_sandbox_failed() {
    let root = tempfile::tempdir().unwrap();
    let (kernel, backend) = fake_kernel(root.path());
    kernel.refuse_reconfigure.store(true, Ordering::SeqCst);
    let d = TestDaemon::start_with(false, |c| {
        c.health_interval = Duration::from_millis(100);
        c.seams.kernel_backend = Some(backend);
    })
    .await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create_kernel(&mut c, "k2").await;
    let i = index_of(&sb);
    let mut events = c
        .events
        .watch_events(v1::WatchEventsRequest {
            sandbox: "k2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    kernel.kill_connection(i);
    let seen = watch_until(&mut events, |e| {
        e.kind == v1::EventKind::Sandbox as i32
            && e.sandbox_state == v1::SandboxState::Failed as i32
    })
    .await;
    let healths: Vec<_> = seen
        .iter()
        .filter(|e| e.kind == v1::EventKind::Health as i32)
        .collect();
    assert_eq!(
        healths.iter().map(|e| e.health).collect::<Vec<_>>(),
        vec![
            v1::HealthState::Degraded as i32,
            v1::HealthState::Failed as i32
        ],
        "{seen:#?}"
    );
    for e in &healths {
        assert!(
            e.message.starts_with(&format!(
                "1 of 1 connection(s) of {} dead; reconnecting with RECONFIGURE failed",
                sb.device_path
            )),
            "{}",
            e.message
        );
    }
    let got = c
        .sandboxes
        .get_sandbox(v1::GetSandboxRequest { id: "k2".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, v1::SandboxState::Failed as i32);
    assert_eq!(got.health, v1::HealthState::Failed as i32);
    assert_eq!(got.recoveries, 0);
    assert!(
        got.message.contains("RECONFIGURE failed"),
        "{}",
        got.message
    );
    let m = d.daemon.core().render_metrics();
    assert!(
        metric(
            &m,
            "rootfork_health_recoveries_total{result=\"reconnect_failed\"}"
        ) >= 2,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "rootfork_health_recoveries_total{result=\"marked_failed\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &m,
            "rootfork_health_recoveries_total{result=\"reconnected\"}"
        ),
        0
    );
    assert_eq!(kernel.reconfigured.load(Ordering::SeqCst), 0);
    // A failed sandbox can still be deleted, releasing the device.
    assert!(delete(&mut c, "k2").await.unwrap());
    assert!(kernel.quiescent(i));
    assert!(d.files("cache").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_injection_trigger_kills_a_connection_and_the_round_recovers_it() {
    let root = tempfile::tempdir().unwrap();
    let (kernel, backend) = fake_kernel(root.path());
    let d = TestDaemon::start_with(false, |c| {
        c.health_interval = Duration::from_millis(100);
        c.seams.kernel_backend = Some(backend);
        c.fault_injection = true;
    })
    .await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create_kernel(&mut c, "k3").await;
    let i = index_of(&sb);
    let mut events = c
        .events
        .watch_events(v1::WatchEventsRequest {
            sandbox: "k3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let faults = d.state().join("faults");
    std::fs::create_dir_all(&faults).unwrap();
    std::fs::write(faults.join("kill-connection.k3"), "").unwrap();
    let seen = watch_until(&mut events, |e| e.kind == v1::EventKind::Health as i32).await;
    assert_eq!(
        seen.last().unwrap().message,
        format!(
            "reconnected 1 connection(s) of {} with RECONFIGURE",
            sb.device_path
        )
    );
    assert!(
        !faults.join("kill-connection.k3").exists(),
        "trigger not consumed"
    );
    assert_eq!(kernel.reconfigured.load(Ordering::SeqCst), 1);
    assert!(delete(&mut c, "k3").await.unwrap());
    assert!(kernel.quiescent(i));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_injection_trigger_does_nothing_when_off() {
    let root = tempfile::tempdir().unwrap();
    let (kernel, backend) = fake_kernel(root.path());
    let d = TestDaemon::start_with(false, |c| {
        c.health_interval = Duration::from_millis(100);
        c.seams.kernel_backend = Some(backend);
    })
    .await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create_kernel(&mut c, "k4").await;
    let faults = d.state().join("faults");
    std::fs::create_dir_all(&faults).unwrap();
    std::fs::write(faults.join("kill-connection.k4"), "").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        faults.join("kill-connection.k4").exists(),
        "trigger acted on while off"
    );
    assert_eq!(kernel.reconfigured.load(Ordering::SeqCst), 0);
    let got = c
        .sandboxes
        .get_sandbox(v1::GetSandboxRequest { id: "k4".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.recoveries, got.health),
        (0, v1::HealthState::Healthy as i32)
    );
    assert!(delete(&mut c, "k4").await.unwrap());
    assert!(kernel.quiescent(index_of(&sb)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_kernel_request_marks_the_sandbox_failed() {
    use rootfork_nbd::testing::GatedDevice;

    let root = tempfile::tempdir().unwrap();
    let (kernel, backend) = fake_kernel(root.path());
    // The kernel sandbox's overlay is served through a gate the test holds.
    let gate: Arc<Mutex<Option<Arc<GatedDevice>>>> = Arc::default();
    let g = gate.clone();
    let d = TestDaemon::start_with(false, move |c| {
        c.health_interval = Duration::from_millis(200);
        c.stuck_request = Duration::from_secs(1);
        c.seams.kernel_backend = Some(backend);
        c.seams.kernel_device_wrapper =
            Some(rootfork_provider::DeviceWrapper(Arc::new(move |dev| {
                let gd = Arc::new(GatedDevice::new(dev));
                *g.lock().unwrap() = Some(gd.clone());
                gd
            })));
    })
    .await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create_kernel(&mut c, "k5").await;
    let i = index_of(&sb);
    /// Opens the gate however the test ends, so a failing assertion fails instead of hanging.
    struct OpenOnDrop(Arc<GatedDevice>);
    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.open();
        }
    }
    let gd = OpenOnDrop(gate.lock().unwrap().clone().expect("the device is gated"));
    let (err, data) = request(&kernel, i, 0, 1, 4096 * 2, vec![], 12).await;
    assert_eq!((err, &data[..]), (0, &b"tpl block 2\n"[..]));
    let mut events = c
        .events
        .watch_events(v1::WatchEventsRequest {
            sandbox: "k5".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Hold reads: the kernel's next read waits in the device.
    gd.0.close();
    let mut s = kernel.socket(i);
    let reader = std::thread::spawn(move || nbd_request(&mut s, 0, 2, 4096 * 3, &[], 12));
    let seen = watch_until(&mut events, |e| {
        e.kind == v1::EventKind::Sandbox as i32
            && e.sandbox_state == v1::SandboxState::Failed as i32
    })
    .await;
    let healths: Vec<_> = seen
        .iter()
        .filter(|e| e.kind == v1::EventKind::Health as i32)
        .collect();
    assert_eq!(
        healths.iter().map(|e| e.health).collect::<Vec<_>>(),
        vec![
            v1::HealthState::Degraded as i32,
            v1::HealthState::Failed as i32
        ],
        "{seen:#?}"
    );
    assert!(
        healths
            .iter()
            .all(|e| e.message.contains("NBD request has been stuck for")),
        "{healths:#?}"
    );
    // Released, the read completes with the template's data. (The test's handles on the gate
    // keep the overlay and its cache file alive: drop them.)
    drop(gd);
    gate.lock().unwrap().take();
    let (err, data) = reader.join().unwrap();
    assert_eq!((err, &data[..]), (0, &b"tpl block 3\n"[..]));
    assert!(delete(&mut c, "k5").await.unwrap());
    assert!(kernel.quiescent(i));
    assert!(d.files("cache").is_empty());
}
