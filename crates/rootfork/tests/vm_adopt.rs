//! VMs that outlive the daemon. A QEMU VM the daemon started keeps running when the daemon is
//! SIGKILLed or stopped with SIGTERM, and the next start adopts it by pid and start time.
//!
//! Without a VM (runs everywhere): a record naming a stand-in process (`common::Fake`: a process
//! whose command line names the recorded QMP socket, like QEMU's) is adopted with its sandbox; a
//! record whose start time does not match the process holding the pid (a reused pid) leaves the
//! sandbox `FAILED` with its disk still served, the process untouched, and the sandbox pausable;
//! a delete kills an adopted process.
//!
//! With a real TCG guest (ignored; run by scripts/test.d/60-daemon.sh with QEMU, KERNEL and
//! ROOTFORK_BOOT_ASSETS set): `rootfork serve` as a subprocess boots the counter guest on a socket
//! sandbox; through a SIGKILL and a SIGTERM restart the same QEMU keeps counting and is adopted
//! (same pid, RUNNING, no reboot); a pause of the adopted VM saves its memory over the
//! reconnected QMP socket; resumed, the guest counts to its end in the same boot and its file on
//! the root disk holds every line written across the gaps. A second guest, adopted, is killed by
//! its delete.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rootfork::api::v1;
use rootfork::config::Config;
use rootfork::daemon::Daemon;
use rootfork_vmm::qemu::ProcessIdentity;

async fn start(state: &Path, locks: &Path) -> Daemon {
    let mut config = Config::with_state_dir(state).unwrap();
    config.demo_template = false;
    config.nbd_lock_dir = locks.to_owned();
    config.health_interval = Duration::from_secs(3600);
    Daemon::start(config).await.unwrap()
}

fn state_of(s: &v1::Sandbox) -> v1::SandboxState {
    v1::SandboxState::try_from(s.state).unwrap()
}

