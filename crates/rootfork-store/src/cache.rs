//! [`ChunkCache`]: fetched chunks on local disk, bounded by a byte budget, evicted LRU.
//!
//! Each chunk is one file `<build id>.<chunk size>.<index>` in the cache directory, written to a
//! temporary name and renamed into place, so a crash never leaves a partial chunk under a real
//! name. The index (sizes, recency, open descriptors) lives in memory behind one short mutex that
//! is never held across I/O; readers clone the chunk's open descriptor and `pread` outside it,
//! so an eviction that unlinks a file under a reader is harmless.
//!
//! Chunks inserted by this process were verified before insertion. Chunks found on disk at start
//! are indexed as *unverified*: the first reader verifies them against the build's checksums
//! and drops them if they fail (the caller refetches). One process owns a cache directory at a
//! time (an exclusive lock on `<dir>/.lock`).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rootfork_block::layered::BuildId;

use crate::config::CacheConfig;
use crate::stats::FetchStats;

/// Names one chunk of one build's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    /// The build.
    pub build: BuildId,
    /// The fetch chunk size the chunk was cut with.
    pub chunk_size: u64,
    /// Chunk index in the build's data.
    pub index: u64,
}

impl ChunkKey {
    fn file_name(&self) -> String {
        format!("{}.{}.{}", self.build, self.chunk_size, self.index)
    }

    fn parse(name: &str) -> Option<Self> {
        let mut it = name.split('.');
        let build = it.next()?.parse().ok()?;
        let chunk_size = it.next()?.parse().ok()?;
        let index = it.next()?.parse().ok()?;
        it.next().is_none().then_some(ChunkKey {
            build,
            chunk_size,
            index,
        })
    }
}

/// A cached chunk handed to a reader.
#[derive(Debug, Clone)]
pub struct CachedChunk {
    /// The chunk's file, open read-only.
    pub file: Arc<File>,
    /// Its length.
    pub len: u64,
    /// Whether it has been verified since this process started.
    pub verified: bool,
}

struct Entry {
    file: Arc<File>,
    len: u64,
    tick: u64,
    verified: bool,
}

#[derive(Default)]
struct Index {
    entries: HashMap<ChunkKey, Entry>,
    lru: BTreeMap<u64, ChunkKey>,
    tick: u64,
    used: u64,
}

/// The on-disk chunk cache.
pub struct ChunkCache {
    dir: PathBuf,
    budget: u64,
    index: Mutex<Index>,
    stats: Arc<FetchStats>,
    tmp_seq: AtomicU64,
    _lock: File,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.dir)
            .field("budget", &self.budget)
            .field("used", &self.used())
            .finish()
    }
}

impl ChunkCache {
    /// Opens (creating if needed) the cache directory, indexes the chunks already in it and
    /// evicts down to the budget.
    pub fn open(cfg: &CacheConfig, stats: Arc<FetchStats>) -> io::Result<Self> {
        fs::create_dir_all(&cfg.dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(cfg.dir.join(".lock"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "chunk cache {} is in use by another process",
                    cfg.dir.display()
                ),
            )
        })?;
        let cache = ChunkCache {
            dir: cfg.dir.clone(),
            budget: cfg.budget,
            index: Mutex::new(Index::default()),
            stats,
            tmp_seq: AtomicU64::new(0),
            _lock: lock,
        };
        for entry in fs::read_dir(&cfg.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name == ".lock" {
                continue;
            }
            match ChunkKey::parse(&name) {
                Some(key) if entry.file_type()?.is_file() => {
                    let file = File::open(entry.path())?;
                    let len = file.metadata()?.len();
                    let mut idx = cache.index.lock();
                    idx.tick += 1;
                    let tick = idx.tick;
                    idx.used += len;
                    idx.lru.insert(tick, key);
                    idx.entries.insert(
                        key,
                        Entry {
                            file: Arc::new(file),
                            len,
                            tick,
                            verified: false,
                        },
                    );
                }
                _ => {
                    // Temporary files of a crashed process, or foreign files.
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        cache.evict(None);
        Ok(cache)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of chunks held.
    pub fn used(&self) -> u64 {
        self.index.lock().used
    }

    /// Number of chunks held.
    pub fn len(&self) -> usize {
        self.index.lock().entries.len()
    }

    /// Whether the cache holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunk `key`, marking it most recently used.
    pub fn get(&self, key: &ChunkKey) -> Option<CachedChunk> {
        let mut idx = self.index.lock();
        idx.tick += 1;
        let tick = idx.tick;
        let e = idx.entries.get_mut(key)?;
        let old = std::mem::replace(&mut e.tick, tick);
        let out = CachedChunk {
            file: e.file.clone(),
            len: e.len,
            verified: e.verified,
        };
        idx.lru.remove(&old);
        idx.lru.insert(tick, *key);
        Some(out)
    }

    /// Whether `key` is cached (without touching its recency).
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.index.lock().entries.contains_key(key)
    }

    /// Records that `key` passed verification.
    pub fn mark_verified(&self, key: &ChunkKey) {
        if let Some(e) = self.index.lock().entries.get_mut(key) {
            e.verified = true;
        }
    }

    /// Drops `key` (for example after it failed verification).
    pub fn remove(&self, key: &ChunkKey) {
        let removed = {
            let mut idx = self.index.lock();
            let e = idx.entries.remove(key);
            if let Some(e) = &e {
                idx.lru.remove(&e.tick);
                idx.used -= e.len;
            }
            e.is_some()
        };
        if removed {
            let _ = fs::remove_file(self.dir.join(key.file_name()));
        }
    }

    /// Stores a verified chunk and evicts older ones beyond the budget.
    pub fn insert(&self, key: ChunkKey, bytes: &[u8]) -> io::Result<()> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(".tmp-{}-{seq}", key.file_name()));
        let dest = self.dir.join(key.file_name());
        let write = || -> io::Result<File> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            fs::rename(&tmp, &dest)?;
            File::open(&dest)
        };
        let file = match write() {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        {
            let mut idx = self.index.lock();
            idx.tick += 1;
            let tick = idx.tick;
            let len = bytes.len() as u64;
            if let Some(old) = idx.entries.insert(
                key,
                Entry {
                    file: Arc::new(file),
                    len,
                    tick,
                    verified: true,
                },
            ) {
                idx.lru.remove(&old.tick);
                idx.used -= old.len;
            }
            idx.lru.insert(tick, key);
            idx.used += len;
        }
        self.evict(Some(key));
        Ok(())
    }

