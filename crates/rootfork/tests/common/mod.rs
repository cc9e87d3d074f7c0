//! Helpers shared by the daemon's integration tests: an in-process daemon in a temporary state
//! directory, a client over its Unix socket, small templates and an NBD reader/writer
//! (`/usr/bin/python3` with libnbd's bindings, installed by scripts/install-deps), and a Rust
//! NBD client that keeps many requests in flight (`nbd_client.rs`).

#![allow(dead_code)]

pub mod nbd_client;

use std::path::{Path, PathBuf};
use std::process::Command;

use rootfork::api::v1;
use rootfork::client::{self, ApiTarget, Clients};
use rootfork::config::Config;
use rootfork::daemon::Daemon;

pub mod fake_kernel;

/// A running daemon and its state directory.
pub struct TestDaemon {
    pub daemon: Daemon,
    pub dir: tempfile::TempDir,
}

impl TestDaemon {
    /// Starts a daemon with defaults (demo off unless `demo`), state in a new tempdir.
    pub async fn start(demo: bool) -> TestDaemon {
        Self::start_with(demo, |_| {}).await
    }

    /// Same, letting the test adjust the configuration.
    pub async fn start_with(demo: bool, f: impl FnOnce(&mut Config)) -> TestDaemon {
        Self::start_prepared(demo, |_| (), f).await.0
    }

    /// As [`TestDaemon::start_with`], calling `prepare(state_dir)` first (e.g. to mount a
    /// file system there) and returning what it made.
    pub async fn start_prepared<T>(
        demo: bool,
        prepare: impl FnOnce(&Path) -> T,
        f: impl FnOnce(&mut Config),
    ) -> (TestDaemon, T) {
        let dir = tempfile::Builder::new()
            .prefix("rfd")
            .tempdir_in("/tmp")
            .unwrap();
        let prepared = prepare(&dir.path().join("s"));
        let mut config = Config::with_state_dir(dir.path().join("s")).unwrap();
        config.demo_template = demo;
        config.nbd_lock_dir = dir.path().join("locks");
        f(&mut config);
        let daemon = Daemon::start(config).await.expect("daemon starts");
        (TestDaemon { daemon, dir }, prepared)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("s")
    }

    pub async fn client(&self) -> Clients {
        client::connect(&ApiTarget::Unix(self.daemon.api_socket().to_owned()))
            .await
            .expect("client connects")
    }

    /// Names in a state subdirectory.
    pub fn files(&self, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state().join(sub))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The builds in the state directory's build store.
    pub fn builds(&self) -> Vec<String> {
        builds_in(&self.state())
    }

    /// The base build of template `name`.
    pub fn template_build(&self, name: &str) -> String {
        template_build(&self.state(), name)
    }

