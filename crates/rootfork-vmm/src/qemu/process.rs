//! A running QEMU as an RAII guard: killed and reaped on drop, with timed waits.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::config::{QemuBinary, QemuConfig};
use super::error::QemuError;
use super::qmp::Qmp;
use super::verify::verify_root;
use crate::firecracker::TemplateIdentity;

/// How long QEMU may take to initialise and greet on QMP.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// failure the process is killed before a single guest instruction ran.
    pub fn spawn_verified(
        qemu: &QemuBinary,
        config: &QemuConfig,
        log: &Path,
        qmp_socket: &Path,
        templates: &[TemplateIdentity],
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
        let _ = std::fs::remove_file(qmp_socket);
        File::create(&config.serial).map_err(|e| {
            QemuError::io(
                format!("creating console file {}", config.serial.display()),
                e,
            )
        })?;
        let mut cmd = qemu.command();
        cmd.args(args);
        let mut vm = Self::spawn_command(cmd, log, Some(config.serial.clone()))?;
        let mut qmp = match Qmp::connect(qmp_socket, QMP_TIMEOUT) {
            Ok(q) => q,
            Err(e) => {
                vm.kill();
                return Err(QemuError::Qmp(format!(
                    "{e}; qemu log: {}",
                    vm.log().trim()
                )));
            }
        };
        verify_root(vm.pid, &config.root, templates)?; // `vm` is killed by its drop on error
        qmp.execute("cont", None)?;
        Ok(vm)
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
        })
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