/// A stopped daemon's state directory holding socket sandboxes `ids` over a 16-block template,
/// sandbox `k` with 4 KiB of `bytes[k]` written at `at`: what the tests then record a VM for.
async fn stopped_with_sandboxes(
    prefix: &str,
    ids: &[&str],
    at: u64,
    bytes: &[u8],
) -> (tempfile::TempDir, PathBuf, PathBuf, Vec<v1::Sandbox>) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    let (state, locks) = (dir.path().join("s"), dir.path().join("locks"));
    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    let src = make_template(dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let mut made = Vec::new();
    for (id, b) in ids.iter().zip(bytes) {
        let sb = create(&mut c, "tpl", id).await.unwrap();
        nbd_write(&sb.nbd_uri, at, 4096, *b);
        made.push(sb);
    }
    d.shutdown().await;
    (dir, state, locks, made)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_vm_is_adopted_by_pid_and_start_time_and_a_reused_pid_is_refused() {
    let (_dir, state, locks, made) =
        stopped_with_sandboxes("rfv", &["ours", "reused"], 4096, &[0x31, 0x32]).await;
    let (ours, reused) = (&made[0], &made[1]);

    let vm_dir = state.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let (m1, m2) = (vm_dir.join("901.qmp"), vm_dir.join("902.qmp"));
    let (mut f1, f2) = (Fake::spawn(&m1), Fake::spawn(&m2));
    record_vm(&state, "ours", vm_process(&state, "ours", &f1, &m1, 0));
    // What a running VM writes to in vm/ outlives the start's clean-up of that directory.
    let console = vm_dir.join("ours.console");
    std::fs::write(&console, b"before the restart\n").unwrap();
    std::fs::write(vm_dir.join("leftover.console"), b"").unwrap();
    // The pid is held by a process started at another time than the recorded one.
    record_vm(&state, "reused", vm_process(&state, "reused", &f2, &m2, 1));

    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    let m = d.core().render_metrics();
    for line in [
        r#"rootfork_adoptions_total{result="adopted",reason="none"} 1"#,
        r#"rootfork_adoptions_total{result="failed",reason="vm_pid_reused"} 1"#,
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }
    let got = get(&mut c, "ours").await;
    assert_eq!(state_of(&got), v1::SandboxState::Running, "{}", got.message);
    assert_eq!(got.vm_pid, f1.pid());
    assert!(
        got.message.contains("adopted") && got.message.contains(&f1.pid().to_string()),
        "{}",
        got.message
    );
    assert_eq!(nbd_read(&ours.nbd_uri, 4096, 4096), vec![0x31; 4096]);
    assert_eq!(got.vm_console, console.display().to_string());
    assert_eq!(std::fs::read(&console).unwrap(), b"before the restart\n");
    assert!(
        m1.exists(),
        "the adopted VM's QMP socket was removed at start"
    );
    assert!(
        !vm_dir.join("leftover.console").exists(),
        "a file no record names was kept in vm/"
    );

    let bad = get(&mut c, "reused").await;
    assert_eq!(state_of(&bad), v1::SandboxState::Failed, "{}", bad.message);
    assert_eq!(bad.vm_pid, 0);
    assert!(
        bad.message.contains("another process") && bad.message.contains("pause it"),
        "{}",
        bad.message
    );
    // Its disk is still served, the process holding the pid is left alone, and it pauses.
    assert_eq!(nbd_read(&reused.nbd_uri, 4096, 4096), vec![0x32; 4096]);
    assert!(Path::new(&format!("/proc/{}", f2.pid())).exists());
    let paused = pause(&mut c, "reused").await.unwrap();
    assert_eq!(state_of(&paused), v1::SandboxState::Paused);
    assert!(
        ProcessIdentity::of(f2.pid()).is_ok(),
        "the pause killed a process that was not the VM"
    );

    // A delete kills the adopted VM before its disk goes.
    assert!(delete(&mut c, "ours").await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = f1.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the adopted VM outlived its delete"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(!m1.exists(), "the adopted VM's QMP socket was kept");
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_vm_that_is_gone_fails_its_sandbox_with_the_disk_kept() {
    let (_dir, state, locks, mut made) =
        stopped_with_sandboxes("rfg", &["gone"], 8192, &[0x41]).await;
    let sb = made.remove(0);
    let vm_dir = state.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let marker = vm_dir.join("903.qmp");
    let fake = Fake::spawn(&marker);
    record_vm(
        &state,
        "gone",
        vm_process(&state, "gone", &fake, &marker, 0),
    );
    drop(fake);

    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    let m = d.core().render_metrics();
    let line = r#"rootfork_adoptions_total{result="failed",reason="vm_gone"} 1"#;
    assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    let got = get(&mut c, "gone").await;
    assert_eq!(state_of(&got), v1::SandboxState::Failed, "{}", got.message);
    assert!(got.message.contains("is gone"), "{}", got.message);
    assert_eq!(nbd_read(&sb.nbd_uri, 8192, 4096), vec![0x41; 4096]);
    let paused = pause(&mut c, "gone").await.unwrap();
    assert_eq!(state_of(&paused), v1::SandboxState::Paused);
    let resumed = resume(&mut c, "gone").await.unwrap();
    assert_eq!(nbd_read(&resumed.nbd_uri, 8192, 4096), vec![0x41; 4096]);
    assert!(delete(&mut c, "gone").await.unwrap());
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_whose_vm_had_exited_is_adopted_without_one() {
    let (_dir, state, locks, mut made) =
        stopped_with_sandboxes("rfe", &["exited"], 4096, &[0x51]).await;
    let sb = made.remove(0);
    // A QEMU sandbox whose VM a health round reaped: its record names no VM process.
    record_vm(&state, "exited", serde_json::Value::Null);

    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    let got = get(&mut c, "exited").await;
    assert_eq!(state_of(&got), v1::SandboxState::Running, "{}", got.message);
    assert_eq!(got.vm_pid, 0);
    assert!(got.message.contains("adopted"), "{}", got.message);
    assert_eq!(nbd_read(&sb.nbd_uri, 4096, 4096), vec![0x51; 4096]);
    assert!(delete(&mut c, "exited").await.unwrap());
    d.shutdown().await;
}

/// Kills, when dropped, every process whose command line names `dir` (the daemon and the
/// QEMUs it started: they outlive a SIGKILLed daemon, and their arguments name the state
/// directory), so no VM survives a failing test.
struct KillUnder(PathBuf);

impl KillUnder {
    fn pids(&self) -> Vec<u32> {
        use std::os::unix::ffi::OsStrExt;
        let needle = self.0.as_os_str().as_bytes();
        let me = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != me)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
            })
            .collect()
    }
}

impl Drop for KillUnder {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether the process `id` names still runs (the same one: pid and start time).
fn runs(id: &ProcessIdentity) -> bool {
    id.check(None).is_ok()
}

/// The counter values the guest printed (`ROOTFORK-COUNT I boot=B`), with their boot ids.
fn counts(console: &str) -> Vec<(u32, String)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("ROOTFORK-COUNT ")?;
            let (n, boot) = rest.split_once(" boot=")?;
            Some((n.parse().ok()?, boot.trim().to_owned()))
        })
        .collect()
}

