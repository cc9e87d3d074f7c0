//! Fetch and cache counters, readable at any time (for tests, benchmarks and metrics).

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of a store.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub(crate) requests: AtomicU64,
    pub(crate) bytes_fetched: AtomicU64,
    pub(crate) chunks_fetched: AtomicU64,
    pub(crate) maps_fetched: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) shared_waits: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) checksum_failures: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) prefetched: AtomicU64,
    pub(crate) prefetch_hits: AtomicU64,
    pub(crate) readahead: AtomicU64,
    pub(crate) readahead_hits: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// GET requests sent (every attempt, maps and chunks).
    pub requests: u64,
    /// Payload bytes received.
    pub bytes_fetched: u64,
    /// Chunks fetched successfully and verified.
    pub chunks_fetched: u64,
    /// Maps fetched.
    pub maps_fetched: u64,
    /// Chunk reads served by the local cache.
    pub cache_hits: u64,
    /// Chunk reads that had to fetch (or join a fetch).
    pub cache_misses: u64,
    /// Readers that joined another reader's fetch of the same chunk.
    pub shared_waits: u64,
    /// Attempts repeated after a failure.
    pub retries: u64,
    /// Fetches that ran out of time.
    pub timeouts: u64,
    /// Fetches that failed for good (timeouts included).
    pub failures: u64,
    /// Fetched chunks that failed checksum verification.
    pub checksum_failures: u64,
    /// Chunks evicted from the cache.
    pub evictions: u64,
    /// Chunks fetched by a prefetch ([`RemoteStore::prefetch`](crate::RemoteStore::prefetch));
    /// included in `chunks_fetched`.
    pub prefetched: u64,
    /// Demand reads served by a prefetched chunk (from the cache, or by joining its fetch);
    /// counted once per chunk, on its first demand read.
    pub prefetch_hits: u64,
    /// Chunks fetched by readahead on sequential access; included in `chunks_fetched`.
    pub readahead: u64,
    /// Demand reads served by a readahead chunk, once per chunk.
    pub readahead_hits: u64,
}

impl FetchStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: g(&self.requests),
            bytes_fetched: g(&self.bytes_fetched),
            chunks_fetched: g(&self.chunks_fetched),
            maps_fetched: g(&self.maps_fetched),
            cache_hits: g(&self.cache_hits),
            cache_misses: g(&self.cache_misses),
            shared_waits: g(&self.shared_waits),
            retries: g(&self.retries),
            timeouts: g(&self.timeouts),
            failures: g(&self.failures),
            checksum_failures: g(&self.checksum_failures),
            evictions: g(&self.evictions),
            prefetched: g(&self.prefetched),
            prefetch_hits: g(&self.prefetch_hits),
            readahead: g(&self.readahead),
            readahead_hits: g(&self.readahead_hits),
        }
    }
}
