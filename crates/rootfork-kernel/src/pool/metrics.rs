//! Pool counters and the connect-latency histogram, kept in atomics and read as a serialisable
//! [`MetricsSnapshot`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;

use crate::sysfs::NotQuiescent;

/// Upper bounds of the connect-latency buckets, in microseconds (the last bucket is unbounded).
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000,
    5_000_000,
];

/// A fixed-bucket latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        HistogramSnapshot {
            bounds_us: LATENCY_BOUNDS_US.to_vec(),
            count: counts.iter().sum(),
            counts,
            sum_us: self.sum_us.load(Relaxed),
        }
    }
}

/// A histogram's values.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HistogramSnapshot {
    /// Bucket upper bounds (µs); `counts` has one more entry, for larger values.
    pub bounds_us: Vec<u64>,
    /// Observations per bucket.
    pub counts: Vec<u64>,
    /// Number of observations.
    pub count: u64,
    /// Sum of all observations (µs).
    pub sum_us: u64,
}

/// How often the quiescence check refused a slot, per rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QuiescenceSkips {
    /// A `pid` file was present.
    pub pid: u64,
    /// The size was not 0.
    pub size: u64,
    /// Requests were in flight.
    pub inflight: u64,
    /// Something held the device.
    pub holders: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) claimed: AtomicU64,
    pub(crate) claims_total: AtomicU64,
    pub(crate) releases_total: AtomicU64,
    pub(crate) exhausted_total: AtomicU64,
    pub(crate) busy_skips: AtomicU64,
    pub(crate) cooling_skips: AtomicU64,
    pub(crate) reclaimed_total: AtomicU64,
    nq: [AtomicU64; 4],
    teardown: [AtomicU64; 4],
    pub(crate) connect_latency: Histogram,
    failures: Mutex<BTreeMap<i32, u64>>,
}

impl Metrics {
    pub(crate) fn not_quiescent(&self, why: NotQuiescent) {
        self.nq[rule(why)].fetch_add(1, Relaxed);
    }

    pub(crate) fn teardown_pending(&self, why: NotQuiescent) {
        self.teardown[rule(why)].fetch_add(1, Relaxed);
    }

    pub(crate) fn failure(&self, errno: i32) {
        *self.failures.lock().entry(errno).or_default() += 1;
    }

    pub(crate) fn snapshot(&self, ready: u64, total: u64) -> MetricsSnapshot {
        MetricsSnapshot {
            slots: total,
            ready,
            claimed: self.claimed.load(Relaxed),
            claims_total: self.claims_total.load(Relaxed),
            releases_total: self.releases_total.load(Relaxed),
            exhausted_total: self.exhausted_total.load(Relaxed),
            busy_skips: self.busy_skips.load(Relaxed),
            cooling_skips: self.cooling_skips.load(Relaxed),
            reclaimed_total: self.reclaimed_total.load(Relaxed),
            not_quiescent_skips: skips(&self.nq),
            teardown_pending: skips(&self.teardown),
            connect_latency: self.connect_latency.snapshot(),
            failures_by_errno: self.failures.lock().clone(),
        }
    }
}

fn rule(why: NotQuiescent) -> usize {
    match why {
        NotQuiescent::Pid(_) => 0,
        NotQuiescent::Size(_) => 1,
        NotQuiescent::Inflight(..) => 2,
        NotQuiescent::Holders(_) => 3,
    }
}

fn skips(c: &[AtomicU64; 4]) -> QuiescenceSkips {
    QuiescenceSkips {
        pid: c[0].load(Relaxed),
        size: c[1].load(Relaxed),
        inflight: c[2].load(Relaxed),
        holders: c[3].load(Relaxed),
    }
}

/// The pool's metrics at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Slots in the pool.
    pub slots: u64,
    /// Slots free to claim now (quiescent, unclaimed, not cooling down).
    pub ready: u64,
    /// Slots this process holds.
    pub claimed: u64,
    /// Successful claims so far.
    pub claims_total: u64,
    /// Releases so far.
    pub releases_total: u64,
    /// Claims that found no free slot.
    pub exhausted_total: u64,
    /// Slots skipped because another holder had the claim.
    pub busy_skips: u64,
    /// Slots skipped during their cooldown.
    pub cooling_skips: u64,
    /// Slots skipped by the quiescence check, per rule.
    pub not_quiescent_skips: QuiescenceSkips,
    /// Orderly closes whose slot was not yet quiescent right after `DISCONNECT` returned (the
    /// kernel's teardown was still running), per rule: what an immediate reuse would have hit.
    pub teardown_pending: QuiescenceSkips,
    /// Devices and claims reclaimed from dead processes.
    pub reclaimed_total: u64,
    /// Claim-to-connected latency of successful attaches.
    pub connect_latency: HistogramSnapshot,
    /// Failed attaches by errno.
    pub failures_by_errno: BTreeMap<i32, u64>,
}