/// Polls the console file until `done(text)` or the deadline; returns the text.
async fn wait_console(console: &Path, secs: u64, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if done(&text) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the guest on `console` printed `more` counts beyond what it has now, and checks
/// it did (in the same boot).
async fn counts_on(console: &Path, more: usize, what: &str) {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let (seen, boot) = {
        let c = counts(&text);
        (c.len(), c.first().map(|x| x.1.clone()))
    };
    let text = wait_console(console, 120, |t| counts(t).len() >= seen + more).await;
    let c = counts(&text);
    assert!(
        c.len() >= seen + more,
        "{what}: the guest stopped counting at {}:\n{text}",
        c.len()
    );
    assert!(
        c.iter().all(|(_, b)| Some(b) == boot.as_ref()),
        "{what}: a second boot"
    );
}

fn need(k: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(k).unwrap_or_else(|| panic!("{k} is not set")))
}

/// A counter guest's create request (`rootfork.counter=to`).
fn counter(id: &str, to: u32) -> v1::CreateSandboxRequest {
    let assets = need("ROOTFORK_BOOT_ASSETS");
    v1::CreateSandboxRequest {
        template: "counter".into(),
        id: id.into(),
        provider: v1::ProviderKind::Socket as i32,
        vmm: Some(v1::VmmSettings {
            kind: v1::vmm_settings::Kind::Qemu as i32,
            kernel: need("KERNEL").display().to_string(),
            initrd: assets.join("initrd.cpio.gz").display().to_string(),
            kernel_args: format!("console=ttyS0 root=/dev/vda rw panic=-1 rootfork.counter={to}"),
            memory_mib: 256,
            vcpus: 1,
        }),
        ..Default::default()
    }
}

/// A `rootfork serve` subprocess on `state` and its client.
async fn serve(state: &Path, locks: &Path) -> (ServeProcess, rootfork::client::Clients) {
    let s = ServeProcess::spawn(state, locks);
    let c = connect_when_up(&state.join("api.sock")).await;
    (s, c)
}

/// Checks that `id` was adopted with its VM, the same process.
async fn adopted(c: &mut rootfork::client::Clients, id: &str, vm: &ProcessIdentity, what: &str) {
    let got = get(c, id).await;
    assert_eq!(
        state_of(&got),
        v1::SandboxState::Running,
        "{what}: {}",
        got.message
    );
    assert_eq!(got.vm_pid, vm.pid, "{what}: another VM");
    assert!(
        got.message.contains("adopted") && got.message.contains(&format!("pid {}", vm.pid)),
        "{what}: {}",
        got.message
    );
}

