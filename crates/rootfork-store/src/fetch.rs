//! The lazy fetcher: cache lookup, single-flight fetches, retries with backoff under a deadline,
//! and checksum verification before anything is cached or served.
//!
//! A read that misses the cache either becomes the *leader* for that chunk — it runs the fetch
//! on the store's runtime, verifies it, inserts it into the cache and publishes the outcome — or
//! finds a fetch in flight and waits for the leader's outcome. Either way one chunk is fetched
//! once however many readers want it. Failures (not found, timeout, transport errors, checksum
//! mismatches) are published to the waiters of that one flight and never cached: the next read
//! starts a new fetch.
//!
//! Chunks can also be fetched *ahead* of demand ([`Fetcher::fill`], used by prefetch and
//! readahead): such a fetch takes the same single-flight slot, so a demand read arriving while it
//! runs waits for it instead of fetching again, and a demand read that finds it (in the cache or
//! in flight) counts as a prefetch or readahead hit.

use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use tokio::time::Instant;

use crate::bridge::Bridge;
use crate::cache::{CachedChunk, ChunkCache, ChunkKey};
use crate::config::FetchPolicy;
use crate::error::FetchError;
use crate::source::{ObjectSource, SourceError};
use crate::stats::FetchStats;

/// Checksums covering one fetched range: CRC-32C of every `sub`-byte piece, in order.
#[derive(Debug, Clone)]
pub struct Verify {
    /// All checksums of the object.
    pub crcs: Arc<[u32]>,
    /// Bytes per checksum.
    pub sub: u64,
}

impl Verify {
    /// Checks `bytes`, which start at object offset `start` (a multiple of `sub`). Returns the
    /// object offset of the first failing piece.
    pub fn check(&self, start: u64, bytes: &[u8]) -> Result<(), u64> {
        for (i, piece) in bytes.chunks(self.sub as usize).enumerate() {
            let at = start + i as u64 * self.sub;
            let want = self.crcs.get((at / self.sub) as usize).copied();
            if want != Some(crc32c::crc32c(piece)) {
                return Err(at);
            }
        }
        Ok(())
    }
}

/// A chunk's bytes, either in the cache file or in memory.
#[derive(Debug, Clone)]
pub enum ChunkData {
    /// In the cache.
    Cached(CachedChunk),
    /// In memory (just fetched, or verified from the cache).
    Memory(Bytes),
}

impl ChunkData {
    /// Copies `buf.len()` bytes at `offset` within the chunk.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            ChunkData::Cached(c) => c.file.read_exact_at(buf, offset),
            ChunkData::Memory(b) => {
                let start = offset as usize;
                let src = b
                    .get(start..start + buf.len())
                    .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EIO))?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }
}

/// One fetch in flight and its outcome.
#[derive(Default)]
struct Flight {
    outcome: Mutex<Option<Result<Bytes, FetchError>>>,
    done: Condvar,
}

impl Flight {
    fn publish(&self, r: Result<Bytes, FetchError>) {
        *self.outcome.lock() = Some(r);
        self.done.notify_all();
    }

    /// The leader's outcome, or `None` if `deadline` passes first.
    fn wait_until(&self, deadline: std::time::Instant) -> Option<Result<Bytes, FetchError>> {
        let mut g = self.outcome.lock();
        loop {
            if let Some(r) = g.as_ref() {
                return Some(r.clone());
            }
            if self.done.wait_until(&mut g, deadline).timed_out() {
                return g.clone();
            }
        }
    }
}

/// Removes the flight from the table and publishes a failure if the leader unwinds early.
struct LeaderGuard<'a> {
    fetcher: &'a Fetcher,
    key: ChunkKey,
    flight: Arc<Flight>,
    outcome: Option<Result<Bytes, FetchError>>,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        self.fetcher.inflight.lock().remove(&self.key);
        self.flight
            .publish(self.outcome.take().unwrap_or(Err(FetchError::Shutdown)));
    }
}

/// Why a chunk is fetched before any read asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// Listed in a boot trace being prefetched.
    Prefetch,
    /// The next chunk after a sequential step.
    Readahead,
}

