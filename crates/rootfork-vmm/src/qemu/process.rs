//! A running QEMU as an RAII guard: killed and reaped on drop, with timed waits; started after
//! a check of what it opened, either booting or restored from a saved state, and able to save
//! its state to a file.
//!
//! QEMU runs in its own session (no controlling terminal, no signal sent to the daemon's process
//! group reaches it, no parent-death signal), so it outlives a daemon that dies or hands it over
//! ([`QemuProcess::release`]); its QMP socket stays where it was created. A later daemon takes it
//! back with [`QemuProcess::adopt`] by pid and start time: it is no longer that daemon's child,
//! so it is watched and killed through a pidfd, and QMP is reconnected when first needed.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::config::{QemuBinary, QemuConfig};
use super::error::QemuError;
use super::qmp::Qmp;
use super::snapshot;
use super::verify::verify_root;
use crate::firecracker::TemplateIdentity;
use crate::procstat::{pidfd_exited, pidfd_signal, ProcessIdentity};

/// How long QEMU may take to initialise and greet on QMP.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long writing or loading a VM's state may take (a few GiB of guest memory to a local
/// file takes seconds).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// How often waits poll the child.
const POLL: Duration = Duration::from_millis(10);

/// How long a `SIGKILL`ed adopted VM may take to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(30);

/// How a VM ended.
#[derive(Debug, Clone, Copy)]
pub struct QemuExit {
    /// QEMU's exit status; `None` for an adopted VM (its parent, not this process, reaps it).
    pub status: Option<ExitStatus>,
    /// Time from spawn (or adoption) to exit.
    pub elapsed: Duration,
}

impl std::fmt::Display for QemuExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "{s} after {:?}", self.elapsed),
            None => write!(
                f,
                "exit status unknown (an adopted VM), seen {:?} after adoption",
                self.elapsed
            ),
        }
    }
}

/// A QEMU child process. Dropping it kills (`SIGKILL`) and reaps the process, so a test or a
/// sandbox that fails half-way never leaves a VM behind.
#[derive(Debug)]
pub struct QemuProcess {
    child: Option<Child>,
    /// An adopted VM's pidfd (it is not this process's child).
    adopted: Option<OwnedFd>,
    pid: u32,
    started: Instant,
    console: Option<PathBuf>,
    log: PathBuf,
    exit: Option<QemuExit>,
    /// The QMP session of a VM started paused (kept for pause and continue).
    qmp: Option<Qmp>,
    /// Whether its machine has a VM generation ID device ([`QemuConfig::vmgenid`]).
    vmgenid: bool,
    /// Where QMP listens (kept, so an adopting daemon can reconnect).
    qmp_socket: Option<PathBuf>,
}

/// What [`QemuProcess::save_state`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedState {
    /// The state file's size.
    pub bytes: u64,
    /// From the `stop` to the file being synced.
    pub elapsed: Duration,
}

impl QemuProcess {
    /// Boots `config` with `qemu`. QEMU's own stdout/stderr go to `log`; the guest's serial
    /// console goes to `config.serial` (truncated first).
    pub fn spawn(qemu: &QemuBinary, config: &QemuConfig, log: &Path) -> Result<Self, QemuError> {
        config.check_files()?;
        let args = config.args()?;
        File::create(&config.serial).map_err(|e| {
            QemuError::io(
                format!("creating console file {}", config.serial.display()),
                e,
            )
        })?;
        let mut cmd = qemu.command();
        cmd.args(args);
        tracing::debug!(?cmd, "starting qemu");
        Self::spawn_command(cmd, log, Some(config.serial.clone()))
    }

    /// Boots `config` paused (`-S`, QMP on `qmp_socket`), waits until QEMU has initialised (its
    /// disks are open when it greets on QMP), checks with [`verify_root`] that it holds the
    /// provider's device and none of `templates` open, and only then lets the guest run. On any
    /// failure the process is killed before a single guest instruction ran. The QMP session
    /// stays open in the process (for [`save_state`](Self::save_state)).
    pub fn spawn_verified(
        qemu: &QemuBinary,
        config: &QemuConfig,
        log: &Path,
        qmp_socket: &Path,
        templates: &[TemplateIdentity],
    ) -> Result<Self, QemuError> {
        File::create(&config.serial).map_err(|e| {
            QemuError::io(
                format!("creating console file {}", config.serial.display()),
                e,
            )
        })?;
        let mut vm = Self::spawn_paused(qemu, config, log, qmp_socket, &[])?;
        verify_root(vm.pid, &config.root, templates)?; // `vm` is killed by its drop on error
        vm.monitor()?.execute("cont", None)?;
        Ok(vm)
    }

