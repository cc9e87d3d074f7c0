//! Counters of an overlay: blocks in each state and bytes moved, for metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of an overlay's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OverlayStats {
    /// Blocks still read from the base (never written).
    pub blocks_absent: u64,
    /// Blocks held in the cache.
    pub blocks_data: u64,
    /// Blocks that read as zeroes with no storage.
    pub blocks_zero: u64,
    /// Bytes read from the base device (client reads and the reads of read-modify-writes).
    pub bytes_read_base: u64,
    /// Bytes read from the cache file (client reads and the reads of read-modify-writes).
    pub bytes_read_cache: u64,
    /// Bytes of successful client writes (`write_at` payloads).
    pub bytes_written: u64,
}

/// One counter on its own cache line, so that threads bumping different counters do not
/// contend on one line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Counter(AtomicU64);

/// The byte counters, updated with relaxed atomics on the data path.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub read_base: Counter,
    pub read_cache: Counter,
    pub written: Counter,
}

impl Counters {
    pub(crate) fn add(counter: &Counter, n: u64) {
        counter.0.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &Counter) -> u64 {
        counter.0.load(Ordering::Relaxed)
    }
}
