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

#[cfg(test)]
mod tests {
    use std::io::{IoSliceMut, Read};
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixListener;

    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

    use super::*;

    /// A stand-in QEMU monitor: greets, accepts `qmp_capabilities`, then receives one command
    /// with a descriptor and answers with the received descriptor's inode.
    fn monitor(listener: UnixListener) -> std::thread::JoinHandle<(String, u64)> {
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("qmp_capabilities"));
            s.write_all(b"{\"event\": \"RESUME\"}\n{\"return\": {}}\n")
                .unwrap();
            let mut data = [0u8; 256];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let (len, fd) = {
                let mut iov = [IoSliceMut::new(&mut data)];
                let msg =
                    recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
                        .unwrap();
                let fd = msg
                    .cmsgs()
                    .unwrap()
                    .find_map(|c| match c {
                        ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                        _ => None,
                    })
                    .expect("a descriptor came with the command");
                (msg.bytes, fd)
            };
            // SAFETY: `fd` was just received with SCM_RIGHTS and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let ino = std::fs::File::from(fd).metadata().unwrap().ino();
            s.write_all(format!("{{\"return\": {{\"ino\": {ino}}}}}\n").as_bytes())
                .unwrap();
            (String::from_utf8_lossy(&data[..len]).into_owned(), ino)
        })
    }

    #[test]
    fn a_descriptor_travels_with_its_command() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = monitor(UnixListener::bind(&sock).unwrap());
        let mut qmp = Qmp::connect(&sock, Duration::from_secs(10)).unwrap();
        let file = std::fs::File::create(dir.path().join("state")).unwrap();
        let ret = qmp
            .execute_with_fd("getfd", Some(json!({ "fdname": "x" })), file.as_fd())
            .unwrap();
        let (line, ino) = server.join().unwrap();
        assert_eq!(ino, file.metadata().unwrap().ino());
        assert_eq!(ret["ino"], ino);
        assert_eq!(
            serde_json::from_str::<Value>(line.trim()).unwrap(),
            json!({ "execute": "getfd", "arguments": { "fdname": "x" } })
        );
    }

    #[test]
    fn errors_are_reported_with_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {}}\n").unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"{\"return\": {}}\n").unwrap();
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n")
                .unwrap();
        });
        let mut qmp = Qmp::connect(&sock, Duration::from_secs(10)).unwrap();
        let e = qmp.execute("migrate", None).unwrap_err();
        assert!(
            matches!(&e, QemuError::Qmp(m) if m.starts_with("migrate: ")),
            "{e}"
        );
        server.join().unwrap();
    }
}
