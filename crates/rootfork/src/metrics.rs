//! Prometheus metrics (`prometheus-client`). Counters and histograms that the daemon updates as
//! things happen live here; gauges that describe current state (sandboxes and pool slots by state,
//! overlay bytes) are recomputed from a [`Snapshot`] at every scrape, and monotonic totals read
//! from elsewhere (template bytes read, kernel attach failures) advance by the delta since the
//! previous scrape. NBD request counts and latency by command come from the NBD servers' own
//! counters at scrape time (see [`crate::nbd_metrics`]).

use std::collections::BTreeMap;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use rootfork_nbd::StatsSnapshot;

use crate::nbd_metrics::NbdCollector;

/// A `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The state.
    pub state: String,
}

/// A `resource` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    /// sandboxes | fds.
    pub resource: String,
}

/// A `provider` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    /// socket | kernel.
    pub provider: String,
}

/// Labels of an error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// What failed (an API operation, `kernel_attach`, `health`).
    pub op: String,
    /// The errno it maps to.
    pub errno: String,
}

/// Labels of a health check.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabel {
    /// ok | failed.
    pub result: String,
}

/// Labels of an upload to the object store.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UploadLabel {
    /// ok | failed.
    pub result: String,
}

/// Labels of a sandbox adoption at start.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdoptionLabel {
    /// adopted | failed.
    pub result: String,
    /// Why it failed (`none` when adopted).
    pub reason: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// State read at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Sandboxes per state name.
    pub sandboxes: BTreeMap<String, i64>,
    /// Kernel pool slots per state name (empty when the pool is unavailable).
    pub slots: BTreeMap<String, i64>,
    /// Whether the kernel pool is available.
    pub pool_available: bool,
    /// Overlay bytes per block state (`data`, `zero`, `absent`) over served sandboxes.
    pub overlay_bytes: BTreeMap<&'static str, i64>,
    /// Bytes read from templates, ever (closed sandboxes included).
    pub template_bytes_read: u64,
    /// Kernel attach failures per errno, ever.
    pub kernel_failures: BTreeMap<i32, u64>,
    /// NBD request counters of every export, ever (closed sandboxes included; kernel-provider
    /// devices do not expose theirs).
    pub nbd: StatsSnapshot,
    /// Limited resources: name → (in use, limit).
    pub resources: BTreeMap<&'static str, (i64, i64)>,
}

/// What a health-check recovery came to (the `result` label of
/// `rootfork_health_recoveries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// A kernel device's dead connections were replaced with `NBD_CMD_RECONFIGURE`.
    Reconnected,
    /// A reconnect attempt failed (the check fails; a second failure marks the sandbox failed).
    ReconnectFailed,
    /// The sandbox was marked failed.
    MarkedFailed,
    /// A failed sandbox passed its check again and is running.
    Revived,
}

