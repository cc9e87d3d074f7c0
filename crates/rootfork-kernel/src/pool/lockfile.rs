//! Host-wide claims: one lock file per slot (`<dir>/nbdN.lock`) held with an exclusive `flock`
//! for as long as the slot is claimed. The kernel drops the lock when its holder dies, so a crashed
//! daemon can never keep a slot claimed. The file also carries a small JSON record (who claimed
//! it, when, which cache file) so that `list` and reclaim see other processes' claims.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::identity::device_name;

/// What a lock file says about its slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockRecord {
    /// `claimed` while held, `released` after an orderly release.
    pub state: RecordState,
    /// The process that wrote the record.
    pub pid: u32,
    /// The sandbox it was claimed for.
    pub sandbox: String,
    /// When the state began, in milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// The overlay cache file of the attachment, removed by reclaim if the owner died.
    #[serde(default)]
    pub cache: Option<PathBuf>,
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
    /// Lock files in `dir` (created 0700 on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LockDir { dir: dir.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, index: u32) -> PathBuf {
        self.dir.join(format!("{}.lock", device_name(index)))
    }

    /// Takes the claim on `index` without waiting; `None` if another holder has it.
    pub fn try_lock(&self, index: u32) -> io::Result<Option<SlotLock>> {
        if !self.dir.is_dir() {
            fs::create_dir_all(&self.dir)?;
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(self.file(index))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => Ok(Some(SlotLock { file })),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(e.into()),
        }
    }

    /// Reads the record of `index` without locking (a torn or missing record is `None`).
    pub fn read(&self, index: u32) -> Option<LockRecord> {
        let s = fs::read_to_string(self.file(index)).ok()?;
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
            state: RecordState::Claimed,
            pid: 1,
            sandbox: "s".into(),
            since_ms: 5,
            cache: Some("/c".into()),
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
}
