//! Per-command counters and latency histograms, kept per connection and per server, readable at
//! any time as a [`StatsSnapshot`] (for metrics).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A command class counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Requests rejected before reaching the device (invalid, or while draining).
    Rejected,
}

impl Op {
    /// Every class, in index order.
    pub const ALL: [Op; 8] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::Cache,
        Op::WriteZeroes,
        Op::BlockStatus,
        Op::Rejected,
    ];

    /// A short lowercase name (metrics label).
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::Cache => "cache",
            Op::WriteZeroes => "write_zeroes",
            Op::BlockStatus => "block_status",
            Op::Rejected => "rejected",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Buckets of the latency histogram: bucket `i` counts latencies below `2^i` microseconds
/// (the last one everything longer).
pub const LATENCY_BUCKETS: usize = 24;

#[derive(Debug, Default)]
struct Counters {
    count: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    latency_ns: AtomicU64,
    latency_max_ns: AtomicU64,
    hist: [AtomicU64; LATENCY_BUCKETS],
}

/// Live counters (atomics; cheap to update from any thread).
#[derive(Debug, Default)]
pub struct Stats {
    ops: [Counters; 8],
    panics: AtomicU64,
    refused_too_large: AtomicU64,
    refused_connections: AtomicU64,
    accept_errors: AtomicU64,
}

/// A copy of one command class's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Requests answered.
    pub count: u64,
    /// Of which answered with an error.
    pub errors: u64,
    /// Payload bytes read or written (or range bytes for trim/zero/cache/status).
    pub bytes: u64,
    /// Sum of latencies (receive to reply queued).
    pub latency_total: Duration,
    /// Largest latency.
    pub latency_max: Duration,
    /// Histogram, see [`LATENCY_BUCKETS`].
    pub latency_hist: Vec<u64>,
}

/// A copy of all counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Per command class, in [`Op::ALL`] order.
    pub ops: Vec<(Op, OpStats)>,
    /// Panics caught in device code (each answered `EIO`, also counted as an error of its
    /// command class) or, as a last resort, in the engine itself (which ends the connection).
    pub panics: u64,
    /// Requests refused for their size (a read over `ServeOptions::max_payload`: `EOVERFLOW`;
    /// a write over `ServeOptions::write_limit`: `EINVAL`); also counted as rejected.
    pub refused_too_large: u64,
    /// Connections closed at once because a connection limit was reached
    /// (`ServeOptions::max_connections` or the shared budget).
    pub refused_connections: u64,
    /// Failed `accept` calls (e.g. `EMFILE` at the file-descriptor limit), each followed by a
    /// backoff.
    pub accept_errors: u64,
    /// Bytes of I/O buffers (write payloads, read replies) handed out and not yet returned by
    /// the buffer pool behind these counters: the server's (shared by all its connections) in
    /// socket mode, the connection's in kernel mode. 0 in snapshots built from [`Stats`] alone.
    pub buffer_bytes: u64,
    /// The most `buffer_bytes` has been since the pool was created.
    pub buffer_bytes_peak: u64,
}

/// What a finished connection did.
pub type ConnectionStats = StatsSnapshot;

impl StatsSnapshot {
    /// The counters of one class.
    pub fn op(&self, op: Op) -> OpStats {
        self.ops
            .iter()
            .find(|(o, _)| *o == op)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    /// Requests answered, all classes together.
    pub fn total_requests(&self) -> u64 {
        self.ops.iter().map(|(_, s)| s.count).sum()
    }
}

impl Stats {
    /// Counts one answered request.
    pub fn record(&self, op: Op, ok: bool, bytes: u64, latency: Duration) {
        let c = &self.ops[op.index()];
        c.count.fetch_add(1, Relaxed);
        if !ok {
            c.errors.fetch_add(1, Relaxed);
        }
        c.bytes.fetch_add(bytes, Relaxed);
        let ns = latency.as_nanos().min(u128::from(u64::MAX)) as u64;
        c.latency_ns.fetch_add(ns, Relaxed);
        c.latency_max_ns.fetch_max(ns, Relaxed);
        let us = ns / 1000;
        let bucket = (64 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        c.hist[bucket].fetch_add(1, Relaxed);
    }

    /// Counts one panic caught.
    pub fn record_panic(&self) {
        self.panics.fetch_add(1, Relaxed);
    }

    /// Counts one connection refused at a limit.
    pub fn record_refused_connection(&self) {
        self.refused_connections.fetch_add(1, Relaxed);
    }

    /// Counts one failed `accept`.
    pub fn record_accept_error(&self) {
        self.accept_errors.fetch_add(1, Relaxed);
    }

    /// Counts one request refused for its size.
    pub fn record_too_large(&self) {
        self.refused_too_large.fetch_add(1, Relaxed);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            panics: self.panics.load(Relaxed),
            refused_too_large: self.refused_too_large.load(Relaxed),
            refused_connections: self.refused_connections.load(Relaxed),
            accept_errors: self.accept_errors.load(Relaxed),
            buffer_bytes: 0,
            buffer_bytes_peak: 0,
            ops: Op::ALL
                .iter()
                .map(|&op| {
                    let c = &self.ops[op.index()];
                    (
                        op,
                        OpStats {
                            count: c.count.load(Relaxed),
                            errors: c.errors.load(Relaxed),
                            bytes: c.bytes.load(Relaxed),
                            latency_total: Duration::from_nanos(c.latency_ns.load(Relaxed)),
                            latency_max: Duration::from_nanos(c.latency_max_ns.load(Relaxed)),
                            latency_hist: c.hist.iter().map(|h| h.load(Relaxed)).collect(),
                        },
                    )
                })
                .collect(),
        }
    }
}