/// The counter guest A runs to this (every 100 ms), through the restarts and a pause.
const COUNT_A: u32 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots TCG VMs; run by scripts/test.d/60-daemon.sh"]
async fn qemu_vms_run_through_daemon_restarts_and_are_adopted() {
    let dir = tempfile::Builder::new()
        .prefix("rfq")
        .tempdir_in("/tmp")
        .unwrap();
    let (state, locks) = (dir.path().join("s"), dir.path().join("locks"));
    // Dropped last: kills whatever still runs under the state directory.
    let _reaper = KillUnder(state.clone());
    let tpl = need("ROOTFORK_BOOT_ASSETS").join("template.ext4");
    let (srv, mut c) = serve(&state, &locks).await;
    import(&mut c, "counter", &tpl).await.unwrap();
    let a = c
        .sandboxes
        .create_sandbox(counter("vm-a", COUNT_A))
        .await
        .unwrap()
        .into_inner();
    let b = c
        .sandboxes
        .create_sandbox(counter("vm-b", 100_000))
        .await
        .unwrap()
        .into_inner();
    let (qa, qb) = (
        ProcessIdentity::of(a.vm_pid).unwrap(),
        ProcessIdentity::of(b.vm_pid).unwrap(),
    );
    let (ca, cb) = (PathBuf::from(&a.vm_console), PathBuf::from(&b.vm_console));
    let text = wait_console(&ca, 180, |t| counts(t).len() >= 3).await;
    assert!(counts(&text).len() >= 3, "guest A never counted:\n{text}");
    let text = wait_console(&cb, 180, |t| counts(t).len() >= 3).await;
    assert!(counts(&text).len() >= 3, "guest B never counted:\n{text}");

    // SIGKILL: the VMs run on and keep counting with no daemon; the next one adopts them.
    srv.kill9();
    assert!(runs(&qa) && runs(&qb), "a VM died with the daemon");
    counts_on(&ca, 3, "without a daemon").await;
    let (srv, mut c) = serve(&state, &locks).await;
    adopted(&mut c, "vm-a", &qa, "after SIGKILL").await;
    adopted(&mut c, "vm-b", &qb, "after SIGKILL").await;
    counts_on(&ca, 3, "after SIGKILL").await;
    counts_on(&cb, 2, "after SIGKILL").await;

    // SIGTERM: the same, the VMs handed over.
    srv.terminate();
    assert!(runs(&qa) && runs(&qb), "a VM was stopped with the daemon");
    counts_on(&ca, 3, "after SIGTERM, without a daemon").await;
    let (srv, mut c) = serve(&state, &locks).await;
    adopted(&mut c, "vm-a", &qa, "after SIGTERM").await;
    adopted(&mut c, "vm-b", &qb, "after SIGTERM").await;
    counts_on(&ca, 3, "after SIGTERM").await;

    // The adopted VM pauses live (its state saved over the reconnected QMP socket) and resumes.
    let paused = pause(&mut c, "vm-a").await.unwrap();
    assert_eq!(
        state_of(&paused),
        v1::SandboxState::Paused,
        "{}",
        paused.message
    );
    assert!(paused.vm_state_bytes > 0, "no VM state saved");
    assert!(!runs(&qa), "the adopted VM outlived its pause");
    let at_pause = std::fs::read_to_string(&ca).unwrap();
    let last = counts(&at_pause).last().unwrap().0;
    assert!(last < COUNT_A, "guest A finished before its pause: {last}");
    let resumed = resume(&mut c, "vm-a").await.unwrap();
    assert_eq!(state_of(&resumed), v1::SandboxState::Running);
    let qa2 = ProcessIdentity::of(resumed.vm_pid).unwrap();
    let text = wait_console(&ca, 180, |t| t.contains("ROOTFORK-COUNTER-DONE")).await;
    // One boot, counting on through both restarts and the pause, every line in its file.
    let all = counts(&text);
    let values: Vec<u32> = all.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        values,
        (1..=COUNT_A).collect::<Vec<_>>(),
        "console:\n{text}"
    );
    assert!(all.iter().all(|(_, b)| *b == all[0].1), "a second boot id");
    assert_eq!(
        text.matches("Linux version").count(),
        1,
        "rebooted:\n{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while runs(&qa2) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!runs(&qa2), "guest A did not power off");
    let img = dir.path().join("a.img");
    let st = Command::new("nbdcopy")
        .arg(&resumed.nbd_uri)
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let cat = Command::new("debugfs")
        .args(["-R", "cat /counter.log"])
        .arg(&img)
        .output()
        .unwrap();
    let want: String = (1..=COUNT_A).map(|i| format!("count {i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), want);

    // A delete kills the adopted VM.
    assert!(runs(&qb));
    assert!(delete(&mut c, "vm-b").await.unwrap());
    assert!(!runs(&qb), "the adopted VM outlived its delete");
    assert!(delete(&mut c, "vm-a").await.unwrap());
    srv.terminate();
    assert!(
        std::fs::read_dir(state.join("vm"))
            .unwrap()
            .next()
            .is_none(),
        "files left in vm/"
    );
}

/// Whether a connected (not listening) Unix socket bound to `path` exists: QEMU's NBD client
/// is connected to the daemon's socket (the accepted end carries the path).
fn connected_at(path: &str) -> bool {
    std::fs::read_to_string("/proc/net/unix").is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path; St 03: connected.
            f.len() >= 8 && f[5] == "03" && f[7] == path
        })
    })
}

