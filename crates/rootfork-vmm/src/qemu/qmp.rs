//! A minimal QMP client (QEMU's JSON monitor protocol over a Unix socket): enough to wait for a
//! paused VM to finish initialising, to let it run, and to hand QEMU a file descriptor
//! ([`Qmp::execute_with_fd`], `SCM_RIGHTS`) for a migration to or from a file.
//!
//! QEMU started with `-S -qmp unix:PATH,server=on,wait=off` has opened its block devices by the
//! time it greets a QMP client, and runs no guest code until `cont`. That window is where
//! [`super::verify`] checks what the process holds open.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::error::QemuError;

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `socket` (retrying while QEMU creates it, up to `timeout`), reads the greeting
    /// and leaves capabilities negotiation mode.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, QemuError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(QemuError::io(
                        format!("connecting to QMP at {}", socket.display()),
                        e,
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| QemuError::io("setting the QMP read timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| QemuError::io("cloning the QMP socket", e))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::Qmp(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Sets how long one reply may take from now on.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), QemuError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|e| QemuError::io("setting the QMP read timeout", e))
    }

    /// Runs `command` (with optional `arguments`) and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QemuError> {
        let line = Self::command_line(command, arguments);
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| QemuError::io(format!("sending QMP {command}"), e))?;
        self.reply(command)
    }

    /// Runs `command` with `fd` attached to it as `SCM_RIGHTS` ancillary data (QEMU's `getfd`
    /// and `add-fd` take the descriptor that arrives with them). The caller keeps its own copy.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QemuError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let line = Self::command_line(command, arguments);
        let fds = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [IoSlice::new(line.as_bytes())];
        let sent = sendmsg::<()>(
            self.writer.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| QemuError::io(format!("sending QMP {command} with a descriptor"), e.into()))?;
        if sent < line.len() {
            // The descriptor went with the first byte; the rest of the line follows.
            self.writer
                .write_all(&line.as_bytes()[sent..])
                .map_err(|e| QemuError::io(format!("sending QMP {command}"), e))?;
        }
        self.reply(command)
    }

    fn command_line(command: &str, arguments: Option<Value>) -> String {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        line
    }

    /// Reads until the reply to `command` (events in between are skipped).
    fn reply(&mut self, command: &str) -> Result<Value, QemuError> {
        loop {
            let m = self.read_message()?;
            if m.get("event").is_some() {
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QemuError::Qmp(format!("{command}: {e}")));
            }
            return Err(QemuError::Qmp(format!("{command}: unexpected reply {m}")));
        }
    }

    fn read_message(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| QemuError::io("reading from QMP", e))?;
        if n == 0 {
            return Err(QemuError::Qmp("QEMU closed the QMP connection".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| QemuError::Qmp(format!("bad QMP message {line:?}: {e}")))
    }
}
