//! Paths inside a jail's chroot, handled through directory file descriptors.
//!
//! The jailer chowns the chroot to the jail user, so a compromised VMM can plant symlinks or
//! swap entries under it while rootfork, as root, makes the drive node there. Every operation
//! below the chroot therefore goes through descriptors, never through a path string:
//!
//! - each directory is opened one component at a time with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` relative to the one before, so a symlinked or
//!   `..` component is refused (`ELOOP`/`EXDEV`) instead of followed out of the jail;
//! - the node is made under a random temporary name (`mknodat`/`linkat`, which fail with
//!   `EEXIST` on anything already there, symlinks included), then opened `O_PATH | O_NOFOLLOW`
//!   and checked to be what was made before it is chowned through that descriptor
//!   (`fchownat(AT_EMPTY_PATH)`): a swap between the two calls cannot redirect the chown;
//! - the rename into place (`renameat`) refuses a symlink planted at the final name, and the
//!   entry is checked again afterwards;
//! - removal is an `unlinkat` in the directory descriptor kept open, which never follows a link.
//!
//! Only the chroot root itself is opened by path (`O_NOFOLLOW`): it and its ancestors belong to
//! the host (the jailer's `--chroot-base-dir`), not to the jail user.

use std::collections::hash_map::RandomState;
use std::ffi::{OsStr, OsString};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, renameat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, mknodat, FileStat, Mode, SFlag};
use nix::unistd::{fchownat, linkat, unlinkat, Gid, Uid, UnlinkatFlags};