    /// Waits until the store holds `n` builds (20 s at most), and returns them.
    pub async fn builds_settle_count(&self, n: usize) -> Vec<String> {
        for _ in 0..200 {
            if self.builds().len() == n {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        self.builds()
    }

    /// Waits until the store holds exactly `want` builds (the collection of unused builds runs
    /// in the background after a pause or delete; 20 s at most), and returns them.
    pub async fn builds_settle(&self, want: &[String]) -> Vec<String> {
        builds_settle(&self.state(), want).await
    }
}

/// The builds in the build store of state directory `state`.
pub fn builds_in(state: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state.join("store"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The base build of template `name` in state directory `state` (from its record).
pub fn template_build(state: &Path, name: &str) -> String {
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(state.join("templates").join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    rec["build"]
        .as_str()
        .expect("the record names a build")
        .to_owned()
}

/// Waits until the store of `state` holds exactly the builds `want` (sorted; 20 s at most).
pub async fn builds_settle(state: &Path, want: &[String]) -> Vec<String> {
    let mut want = want.to_vec();
    want.sort();
    for _ in 0..200 {
        if builds_in(state) == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    builds_in(state)
}

/// The bytes template `name` of state directory `state` serves (read through its base build).
pub fn template_bytes(state: &Path, name: &str) -> Vec<u8> {
    use rootfork_block::BlockDevice;
    let store = rootfork_block::layered::LocalStore::new(state.join("store"));
    let t = store
        .open(&template_build(state, name).parse().unwrap())
        .unwrap();
    let mut out = vec![0u8; t.size() as usize];
    t.read_at(&mut out, 0).unwrap();
    out
}

/// The files of template `name`'s base build (data, map), to check nothing rewrote them.
pub fn template_files(state: &Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = state.join("store").join(template_build(state, name));
    (
        std::fs::read(dir.join("data")).unwrap(),
        std::fs::read(dir.join("map")).unwrap(),
    )
}

/// Creates kernel sandbox `id` of template `tpl` with a Firecracker VM (128 MiB, 1 vCPU) whose
/// kernel is a placeholder file written into `dir` (the API double only opens it).
pub async fn create_firecracker(c: &mut Clients, id: &str, dir: &Path) -> v1::Sandbox {
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"not a kernel; the double only opens it").unwrap();
    c.sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: "tpl".into(),
            id: id.into(),
            provider: v1::ProviderKind::Kernel as i32,
            vmm: Some(v1::VmmSettings {
                kind: v1::vmm_settings::Kind::Firecracker as i32,
                kernel: kernel.display().to_string(),
                memory_mib: 128,
                vcpus: 1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// A client of the API at `api`, once the daemon answers there (30 s at most).
pub async fn connect_when_up(api: &Path) -> Clients {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(c) = client::connect(&ApiTarget::Unix(api.to_owned())).await {
            return c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not come up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A `rootfork serve` process (or a shell running one); killed and reaped however the test
/// ends.
pub struct ServeProcess(pub std::process::Child);

impl ServeProcess {
    /// `rootfork serve --no-demo` on `state` (kernel claim locks in `locks`), health checks
    /// rare, logging warnings only.
    pub fn spawn(state: &Path, locks: &Path) -> ServeProcess {
        ServeProcess(
            Command::new(env!("CARGO_BIN_EXE_rootfork"))
                .args(["serve", "--no-demo", "--health-interval", "10"])
                .arg("--state-dir")
                .arg(state)
                .arg("--nbd-lock-dir")
                .arg(locks)
                .env("RUST_LOG", "warn")
                .spawn()
                .unwrap(),
        )
    }

    /// Kills it now (SIGKILL) and reaps it.
    pub fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Stops it with SIGTERM and waits for it to exit (up to a minute; then SIGKILL and fail).
    pub fn terminate(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                assert!(status.success(), "rootfork serve exited with {status}");
                return;
            }
            // Dropping `self` kills and reaps it.
            assert!(
                std::time::Instant::now() < deadline,
                "rootfork serve did not exit within a minute of SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `rootfork serve` process on a fresh state directory under /tmp (short paths: socket names
/// stay below the Unix limit), with template `tpl` of `blocks` tagged blocks imported: where the
/// restart tests start.
pub struct ServedState {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub locks: PathBuf,
    pub api: PathBuf,
    pub serve: ServeProcess,
    pub client: Clients,
}

/// Starts a [`ServedState`]; `prefix` names the temporary directory.
pub async fn serve_with_template(prefix: &str, blocks: u64) -> ServedState {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    let (state, locks) = (dir.path().join("s"), dir.path().join("locks"));
    let api = state.join("api.sock");
    let serve = ServeProcess::spawn(&state, &locks);
    let mut client = connect_when_up(&api).await;
    let src = make_template(dir.path(), "src.img", blocks);
    import(&mut client, "tpl", &src).await.unwrap();
    ServedState {
        dir,
        state,
        locks,
        api,
        serve,
        client,
    }
}

/// A raw template whose block `n` starts with `tpl block n`.
pub fn make_template(dir: &Path, name: &str, blocks: u64) -> PathBuf {
    let p = dir.join(name);
    let mut data = vec![0u8; (blocks * 4096) as usize];
    for n in 0..blocks {
        let tag = format!("tpl block {n}\n");
        let o = (n * 4096) as usize;
        data[o..o + tag.len()].copy_from_slice(tag.as_bytes());
    }
    std::fs::write(&p, data).unwrap();
    p
}

/// [`make_template`] of 16 tagged blocks, extended (sparse) to `size` bytes.
pub fn make_sparse_template(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = make_template(dir, name, 16);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(size)
        .unwrap();
    p
}

/// Imports a template, returning the final progress message.
pub async fn import(
    c: &mut Clients,
    name: &str,
    path: &Path,
) -> Result<v1::Template, tonic::Status> {
    let mut s = c
        .templates
        .import_template(v1::ImportTemplateRequest {
            name: name.into(),
            source_path: path.display().to_string(),
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(p) = s.message().await? {
        assert!(p.bytes_done <= p.bytes_total);
        if let Some(t) = p.template {
            last = Some(t);
        }
    }
    Ok(last.expect("the last message carries the template"))
}

pub async fn create(
    c: &mut Clients,
    template: &str,
    id: &str,
) -> Result<v1::Sandbox, tonic::Status> {
    c.sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: template.into(),
            id: id.into(),
            provider: v1::ProviderKind::Socket as i32,
            vmm: None,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn get(c: &mut Clients, id: &str) -> v1::Sandbox {
    c.sandboxes
        .get_sandbox(v1::GetSandboxRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

pub async fn pause(c: &mut Clients, id: &str) -> Result<v1::Sandbox, tonic::Status> {
    c.sandboxes
        .pause_sandbox(v1::PauseSandboxRequest { id: id.into() })
        .await
        .map(|r| r.into_inner())
}

pub async fn resume(c: &mut Clients, id: &str) -> Result<v1::Sandbox, tonic::Status> {
    c.sandboxes
        .resume_sandbox(v1::ResumeSandboxRequest {
            id: id.into(),
            wait: false,
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn delete(c: &mut Clients, id: &str) -> Result<bool, tonic::Status> {
    c.sandboxes
        .delete_sandbox(v1::DeleteSandboxRequest { id: id.into() })
        .await
        .map(|r| r.into_inner().deleted)
}

fn python(script: &str, args: &[&str]) -> String {
    let o = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("running /usr/bin/python3 (python3-libnbd)");
    assert!(
        o.status.success(),
        "python: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Reads `len` bytes at `offset` of an NBD URI (hex).
pub fn nbd_read(uri: &str, offset: u64, len: u32) -> Vec<u8> {
    let hex = python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nsys.stdout.write(h.pread(int(sys.argv[3]),int(sys.argv[2])).hex())\nh.shutdown()",
        &[uri, &offset.to_string(), &len.to_string()],
    );
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// The export's size.
pub fn nbd_size(uri: &str) -> u64 {
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint(h.get_size())\nh.shutdown()",
        &[uri],
    )
    .trim()
    .parse()
    .unwrap()
}

/// Writes `byte` repeated `len` times at `offset` and flushes; the server's error as text.
pub fn nbd_try_write(uri: &str, offset: u64, len: u32, byte: u8) -> Result<(), String> {
    let out = python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\ntry:\n  h.pwrite(bytes([int(sys.argv[4])])*int(sys.argv[3]),int(sys.argv[2]))\n  h.flush()\n  print('ok')\nexcept nbd.Error as e:\n  print('error', e.errnum, e.string)\nh.shutdown()",
        &[uri, &offset.to_string(), &len.to_string(), &byte.to_string()],
    );
    match out.trim() {
        "ok" => Ok(()),
        e => Err(e.to_owned()),
    }
}

/// Writes `byte` repeated `len` times at `offset` and flushes.
pub fn nbd_write(uri: &str, offset: u64, len: u32, byte: u8) {
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nh.pwrite(bytes([int(sys.argv[4])])*int(sys.argv[3]),int(sys.argv[2]))\nh.flush()\nh.shutdown()",
        &[uri, &offset.to_string(), &len.to_string(), &byte.to_string()],
    );
}

/// A stand-in for a QEMU the daemon started: a long-running process whose command line names
/// `marker` (the recorded QMP socket). Killed and reaped on drop.
pub struct Fake(pub std::process::Child);

impl Fake {
    pub fn spawn(marker: &Path) -> Fake {
        std::fs::write(marker, b"").unwrap();
        Fake(Command::new("tail").arg("-f").arg(marker).spawn().unwrap())
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Makes `id`'s record say it runs a QEMU VM, the process `vm_process` names.
pub fn record_vm(state: &Path, id: &str, vm_process: serde_json::Value) {
    let path = state.join("sandboxes").join(format!("{id}.json"));
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(rec["state"], "running", "{rec}");
    assert!(rec["served"].is_object(), "{rec}");
    rec["vm"] = serde_json::json!({
        "kind": "Qemu",
        "kernel": "/nonexistent/vmlinuz",
        "initrd": null,
        "kernel_args": null,
        "memory_mib": null,
        "vcpus": null,
    });
    rec["vm_process"] = vm_process;
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
}

/// The `vm_process` of a record naming `fake` (its start time off by `skew`), its QMP socket
/// `marker`, console and log in `STATE/vm/`.
pub fn vm_process(
    state: &Path,
    id: &str,
    fake: &Fake,
    marker: &Path,
    skew: u64,
) -> serde_json::Value {
    let me = rootfork_vmm::qemu::ProcessIdentity::of(fake.pid()).unwrap();
    let vm = state.join("vm");
    serde_json::json!({
        "pid": me.pid,
        "start_time": me.start_time + skew,
        "qmp": marker,
        "console": vm.join(format!("{id}.console")),
        "log": vm.join(format!("{id}.qemu.log")),
    })
}
