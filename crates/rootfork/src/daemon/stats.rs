//! Metrics recording: the counters of closed providers (kept so totals never go back when a
//! sandbox is paused or deleted) and the snapshot of live state rendered at every scrape.

use std::sync::atomic::{AtomicU64, Ordering};

use rootfork_provider::AnyProvider;

use crate::daemon::core::Core;
use crate::daemon::model::{DeviceList, SandboxState};
use crate::daemon::sandbox::overlay_stats;
use crate::metrics::Snapshot;

/// Overlay block size the byte gauges count in.
const BLOCK: i64 = 4096;

/// Totals of providers that have been closed.
#[derive(Debug, Default)]
pub struct ClosedTotals {
    /// Template bytes their overlays read.
    template_bytes: AtomicU64,
    /// Their NBD request counters.
    nbd: parking_lot::Mutex<rootfork_nbd::StatsSnapshot>,
}

impl ClosedTotals {
    /// Adds a closed provider's final counters (`template_read`: its overlay's template bytes,
    /// read before the close).
    pub fn add(&self, template_read: u64, p: &AnyProvider) {
        self.template_bytes
            .fetch_add(template_read, Ordering::Relaxed);
        if let Some(st) = p.nbd_stats() {
            crate::nbd_metrics::add(&mut self.nbd.lock(), &st);
        }
    }
}

/// The metrics text: closed totals plus every live sandbox's counters, states and the pool.
pub fn render(core: &Core) -> String {
    let mut snap = Snapshot {
        nbd: core.closed.nbd.lock().clone(),
        ..Snapshot::default()
    };
    let mut live_template_bytes = 0;
    let (mut data, mut zero, mut absent) = (0i64, 0i64, 0i64);
    let all: Vec<_> = core.sandboxes.read().values().cloned().collect();
    for sb in &all {
        *snap
            .sandboxes
            .entry(sb.state().as_str().to_owned())
            .or_default() += 1;
        // A sandbox in the middle of an operation is counted at the next scrape.
        let Ok(live) = sb.live.try_lock() else {
            continue;
        };
        if let Some(st) = live.provider.as_ref().and_then(overlay_stats) {
            live_template_bytes += st.bytes_read_base;
            data += st.blocks_data as i64 * BLOCK;
            zero += st.blocks_zero as i64 * BLOCK;
            absent += st.blocks_absent as i64 * BLOCK;
        }
        if let Some(st) = live.provider.as_ref().and_then(AnyProvider::nbd_stats) {
            crate::nbd_metrics::add(&mut snap.nbd, &st);
        }
    }
    for s in [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Failed,
        SandboxState::Deleted,
    ] {
        snap.sandboxes.entry(s.as_str().to_owned()).or_default();
    }
    snap.overlay_bytes = [("data", data), ("zero", zero), ("absent", absent)].into();
    let live = all.iter().filter(|s| s.is_live()).count() as i64;
    let (fds, fd_limit) = crate::daemon::limits::fds();
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    snap.resources = [
        ("sandboxes", (live, clamp(core.config.max_sandboxes as u64))),
        ("fds", (clamp(fds), clamp(fd_limit))),
        (
            "disk_bytes",
            (
                clamp(crate::daemon::limits::disk_committed(core)),
                clamp(
                    (crate::daemon::limits::disk_free(core).unwrap_or(0) as f64
                        * core.config.disk_overcommit) as u64,
                ),
            ),
        ),
        (
            "nbd_inflight_bytes",
            (
                clamp(core.nbd_bytes.used() as u64),
                clamp(core.nbd_bytes.limit() as u64),
            ),
        ),
        (
            "nbd_connections",
            (
                clamp(core.nbd_connections.used() as u64),
                clamp(core.nbd_connections.limit() as u64),
            ),
        ),
    ]
    .into();
    snap.template_bytes_read =
        core.closed.template_bytes.load(Ordering::Relaxed) + live_template_bytes;
    if let DeviceList::Available(devices) = core.kernel.list() {
        snap.pool_available = true;
        for d in devices {
            *snap.slots.entry(d.state).or_default() += 1;
        }
    }
    if snap.pool_available {
        snap.kernel_failures = core.kernel.pool().metrics().failures_by_errno;
    }
    if let Some(stock) = &core.warm {
        let c = stock.counts();
        snap.resources.insert(
            "kernel_warm_slots",
            (clamp(c.ready as u64), clamp(c.target as u64)),
        );
    }
    core.metrics.render(snap)
}