/// Measures what a guest sees of a SIGKILL restart of the daemon (not a check: numbers for
/// docs/daemon.md). A counter guest runs on a socket sandbox; each round SIGKILLs `rootfork
/// serve` and starts it again at once; a thread notes when each count reaches the console and
/// when QEMU's NBD connection is back. Printed: the longest gap between two counts around each
/// restart, the daemon's downtime (kill to API up) and kill to reconnected.
///
/// `cargo test -p rootfork --test vm_adopt -- --ignored --nocapture measure_`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; boots a TCG VM"]
async fn measure_guest_stall_across_sigkill_restarts() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const ROUNDS: usize = 5;
    let dir = tempfile::Builder::new()
        .prefix("rfm")
        .tempdir_in("/tmp")
        .unwrap();
    let (state, locks) = (dir.path().join("s"), dir.path().join("locks"));
    let _reaper = KillUnder(state.clone());
    let tpl = need("ROOTFORK_BOOT_ASSETS").join("template.ext4");
    let (mut srv, mut c) = serve(&state, &locks).await;
    import(&mut c, "counter", &tpl).await.unwrap();
    let sb = c
        .sandboxes
        .create_sandbox(counter("vm-m", 100_000))
        .await
        .unwrap()
        .into_inner();
    let qm = ProcessIdentity::of(sb.vm_pid).unwrap();
    let console = PathBuf::from(&sb.vm_console);
    let socket = sb
        .nbd_uri
        .rsplit_once("socket=")
        .unwrap()
        .1
        .replace("%2F", "/");
    let text = wait_console(&console, 180, |t| counts(t).len() >= 5).await;
    assert!(counts(&text).len() >= 5, "the guest never counted:\n{text}");

    let seen: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (seen, stop, console) = (seen.clone(), stop.clone(), console.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let c = counts(&std::fs::read_to_string(&console).unwrap_or_default()).len();
                let now = Instant::now();
                let mut s = seen.lock().unwrap();
                while n < c {
                    s.push(now);
                    n += 1;
                }
                drop(s);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let (mut gaps, mut downs, mut reconnects) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        counts_on(&console, 10, "before a restart").await;
        let before = seen.lock().unwrap().len();
        let t0 = Instant::now();
        srv.kill9();
        let (s, mut c2) = serve(&state, &locks).await;
        srv = s;
        downs.push(t0.elapsed());
        adopted(&mut c2, "vm-m", &qm, "measuring").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !connected_at(&socket) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        reconnects.push(t0.elapsed());
        counts_on(&console, 10, "after a restart").await;
        let s = seen.lock().unwrap();
        let window = &s[before.saturating_sub(1)..];
        gaps.push(
            window
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default(),
        );
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let steady: Vec<Duration> = {
        let s = seen.lock().unwrap();
        s.windows(2).map(|w| w[1] - w[0]).collect()
    };
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        format!("p50 {:?} max {:?}", v[v.len() / 2], v[v.len() - 1])
    };
    println!("rounds: {ROUNDS}");
    println!("count interval, whole run: {}", stats(&mut steady.clone()));
    println!("longest count gap around a restart: {}", stats(&mut gaps));
    println!("daemon down (SIGKILL to API up): {}", stats(&mut downs));
    println!(
        "SIGKILL to QEMU's NBD client connected again: {}",
        stats(&mut reconnects)
    );
    drop(c);
    let mut c = connect_when_up(&state.join("api.sock")).await;
    assert!(delete(&mut c, "vm-m").await.unwrap());
    drop(srv);
}
