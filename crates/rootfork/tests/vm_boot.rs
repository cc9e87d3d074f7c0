//! A sandbox with QEMU VMM settings: the daemon boots a real TCG guest on the sandbox's served
//! disk (after checking QEMU opened no template); the guest writes its own file and prints a
//! marker; the file is then read back from the sandbox's overlay, and the template is unchanged.
//! Then live pause and resume: a guest counting on its console and into a file on its root disk
//! is paused (memory saved) and resumed (a new QEMU restored from that state on a new disk), and
//! goes on counting without a reboot, every line of its file intact; a pause that fails after
//! the VM's state was written lets the same guest continue. And fork: three sandboxes forked
//! from the paused counter guest each continue from the same count without a reboot, each
//! writing a file named after its own disk serial (its sandbox id) and seeing no other fork's,
//! while the parent is deleted under them.
//!
//! Needs the boot test's assets: run through scripts/test.d/60-daemon.sh, which sets QEMU,
//! QEMU_MODULE_DIR, KERNEL (tests/vm/assets.sh) and ROOTFORK_BOOT_ASSETS (tests/boot/build-assets.sh).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use rootfork::api::v1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a TCG VM; run by scripts/test.d/60-daemon.sh"]
async fn daemon_boots_qemu_on_the_sandbox_disk() {
    let need =
        |k: &str| PathBuf::from(std::env::var_os(k).unwrap_or_else(|| panic!("{k} is not set")));
    let assets = need("ROOTFORK_BOOT_ASSETS");
    let kernel = need("KERNEL");
    let d = TestDaemon::start_with(false, |c| c.health_interval = Duration::from_millis(200)).await;
    let mut c = d.client().await;
    let tpl = assets.join("template.ext4");
    let before = std::fs::read(&tpl).unwrap();
    import(&mut c, "boot", &tpl).await.unwrap();
    let sb = c
        .sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: "boot".into(),
            id: "vm-d".into(),
            provider: v1::ProviderKind::Socket as i32,
            vmm: Some(v1::VmmSettings {
                kind: v1::vmm_settings::Kind::Qemu as i32,
                kernel: kernel.display().to_string(),
                initrd: assets.join("initrd.cpio.gz").display().to_string(),
                kernel_args: "console=ttyS0 root=/dev/vda rw panic=-1 quiet rootfork.vmid=vm-d"
                    .into(),
                memory_mib: 256,
                vcpus: 1,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(sb.vm_pid > 0);
    // The record names the running VM (pid, QMP socket) for a restarted daemon to adopt.
    let record = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.state().join("sandboxes/vm-d.json")).unwrap())
            .unwrap()
    };
    let rec = record();
    assert_eq!(rec["vm_process"]["pid"], sb.vm_pid, "{rec}");
    assert!(
        Path::new(rec["vm_process"]["qmp"].as_str().unwrap()).exists(),
        "{rec}"
    );
    let console = PathBuf::from(&sb.vm_console);
    let deadline = Instant::now() + Duration::from_secs(180);
    let text = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("ROOTFORK-BOOT-OK") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        text.contains("ROOTFORK-BOOT-OK vmid=vm-d"),
        "console:\n{text}"
    );
    // The guest powers off; the health round reaps QEMU and says so.
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = c
            .sandboxes
            .get_sandbox(v1::GetSandboxRequest { id: "vm-d".into() })
            .await
            .unwrap()
            .into_inner();
        if got.vm_pid == 0 || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(got.vm_pid, 0, "QEMU not reaped after the guest powered off");
    assert!(got.message.contains("VM exited"), "{}", got.message);
    // ... and no longer once the VM is reaped: a restart adopts the disk alone.
    let rec = record();
    assert!(rec.get("vm_process").is_none(), "{rec}");
    assert_eq!(got.state, v1::SandboxState::Running as i32);
    // The guest's file is in the sandbox's overlay.
    let img = d.dir.path().join("disk.img");
    let st = std::process::Command::new("nbdcopy")
        .arg(&sb.nbd_uri)
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let ls = std::process::Command::new("debugfs")
        .args(["-R", "ls -l /"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains("hello-vm-d"));
    assert!(delete(&mut c, "vm-d").await.unwrap());
    assert!(
        !PathBuf::from(format!("/proc/{}", sb.vm_pid))
            .join("exe")
            .exists()
            || {
                // The pid may be reused; it must not be our QEMU any more.
                std::fs::read_link(format!("/proc/{}/exe", sb.vm_pid))
                    .map(|l| !l.to_string_lossy().contains("qemu"))
                    .unwrap_or(true)
            }
    );
    assert_eq!(std::fs::read(&tpl).unwrap(), before, "template changed");
    d.daemon.shutdown().await;
}

