//! Directories rootfork keeps host-wide state in (the slot lock directory, the attach cache
//! directory) must belong to this process's user and be writable by nobody else; otherwise another
//! user could plant a symlink or a forged record in them and make a root process write or delete
//! any file. [`PrivateDir::open`] creates a missing directory `0700`, opens it without following a
//! symlink in its last component, and checks owner and mode on the open descriptor; files inside
//! are then reached relative to that descriptor, never through the path again.

use std::fs::DirBuilder;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{fstat, SFlag};
use nix::unistd::geteuid;

/// Why a directory is not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    /// The path's last component is a symbolic link.
    #[error("it is a symbolic link")]
    Symlink,
    /// It is not a directory.
    #[error("it is not a directory")]
    NotDirectory,
    /// Another user owns it.
    #[error("it is owned by uid {owner}, not by this process's uid {me}")]
    Owner {
        /// The owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Group or others may write to it.
    #[error("its mode {mode:04o} lets group or others write to it")]
    Writable {
        /// The permission bits.
        mode: u32,
    },
}

/// Errors opening a private directory.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The directory exists but is not safe to use.
    #[error("refusing directory {path}: {why} (it must be this user's and not group/other-writable; fix it with chown/chmod or choose another directory)")]
    Untrusted {
        /// The directory.
        path: PathBuf,
        /// Why.
        why: Untrusted,
    },
    /// Creating, opening or inspecting it failed.
    #[error("opening directory {path}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl DirError {
    /// The errno for metrics and the wire.
    pub fn errno(&self) -> i32 {
        match self {
            DirError::Untrusted { .. } => libc::EPERM,
            DirError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// An open, checked directory.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl PrivateDir {
    /// Creates `path` (`0700`, with missing parents) if it does not exist, opens it without
    /// following a final symlink, and checks that this user owns it and nobody else may write.
    pub fn open(path: &Path) -> Result<PrivateDir, DirError> {
        let io_err = |source: io::Error| DirError::Io {
            path: path.to_owned(),
            source,
        };
        let untrusted = |why| DirError::Untrusted {
            path: path.to_owned(),
            why,
        };
        match std::fs::symlink_metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match DirBuilder::new().recursive(true).mode(0o700).create(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err(e)),
                }
            }
            Err(e) => return Err(io_err(e)),
        }
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path);
        let fd = match opened {
            Ok(f) => OwnedFd::from(f),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(untrusted(Untrusted::Symlink))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                let link =
                    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
                return Err(untrusted(if link {
                    Untrusted::Symlink
                } else {
                    Untrusted::NotDirectory
                }));
            }
            Err(e) => return Err(io_err(e)),
        };
        let st = fstat(fd.as_raw_fd()).map_err(|e| io_err(e.into()))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
            return Err(untrusted(Untrusted::NotDirectory));
        }
        let me = geteuid().as_raw();
        if st.st_uid != me {
            return Err(untrusted(Untrusted::Owner {
                owner: st.st_uid,
                me,
            }));
        }
        let mode = st.st_mode & 0o7777;
        if mode & 0o022 != 0 {
            return Err(untrusted(Untrusted::Writable { mode }));
        }
        Ok(PrivateDir {
            path: path.to_owned(),
            fd,
        })
    }

    /// The directory's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open directory.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_missing_directory_is_made_private() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a/b");
        PrivateDir::open(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Opening it again is fine.
        PrivateDir::open(&p).unwrap();
    }

    #[test]
    fn symlinks_files_and_shared_directories_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let why = |p: &Path| match PrivateDir::open(p) {
            Err(DirError::Untrusted { why, .. }) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(why(&link), Untrusted::Symlink);
        let file = t.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(why(&file), Untrusted::NotDirectory);
        for mode in [0o777, 0o1777, 0o770, 0o702] {
            std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(why(&real), Untrusted::Writable { mode }, "{mode:o}");
        }
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
        PrivateDir::open(&real).unwrap();
        let msg = PrivateDir::open(&link).unwrap_err().to_string();
        assert!(
            msg.contains("symbolic link") && msg.contains("link"),
            "{msg}"
        );
    }
}
