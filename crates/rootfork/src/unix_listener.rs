//! Unix sockets that nobody else can connect to, not even for a moment: the socket is bound,
//! given its final mode, and only then listens (binding and listening in one step, as
//! `tokio::net::UnixListener::bind` does, leaves a window in which the socket has the umask's
//! mode and accepts connections).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

/// Binds `path` with `mode`, then listens; the listener is non-blocking, for Tokio.
pub fn bind_with_mode(path: &Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    bind(fd.as_raw_fd(), &addr)?;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN))?;
    tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn the_socket_has_its_mode_and_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.sock");
        let l = bind_with_mode(&p, 0o600).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let c = tokio::net::UnixStream::connect(&p);
        let (a, b) = tokio::join!(l.accept(), c);
        a.unwrap();
        b.unwrap();
    }

    #[tokio::test]
    async fn an_existing_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("taken");
        std::fs::write(&p, b"x").unwrap();
        assert!(bind_with_mode(&p, 0o600).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
    }
}
