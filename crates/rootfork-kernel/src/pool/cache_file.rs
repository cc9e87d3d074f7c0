//! Removing a dead claim's overlay cache file, and nothing else.
//!
//! The path comes from a lock record, which a process of this user wrote but which names any
//! path it likes. It is removed only when it is directly inside the cache directory this pool was
//! given (checked like the lock directory: this user's, not writable by others), and, seen through
//! that directory's descriptor without following symlinks, is a regular file owned by this user.
//! The unlink is relative to the same descriptor, so nothing can swap the name in between (nobody
//! else may write to the directory).

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::AtFlags;
use nix::sys::stat::{fstatat, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::private_dir::{DirError, PrivateDir};

/// Why a recorded cache file was left alone.
#[derive(Debug, thiserror::Error)]
pub enum CacheRemoveError {
    /// The pool has no cache directory, so it removes no cache files.
    #[error("no cache directory is configured; {0} left alone")]
    NoCacheDir(PathBuf),
    /// The path is not a plain name directly inside the cache directory.
    #[error("{path} is not directly inside the cache directory {dir}; left alone")]
    Outside {
        /// The recorded path.
        path: PathBuf,
        /// The cache directory.
        dir: PathBuf,
    },
    /// The cache directory is not trusted.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// The name is a symlink, not a regular file or another user's.
    #[error("{path}: {why}; left alone")]
    NotOurs {
        /// The recorded path.
        path: PathBuf,
        /// Why.
        why: &'static str,
    },
    /// Inspecting or unlinking it failed.
    #[error("removing {path}")]
    Io {
        /// The recorded path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Removes `path` if it is a cache file of `dir` (see the module docs). `Ok(false)`: it did not
/// exist.
pub fn remove_cache_file(dir: Option<&Path>, path: &Path) -> Result<bool, CacheRemoveError> {
    let Some(dir) = dir else {
        return Err(CacheRemoveError::NoCacheDir(path.to_owned()));
    };
    let outside = || CacheRemoveError::Outside {
        path: path.to_owned(),
        dir: dir.to_owned(),
    };
    let name = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if same_dir(parent, dir) && plain(name) => name,
        _ => return Err(outside()),
    };
    let d = PrivateDir::open(dir)?;
    let io_err = |e: nix::errno::Errno| CacheRemoveError::Io {
        path: path.to_owned(),
        source: e.into(),
    };
    let st = match fstatat(Some(d.fd().as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return Ok(false),
        Err(e) => return Err(io_err(e)),
    };
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    let why = if kind == SFlag::S_IFLNK {
        Some("it is a symbolic link")
    } else if kind != SFlag::S_IFREG {
        Some("it is not a regular file")
    } else if st.st_uid != nix::unistd::geteuid().as_raw() {
        Some("another user owns it")
    } else {
        None
    };
    if let Some(why) = why {
        return Err(CacheRemoveError::NotOurs {
            path: path.to_owned(),
            why,
        });
    }
    match unlinkat(Some(d.fd().as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ENOENT) => Ok(false),
        Err(e) => Err(io_err(e)),
    }
}

/// `a` and `b` name the same directory lexically (no `..`, trailing slashes and `.` ignored).
fn same_dir(a: &Path, b: &Path) -> bool {
    matches!((normal(a), normal(b)), (Some(x), Some(y)) if x == y)
}

/// `p`'s components without `.`; `None` if it has `..`.
fn normal(p: &Path) -> Option<Vec<Component<'_>>> {
    let mut v = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => return None,
            c => v.push(c),
        }
    }
    Some(v)
}

fn plain(name: &OsStr) -> bool {
    name != "." && name != ".." && !name.is_empty()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn cache_dir() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("cache");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        (t, d)
    }

    #[test]
    fn removes_a_cache_file_of_its_directory() {
        let (_t, d) = cache_dir();
        let f = d.join("a.cache");
        std::fs::write(&f, b"x").unwrap();
        assert!(remove_cache_file(Some(&d), &f).unwrap());
        assert!(!f.exists());
        assert!(!remove_cache_file(Some(&d), &f).unwrap());
        // Equivalent spellings of the directory.
        std::fs::write(&f, b"x").unwrap();
        assert!(remove_cache_file(Some(&d), &d.join(".").join("a.cache")).unwrap());
    }

    #[test]
    fn leaves_everything_else_alone() {
        let (t, d) = cache_dir();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // Outside the directory, directly or through `..`.
        assert!(matches!(
            remove_cache_file(Some(&d), &victim),
            Err(CacheRemoveError::Outside { .. })
        ));
        assert!(matches!(
            remove_cache_file(Some(&d), &d.join("../victim")),
            Err(CacheRemoveError::Outside { .. })
        ));
        // A symlink inside the directory to the victim.
        let link = d.join("link.cache");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(matches!(
            remove_cache_file(Some(&d), &link),
            Err(CacheRemoveError::NotOurs { .. })
        ));
        assert!(link.symlink_metadata().is_ok());
        // A directory.
        std::fs::create_dir(d.join("sub")).unwrap();
        assert!(remove_cache_file(Some(&d), &d.join("sub")).is_err());
        // No cache directory configured.
        assert!(matches!(
            remove_cache_file(None, &d.join("sub")),
            Err(CacheRemoveError::NoCacheDir(_))
        ));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
