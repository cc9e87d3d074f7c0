//! Launching the VMM process (Firecracker, or the API double) and owning it.
//!
//! [`VmmProcess`] is an RAII guard: dropping it kills and reaps the process; the normal path is
//! [`VmmProcess::shutdown`], which asks politely (`SIGTERM`) and waits before killing.
//!
//! The VMM runs in a session of its own (no controlling terminal, no signal sent to the daemon's
//! process group reaches it, no parent-death signal), so it outlives a daemon that dies or hands
//! it over ([`VmmProcess::release`]). A later daemon takes it back with [`VmmProcess::adopt`]
//! by pid and start time; it is no longer that daemon's child, so it is watched and signalled
//! through a pidfd.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::namespace::NamespacePlan;
use crate::procstat::{pidfd_exited, pidfd_signal, IdentityError, ProcessIdentity};

/// How long a `SIGKILL`ed adopted VMM may take to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors launching or stopping the VMM process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The process could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The log file could not be created.
    #[error("cannot create the log file {path}: {source}")]
    Log {
        /// The log path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The process exited while it was expected to run.
    #[error("the VMM exited early ({status}); log {log}: {tail}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// The log path.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// The API socket did not appear in time.
    #[error("the API socket {socket} did not accept connections within {waited:?}")]
    SocketTimeout {
        /// The socket path.
        socket: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// An adopted process (not this process's child: its exit status is unknown) has exited.
    #[error("the adopted VMM (pid {pid}) has exited; log {log}: {tail}")]
    AdoptedExited {
        /// The pid.
        pid: u32,
        /// The log path.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// Watching or signalling an adopted process through its pidfd failed.
    #[error(transparent)]
    Pidfd(#[from] IdentityError),
    /// Waiting for or signalling the process failed.
    #[error("cannot signal or reap pid {pid}: {source}")]
    Wait {
        /// The pid.
        pid: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The command line of a VMM: a program and its arguments.
#[derive(Debug, Clone)]
pub struct VmmCommand {
    program: PathBuf,
    args: Vec<OsString>,
}

impl VmmCommand {
    /// A command running `program`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        VmmCommand {
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// Appends an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// The program.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The arguments.
    pub fn args(&self) -> &[OsString] {
        &self.args
    }
}

/// A running VMM process; killed and reaped on drop.
#[derive(Debug)]
pub struct VmmProcess {
    child: Option<Child>,
    /// An adopted process's pidfd (it is not this process's child).
    adopted: Option<OwnedFd>,
    pid: u32,
    log: PathBuf,
}

impl VmmProcess {
    /// Starts `cmd` with stdout and stderr appended to `log`, inside the mount namespace
    /// described by `plan` if given.
    pub fn spawn(
        cmd: &VmmCommand,
        plan: Option<NamespacePlan>,
        log: &Path,
    ) -> Result<Self, ProcessError> {
        let log_err = |source| ProcessError::Log {
            path: log.to_owned(),
            source,
        };
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        let mut command = Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: the hook runs in the forked child before exec; `setsid` and
        // `NamespacePlan::enter` only make system calls on data prepared before the fork (no
        // allocation, no locks).
        unsafe {
            command.pre_exec(move || {
                nix::unistd::setsid().map_err(io::Error::from)?;
                match &plan {
                    Some(plan) => plan.enter(),
                    None => Ok(()),
                }
            });
        }
        let child = command.spawn().map_err(|source| ProcessError::Spawn {
            program: cmd.program.clone(),
            source,
        })?;
        Ok(VmmProcess {
            pid: child.id(),
            child: Some(child),
            adopted: None,
            log: log.to_owned(),
        })
    }

    /// Takes back a VMM a previous daemon process started and [`release`](Self::release)d (or
    /// that outlived it): it must still run, have been started at `identity`'s time (a reused
    /// pid is refused) and name `marker` (its API socket) on its command line. From then on it
    /// is watched and killed through a pidfd; dropping the returned guard kills it.
    pub fn adopt(
        identity: ProcessIdentity,
        marker: &Path,
        log: &Path,
    ) -> Result<Self, IdentityError> {
        let pidfd = identity.open_checked(Some(marker))?;
        Ok(VmmProcess {
            child: None,
            adopted: Some(pidfd),
            pid: identity.pid,
            log: log.to_owned(),
        })
    }

    /// The process's pid and start time, by which a later daemon can [`adopt`](Self::adopt) it.
    pub fn identity(&self) -> Result<ProcessIdentity, IdentityError> {
        ProcessIdentity::of(self.pid)
    }

    /// Lets the process run on without this guard: it is neither killed nor reaped (a daemon
    /// stopping for a restart hands it to the next one, which [`adopt`](Self::adopt)s it).
    pub fn release(mut self) {
        // Dropping a `Child` neither kills nor waits for it.
        self.child = None;
        self.adopted = None;
    }

    /// The process id (whose `/proc/<pid>/fd` is verified).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last bytes of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].trim().to_owned()
    }

    /// `Err(Exited)` if the process has exited.
    pub fn check_running(&mut self) -> Result<(), ProcessError> {
        if let Some(pidfd) = &self.adopted {
            return if pidfd_exited(pidfd, Duration::ZERO)? {
                Err(ProcessError::AdoptedExited {
                    pid: self.pid,
                    log: self.log.clone(),
                    tail: self.log_tail(),
                })
            } else {
                Ok(())
            };
        }
        let child = self.child.as_mut().expect("child present until shutdown");
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(ProcessError::Exited {
                status,
                log: self.log.clone(),
                tail: self.log_tail(),
            }),
            Err(source) => Err(ProcessError::Wait {
                pid: self.pid,
                source,
            }),
        }
    }

    /// Waits until `socket` accepts connections, failing early if the process exits.
    pub async fn wait_for_socket(
        &mut self,
        socket: &Path,
        timeout: Duration,
    ) -> Result<(), ProcessError> {
        let start = Instant::now();
        loop {
            self.check_running()?;
            if tokio::net::UnixStream::connect(socket).await.is_ok() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(ProcessError::SocketTimeout {
                    socket: socket.to_owned(),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the process: `SIGTERM`, up to `grace` to exit, then `SIGKILL`; reaps it. The exit
    /// status is `None` for an adopted process (its parent, not this process, reaps it).
    pub async fn shutdown(mut self, grace: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        if let Some(pidfd) = self.adopted.take() {
            stop_adopted(&pidfd, grace).await?;
            return Ok(None);
        }
        let mut child = self.child.take().expect("child present until shutdown");
        let pid = self.pid;
        let wait_err = |source| ProcessError::Wait { pid, source };
        if child.try_wait().map_err(wait_err)?.is_none() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < grace {
                if let Some(status) = child.try_wait().map_err(wait_err)? {
                    return Ok(Some(status));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = child.kill();
        }
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .map_err(|e| wait_err(io::Error::other(e)))?
            .map(Some)
            .map_err(wait_err)
    }
}

/// `SIGTERM` through `pidfd`, up to `grace` to exit, then `SIGKILL` and up to [`KILL_TIMEOUT`].
async fn stop_adopted(pidfd: &OwnedFd, grace: Duration) -> Result<(), IdentityError> {
    use rustix::process::Signal;
    pidfd_signal(pidfd, Signal::TERM)?;
    let start = Instant::now();
    while start.elapsed() < grace {
        if pidfd_exited(pidfd, Duration::ZERO)? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pidfd_signal(pidfd, Signal::KILL)?;
    let start = Instant::now();
    while start.elapsed() < KILL_TIMEOUT {
        if pidfd_exited(pidfd, Duration::ZERO)? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(IdentityError::Io {
        context: format!("an adopted VMM outlived SIGKILL by {KILL_TIMEOUT:?}"),
        source: io::Error::from(io::ErrorKind::TimedOut),
    })
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Some(pidfd) = self.adopted.take() {
            let _ = pidfd_signal(&pidfd, rustix::process::Signal::KILL);
            if !matches!(pidfd_exited(&pidfd, KILL_TIMEOUT), Ok(true)) {
                tracing::warn!(pid = self.pid, "an adopted VMM outlived SIGKILL");
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[tokio::test]
    async fn early_exit_is_reported_with_the_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = VmmCommand::new("/bin/sh")
            .arg("-c")
            .arg("echo the api socket is busy >&2; exit 3");
        let mut p = VmmProcess::spawn(&cmd, None, &dir.path().join("log")).unwrap();
        match p
            .wait_for_socket(&dir.path().join("sock"), Duration::from_secs(5))
            .await
        {
            Err(ProcessError::Exited { status, tail, .. }) => {
                assert_eq!(status.code(), Some(3));
                assert!(tail.contains("socket is busy"), "{tail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_socket_that_never_appears_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = VmmCommand::new("/bin/sleep").arg("30");
        let mut p = VmmProcess::spawn(&cmd, None, &dir.path().join("log")).unwrap();
        let r = p
            .wait_for_socket(&dir.path().join("sock"), Duration::from_millis(50))
            .await;
        assert!(
            matches!(r, Err(ProcessError::SocketTimeout { .. })),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn shutdown_terminates_and_drop_kills() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = VmmCommand::new("/bin/sleep").arg("30");
        let p = VmmProcess::spawn(&cmd, None, &dir.path().join("log")).unwrap();
        let status = p.shutdown(Duration::from_secs(2)).await.unwrap().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));

        // A process ignoring SIGTERM is killed after the grace period.
        let cmd = VmmCommand::new("/bin/sh")
            .arg("-c")
            .arg("trap '' TERM; exec sleep 30");
        let p = VmmProcess::spawn(&cmd, None, &dir.path().join("log")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let status = p
            .shutdown(Duration::from_millis(100))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));

        let p = VmmProcess::spawn(
            &VmmCommand::new("/bin/sleep").arg("30"),
            None,
            &dir.path().join("log"),
        )
        .unwrap();
        let pid = p.pid();
        drop(p);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    /// Reaps `pid` (a released process is still this test's child) and says whether it is gone.
    fn reaped(pid: u32) -> bool {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
        !Path::new(&format!("/proc/{pid}")).exists()
    }

    /// Kills and reaps a released process however the test ends.
    struct Reaper(u32);

    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
            reaped(self.0);
        }
    }

    #[tokio::test]
    async fn a_released_process_runs_on_in_its_own_session_and_is_adopted_by_its_marker() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("api.sock");
        std::fs::write(&marker, b"").unwrap();
        // `tail -f` on a file named like the API socket: its command line names it.
        let cmd = VmmCommand::new("tail").arg("-f").arg(&marker);
        let log = dir.path().join("log");
        let p = VmmProcess::spawn(&cmd, None, &log).unwrap();
        let pid = p.pid();
        let sid = nix::unistd::getsid(Some(Pid::from_raw(pid as i32))).unwrap();
        assert_eq!(sid.as_raw() as u32, pid, "not in a session of its own");
        let _reaper = Reaper(pid);
        let id = p.identity().unwrap();
        p.release();
        assert!(Path::new(&format!("/proc/{pid}")).exists());

        let other = ProcessIdentity {
            start_time: id.start_time + 1,
            ..id
        };
        assert!(matches!(
            VmmProcess::adopt(other, &marker, &log),
            Err(IdentityError::PidReused { .. })
        ));
        assert!(matches!(
            VmmProcess::adopt(id, &dir.path().join("other.sock"), &log),
            Err(IdentityError::NotOurs { .. })
        ));
        let mut a = VmmProcess::adopt(id, &marker, &log).unwrap();
        assert_eq!(a.pid(), pid);
        a.check_running().unwrap();
        assert_eq!(a.shutdown(Duration::from_secs(5)).await.unwrap(), None);
        assert!(reaped(pid));
        assert!(matches!(
            VmmProcess::adopt(id, &marker, &log),
            Err(IdentityError::Gone(p)) if p == pid
        ));
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let r = VmmProcess::spawn(
            &VmmCommand::new("/nonexistent/fc"),
            None,
            &dir.path().join("log"),
        );
        assert!(matches!(r, Err(ProcessError::Spawn { .. })));
    }
}
