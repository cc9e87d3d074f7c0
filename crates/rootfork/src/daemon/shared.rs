//! Files several sandboxes use: a fork reads its parent's paused diff as a lower layer of its own
//! overlay, so the diff outlives whichever of them is deleted first. [`SharedFiles`] counts the
//! users of such a file by sandbox id; the count is never stored on its own: at start it is
//! rebuilt from the sandbox records, each of which names the diff and VM state files it uses
//! (`paused`, `vm_state`), so it cannot drift from what is on disk.
//!
//! A file nobody [`share`](SharedFiles::share)d has one user, its sandbox: releasing it says
//! "remove". Removal is always the caller's: a sandbox drops a file from its own list and removes
//! it only when [`release`](SharedFiles::release) says it was the last user.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The users of shared files, by path.
#[derive(Debug, Default)]
pub struct SharedFiles(parking_lot::Mutex<BTreeMap<PathBuf, BTreeSet<String>>>);

impl SharedFiles {
    /// Notes that sandbox `user` uses `path` (at start, from its record).
    pub fn add(&self, path: &Path, user: &str) {
        self.0
            .lock()
            .entry(path.to_owned())
            .or_default()
            .insert(user.to_owned());
    }

    /// Notes that `user` now uses `path` too, besides `owner`.
    pub fn share(&self, path: &Path, owner: &str, user: &str) {
        let mut m = self.0.lock();
        let users = m.entry(path.to_owned()).or_default();
        users.insert(owner.to_owned());
        users.insert(user.to_owned());
    }

    /// `user` is done with `path`: `true` when nobody else uses it (the caller removes it).
    pub fn release(&self, path: &Path, user: &str) -> bool {
        let mut m = self.0.lock();
        let Some(users) = m.get_mut(path) else {
            return true;
        };
        users.remove(user);
        if users.is_empty() {
            m.remove(path);
            true
        } else {
            false
        }
    }

    /// The sandboxes that use `path` (empty when it was never shared or noted).
    pub fn users(&self, path: &Path) -> Vec<String> {
        self.0
            .lock()
            .get(path)
            .map(|u| u.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Removes `path` when `user` was its last user; a missing file is fine.
pub fn release_and_remove(shared: &SharedFiles, path: &Path, user: &str) {
    if !shared.release(path, user) {
        tracing::debug!(file = %path.display(), sandbox = user, "kept a file other sandboxes use");
        return;
    }
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(file = %path.display(), "removing a sandbox file: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_goes_with_its_last_user_whatever_the_order() {
        let s = SharedFiles::default();
        let p = Path::new("/s/paused/a.1.diff");
        // Never shared: its one user may remove it.
        assert!(s.release(p, "a"));
        s.share(p, "a", "a-fork-0");
        s.share(p, "a", "a-fork-1");
        assert_eq!(s.users(p), ["a", "a-fork-0", "a-fork-1"]);
        assert!(
            !s.release(p, "a"),
            "the parent goes first: the forks keep it"
        );
        assert!(!s.release(p, "a-fork-1"));
        // A user releasing twice does not count for another.
        assert!(!s.release(p, "a-fork-1"));
        assert!(s.release(p, "a-fork-0"));
        assert!(s.users(p).is_empty());
    }

    #[test]
    fn users_noted_from_records_count_like_shared_ones() {
        let s = SharedFiles::default();
        let p = Path::new("/s/paused/a.1.diff");
        s.add(p, "a-fork-0");
        s.add(p, "a");
        assert!(!s.release(p, "a-fork-0"));
        assert!(s.release(p, "a"));
    }

    #[test]
    fn release_and_remove_keeps_a_file_in_use_and_removes_it_after() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.1.diff");
        std::fs::write(&p, b"x").unwrap();
        let s = SharedFiles::default();
        s.share(&p, "a", "b");
        release_and_remove(&s, &p, "a");
        assert!(p.exists());
        release_and_remove(&s, &p, "b");
        assert!(!p.exists());
        // Gone already: no complaint.
        release_and_remove(&s, &p, "b");
    }
}