    /// Starts `config` from the state [`save_state`](Self::save_state) wrote to `state`
    /// instead of booting: QEMU starts paused with `-incoming defer`, loads the state, is
    /// checked like [`spawn_verified`](Self::spawn_verified), and its guest continues where it
    /// was stopped. `config` must describe the same machine as the saved VM's (memory, vCPUs,
    /// devices); its root disk may be a different device or socket holding the same data. The
    /// console file is appended to, not truncated. On any failure the process is killed.
    pub fn spawn_restored(
        qemu: &QemuBinary,
        config: &QemuConfig,
        log: &Path,
        qmp_socket: &Path,
        templates: &[TemplateIdentity],
        state: &Path,
    ) -> Result<Self, QemuError> {
        let file = File::open(state)
            .map_err(|e| QemuError::io(format!("opening VM state {}", state.display()), e))?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.serial)
            .map_err(|e| {
                QemuError::io(
                    format!("opening console file {}", config.serial.display()),
                    e,
                )
            })?;
        let mut vm = Self::spawn_paused(
            qemu,
            config,
            log,
            qmp_socket,
            &["-incoming".into(), "defer".into()],
        )?;
        verify_root(vm.pid, &config.root, templates)?;
        let qmp = vm.monitor()?;
        snapshot::load(qmp, &file, MIGRATION_TIMEOUT).map_err(|e| with_log(e, &vm))?;
        vm.monitor()?.execute("cont", None)?;
        Ok(vm)
    }

    /// Stops the guest and writes its memory and device state to a new file at `path`
    /// (created `0600`, synced). On success the guest stays stopped and QEMU has released its
    /// disk (everything it wrote is flushed to the provider): kill it, or
    /// [`continue_guest`](Self::continue_guest) to undo. On failure the file is removed and the
    /// guest continues as it was (a failure to continue is reported with the cause).
    pub fn save_state(&mut self, path: &Path) -> Result<SavedState, QemuError> {
        use std::os::unix::fs::OpenOptionsExt;
        let started = Instant::now();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| QemuError::io(format!("creating VM state {}", path.display()), e))?;
        let saved = self
            .monitor()
            .and_then(|qmp| snapshot::save(qmp, &file, MIGRATION_TIMEOUT))
            .and_then(|()| {
                file.sync_all()
                    .map_err(|e| QemuError::io(format!("syncing {}", path.display()), e))?;
                file.metadata()
                    .map_err(|e| QemuError::io(format!("stat {}", path.display()), e))
            });
        match saved {
            Ok(meta) => Ok(SavedState {
                bytes: meta.len(),
                elapsed: started.elapsed(),
            }),
            Err(e) => {
                drop(file);
                let _ = std::fs::remove_file(path);
                match self.continue_guest() {
                    Ok(()) => Err(e),
                    Err(ce) => Err(QemuError::Migration(format!(
                        "{e}; the guest could not be continued either: {ce}"
                    ))),
                }
            }
        }
    }

    /// Lets a stopped guest run again (`cont`): after a [`save_state`](Self::save_state) whose
    /// later steps failed, QEMU takes its disk back and the guest goes on as if nothing
    /// happened.
    pub fn continue_guest(&mut self) -> Result<(), QemuError> {
        let qmp = self.monitor()?;
        qmp.set_timeout(QMP_TIMEOUT)?;
        qmp.execute("cont", None).map(|_| ())
    }

    /// The QMP session, connected again to the kept socket if there is none (an adopted VM).
    fn monitor(&mut self) -> Result<&mut Qmp, QemuError> {
        if self.qmp.is_none() {
            let Some(socket) = self.qmp_socket.as_deref() else {
                return Err(QemuError::NoMonitor);
            };
            self.qmp = Some(Qmp::connect(socket, QMP_TIMEOUT)?);
        }
        self.qmp.as_mut().ok_or(QemuError::NoMonitor)
    }

    /// Takes back a VM that a previous daemon process started (with
    /// [`spawn_verified`](Self::spawn_verified) or [`spawn_restored`](Self::spawn_restored))
    /// and that outlived it: `identity` is what [`identity`](Self::identity) returned then,
    /// `qmp_socket` the QMP socket it was started with. The process must still run, have been
    /// started at the recorded time (a reused pid is refused) and name `qmp_socket` on its
    /// command line. It is watched and killed through a pidfd from then on (dropping the
    /// returned value kills it, as for a spawned one); QMP is connected when first used.
    pub fn adopt(
        identity: ProcessIdentity,
        qmp_socket: &Path,
        console: Option<PathBuf>,
        log: &Path,
    ) -> Result<Self, QemuError> {
        let pid = identity.pid;
        let pidfd = identity.open_checked(Some(qmp_socket))?;
        // Whether it was started with a VM generation ID device (`-device vmgenid,…`), which its
        // saved state would need on a restore.
        let vmgenid = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            c.split(|b| *b == 0)
                .any(|arg| arg.starts_with(b"vmgenid,") || arg == b"vmgenid")
        });
        Ok(QemuProcess {
            child: None,
            adopted: Some(pidfd),
            pid,
            started: Instant::now(),
            console,
            log: log.to_owned(),
            exit: None,
            qmp: None,
            vmgenid,
            qmp_socket: Some(qmp_socket.to_owned()),
        })
    }

    /// The process's pid and start time, by which a later daemon can [`adopt`](Self::adopt) it.
    pub fn identity(&self) -> Result<ProcessIdentity, QemuError> {
        Ok(ProcessIdentity::of(self.pid)?)
    }

    /// Where QMP listens, when the VM has a monitor.
    pub fn qmp_socket(&self) -> Option<&Path> {
        self.qmp_socket.as_deref()
    }

    /// QEMU's own log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Lets the VM run on without this guard: it is neither killed nor reaped (a daemon
    /// stopping for a restart hands it to the next one, which [`adopt`](Self::adopt)s it). The
    /// QMP session is closed; the socket stays.
    pub fn release(mut self) {
        self.qmp = None;
        // Dropping a `Child` neither kills nor waits for it.
        self.child = None;
        self.adopted = None;
    }

    /// Spawns `config` paused (`-S`) with QMP on `qmp_socket` and `extra` arguments, and waits
    /// for QMP's greeting (QEMU has opened its disks by then).
    fn spawn_paused(
        qemu: &QemuBinary,
        config: &QemuConfig,
        log: &Path,
        qmp_socket: &Path,
        extra: &[OsString],
    ) -> Result<Self, QemuError> {
        config.check_files()?;
        let qmp_arg = qmp_socket
            .to_str()
            .filter(|s| !s.contains(','))
            .ok_or_else(|| QemuError::InvalidConfig(format!("QMP socket {qmp_socket:?}")))?;
        let mut args = config.args()?;
        args.extend([
            "-S".into(),
            "-qmp".into(),
            format!("unix:{qmp_arg},server=on,wait=off").into(),
        ]);
        args.extend(extra.iter().cloned());
        let _ = std::fs::remove_file(qmp_socket);
        let mut cmd = qemu.command();
        cmd.args(args);
        let mut vm = Self::spawn_command(cmd, log, Some(config.serial.clone()))?;
        vm.vmgenid = config.vmgenid;
        match Qmp::connect(qmp_socket, QMP_TIMEOUT) {
            Ok(q) => {
                vm.qmp = Some(q);
                vm.qmp_socket = Some(qmp_socket.to_owned());
                Ok(vm)
            }
            Err(e) => {
                vm.kill();
                Err(with_log(e, &vm))
            }
        }
    }

    /// Spawns an already prepared QEMU command (stdin closed, output to `log`) in a session of
    /// its own, so that it can outlive this process.
    pub(crate) fn spawn_command(
        mut cmd: Command,
        log: &Path,
        console: Option<PathBuf>,
    ) -> Result<Self, QemuError> {
        let out = File::create(log)
            .map_err(|e| QemuError::io(format!("creating log file {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| QemuError::io(format!("duplicating log file {}", log.display()), e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: the closure runs in the forked child before exec and only calls `setsid`,
        // which is async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let binary = PathBuf::from(cmd.get_program());
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|source| QemuError::Spawn { binary, source })?;
        Ok(QemuProcess {
            pid: child.id(),
            child: Some(child),
            adopted: None,
            started,
            console,
            log: log.to_owned(),
            exit: None,
            qmp: None,
            vmgenid: false,
            qmp_socket: None,
        })
    }

    /// Whether the VM has a VM generation ID device (its saved state restores only into a
    /// machine that has one too).
    pub fn has_vmgenid(&self) -> bool {
        self.vmgenid
    }

    /// The GUID of the VM's generation ID device (`query-vm-generation-id`), `None` when it
    /// has none. QEMU draws it when the process starts: a VM restored from a saved state has a
    /// GUID of its own, not the saved VM's.
    pub fn generation_id(&mut self) -> Result<Option<String>, QemuError> {
        if !self.vmgenid {
            return Ok(None);
        }
        let qmp = self.monitor()?;
        qmp.set_timeout(QMP_TIMEOUT)?;
        let r = qmp.execute("query-vm-generation-id", None)?;
        Ok(r.get("guid").and_then(|g| g.as_str()).map(str::to_owned))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When QEMU was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The console file, if the guest has one.
    pub fn console_path(&self) -> Option<&Path> {
        self.console.as_deref()
    }

    /// The guest's console output so far (lossily decoded, carriage returns removed).
    pub fn console(&self) -> String {
        self.console.as_deref().map(read_lossy).unwrap_or_default()
    }

    /// QEMU's own stdout/stderr so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The exit, if QEMU has exited (does not block).
    pub fn try_exit(&mut self) -> Result<Option<QemuExit>, QemuError> {
        if let Some(exit) = self.exit {
            return Ok(Some(exit));
        }
        if let Some(pidfd) = &self.adopted {
            if !exited(pidfd, Duration::ZERO)? {
                return Ok(None);
            }
            let exit = QemuExit {
                status: None,
                elapsed: self.started.elapsed(),
            };
            self.exit = Some(exit);
            self.adopted = None;
            return Ok(Some(exit));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                let exit = QemuExit {
                    status: Some(status),
                    elapsed: self.started.elapsed(),
                };
                self.exit = Some(exit);
                self.child = None;
                Ok(Some(exit))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(QemuError::io(
                format!("waiting for qemu pid {}", self.pid),
                e,
            )),
        }
    }

    /// Blocks until QEMU exits or `timeout` passes; on timeout the VM is killed and
    /// [`QemuError::Timeout`] returned.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<QemuExit, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.try_exit()? {
                return Ok(exit);
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(QemuError::Timeout(timeout));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Like [`wait_timeout`](Self::wait_timeout) without blocking the async runtime's thread.
    pub async fn wait_timeout_async(&mut self, timeout: Duration) -> Result<QemuExit, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.try_exit()? {
                return Ok(exit);
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(QemuError::Timeout(timeout));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Kills the VM (`SIGKILL`) and reaps it (an adopted one: waits until it is gone, up to
    /// [`KILL_TIMEOUT`]). Idempotent.
    pub fn kill(&mut self) {
        if let Some(pidfd) = self.adopted.take() {
            let pid = self.pid;
            if let Err(e) = pidfd_signal(&pidfd, rustix::process::Signal::KILL) {
                tracing::warn!(pid, "killing an adopted qemu: {e}");
            }
            match exited(&pidfd, KILL_TIMEOUT) {
                Ok(true) => {
                    self.exit = Some(QemuExit {
                        status: None,
                        elapsed: self.started.elapsed(),
                    })
                }
                Ok(false) => {
                    tracing::warn!(pid, "an adopted qemu outlived SIGKILL by {KILL_TIMEOUT:?}")
                }
                Err(e) => tracing::warn!(pid, "waiting for an adopted qemu: {e}"),
            }
        }
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill() {
                tracing::debug!(pid = self.pid, "kill: {e}");
            }
            match child.wait() {
                Ok(status) => {
                    self.exit = Some(QemuExit {
                        status: Some(status),
                        elapsed: self.started.elapsed(),
                    });
                }
                Err(e) => tracing::warn!(pid = self.pid, "reaping qemu: {e}"),
            }
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `e` with QEMU's own log appended (QMP errors alone rarely say why QEMU gave up).
fn with_log(e: QemuError, vm: &QemuProcess) -> QemuError {
    let log = vm.log();
    let log = log.trim();
    if log.is_empty() {
        return e;
    }
    match e {
        QemuError::Qmp(m) => QemuError::Qmp(format!("{m}; qemu log: {log}")),
        QemuError::Migration(m) => QemuError::Migration(format!("{m}; qemu log: {log}")),
        other => other,
    }
}

/// Whether the process behind `pidfd` has exited, waiting up to `timeout`.
fn exited(pidfd: &OwnedFd, timeout: Duration) -> Result<bool, QemuError> {
    Ok(pidfd_exited(pidfd, timeout)?)
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(secs: &str, dir: &Path) -> QemuProcess {
        let mut cmd = Command::new("sleep");
        cmd.arg(secs);
        QemuProcess::spawn_command(cmd, &dir.join("log"), None).unwrap()
    }

    fn alive(pid: u32) -> bool {
        // A reaped child no longer exists; a zombie would still show up in /proc.
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn drop_kills_and_reaps() {
        let dir = tempfile::tempdir().unwrap();
        let p = sleeper("30", dir.path());
        let pid = p.pid();
        assert!(alive(pid));
        drop(p);
        assert!(!alive(pid), "child {pid} survived drop");
    }

    #[test]
    fn wait_timeout_kills_on_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = sleeper("30", dir.path());
        let pid = p.pid();
        let t = Instant::now();
        assert!(matches!(
            p.wait_timeout(Duration::from_millis(100)),
            Err(QemuError::Timeout(_))
        ));
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(!alive(pid));
    }

    #[test]
    fn wait_returns_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = sleeper("0", dir.path());
        let exit = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(exit.status.unwrap().success());
        // Waiting again returns the same exit.
        assert!(p
            .wait_timeout(Duration::from_millis(1))
            .unwrap()
            .status
            .unwrap()
            .success());
    }

    #[tokio::test]
    async fn async_wait_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = sleeper("30", dir.path());
        assert!(matches!(
            p.wait_timeout_async(Duration::from_millis(50)).await,
            Err(QemuError::Timeout(_))
        ));
    }

    /// A long-running process whose command line names `marker` (a file it follows).
    fn marked(dir: &Path) -> (QemuProcess, PathBuf) {
        let marker = dir.join("7.qmp");
        std::fs::write(&marker, b"").unwrap();
        let mut cmd = Command::new("tail");
        cmd.arg("-f").arg(&marker);
        (
            QemuProcess::spawn_command(cmd, &dir.join("log"), None).unwrap(),
            marker,
        )
    }

    fn reap(pid: u32) {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    }

    #[test]
    fn a_spawned_process_runs_in_its_own_session() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = marked(dir.path());
        let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
        assert_eq!(nix::unistd::getsid(Some(pid)).unwrap(), pid);
    }

    #[test]
    fn a_released_process_runs_on_and_is_adopted_then_killed() {
        let dir = tempfile::tempdir().unwrap();
        let (p, marker) = marked(dir.path());
        let pid = p.pid();
        let id = p.identity().unwrap();
        p.release();
        assert!(alive(pid), "release killed {pid}");
        let mut a = QemuProcess::adopt(id, &marker, None, &dir.path().join("log")).unwrap();
        assert_eq!(a.pid(), pid);
        assert_eq!(a.qmp_socket(), Some(marker.as_path()));
        assert!(a.try_exit().unwrap().is_none());
        a.kill();
        let exit = a.try_exit().unwrap().expect("killed");
        assert!(exit.status.is_none());
        // It was this test's child: a zombie until reaped here.
        reap(pid);
        assert!(!alive(pid));
    }

    #[test]
    fn adoption_refuses_another_start_time_or_another_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let (p, marker) = marked(dir.path());
        let id = p.identity().unwrap();
        let log = dir.path().join("log");
        let older = ProcessIdentity {
            start_time: id.start_time.saturating_sub(1),
            ..id
        };
        assert!(matches!(
            QemuProcess::adopt(older, &marker, None, &log),
            Err(QemuError::PidReused { .. })
        ));
        assert!(matches!(
            QemuProcess::adopt(id, &dir.path().join("8.qmp"), None, &log),
            Err(QemuError::NotOurVm { .. })
        ));
        let pid = p.pid();
        drop(p);
        assert!(matches!(
            QemuProcess::adopt(id, &marker, None, &log),
            Err(QemuError::ProcessGone(x)) if x == pid
        ));
    }

    #[test]
    fn an_adopted_process_that_exits_is_seen_exited_and_dropping_one_kills_it() {
        let dir = tempfile::tempdir().unwrap();
        let (p, marker) = marked(dir.path());
        let pid = p.pid();
        let id = p.identity().unwrap();
        p.release();
        let mut a = QemuProcess::adopt(id, &marker, None, &dir.path().join("log")).unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let exit = a.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(exit.status.is_none());
        reap(pid);
        let (p, marker) = marked(dir.path());
        let pid = p.pid();
        let id = p.identity().unwrap();
        p.release();
        drop(QemuProcess::adopt(id, &marker, None, &dir.path().join("log")).unwrap());
        reap(pid);
        assert!(!alive(pid));
    }

    #[test]
    fn spawn_of_missing_binary_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = Command::new("/nonexistent/qemu-system-x86_64");
        assert!(matches!(
            QemuProcess::spawn_command(cmd, &dir.path().join("log"), None),
            Err(QemuError::Spawn { .. })
        ));
    }
}
