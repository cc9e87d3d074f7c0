//! Host-wide claims: one lock file per slot (`<dir>/nbdN.lock`) held with an exclusive `flock`
//! for as long as the slot is claimed. The kernel drops the lock when its holder dies, so a crashed
//! daemon can never keep a slot claimed, and a free lock is the proof that the owner is gone. The
//! file also carries a small JSON record (which instance claimed it, when, which cache file, the
//! device's `dead_conn_timeout`) so that `list` and reclaim see other processes' claims.
//!
//! The directory must be this user's and not writable by others ([`PrivateDir`]); lock files are
//! opened relative to it with `O_NOFOLLOW` and must be regular files of this user with one link,
//! so a planted symlink or hard link is refused instead of written through.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{openat, Flock, FlockArg, OFlag};
use nix::sys::stat::{fstat, Mode, SFlag};

use super::private_dir::{DirError, PrivateDir};
use crate::identity::device_name;

/// What a lock file says about its slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockRecord {
    /// `claimed` while held, `released` after an orderly release.
    pub state: RecordState,
    /// The process that wrote the record (informative only: pids are per namespace).
    pub pid: u32,
    /// The sandbox it was claimed for.
    pub sandbox: String,
    /// When the state began, in milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// The overlay cache file of the attachment, removed by reclaim if the owner died.
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// The rootfork instance that wrote the record (the one in the device's backend identifier).
    #[serde(default)]
    pub instance: Option<String>,
    /// The device's `dead_conn_timeout` in milliseconds (`None`: the kernel fails I/O as soon as
    /// every connection is dead).
    #[serde(default)]
    pub dead_conn_timeout_ms: Option<u64>,
    /// When a reclaim first found the claim's lock free (its owner gone), in milliseconds since
    /// the Unix epoch. Another instance may disconnect the device once `dead_conn_timeout` has
    /// passed since then.
    #[serde(default)]
    pub orphaned_since_ms: Option<u64>,
}

impl LockRecord {
    /// A record of state `state` for `sandbox`, written now by this process.
    pub fn now(state: RecordState, sandbox: &str) -> Self {
        LockRecord {
            state,
            pid: std::process::id(),
            sandbox: sandbox.to_owned(),
            since_ms: now_ms(),
            cache: None,
            instance: None,
            dead_conn_timeout_ms: None,
            orphaned_since_ms: None,
        }
    }
}