/// What a fetch ahead of demand ([`Fetcher::fill`]) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fill {
    /// Fetched, verified and cached.
    Fetched,
    /// Nothing to do: already cached, or another fetch of it is running.
    Present,
    /// The fetch failed (nothing cached; a later read fetches again).
    Failed(FetchError),
}

/// Fetches objects and chunks with retries, deadlines, single flight and caching.
pub struct Fetcher {
    bridge: Bridge,
    source: Arc<dyn ObjectSource>,
    policy: FetchPolicy,
    cache: ChunkCache,
    stats: Arc<FetchStats>,
    inflight: Mutex<HashMap<ChunkKey, Arc<Flight>>>,
    /// Chunks fetched ahead of demand that no demand read has used yet.
    ahead: Mutex<HashMap<ChunkKey, Ahead>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("policy", &self.policy)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher over `source`.
    pub fn new(
        bridge: Bridge,
        source: Arc<dyn ObjectSource>,
        policy: FetchPolicy,
        cache: ChunkCache,
        stats: Arc<FetchStats>,
    ) -> Self {
        Fetcher {
            bridge,
            source,
            policy,
            cache,
            stats,
            inflight: Mutex::new(HashMap::new()),
            ahead: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` is cached or being fetched.
    pub fn present(&self, key: &ChunkKey) -> bool {
        self.cache.contains(key) || self.inflight.lock().contains_key(key)
    }

    /// A demand read got `key`; `from_ahead` if it came from the cache or another fetch (not
    /// its own). Counts the first demand use of a chunk fetched ahead.
    fn demanded(&self, key: &ChunkKey, from_ahead: bool) {
        let kind = {
            let mut ahead = self.ahead.lock();
            if ahead.is_empty() {
                return;
            }
            ahead.remove(key)
        };
        match (kind, from_ahead) {
            (Some(Ahead::Prefetch), true) => FetchStats::add(&self.stats.prefetch_hits, 1),
            (Some(Ahead::Readahead), true) => FetchStats::add(&self.stats.readahead_hits, 1),
            _ => {}
        }
    }

    /// The cached chunk `key`, verified (a cached chunk failing verification is dropped).
    fn cached(&self, key: &ChunkKey, range: &Range<u64>, verify: &Verify) -> Option<ChunkData> {
        let c = self.cache.get(key)?;
        if c.verified {
            return Some(ChunkData::Cached(c));
        }
        if let Some(bytes) = self.verify_cached(&c, range, verify) {
            self.cache.mark_verified(key);
            return Some(ChunkData::Memory(bytes));
        }
        tracing::warn!(?key, "cached chunk fails verification; refetching");
        self.cache.remove(key);
        None
    }

    /// Claims the single-flight slot of `key`: `(flight, true)` if the caller is now its leader.
    fn claim(&self, key: ChunkKey) -> (Arc<Flight>, bool) {
        let mut table = self.inflight.lock();
        match table.get(&key) {
            Some(f) => (f.clone(), false),
            None => {
                let f = Arc::new(Flight::default());
                table.insert(key, f.clone());
                (f, true)
            }
        }
    }

    /// A freshly claimed leader re-checks the cache: a fetch that finished between the caller's
    /// cache lookup and its claim left the chunk there, and fetching it again would be a second
    /// GET for one chunk. Returns the chunk's bytes if so.
    fn cached_after_claim(
        &self,
        key: &ChunkKey,
        range: &Range<u64>,
        verify: &Verify,
    ) -> Option<Bytes> {
        match self.cached(key, range, verify)? {
            ChunkData::Memory(b) => Some(b),
            ChunkData::Cached(c) => {
                let mut buf = vec![0u8; c.len as usize];
                c.file.read_exact_at(&mut buf, 0).ok()?;
                Some(Bytes::from(buf))
            }
        }
    }

    /// Fetches chunk `key` into the cache ahead of demand, unless it is cached or already being
    /// fetched. Runs on the store's runtime (an `async` task; it never blocks on the bridge). A
    /// demand read of the same chunk meanwhile joins this fetch. Failures are not cached.
    pub async fn fill(
        &self,
        key: ChunkKey,
        object: &str,
        range: Range<u64>,
        verify: &Verify,
        why: Ahead,
    ) -> Fill {
        if self.present(&key) {
            return Fill::Present;
        }
        let (flight, leader) = self.claim(key);
        if !leader {
            return Fill::Present;
        }
        let mut guard = LeaderGuard {
            fetcher: self,
            key,
            flight,
            outcome: None,
        };
        if let Some(bytes) = self.cached_after_claim(&key, &range, verify) {
            guard.outcome = Some(Ok(bytes));
            return Fill::Present;
        }
        self.ahead.lock().insert(key, why);
        let result = fetch_with_retries(
            self.source.clone(),
            object.to_owned(),
            Some(range),
            Some(verify.clone()),
            self.policy,
            std::time::Instant::now() + self.policy.timeout,
            self.stats.clone(),
        )
        .await;
        let fill = match &result {
            Ok(bytes) => {
                FetchStats::add(&self.stats.chunks_fetched, 1);
                FetchStats::add(
                    match why {
                        Ahead::Prefetch => &self.stats.prefetched,
                        Ahead::Readahead => &self.stats.readahead,
                    },
                    1,
                );
                if let Err(e) = self.cache.insert(key, bytes) {
                    tracing::warn!(?key, error = %e, "could not cache a chunk fetched ahead");
                }
                Fill::Fetched
            }
            Err(e) => {
                tracing::debug!(?key, error = %e, ?why, "fetch ahead failed");
                self.ahead.lock().remove(&key);
                Fill::Failed(e.clone())
            }
        };
        guard.outcome = Some(result);
        fill
    }

    /// The chunk cache.
    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// The runtime bridge.
    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// The fetch policy.
    pub fn policy(&self) -> &FetchPolicy {
        &self.policy
    }

    /// Fetches a whole (small) object, such as a build map.
    pub fn fetch_object(&self, key: &str) -> Result<Bytes, FetchError> {
        let fut = fetch_with_retries(
            self.source.clone(),
            key.to_owned(),
            None,
            None,
            self.policy,
            std::time::Instant::now() + self.policy.timeout,
            self.stats.clone(),
        );
        let r = self.bridge.run(fut)?;
        if r.is_ok() {
            FetchStats::add(&self.stats.maps_fetched, 1);
        }
        r
    }

    /// Fetches a whole (small) object from a task on the store's runtime.
    pub async fn fetch_object_async(&self, key: &str) -> Result<Bytes, FetchError> {
        let r = fetch_with_retries(
            self.source.clone(),
            key.to_owned(),
            None,
            None,
            self.policy,
            std::time::Instant::now() + self.policy.timeout,
            self.stats.clone(),
        )
        .await;
        if r.is_ok() {
            FetchStats::add(&self.stats.maps_fetched, 1);
        }
        r
    }

    /// The chunk `key`, stored at `range` of object `object`, verified with `verify`, or an
    /// error no later than (about) `deadline`.
    pub fn chunk(
        &self,
        key: ChunkKey,
        object: &str,
        range: Range<u64>,
        verify: &Verify,
        deadline: std::time::Instant,
    ) -> Result<ChunkData, FetchError> {
        if let Some(d) = self.cached(&key, &range, verify) {
            FetchStats::add(&self.stats.cache_hits, 1);
            self.demanded(&key, true);
            return Ok(d);
        }
        FetchStats::add(&self.stats.cache_misses, 1);
        let (flight, leader) = self.claim(key);
        if !leader {
            FetchStats::add(&self.stats.shared_waits, 1);
            return match flight.wait_until(deadline) {
                Some(r) => {
                    if r.is_ok() {
                        self.demanded(&key, true);
                    }
                    r.map(ChunkData::Memory)
                }
                None => {
                    FetchStats::add(&self.stats.timeouts, 1);
                    FetchStats::add(&self.stats.failures, 1);
                    Err(FetchError::Timeout {
                        key: object.to_owned(),
                        after: self.policy.timeout,
                        attempts: 0,
                        last: "another reader's fetch of this chunk is still running".into(),
                    })
                }
            };
        }
        let mut guard = LeaderGuard {
            fetcher: self,
            key,
            flight,
            outcome: None,
        };
        if let Some(bytes) = self.cached_after_claim(&key, &range, verify) {
            self.demanded(&key, true);
            guard.outcome = Some(Ok(bytes.clone()));
            return Ok(ChunkData::Memory(bytes));
        }
        self.demanded(&key, false);
        let fut = fetch_with_retries(
            self.source.clone(),
            object.to_owned(),
            Some(range),
            Some(verify.clone()),
            self.policy,
            deadline,
            self.stats.clone(),
        );
        let result = self.bridge.run(fut).and_then(|r| r);
        match &result {
            Ok(bytes) => {
                FetchStats::add(&self.stats.chunks_fetched, 1);
                if let Err(e) = self.cache.insert(key, bytes) {
                    tracing::warn!(?key, error = %e, "could not cache a fetched chunk");
                }
            }
            Err(e) => tracing::warn!(?key, error = %e, "chunk fetch failed"),
        }
        guard.outcome = Some(result.clone());
        drop(guard);
        result.map(ChunkData::Memory)
    }

    fn verify_cached(&self, c: &CachedChunk, range: &Range<u64>, verify: &Verify) -> Option<Bytes> {
        if c.len != range.end - range.start {
            return None;
        }
        let mut buf = vec![0u8; c.len as usize];
        c.file.read_exact_at(&mut buf, 0).ok()?;
        verify.check(range.start, &buf).ok()?;
        Some(Bytes::from(buf))
    }
}

/// Fetches `key` (or `range` of it) with retries and backoff until `deadline`.
pub async fn fetch_with_retries(
    source: Arc<dyn ObjectSource>,
    key: String,
    range: Option<Range<u64>>,
    verify: Option<Verify>,
    policy: FetchPolicy,
    deadline: std::time::Instant,
    stats: Arc<FetchStats>,
) -> Result<Bytes, FetchError> {
    let deadline = Instant::from_std(deadline);
    let mut delay = policy.backoff_initial;
    let mut attempts = 0u32;
    loop {
        let now = Instant::now();
        attempts += 1;
        FetchStats::add(&stats.requests, 1);
        let request = match &range {
            Some(r) => source.get_range(&key, r.clone()),
            None => source.get(&key),
        };
        let failure = match tokio::time::timeout(deadline.saturating_duration_since(now), request)
            .await
        {
            Err(_elapsed) => {
                FetchStats::add(&stats.timeouts, 1);
                FetchStats::add(&stats.failures, 1);
                return Err(FetchError::Timeout {
                    key,
                    after: policy.timeout,
                    attempts,
                    last: "request still pending at the deadline".into(),
                });
            }
            Ok(Err(SourceError::NotFound)) => {
                FetchStats::add(&stats.failures, 1);
                return Err(FetchError::NotFound { key });
            }
            Ok(Err(SourceError::Other(m))) => Err(m),
            Ok(Ok(bytes)) => {
                FetchStats::add(&stats.bytes_fetched, bytes.len() as u64);
                let want = range.as_ref().map(|r| r.end - r.start);
                match (want, &verify) {
                    (Some(n), _) if bytes.len() as u64 != n => {
                        Err(format!("short read: {} of {n} bytes", bytes.len()))
                    }
                    (_, Some(v)) => match v.check(range.as_ref().map_or(0, |r| r.start), &bytes) {
                        Ok(()) => return Ok(bytes),
                        Err(offset) => {
                            FetchStats::add(&stats.checksum_failures, 1);
                            Ok(offset)
                        }
                    },
                    _ => return Ok(bytes),
                }
            }
        };
        // `failure` is Err(transport message) or Ok(offset of a checksum mismatch).
        if attempts > policy.retries {
            FetchStats::add(&stats.failures, 1);
            return Err(match failure {
                Ok(offset) => FetchError::Checksum { key, offset },
                Err(last) => FetchError::Failed {
                    key,
                    attempts,
                    last,
                },
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            FetchStats::add(&stats.timeouts, 1);
            FetchStats::add(&stats.failures, 1);
            return Err(FetchError::Timeout {
                key,
                after: policy.timeout,
                attempts,
                last: match failure {
                    Ok(offset) => format!("checksum mismatch at {offset}"),
                    Err(m) => m,
                },
            });
        }
        FetchStats::add(&stats.retries, 1);
        tokio::time::sleep(delay.min(left)).await;
        delay = (delay * 2).min(policy.backoff_max.max(Duration::from_millis(1)));
    }
}