/// Why a jail path was refused or an operation under it failed.
#[derive(Debug, thiserror::Error)]
pub enum JailPathError {
    /// A component is a symlink, or resolving it would leave the jail.
    #[error("{path}: a symlink or a path leaving the jail; refused")]
    Escape {
        /// The host path refused.
        path: PathBuf,
    },
    /// The entry changed under us (replaced between two steps).
    #[error("{path}: replaced while it was being made ({what})")]
    Swapped {
        /// The host path.
        path: PathBuf,
        /// What did not match.
        what: &'static str,
    },
    /// A system call failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The host path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// What to put at a name: a block node, or a hard link to a host file.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NodeSource<'a> {
    /// `mknod` a block device node with this device number, mode 0600.
    Block(u64),
    /// Hard-link this host file (same filesystem).
    HardLink(&'a Path),
}

/// An open directory inside a jail, and its host path (for messages only).
#[derive(Debug)]
pub(crate) struct JailDir {
    fd: OwnedFd,
    path: PathBuf,
}

const BENEATH: ResolveFlag = ResolveFlag::RESOLVE_BENEATH
    .union(ResolveFlag::RESOLVE_NO_SYMLINKS)
    .union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

impl JailDir {
    /// Opens the chroot `root` (created if missing; its ancestors belong to the host).
    pub(crate) fn open_root(root: &Path) -> Result<JailDir, JailPathError> {
        std::fs::create_dir_all(root).map_err(|source| JailPathError::Io {
            path: root.to_owned(),
            op: "create the chroot",
            source,
        })?;
        let how = OpenHow::new().flags(OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC);
        let fd = openat2(libc::AT_FDCWD, root, how).map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => JailPathError::Escape {
                path: root.to_owned(),
            },
            e => JailPathError::Io {
                path: root.to_owned(),
                op: "open the chroot",
                source: e.into(),
            },
        })?;
        Ok(JailDir {
            // SAFETY: `openat2` just returned this descriptor; nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: root.to_owned(),
        })
    }

    /// Opens (creating, mode 0755) each directory of the relative path `rel` in turn, refusing
    /// symlinks and anything that would leave the jail.
    pub(crate) fn create_dirs(self, rel: &Path) -> Result<JailDir, JailPathError> {
        let mut dir = self;
        for c in rel.components() {
            let name = match c {
                Component::Normal(n) => n,
                Component::CurDir => continue,
                _ => {
                    return Err(JailPathError::Escape {
                        path: dir.path.join(rel),
                    })
                }
            };
            dir = dir.subdir(name)?;
        }
        Ok(dir)
    }

    fn subdir(&self, name: &OsStr) -> Result<JailDir, JailPathError> {
        let path = self.path.join(name);
        match mkdirat(Some(self.raw()), name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(io_err(&path, "create directory", e)),
        }
        let how = OpenHow::new()
            .flags(OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(BENEATH);
        let fd = openat2(self.raw(), name, how).map_err(|e| match e {
            Errno::ELOOP | Errno::EXDEV | Errno::ENOTDIR => {
                JailPathError::Escape { path: path.clone() }
            }
            e => io_err(&path, "open directory", e),
        })?;
        Ok(JailDir {
            // SAFETY: `openat2` just returned this descriptor; nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path,
        })
    }

    /// The host path of `name` in this directory.
    pub(crate) fn host_path(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Puts `source` at `name`, owned by `uid`/`gid`, atomically replacing a node already there
    /// (never a symlink): made under a random temporary name, verified, chowned, renamed.
    pub(crate) fn place(
        &self,
        name: &OsStr,
        source: NodeSource<'_>,
        uid: u32,
        gid: u32,
    ) -> Result<(), JailPathError> {
        self.place_via(&temp_name(name), name, source, uid, gid)
    }

    /// [`JailDir::place`] with a chosen temporary name.
    pub(crate) fn place_via(
        &self,
        tmp: &OsStr,
        name: &OsStr,
        source: NodeSource<'_>,
        uid: u32,
        gid: u32,
    ) -> Result<(), JailPathError> {
        let tmp_path = self.host_path(tmp);
        let final_path = self.host_path(name);
        // A symlink planted at the final name is refused, not replaced silently.
        if self.entry_kind(name)? == Some(SFlag::S_IFLNK) {
            return Err(JailPathError::Escape { path: final_path });
        }
        let made = self.make(tmp, source, &tmp_path)?;
        let result = (|| {
            // Chown exactly what was made: through an O_PATH descriptor checked to be it.
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(BENEATH);
            let fd = openat2(self.raw(), tmp, how).map_err(|e| match e {
                Errno::ELOOP | Errno::EXDEV => JailPathError::Escape {
                    path: tmp_path.clone(),
                },
                e => io_err(&tmp_path, "open the new node", e),
            })?;
            // SAFETY: `openat2` just returned this descriptor; nothing else owns it.
            let node = unsafe { OwnedFd::from_raw_fd(fd) };
            let st = fstat(node.as_raw_fd()).map_err(|e| io_err(&tmp_path, "fstat", e))?;
            if !same_node(&st, &made) {
                return Err(JailPathError::Swapped {
                    path: tmp_path.clone(),
                    what: "the temporary node",
                });
            }
            fchownat(
                Some(node.as_fd().as_raw_fd()),
                "",
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                AtFlags::AT_EMPTY_PATH,
            )
            .map_err(|e| io_err(&tmp_path, "chown", e))?;
            renameat(Some(self.raw()), tmp, Some(self.raw()), name)
                .map_err(|e| io_err(&final_path, "rename into place", e))?;
            // What is at the final name now must be the node chowned above.
            let now = fstatat(Some(self.raw()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| io_err(&final_path, "stat", e))?;
            if !same_node(&now, &st) {
                return Err(JailPathError::Swapped {
                    path: final_path.clone(),
                    what: "the node renamed into place",
                });
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = unlinkat(Some(self.raw()), tmp, UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    /// Makes `source` at `tmp` (fails on anything already there) and returns its stat.
    fn make(
        &self,
        tmp: &OsStr,
        source: NodeSource<'_>,
        tmp_path: &Path,
    ) -> Result<FileStat, JailPathError> {
        match source {
            NodeSource::Block(rdev) => mknodat(
                Some(self.raw()),
                tmp,
                SFlag::S_IFBLK,
                Mode::from_bits_truncate(0o600),
                rdev,
            )
            .map_err(|e| io_err(tmp_path, "mknod", e))?,
            NodeSource::HardLink(file) => linkat(
                None,
                file,
                Some(self.raw()),
                Path::new(tmp),
                AtFlags::empty(),
            )
            .map_err(|e| io_err(tmp_path, "hard link", e))?,
        }
        fstatat(Some(self.raw()), tmp, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(tmp_path, "stat", e))
    }

    /// The file type at `name` (not following a symlink), `None` when there is nothing.
    fn entry_kind(&self, name: &OsStr) -> Result<Option<SFlag>, JailPathError> {
        match fstatat(Some(self.raw()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(SFlag::from_bits_truncate(
                st.st_mode & SFlag::S_IFMT.bits(),
            ))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(io_err(&self.host_path(name), "stat", e)),
        }
    }

    /// Removes `name` from this directory (never follows a link; a missing entry is fine).
    pub(crate) fn remove(&self, name: &OsStr) {
        let _ = unlinkat(Some(self.raw()), name, UnlinkatFlags::NoRemoveDir);
    }
}

/// Whether two stats name the same node (device, inode, type).
fn same_node(a: &FileStat, b: &FileStat) -> bool {
    a.st_dev == b.st_dev
        && a.st_ino == b.st_ino
        && (a.st_mode & SFlag::S_IFMT.bits()) == (b.st_mode & SFlag::S_IFMT.bits())
}

/// `.<name>.<16 random hex digits>.tmp`: not guessable ahead of time by the jail user.
fn temp_name(name: &OsStr) -> OsString {
    // `RandomState` keys come from the OS's random source; hashing the time into them gives a
    // fresh, unpredictable value per call without another dependency.
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    let mut t = OsString::from(".");
    t.push(name);
    t.push(format!(".{:016x}.tmp", h.finish()));
    t
}

fn io_err(path: &Path, op: &'static str, e: Errno) -> JailPathError {
    JailPathError::Io {
        path: path.to_owned(),
        op,
        source: e.into(),
    }
}

/// The last component of a stable drive path, as bytes-safe `OsStr`.
pub(crate) fn file_name(p: &Path) -> &OsStr {
    p.file_name().unwrap_or(OsStr::from_bytes(b""))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, MetadataExt};

    use super::*;

    #[test]
    fn a_symlink_at_the_temporary_name_fails_the_node_and_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        let disk = dir.path().join("disk");
        std::fs::write(&disk, b"disk").unwrap();
        let root = dir.path().join("root");
        let jail = JailDir::open_root(&root).unwrap();
        symlink(&secret, root.join("guessed.tmp")).unwrap();
        let e = jail
            .place_via(
                OsStr::new("guessed.tmp"),
                OsStr::new("node"),
                NodeSource::HardLink(&disk),
                4321,
                4321,
            )
            .unwrap_err();
        assert!(
            matches!(&e, JailPathError::Io { op: "hard link", source, .. }
                if source.raw_os_error() == Some(libc::EEXIST)),
            "{e}"
        );
        let m = std::fs::metadata(&secret).unwrap();
        assert_eq!((m.uid(), m.nlink()), (0, 1));
        assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
        assert!(!root.join("node").exists());
        // The planted entry is not ours to remove.
        assert!(std::fs::symlink_metadata(root.join("guessed.tmp")).is_ok());
    }

    #[test]
    fn temporary_names_are_hidden_and_differ_every_time() {
        let a = temp_name(OsStr::new("rootfs.ext4"));
        let b = temp_name(OsStr::new("rootfs.ext4"));
        assert_ne!(a, b);
        let a = a.to_string_lossy().into_owned();
        assert!(a.starts_with(".rootfs.ext4.") && a.ends_with(".tmp"), "{a}");
    }

    #[test]
    fn dot_dot_components_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let jail = JailDir::open_root(&dir.path().join("root")).unwrap();
        let e = jail.create_dirs(Path::new("a/../../b")).unwrap_err();
        assert!(matches!(e, JailPathError::Escape { .. }), "{e}");
        assert!(!dir.path().join("b").exists());
    }
}