/// The state a lock record names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Claimed by `pid` (if the lock is free anyway, the owner died).
    Claimed,
    /// Released in order at `since_ms`.
    Released,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Errors taking or reading a slot's lock file.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock directory is not trusted or cannot be opened.
    #[error(transparent)]
    Dir(#[from] DirError),
    /// The lock file is a symlink, not a regular file, another user's or has other links.
    #[error("refusing lock file {path}: {why}")]
    Untrusted {
        /// The file.
        path: PathBuf,
        /// Why.
        why: &'static str,
    },
    /// Opening, locking, reading or writing it failed.
    #[error("lock file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl LockError {
    /// The errno for metrics and the wire.
    pub fn errno(&self) -> i32 {
        match self {
            LockError::Dir(d) => d.errno(),
            LockError::Untrusted { .. } => libc::EPERM,
            LockError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// The lock directory.
#[derive(Debug, Clone)]
pub struct LockDir {
    dir: PathBuf,
}

/// A held claim on one slot; dropping it releases the `flock`.
#[derive(Debug)]
pub struct SlotLock {
    file: Flock<File>,
}

impl LockDir {
    /// Lock files in `dir` (created `0700` on first use; see [`PrivateDir`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LockDir { dir: dir.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory if needed and checks that it can be trusted.
    pub fn check(&self) -> Result<(), LockError> {
        PrivateDir::open(&self.dir)?;
        Ok(())
    }

    fn file_name(index: u32) -> String {
        format!("{}.lock", device_name(index))
    }

    /// Opens the lock file of `index` in the checked directory, never through a symlink.
    fn open(&self, index: u32, create: bool) -> Result<Option<File>, LockError> {
        let dir = PrivateDir::open(&self.dir)?;
        let name = Self::file_name(index);
        let path = self.dir.join(&name);
        let mut flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
        if create {
            flags |= OFlag::O_CREAT;
        }
        let raw = match openat(
            Some(dir.fd().as_raw_fd()),
            name.as_str(),
            flags,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(raw) => raw,
            Err(Errno::ENOENT) if !create => return Ok(None),
            Err(Errno::ELOOP) => {
                return Err(LockError::Untrusted {
                    path,
                    why: "it is a symbolic link",
                })
            }
            Err(e) => {
                return Err(LockError::Io {
                    path,
                    source: e.into(),
                })
            }
        };
        // SAFETY: `openat` returned a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        let st = fstat(file.as_raw_fd()).map_err(|e| LockError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        let why = if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            Some("it is not a regular file")
        } else if st.st_uid != nix::unistd::geteuid().as_raw() {
            Some("another user owns it")
        } else if st.st_nlink != 1 {
            Some("it has other hard links")
        } else {
            None
        };
        match why {
            Some(why) => Err(LockError::Untrusted { path, why }),
            None => Ok(Some(file)),
        }
    }

    /// Takes the claim on `index` without waiting; `None` if another holder has it.
    pub fn try_lock(&self, index: u32) -> Result<Option<SlotLock>, LockError> {
        let path = || self.dir.join(Self::file_name(index));
        let file = self.open(index, true)?.ok_or_else(|| LockError::Io {
            path: path(),
            source: io::ErrorKind::NotFound.into(),
        })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => Ok(Some(SlotLock { file })),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(LockError::Io {
                path: path(),
                source: e.into(),
            }),
        }
    }

    /// Reads the record of `index` without locking (a torn, missing or untrusted record is
    /// `None`).
    pub fn read(&self, index: u32) -> Option<LockRecord> {
        let mut f = self.open(index, false).ok()??;
        let mut s = String::new();
        f.read_to_string(&mut s).ok()?;
        serde_json::from_str(s.trim()).ok()
    }
}

impl SlotLock {
    /// Replaces the record.
    pub fn write(&mut self, rec: &LockRecord) -> io::Result<()> {
        let json = serde_json::to_string(rec).map_err(io::Error::other)?;
        let f: &mut File = &mut self.file;
        f.set_len(0)?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(json.as_bytes())?;
        f.write_all(b"\n")
    }

    /// Reads the record (written by a previous holder, or by this one).
    pub fn read(&mut self) -> Option<LockRecord> {
        let f: &mut File = &mut self.file;
        f.seek(SeekFrom::Start(0)).ok()?;
        let mut s = String::new();
        f.read_to_string(&mut s).ok()?;
        serde_json::from_str(s.trim()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_excludes_other_holders_until_dropped() {
        let t = tempfile::tempdir().unwrap();
        let d = LockDir::new(t.path().join("locks"));
        let mut a = d.try_lock(3).unwrap().expect("free");
        // A second open file description (as another daemon would have) cannot take it.
        assert!(d.try_lock(3).unwrap().is_none());
        assert!(d.try_lock(4).unwrap().is_some());
        let rec = LockRecord {
            cache: Some("/c".into()),
            instance: Some("i".into()),
            ..LockRecord::now(RecordState::Claimed, "s")
        };
        a.write(&rec).unwrap();
        assert_eq!(d.read(3), Some(rec.clone()));
        assert_eq!(a.read(), Some(rec));
        drop(a);
        assert!(d.try_lock(3).unwrap().is_some());
    }

    #[test]
    fn a_claim_by_another_process_blocks_until_it_dies() {
        let t = tempfile::tempdir().unwrap();
        let d = LockDir::new(t.path());
        drop(d.try_lock(0).unwrap()); // create the directory and the file
                                      // util-linux flock(1) takes the same kind of lock another daemon would.
        let mut child = std::process::Command::new("flock")
            .args(["-x", "--no-fork"])
            .arg(t.path().join("nbd0.lock"))
            .args(["sleep", "30"])
            .spawn()
            .expect("flock(1)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while d.try_lock(0).unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "child never took the lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // With --no-fork the holder is the process we killed; the kernel drops its lock.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while d.try_lock(0).unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "lock never released");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn planted_symlinks_and_links_are_refused_and_their_targets_unchanged() {
        let t = tempfile::tempdir().unwrap();
        let locks = t.path().join("locks");
        let d = LockDir::new(&locks);
        d.check().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, locks.join("nbd0.lock")).unwrap();
        let err = d.try_lock(0).unwrap_err();
        assert!(
            matches!(&err, LockError::Untrusted { why, .. } if why.contains("symbolic")),
            "{err:?}"
        );
        assert_eq!(d.read(0), None);
        std::fs::hard_link(&victim, locks.join("nbd1.lock")).unwrap();
        let err = d.try_lock(1).unwrap_err();
        assert!(
            matches!(&err, LockError::Untrusted { why, .. } if why.contains("hard links")),
            "{err:?}"
        );
        std::fs::create_dir(locks.join("nbd2.lock")).unwrap();
        assert!(d.try_lock(2).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n");
        // The other slots still work.
        assert!(d.try_lock(3).unwrap().is_some());
    }

    #[test]
    fn a_shared_lock_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let locks = t.path().join("locks");
        std::fs::create_dir(&locks).unwrap();
        std::fs::set_permissions(&locks, std::fs::Permissions::from_mode(0o777)).unwrap();
        let d = LockDir::new(&locks);
        assert!(matches!(
            d.check(),
            Err(LockError::Dir(DirError::Untrusted { .. }))
        ));
        assert!(d.try_lock(0).is_err());
        assert!(!locks.join("nbd0.lock").exists());
        let target = t.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = t.path().join("linked");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(LockDir::new(&link).try_lock(0).is_err());
        assert!(!target.join("nbd0.lock").exists());
    }
}
