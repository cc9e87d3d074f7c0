//! A process's identity that outlives the daemon which started it: its pid and its start time
//! (field 22 of `/proc/PID/stat`, in clock ticks after boot). A later daemon adopting a VM by
//! pid checks both, so a pid the kernel handed to another process meanwhile is refused. Shared
//! by both VMMs (QEMU's [`QemuProcess::adopt`], Firecracker's [`FirecrackerVm::adopt`]), with
//! the pidfd an adopted process is watched and killed through.
//!
//! [`QemuProcess::adopt`]: crate::qemu::QemuProcess::adopt
//! [`FirecrackerVm::adopt`]: crate::firecracker::FirecrackerVm::adopt

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a recorded process is not (or no longer) the one recorded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No process has the pid any more (or it is a zombie).
    #[error("process {0} is gone")]
    Gone(u32),
    /// The recorded pid belongs to a process started at another time: the pid was reused.
    #[error("pid {pid} is another process now (started at tick {found}, the recorded one at {expected})")]
    PidReused {
        /// The pid.
        pid: u32,
        /// The recorded start time.
        expected: u64,
        /// The start time of the process that holds the pid now.
        found: u64,
    },
    /// The process holding the pid does not name the recorded marker (a QMP or API socket) on
    /// its command line: it is not the VM the daemon started.
    #[error("pid {pid} is not the VM started with {}", marker.display())]
    NotOurs {
        /// The pid.
        pid: u32,
        /// The marker its command line lacks.
        marker: PathBuf,
    },
    /// `/proc/PID/stat` could not be parsed.
    #[error("/proc/{pid}/stat: {why}")]
    Stat {
        /// The pid.
        pid: u32,
        /// What was wrong.
        why: String,
    },
    /// Reading `/proc` or using the pidfd failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl IdentityError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        IdentityError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A process as the daemon recorded it: a pid is reused, a pid and a start time are not (for as
/// long as the host runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessIdentity {
    /// The process id.
    pub pid: u32,
    /// When it started: clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
}

/// What `/proc/PID/stat` says about the fields adoption needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFields {
    /// The state letter (`R`, `S`, `Z`…).
    pub state: char,
    /// Field 22, `starttime`.
    pub start_time: u64,
}

/// Parses the content of `/proc/PID/stat`. The command name (field 2) is in parentheses and
/// may itself hold spaces and parentheses, so the fields are counted from its last `)`.
pub fn parse_stat(stat: &str) -> Result<StatFields, String> {
    let close = stat
        .rfind(')')
        .ok_or_else(|| "no ')' closing the command name".to_owned())?;
    // Fields 3.. follow the command name.
    let rest: Vec<&str> = stat[close + 1..].split_ascii_whitespace().collect();
    let state = rest
        .first()
        .and_then(|s| s.chars().next())
        .ok_or_else(|| "no state field".to_owned())?;
    let start = rest.get(22 - 3).ok_or_else(|| {
        format!(
            "{} fields after the command name, fewer than 20",
            rest.len()
        )
    })?;
    let start_time = start
        .parse()
        .map_err(|_| format!("start time {start:?} is not a number"))?;
    Ok(StatFields { state, start_time })
}

/// The fields of a live process `pid` (`Ok(None)`: no such process, or it is a zombie).
pub fn stat_of(pid: u32) -> Result<Option<StatFields>, IdentityError> {
    let path = format!("/proc/{pid}/stat");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let f = parse_stat(&s).map_err(|why| IdentityError::Stat { pid, why })?;
            Ok((f.state != 'Z' && f.state != 'X').then_some(f))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IdentityError::io(format!("reading {path}"), e)),
    }
}

impl ProcessIdentity {
    /// The identity of the live process `pid`.
    pub fn of(pid: u32) -> Result<ProcessIdentity, IdentityError> {
        let f = stat_of(pid)?.ok_or(IdentityError::Gone(pid))?;
        Ok(ProcessIdentity {
            pid,
            start_time: f.start_time,
        })
    }