    /// Evicts least recently used chunks until the budget holds, sparing `keep`.
    fn evict(&self, keep: Option<ChunkKey>) {
        let mut victims = Vec::new();
        {
            let mut idx = self.index.lock();
            while idx.used > self.budget {
                let Some((&tick, &key)) = idx.lru.iter().find(|(_, k)| Some(**k) != keep) else {
                    break;
                };
                idx.lru.remove(&tick);
                if let Some(e) = idx.entries.remove(&key) {
                    idx.used -= e.len;
                }
                victims.push(key);
            }
        }
        for key in victims {
            FetchStats::add(&self.stats.evictions, 1);
            let _ = fs::remove_file(self.dir.join(key.file_name()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    fn key(build: BuildId, index: u64) -> ChunkKey {
        ChunkKey {
            build,
            chunk_size: 4096,
            index,
        }
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(FetchStats::default());
        let cfg = CacheConfig {
            dir: dir.path().join("c"),
            budget: 3 * 4096,
        };
        let b = BuildId::random();
        let c = ChunkCache::open(&cfg, stats.clone()).unwrap();
        for i in 0..3 {
            c.insert(key(b, i), &[i as u8; 4096]).unwrap();
        }
        assert!(c.get(&key(b, 0)).is_some()); // 0 is now the most recent
        c.insert(key(b, 3), &[3; 4096]).unwrap();
        assert!(c.get(&key(b, 1)).is_none(), "LRU chunk evicted");
        assert!(c.get(&key(b, 0)).is_some());
        assert_eq!(c.used(), 3 * 4096);
        assert_eq!(stats.snapshot().evictions, 1);
        assert!(!cfg.dir.join(key(b, 1).file_name()).exists());
        // A second process cannot share the directory.
        assert!(ChunkCache::open(&cfg, stats.clone()).is_err());
        drop(c);
        // Reopening indexes what is on disk as unverified.
        let c = ChunkCache::open(&cfg, stats).unwrap();
        assert_eq!(c.len(), 3);
        let got = c.get(&key(b, 3)).unwrap();
        assert!(!got.verified);
        let mut buf = [0u8; 4];
        got.file.read_exact_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [3; 4]);
        c.remove(&key(b, 3));
        assert!(c.get(&key(b, 3)).is_none());
        assert_eq!(c.used(), 2 * 4096);
    }

    #[test]
    fn stray_files_are_cleaned_at_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".tmp-x"), b"partial").unwrap();
        fs::write(dir.path().join("junk"), b"?").unwrap();
        let cfg = CacheConfig {
            dir: dir.path().to_owned(),
            budget: 1 << 20,
        };
        let c = ChunkCache::open(&cfg, Arc::new(FetchStats::default())).unwrap();
        assert!(c.is_empty());
        assert!(!dir.path().join(".tmp-x").exists());
        assert!(!dir.path().join("junk").exists());
    }
}
