//! A running QEMU as an RAII guard: killed and reaped on drop, with timed waits; started after
//! a check of what it opened, either booting or restored from a saved state, and able to save
//! its state to a file.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::config::{QemuBinary, QemuConfig};
use super::error::QemuError;
use super::qmp::Qmp;
use super::snapshot;
use super::verify::verify_root;
use crate::firecracker::TemplateIdentity;

/// How long QEMU may take to initialise and greet on QMP.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long writing or loading a VM's state may take (a few GiB of guest memory to a local
/// file takes seconds).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// How often waits poll the child.
const POLL: Duration = Duration::from_millis(10);

/// How a VM ended.
#[derive(Debug, Clone, Copy)]
pub struct QemuExit {
    /// QEMU's exit status.
    pub status: ExitStatus,
    /// Time from spawn to exit.
    pub elapsed: Duration,
}

/// A QEMU child process. Dropping it kills (`SIGKILL`) and reaps the process, so a test or a
/// sandbox that fails half-way never leaves a VM behind.
#[derive(Debug)]
pub struct QemuProcess {
    child: Option<Child>,
    pid: u32,
    started: Instant,
    console: Option<PathBuf>,
    log: PathBuf,
    exit: Option<QemuExit>,
    /// The QMP session of a VM started paused (kept for pause and continue).
    qmp: Option<Qmp>,
    /// Whether its machine has a VM generation ID device ([`QemuConfig::vmgenid`]).
    vmgenid: bool,
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

    /// The QMP session.
    fn monitor(&mut self) -> Result<&mut Qmp, QemuError> {
        self.qmp.as_mut().ok_or(QemuError::NoMonitor)
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
                Ok(vm)
            }
            Err(e) => {
                vm.kill();
                Err(with_log(e, &vm))
            }
        }
    }

    /// Spawns an already prepared QEMU command (stdin closed, output to `log`).
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
        let binary = PathBuf::from(cmd.get_program());
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|source| QemuError::Spawn { binary, source })?;
        Ok(QemuProcess {
            pid: child.id(),
            child: Some(child),
            started,
            console,
            log: log.to_owned(),
            exit: None,
            qmp: None,
            vmgenid: false,
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
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                let exit = QemuExit {
                    status,
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

    /// Kills the VM (`SIGKILL`) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill() {
                tracing::debug!(pid = self.pid, "kill: {e}");
            }
            match child.wait() {
                Ok(status) => {
                    self.exit = Some(QemuExit {
                        status,
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
        assert!(exit.status.success());
        // Waiting again returns the same exit.
        assert!(p
            .wait_timeout(Duration::from_millis(1))
            .unwrap()
            .status
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
