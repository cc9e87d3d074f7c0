//! NBD request metrics by command: requests, errors and bytes counters and a latency histogram,
//! taken at scrape time from the NBD servers' own counters ([`rootfork_nbd::StatsSnapshot`])
//! and encoded by a prometheus-client [`Collector`].
//!
//! The daemon sums the counters of live exports and of closed ones; a sandbox busy in another
//! operation at scrape time is skipped, so the sum can dip for one scrape. [`NbdCollector`] keeps
//! every series monotonic by never publishing less than it published before.

use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use rootfork_nbd::stats::LATENCY_BUCKETS;
use rootfork_nbd::{Op, OpStats, StatsSnapshot};

/// A `command` label (`read`, `write`, `flush`, ... `rejected`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    /// The NBD command class.
    pub command: String,
}

/// Adds `more`'s counters to `total` (per command; the latency maximum is the larger one).
pub fn add(total: &mut StatsSnapshot, more: &StatsSnapshot) {
    merge(total, more, |a, b| a + b);
}

/// Raises every counter of `total` to at least `now`'s.
fn raise(total: &mut StatsSnapshot, now: &StatsSnapshot) {
    merge(total, now, u64::max);
}

fn merge(total: &mut StatsSnapshot, other: &StatsSnapshot, f: fn(u64, u64) -> u64) {
    let mut out = Vec::with_capacity(Op::ALL.len());
    for op in Op::ALL {
        let (a, b) = (total.op(op), other.op(op));
        let hist = (0..LATENCY_BUCKETS)
            .map(|i| {
                let at = |h: &[u64]| h.get(i).copied().unwrap_or(0);
                f(at(&a.latency_hist), at(&b.latency_hist))
            })
            .collect();
        let nanos = |d: std::time::Duration| d.as_nanos().min(u128::from(u64::MAX)) as u64;
        let merged = OpStats {
            count: f(a.count, b.count),
            errors: f(a.errors, b.errors),
            bytes: f(a.bytes, b.bytes),
            latency_total: std::time::Duration::from_nanos(f(
                nanos(a.latency_total),
                nanos(b.latency_total),
            )),
            latency_max: a.latency_max.max(b.latency_max),
            latency_hist: hist,
        };
        out.push((op, merged));
    }
    total.ops = out;
    total.panics = f(total.panics, other.panics);
    total.refused_too_large = f(total.refused_too_large, other.refused_too_large);
    total.refused_connections = f(total.refused_connections, other.refused_connections);
    total.accept_errors = f(total.accept_errors, other.accept_errors);
}

/// The collector registered with the daemon's registry.
#[derive(Debug, Clone, Default)]
pub struct NbdCollector {
    published: Arc<Mutex<StatsSnapshot>>,
}

impl NbdCollector {
    /// Takes the current sum of every server's counters (before rendering).
    pub fn update(&self, now: &StatsSnapshot) {
        raise(&mut self.published.lock(), now);
    }

    /// What the next scrape publishes.
    pub fn published(&self) -> StatsSnapshot {
        self.published.lock().clone()
    }
}

/// Upper bound in seconds of the NBD histogram's bucket `i` (the last one is `+Inf`).
fn bucket_bound(i: usize) -> f64 {
    if i + 1 == LATENCY_BUCKETS {
        f64::MAX
    } else {
        (1u64 << i) as f64 * 1e-6
    }
}

fn counters(
    encoder: &mut DescriptorEncoder,
    snap: &StatsSnapshot,
    name: &str,
    help: &str,
    value: fn(&OpStats) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (op, s) in &snap.ops {
        let label = CommandLabel {
            command: op.name().into(),
        };
        ConstCounter::new(value(s)).encode(family.encode_family(&label)?)?;
    }
    Ok(())
}

fn histogram(encoder: MetricEncoder, s: &OpStats) -> Result<(), std::fmt::Error> {
    let mut encoder = encoder;
    let buckets: Vec<(f64, u64)> = (0..LATENCY_BUCKETS)
        .map(|i| (bucket_bound(i), s.latency_hist.get(i).copied().unwrap_or(0)))
        .collect();
    encoder.encode_histogram::<NoLabelSet>(s.latency_total.as_secs_f64(), s.count, &buckets, None)
}