impl Recovery {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Recovery::Reconnected => "reconnected",
            Recovery::ReconnectFailed => "reconnect_failed",
            Recovery::MarkedFailed => "marked_failed",
            Recovery::Revived => "revived",
        }
    }
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    sandboxes: Family<StateLabel, Gauge>,
    slots: Family<StateLabel, Gauge>,
    pool_available: Gauge,
    overlay_bytes: Family<StateLabel, Gauge>,
    template_bytes_read: Counter,
    attach_latency: HistFamily<ProviderLabel>,
    errors: Family<ErrorLabel, Counter>,
    health_checks: Family<CheckLabel, Counter>,
    recoveries: Family<CheckLabel, Counter>,
    adoptions: Family<AdoptionLabel, Counter>,
    store_uploads: Family<UploadLabel, Counter>,
    store_upload_bytes: Counter,
    resource_used: Family<ResourceLabel, Gauge>,
    resource_limit: Family<ResourceLabel, Gauge>,
    nbd: NbdCollector,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    template_bytes_read: u64,
    kernel_failures: BTreeMap<i32, u64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("rootfork");
        let m = Metrics {
            sandboxes: Family::default(),
            slots: Family::default(),
            pool_available: Gauge::default(),
            overlay_bytes: Family::default(),
            template_bytes_read: Counter::default(),
            attach_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            errors: Family::default(),
            health_checks: Family::default(),
            recoveries: Family::default(),
            adoptions: Family::default(),
            store_uploads: Family::default(),
            store_upload_bytes: Counter::default(),
            resource_used: Family::default(),
            resource_limit: Family::default(),
            nbd: NbdCollector::default(),
            seen: Mutex::new(Seen::default()),
            registry: Registry::default(),
        };
        r.register("sandboxes", "Sandboxes by state", m.sandboxes.clone());
        r.register(
            "pool_slots",
            "Kernel /dev/nbdN slots by state",
            m.slots.clone(),
        );
        r.register(
            "pool_available",
            "1 when the kernel nbd pool can be used",
            m.pool_available.clone(),
        );
        r.register("overlay_bytes", "Bytes of served overlays by block state (data: in the cache file, zero: reads as zeroes, absent: still read from the template)", m.overlay_bytes.clone());
        r.register(
            "template_read_bytes",
            "Bytes read from templates by overlays",
            m.template_bytes_read.clone(),
        );
        r.register(
            "attach_latency_seconds",
            "Create or resume to device ready, by provider",
            m.attach_latency.clone(),
        );
        r.register(
            "errors",
            "Failed operations by operation and errno",
            m.errors.clone(),
        );
        r.register(
            "health_checks",
            "Health checks by result",
            m.health_checks.clone(),
        );
        r.register(
            "health_recoveries",
            "Health-check recovery outcomes: reconnected (a kernel device's dead connections replaced with RECONFIGURE), reconnect_failed (an attempt failed), marked_failed (the sandbox was given up on), revived (a failed sandbox passed again)",
            m.recoveries.clone(),
        );
        for outcome in [
            Recovery::Reconnected,
            Recovery::ReconnectFailed,
            Recovery::MarkedFailed,
            Recovery::Revived,
        ] {
            // Every outcome is published from the start (at 0).
            drop(m.recoveries.get_or_create(&CheckLabel {
                result: outcome.as_str().into(),
            }));
        }
        r.register(
            "adoptions",
            "Running sandboxes of a previous daemon run served again at start (result adopted), or not (result failed, with the reason)",
            m.adoptions.clone(),
        );
        r.register(
            "store_uploads",
            "Paused sandboxes' uploads to the object store (--store): result ok, or failed (each failed attempt; it is retried)",
            m.store_uploads.clone(),
        );
        r.register(
            "store_upload_bytes",
            "Bytes of builds uploaded to the object store",
            m.store_upload_bytes.clone(),
        );
        r.register(
            "resource_used",
            "Limited resources in use: sandboxes (not deleted), fds (open file descriptors)",
            m.resource_used.clone(),
        );
        r.register(
            "resource_limit",
            "Their limits: limits.max_sandboxes, RLIMIT_NOFILE",
            m.resource_limit.clone(),
        );
        r.register_collector(Box::new(m.nbd.clone()));
        Metrics { registry: r, ..m }
    }

    /// Records a device becoming ready.
    pub fn attach_latency(&self, provider: &str, d: Duration) {
        self.attach_latency
            .get_or_create(&ProviderLabel {
                provider: provider.to_owned(),
            })
            .observe(d.as_secs_f64());
    }

    /// Records a failed operation.
    pub fn error(&self, op: &str, errno: i32) {
        self.errors
            .get_or_create(&ErrorLabel {
                op: op.to_owned(),
                errno: errno_name(errno),
            })
            .inc();
    }

    /// Records a health check.
    pub fn health_check(&self, ok: bool) {
        self.health_checks
            .get_or_create(&CheckLabel {
                result: if ok { "ok" } else { "failed" }.into(),
            })
            .inc();
    }

    /// Records a sandbox marked failed by the health check.
    pub fn health_failed(&self) {
        self.recovery(Recovery::MarkedFailed);
    }

    /// Records a recovery outcome.
    pub fn recovery(&self, outcome: Recovery) {
        self.recoveries
            .get_or_create(&CheckLabel {
                result: outcome.as_str().into(),
            })
            .inc();
    }

    /// Records an upload to the object store (`ok`: done, with `bytes` sent; else a failed
    /// attempt).
    pub fn store_upload(&self, ok: bool, bytes: u64) {
        self.store_uploads
            .get_or_create(&UploadLabel {
                result: if ok { "ok" } else { "failed" }.into(),
            })
            .inc();
        self.store_upload_bytes.inc_by(bytes);
    }

    /// Records a running sandbox of a previous run adopted at start (`failure`: `None`), or
    /// not (the reason's label value).
    pub fn adoption(&self, failure: Option<&str>) {
        self.adoptions
            .get_or_create(&AdoptionLabel {
                result: if failure.is_some() {
                    "failed"
                } else {
                    "adopted"
                }
                .into(),
                reason: failure.unwrap_or("none").into(),
            })
            .inc();
    }

    /// Renders the OpenMetrics text after applying `snap`.
    pub fn render(&self, snap: Snapshot) -> String {
        set_family(&self.sandboxes, &snap.sandboxes);
        set_family(&self.slots, &snap.slots);
        self.pool_available.set(i64::from(snap.pool_available));
        for (resource, (used, limit)) in &snap.resources {
            let label = ResourceLabel {
                resource: (*resource).into(),
            };
            self.resource_used.get_or_create(&label).set(*used);
            self.resource_limit.get_or_create(&label).set(*limit);
        }
        self.nbd.update(&snap.nbd);
        self.overlay_bytes.clear();
        for (k, v) in &snap.overlay_bytes {
            self.overlay_bytes
                .get_or_create(&StateLabel { state: (*k).into() })
                .set(*v);
        }
        {
            let mut seen = self.seen.lock();
            if snap.template_bytes_read > seen.template_bytes_read {
                self.template_bytes_read
                    .inc_by(snap.template_bytes_read - seen.template_bytes_read);
                seen.template_bytes_read = snap.template_bytes_read;
            }
            for (errno, n) in &snap.kernel_failures {
                let before = seen.kernel_failures.insert(*errno, *n).unwrap_or(0);
                if *n > before {
                    self.errors
                        .get_or_create(&ErrorLabel {
                            op: "kernel_attach".into(),
                            errno: errno_name(*errno),
                        })
                        .inc_by(n - before);
                }
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}

fn set_family(f: &Family<StateLabel, Gauge>, values: &BTreeMap<String, i64>) {
    f.clear();
    for (k, v) in values {
        f.get_or_create(&StateLabel { state: k.clone() }).set(*v);
    }
}

/// `ENOENT`-style name of an errno (numeric when unknown).
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EINVAL => "EINVAL",
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::EAGAIN => "EAGAIN",
        _ => return errno.to_string(),
    };
    name.into()
}
