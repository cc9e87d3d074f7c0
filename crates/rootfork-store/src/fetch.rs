//! The lazy fetcher: cache lookup, single-flight fetches, retries with backoff under a deadline,
//! and checksum verification before anything is cached or served.
//!
//! A read that misses the cache either becomes the *leader* for that chunk — it runs the fetch
//! on the store's runtime, verifies it, inserts it into the cache and publishes the outcome — or
//! finds a fetch in flight and waits for the leader's outcome. Either way one chunk is fetched
//! once however many readers want it. Failures (not found, timeout, transport errors, checksum
//! mismatches) are published to the waiters of that one flight and never cached: the next read
//! starts a new fetch.

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

/// Fetches objects and chunks with retries, deadlines, single flight and caching.
pub struct Fetcher {
    bridge: Bridge,
    source: Arc<dyn ObjectSource>,
    policy: FetchPolicy,
    cache: ChunkCache,
    stats: Arc<FetchStats>,
    inflight: Mutex<HashMap<ChunkKey, Arc<Flight>>>,
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
        }
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
        if let Some(c) = self.cache.get(&key) {
            if c.verified {
                FetchStats::add(&self.stats.cache_hits, 1);
                return Ok(ChunkData::Cached(c));
            }
            if let Some(bytes) = self.verify_cached(&c, &range, verify) {
                self.cache.mark_verified(&key);
                FetchStats::add(&self.stats.cache_hits, 1);
                return Ok(ChunkData::Memory(bytes));
            }
            tracing::warn!(?key, "cached chunk fails verification; refetching");
            self.cache.remove(&key);
        }
        FetchStats::add(&self.stats.cache_misses, 1);
        let (flight, leader) = {
            let mut table = self.inflight.lock();
            match table.get(&key) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    table.insert(key, f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            FetchStats::add(&self.stats.shared_waits, 1);
            return match flight.wait_until(deadline) {
                Some(r) => r.map(ChunkData::Memory),
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