impl Collector for NbdCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.published();
        counters(
            &mut encoder,
            &snap,
            "nbd_requests",
            "NBD requests answered, by command (rejected: refused before reaching the device)",
            |s| s.count,
        )?;
        counters(
            &mut encoder,
            &snap,
            "nbd_request_errors",
            "NBD requests answered with an error, by command",
            |s| s.errors,
        )?;
        counters(
            &mut encoder,
            &snap,
            "nbd_request_bytes",
            "NBD payload (read, write) or range (trim, zero, cache, status) bytes, by command",
            |s| s.bytes,
        )?;
        for (name, help, value) in [
            (
                "nbd_panics",
                "Panics caught in device code (each answered EIO) or in the NBD engine (which ends the connection)",
                snap.panics,
            ),
            (
                "nbd_refused_too_large",
                "NBD requests refused for their size (reads over the payload limit, writes over the write limit)",
                snap.refused_too_large,
            ),
            (
                "nbd_refused_connections",
                "NBD connections closed at once at a connection limit (per export or over all exports)",
                snap.refused_connections,
            ),
            (
                "nbd_accept_errors",
                "Failed accepts on NBD sockets (e.g. EMFILE), each followed by a backoff",
                snap.accept_errors,
            ),
        ] {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }
        let mut family = encoder.encode_descriptor(
            "nbd_request_latency_seconds",
            "NBD request latency (received to reply queued), by command",
            None,
            MetricType::Histogram,
        )?;
        for (op, s) in &snap.ops {
            let label = CommandLabel {
                command: op.name().into(),
            };
            histogram(family.encode_family(&label)?, s)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn snap(reads: u64, us: u64) -> StatsSnapshot {
        let s = rootfork_nbd::stats::Stats::default();
        for _ in 0..reads {
            s.record(Op::Read, true, 4096, Duration::from_micros(us));
        }
        s.snapshot()
    }

    #[test]
    fn add_sums_and_publishing_never_goes_down() {
        let mut total = StatsSnapshot::default();
        add(&mut total, &snap(2, 3));
        add(&mut total, &snap(1, 1000));
        let r = total.op(Op::Read);
        assert_eq!((r.count, r.bytes), (3, 3 * 4096));
        assert_eq!(r.latency_hist.iter().sum::<u64>(), 3);
        assert_eq!(r.latency_max, Duration::from_micros(1000));

        let c = NbdCollector::default();
        c.update(&total);
        c.update(&snap(1, 3)); // a dip (a busy sandbox skipped) publishes the earlier values
        assert_eq!(c.published().op(Op::Read).count, 3);
        c.update(&snap(5, 3));
        assert_eq!(c.published().op(Op::Read).count, 5);
    }

    #[test]
    fn renders_counters_and_a_histogram_by_command() {
        let mut registry = prometheus_client::registry::Registry::with_prefix("rootfork");
        let c = NbdCollector::default();
        registry.register_collector(Box::new(c.clone()));
        let mut s = snap(2, 3);
        s.panics = 1;
        s.refused_too_large = 4;
        c.update(&s);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("rootfork_nbd_panics_total 1"), "{out}");
        assert!(
            out.contains("rootfork_nbd_refused_too_large_total 4"),
            "{out}"
        );
        assert!(
            out.contains("rootfork_nbd_requests_total{command=\"read\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("rootfork_nbd_request_bytes_total{command=\"read\"} 8192"),
            "{out}"
        );
        assert!(
            out.contains("rootfork_nbd_requests_total{command=\"write\"} 0"),
            "{out}"
        );
        // 3 µs falls in the bucket below 4 µs: cumulative 0 up to 2 µs, 2 from 4 µs on.
        assert!(
            out.contains(
                "rootfork_nbd_request_latency_seconds_bucket{le=\"0.000002\",command=\"read\"} 0"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "rootfork_nbd_request_latency_seconds_bucket{le=\"0.000004\",command=\"read\"} 2"
            ),
            "{out}"
        );
        assert!(
            out.contains("rootfork_nbd_request_latency_seconds_count{command=\"read\"} 2"),
            "{out}"
        );
    }
}
