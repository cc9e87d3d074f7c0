//! The socket provider's liveness probe: connect to the export's NBD socket, read the server's
//! newstyle greeting (`NBDMAGIC` `IHAVEOPT`), send `NBD_OPT_ABORT` and hang up, all within a
//! bound, so a dead or wedged accept/handshake thread is caught.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nobody accepts on the socket.
    #[error("connecting to {}: {source}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The probe could not bound its own I/O.
    #[error("{0}")]
    Setup(std::io::Error),
    /// The server did not greet in time.
    #[error("no NBD greeting on {} within {timeout:?}: {source}", .path.display())]
    NoGreeting {
        /// The socket.
        path: PathBuf,
        /// The bound.
        timeout: Duration,
        /// Why.
        source: std::io::Error,
    },
    /// Something else answers on the socket.
    #[error("{} answered with something that is not an NBD greeting", .0.display())]
    NotNbd(PathBuf),
    /// The abort could not be sent.
    #[error("writing to {}: {source}", .path.display())]
    Write {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl ProbeError {
    /// Whether the server closed the connection before its greeting (end-of-file or a reset),
    /// which is how an NBD server refuses a connection past a limit.
    pub fn is_closed_at_once(&self) -> bool {
        matches!(
            self,
            ProbeError::NoGreeting { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                )
        )
    }
}

/// Probes an NBD Unix socket's newstyle handshake within `timeout` per step.
pub fn probe_nbd_socket(path: &Path, timeout: Duration) -> Result<(), ProbeError> {
    let mut s = UnixStream::connect(path).map_err(|source| ProbeError::Connect {
        path: path.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(ProbeError::Setup)?;
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet)
        .map_err(|source| ProbeError::NoGreeting {
            path: path.to_owned(),
            timeout,
            source,
        })?;
    if &greet[..8] != b"NBDMAGIC" || &greet[8..16] != b"IHAVEOPT" {
        return Err(ProbeError::NotNbd(path.to_owned()));
    }
    // Client flags (FIXED_NEWSTYLE | NO_ZEROES), then NBD_OPT_ABORT with no data.
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&3u32.to_be_bytes());
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&2u32.to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&msg).map_err(|source| ProbeError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_socket_nobody_listens_on_fails_to_connect() {
        let dir = tempfile::tempdir().unwrap();
        let e = probe_nbd_socket(&dir.path().join("none.sock"), Duration::from_millis(100));
        assert!(matches!(e, Err(ProbeError::Connect { .. })), "{e:?}");
    }

    #[test]
    fn a_connection_closed_at_once_is_told_from_a_silent_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            drop(l.accept().unwrap()); // closed at once, as at a connection limit
            let (_silent, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        let e = probe_nbd_socket(&path, Duration::from_millis(1000)).unwrap_err();
        assert!(e.is_closed_at_once(), "{e:?}");
        let e = probe_nbd_socket(&path, Duration::from_millis(100)).unwrap_err();
        assert!(!e.is_closed_at_once(), "{e:?}");
        t.join().unwrap();
    }

    #[test]
    fn a_silent_server_and_a_wrong_greeting_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (_silent, _) = l.accept().unwrap();
            let (mut wrong, _) = l.accept().unwrap();
            wrong.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        let e = probe_nbd_socket(&path, Duration::from_millis(100));
        assert!(matches!(e, Err(ProbeError::NoGreeting { .. })), "{e:?}");
        let e = probe_nbd_socket(&path, Duration::from_millis(1000));
        assert!(matches!(e, Err(ProbeError::NotNbd(_))), "{e:?}");
        t.join().unwrap();
    }
}