    /// Checks that `self.pid` is still the process recorded: alive, started at the recorded
    /// time, and (when `marker` is given) with `marker` among its command line's arguments
    /// (the daemon passes the VM's QMP or API socket, which names no other process's).
    pub fn check(&self, marker: Option<&Path>) -> Result<(), IdentityError> {
        let pid = self.pid;
        let now = stat_of(pid)?.ok_or(IdentityError::Gone(pid))?;
        if now.start_time != self.start_time {
            return Err(IdentityError::PidReused {
                pid,
                expected: self.start_time,
                found: now.start_time,
            });
        }
        if let Some(marker) = marker {
            let cmdline = match std::fs::read(format!("/proc/{pid}/cmdline")) {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(IdentityError::Gone(pid))
                }
                Err(e) => return Err(IdentityError::io(format!("reading /proc/{pid}/cmdline"), e)),
            };
            if !names(&cmdline, marker) {
                return Err(IdentityError::NotOurs {
                    pid,
                    marker: marker.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Opens a pidfd on the recorded process and checks it is that process
    /// ([`check`](Self::check)): the pidfd first, the check after, so a process that passes the
    /// check (started at the recorded time) held the pid before the pidfd was opened and the
    /// pidfd is its (the pid cannot have passed to the recorded process after the open).
    pub fn open_checked(&self, marker: Option<&Path>) -> Result<OwnedFd, IdentityError> {
        let pid = self.pid;
        let raw = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or(IdentityError::Gone(pid))?;
        let pidfd = match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Err(IdentityError::Gone(pid)),
            Err(e) => {
                return Err(IdentityError::io(
                    format!("pidfd_open({pid})"),
                    std::io::Error::from(e),
                ))
            }
        };
        self.check(marker)?;
        Ok(pidfd)
    }
}

/// Whether the process behind `pidfd` has exited, waiting up to `timeout` (a pidfd turns
/// readable when its process exits, whoever reaps it).
pub fn pidfd_exited(pidfd: &OwnedFd, timeout: Duration) -> Result<bool, IdentityError> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ts = Timespec {
            tv_sec: left.as_secs() as _,
            tv_nsec: left.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) if Instant::now() < deadline => continue,
            Err(rustix::io::Errno::INTR) => return Ok(false),
            Err(e) => {
                return Err(IdentityError::io(
                    "polling a VM's pidfd",
                    std::io::Error::from(e),
                ))
            }
        }
    }
}

/// Sends `signal` to the process behind `pidfd` (one that is already gone is not an error).
pub fn pidfd_signal(pidfd: &OwnedFd, signal: rustix::process::Signal) -> Result<(), IdentityError> {
    match rustix::process::pidfd_send_signal(pidfd, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(IdentityError::io(
            "signalling a VM through its pidfd",
            std::io::Error::from(e),
        )),
    }
}

/// Whether one of the NUL-separated arguments in `cmdline` contains `marker`'s bytes.
fn names(cmdline: &[u8], marker: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let m = marker.as_os_str().as_bytes();
    !m.is_empty()
        && cmdline
            .split(|b| *b == 0)
            .any(|arg| arg.windows(m.len()).any(|w| w == m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_parentheses_in_the_name() {
        let stat = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 123456 789";
        assert_eq!(
            parse_stat(stat).unwrap(),
            StatFields {
                state: 'S',
                start_time: 987654
            }
        );
        let zombie = "7 (a) Z 1 7 7 0 -1 4 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0";
        assert_eq!(parse_stat(zombie).unwrap().state, 'Z');
        assert_eq!(parse_stat(zombie).unwrap().start_time, 55);
    }

    #[test]
    fn short_or_garbled_stat_lines_are_errors() {
        for bad in [
            "",
            "12 no-parens S 1",
            "12 (a) S 1 2 3",
            "12 (a) S 1 1 1 0 -1 4 0 0 0 0 0 0 0 0 20 0 1 0 soon 0 0",
        ] {
            assert!(parse_stat(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn this_process_has_a_stable_identity() {
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        assert_eq!(ProcessIdentity::of(me.pid).unwrap(), me);
        me.check(None).unwrap();
    }

    #[test]
    fn a_reused_pid_with_another_start_time_is_refused() {
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        let recorded = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        match recorded.check(None) {
            Err(IdentityError::PidReused {
                pid,
                expected,
                found,
            }) => {
                assert_eq!(
                    (pid, expected, found),
                    (me.pid, me.start_time + 1, me.start_time)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_process_without_the_marker_is_not_ours() {
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        let marker = Path::new("/nonexistent/rootfork-test/77.qmp");
        assert!(matches!(
            me.check(Some(marker)),
            Err(IdentityError::NotOurs { .. })
        ));
    }

    #[test]
    fn a_gone_process_is_reported_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let recorded = ProcessIdentity { pid, start_time: 1 };
        assert!(matches!(
            recorded.check(None),
            Err(IdentityError::Gone(p)) if p == pid
        ));
    }

    #[test]
    fn markers_are_found_inside_arguments() {
        let cmdline = b"qemu\0-qmp\0unix:/s/vm/3.qmp,server=on,wait=off\0";
        assert!(names(cmdline, Path::new("/s/vm/3.qmp")));
        assert!(!names(cmdline, Path::new("/s/vm/4.qmp")));
        assert!(!names(cmdline, Path::new("")));
    }
}