/// The counter values the guest printed (`ROOTFORK-COUNT I boot=B disk=S`), with their boot
/// ids and the disk serial (the sandbox id) the guest read.
fn counts(console: &str) -> Vec<(u32, String, String)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("ROOTFORK-COUNT ")?;
            let (n, rest) = rest.split_once(" boot=")?;
            let (boot, disk) = rest.split_once(" disk=")?;
            Some((n.parse().ok()?, boot.to_owned(), disk.trim().to_owned()))
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The guest counts to this (every 100 ms) and powers off.
const COUNT_TO: u32 = 100;

/// A daemon running the counter guest (`tests/boot`'s initramfs with `rootfork.counter=N`) in a
/// socket sandbox `id`, counting on its console.
struct CounterGuest {
    d: TestDaemon,
    c: rootfork::client::Clients,
    /// The imported template's source file, and its bytes before.
    tpl: PathBuf,
    before: Vec<u8>,
    console: PathBuf,
    sb: v1::Sandbox,
}

/// Starts a daemon (health rounds every `health`), imports the boot assets' template and
/// creates sandbox `id` whose QEMU guest counts to `count_to`; returns once it has counted 3.
async fn counter_guest(id: &str, count_to: u32, health: Duration) -> CounterGuest {
    let need =
        |k: &str| PathBuf::from(std::env::var_os(k).unwrap_or_else(|| panic!("{k} is not set")));
    let assets = need("ROOTFORK_BOOT_ASSETS");
    let kernel = need("KERNEL");
    let d = TestDaemon::start_with(false, |c| c.health_interval = health).await;
    let mut c = d.client().await;
    let tpl = assets.join("template.ext4");
    let before = std::fs::read(&tpl).unwrap();
    import(&mut c, "counter", &tpl).await.unwrap();
    let sb = c
        .sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: "counter".into(),
            id: id.into(),
            provider: v1::ProviderKind::Socket as i32,
            vmm: Some(v1::VmmSettings {
                kind: v1::vmm_settings::Kind::Qemu as i32,
                kernel: kernel.display().to_string(),
                initrd: assets.join("initrd.cpio.gz").display().to_string(),
                kernel_args: format!(
                    "console=ttyS0 root=/dev/vda rw panic=-1 rootfork.counter={count_to}"
                ),
                memory_mib: 256,
                vcpus: 1,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let console = PathBuf::from(&sb.vm_console);
    let text = wait_console(&console, 180, |t| counts(t).len() >= 3).await;
    assert!(counts(&text).len() >= 3, "the guest never counted:\n{text}");
    CounterGuest {
        d,
        c,
        tpl,
        before,
        console,
        sb,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a TCG VM; run by scripts/test.d/60-daemon.sh"]
async fn a_running_vm_pauses_and_resumes_with_its_memory() {
    let CounterGuest {
        d,
        mut c,
        tpl,
        before,
        console,
        sb,
    } = counter_guest("vm-c", COUNT_TO, Duration::from_millis(200)).await;

    // A pause that fails after the VM's state was written (its export cannot be created: a
    // directory stands where it writes; generation 1 is the state file, 2 the export) lets the
    // guest continue, in the same QEMU, and leaves no state file and no layer behind.
    let builds = d.builds();
    let planted = d.state().join("store").join(".export-vm-c.2");
    std::fs::create_dir(&planted).unwrap();
    let e = pause(&mut c, "vm-c").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
    // (The collection after the failed pause may have removed it already, as a leftover.)
    let _ = std::fs::remove_dir(&planted);
    assert_eq!(d.builds(), builds);
    let running = get(&mut c, "vm-c").await;
    assert_eq!(
        running.state,
        v1::SandboxState::Running as i32,
        "{running:?}"
    );
    assert_eq!(running.vm_pid, sb.vm_pid, "the VM was replaced");
    assert!(
        running.message.contains("pause failed"),
        "{}",
        running.message
    );
    let seen = counts(&std::fs::read_to_string(&console).unwrap()).len();
    let text = wait_console(&console, 60, |t| counts(t).len() >= seen + 2).await;
    assert!(
        counts(&text).len() >= seen + 2,
        "the guest did not continue after the failed pause:\n{text}"
    );
    assert_eq!(
        d.files("paused"),
        Vec::<String>::new(),
        "a failed pause left files"
    );

    // Pause while the guest runs: its memory is saved beside its layer.
    let paused = pause(&mut c, "vm-c").await.unwrap();
    assert_eq!(paused.state, v1::SandboxState::Paused as i32);
    assert_eq!(paused.vm_pid, 0, "the VM runs on after the pause");
    assert!(paused.vm_state_bytes > 0, "no VM state saved");
    let state_files = || {
        d.files("paused")
            .into_iter()
            .filter(|f| f.ends_with(".vmstate"))
            .collect::<Vec<_>>()
    };
    let files = state_files();
    assert_eq!(files.len(), 1, "{files:?}");
    let size = std::fs::metadata(d.state().join("paused").join(&files[0]))
        .unwrap()
        .len();
    assert_eq!(size, paused.vm_state_bytes);
    let at_pause = std::fs::read_to_string(&console).unwrap();
    let last = counts(&at_pause).last().unwrap().0;
    assert!(
        last < COUNT_TO,
        "the guest finished before the pause: {last}"
    );
    // Nothing runs while paused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(std::fs::read_to_string(&console).unwrap(), at_pause);

    // Resume: a new QEMU restored from the state, on the resumed disk.
    let resumed = resume(&mut c, "vm-c").await.unwrap();
    assert_eq!(resumed.state, v1::SandboxState::Running as i32);
    assert!(resumed.vm_pid > 0 && resumed.vm_pid != sb.vm_pid);
    assert!(!sb.vm_generation_id.is_empty());
    assert!(!resumed.vm_generation_id.is_empty());
    assert_ne!(resumed.vm_generation_id, sb.vm_generation_id);
    assert_eq!(resumed.vm_state_bytes, 0);
    assert!(state_files().is_empty(), "the used VM state was kept");
    let text = wait_console(&console, 180, |t| t.contains("ROOTFORK-COUNTER-DONE")).await;

    // One boot, counting on from where it stopped.
    let all = counts(&text);
    let values: Vec<u32> = all.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(
        values,
        (1..=COUNT_TO).collect::<Vec<_>>(),
        "console:\n{text}"
    );
    let after: Vec<u32> = counts(&text[at_pause.len()..])
        .iter()
        .map(|(n, _, _)| *n)
        .collect();
    assert_eq!(after.first(), Some(&(last + 1)), "console:\n{text}");
    let boot = &all[0].1;
    assert!(all.iter().all(|(_, b, _)| b == boot), "a second boot id");
    assert!(all.iter().all(|(_, _, s)| s == "vm-c"), "console:\n{text}");
    assert_eq!(
        text.matches("Linux version").count(),
        1,
        "the kernel booted again:\n{text}"
    );
    assert!(
        text.contains(&format!(
            "ROOTFORK-COUNTER-DONE lines={COUNT_TO} boot={boot}"
        )),
        "console:\n{text}"
    );

    // The guest powered off: its file on the root disk holds every line, in order.
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&mut c, "vm-c").await.vm_pid != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let uri = get(&mut c, "vm-c").await.nbd_uri;
    let img = d.dir.path().join("counter.img");
    let st = std::process::Command::new("nbdcopy")
        .arg(&uri)
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /counter.log"])
        .arg(&img)
        .output()
        .unwrap();
    let want: String = (1..=COUNT_TO).map(|i| format!("count {i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), want);

    assert!(delete(&mut c, "vm-c").await.unwrap());
    assert!(d.files("paused").is_empty(), "{:?}", d.files("paused"));
    assert_eq!(std::fs::read(&tpl).unwrap(), before, "template changed");
    d.daemon.shutdown().await;
}

/// The guest of the fork test counts to this.
const FORK_COUNT_TO: u32 = 40;

/// The files in the root directory of a sandbox's ext4 disk and the content of one of them
/// (copied with nbdcopy, read with debugfs).
fn disk_files(uri: &str, img: &Path, file: &str) -> (Vec<String>, String) {
    let st = std::process::Command::new("nbdcopy")
        .arg(uri)
        .arg(img)
        .status()
        .unwrap();
    assert!(st.success(), "nbdcopy {uri}");
    let debugfs = |cmd: &str| {
        let o = std::process::Command::new("debugfs")
            .args(["-R", cmd])
            .arg(img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let names = debugfs("ls -l /")
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect();
    (names, debugfs(&format!("cat {file}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a TCG VM; run by scripts/test.d/60-daemon.sh"]
async fn forks_of_a_paused_vm_continue_apart() {
    let CounterGuest {
        d,
        mut c,
        tpl,
        before,
        console,
        sb,
    } = counter_guest("vm-f", FORK_COUNT_TO, Duration::from_secs(5)).await;
    pause(&mut c, "vm-f").await.unwrap();
    let at_pause = counts(&std::fs::read_to_string(&console).unwrap());
    let (last, boot, disk) = at_pause.last().unwrap().clone();
    assert_eq!(disk, "vm-f");
    assert!(last < FORK_COUNT_TO, "the guest finished before the pause");

    // Three forks, each a new QEMU restored from the one snapshot on a disk of its own.
    let started = Instant::now();
    let forks = c
        .sandboxes
        .fork_sandbox(v1::ForkSandboxRequest {
            id: "vm-f".into(),
            count: 3,
            id_prefix: "vf".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    let took = started.elapsed();
    eprintln!(
        "FORK-TIMING count=3 total_ms={} per_fork_ms={} memory_mib=256 state_bytes={}",
        took.as_millis(),
        took.as_millis() / 3,
        get(&mut c, "vm-f").await.vm_state_bytes
    );
    let ids: Vec<&str> = forks.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["vf-0", "vf-1", "vf-2"]);
    let mut pids: Vec<u32> = forks.iter().map(|f| f.vm_pid).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 3, "{forks:?}");
    assert!(pids.iter().all(|p| *p > 0 && *p != sb.vm_pid));
    // Each VM has a generation ID of its own (QEMU draws it at start; it is not migrated).
    let mut genids: Vec<&str> = std::iter::once(&sb)
        .chain(&forks)
        .map(|s| s.vm_generation_id.as_str())
        .collect();
    assert!(genids.iter().all(|g| g.len() == 36), "{genids:?}");
    genids.sort_unstable();
    genids.dedup();
    assert_eq!(genids.len(), 4, "{genids:?}");
    // The parent goes while its forks run: they keep their layers and go on.
    assert!(delete(&mut c, "vm-f").await.unwrap());

    for f in &forks {
        let fc = PathBuf::from(&f.vm_console);
        assert_ne!(fc, console);
        let text = wait_console(&fc, 180, |t| t.contains("ROOTFORK-COUNTER-DONE")).await;
        let all = counts(&text);
        let values: Vec<u32> = all.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(
            values,
            (last + 1..=FORK_COUNT_TO).collect::<Vec<_>>(),
            "{}: console:\n{text}",
            f.id
        );
        assert!(all.iter().all(|(_, b, _)| *b == boot), "{}:\n{text}", f.id);
        // The first line may have read the serial before the pause.
        assert!(
            all.iter().skip(1).all(|(_, _, s)| *s == f.id),
            "{}:\n{text}",
            f.id
        );
        assert!(!text.contains("Linux version"), "{} booted:\n{text}", f.id);
        assert!(
            text.contains(&format!(
                "ROOTFORK-COUNTER-DONE lines={FORK_COUNT_TO} boot={boot}"
            )),
            "{}:\n{text}",
            f.id
        );
    }
    // Each fork's disk: the parent's lines and its own, in its own file; no other fork's file.
    for (k, f) in forks.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(&mut c, &f.id).await.vm_pid != 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let img = d.dir.path().join(format!("{}.img", f.id));
        let (names, own) = disk_files(&f.nbd_uri, &img, &format!("/by-{}.log", f.id));
        let (_, parents) = disk_files(&f.nbd_uri, &img, "/by-vm-f.log");
        // The parent's lines, then the fork's own (the pause may fall between a line's write
        // to the files and to the console).
        let split = parents.lines().count() as u32;
        assert!(split == last || split == last + 1, "{}: {parents}", f.id);
        let want: String = (1..=FORK_COUNT_TO)
            .map(|i| format!("count {i}\n"))
            .collect();
        assert_eq!(format!("{parents}{own}"), want, "{}", f.id);
        for (j, other) in forks.iter().enumerate() {
            let has = names.contains(&format!("by-{}.log", other.id));
            assert_eq!(has, j == k, "{}: {names:?}", f.id);
        }
        let (_, all) = disk_files(&f.nbd_uri, &img, "/counter.log");
        assert_eq!(all, want, "{}", f.id);
        std::fs::remove_file(&img).unwrap();
    }
    for f in &forks {
        assert!(delete(&mut c, &f.id).await.unwrap());
    }
    assert!(d.files("paused").is_empty(), "{:?}", d.files("paused"));
    assert_eq!(std::fs::read(&tpl).unwrap(), before, "template changed");
    d.daemon.shutdown().await;
}
