//! One sandbox's health check: reap an exited VM, repair dead kernel connections (then inject a
//! fault if asked), look for a stuck request, and check the device itself (sysfs for the kernel
//! provider, a handshake probe for the socket provider). What fails is a [`CheckFailure`].

use std::path::PathBuf;
use std::time::Duration;

use rootfork_provider::{AnyProvider, Provider, ProviderError};

use super::probe::{probe_nbd_socket, ProbeError};
use crate::daemon::core::Core;
use crate::daemon::model::{Health, SandboxState};
use crate::daemon::sandbox::{Live, Sandbox};
use crate::events::{EventBus, EventKind};
use crate::metrics::Recovery;

/// Why a sandbox failed its check.
#[derive(Debug, thiserror::Error)]
pub enum CheckFailure {
    /// The provider no longer reports its device ready.
    #[error("provider no longer ready: {0}")]
    NotReady(ProviderError),
    /// Dead kernel connections could not be replaced.
    #[error("{dead} of {connections} connection(s) of {device} dead; reconnecting with RECONFIGURE failed: {}", chain(.error))]
    ReconnectFailed {
        /// Dead connections.
        dead: usize,
        /// All connections.
        connections: usize,
        /// The device node.
        device: String,
        /// Why the reconnect failed.
        error: ProviderError,
    },
    /// A request has waited for the server too long.
    #[error("an NBD request has been stuck for {:.1}s (limit {}s)", .age.as_secs_f64(), .limit.as_secs_f64())]
    RequestStuck {
        /// How long the oldest request has waited.
        age: Duration,
        /// `health.stuck_request_secs`.
        limit: Duration,
    },
    /// sysfs says the kernel slot is no longer connected.
    #[error("nbd{0} is no longer connected")]
    SlotDisconnected(u32),
    /// sysfs could not be read.
    #[error("reading sysfs of nbd{index}: {source}")]
    Sysfs {
        /// The slot.
        index: u32,
        /// Why.
        source: std::io::Error,
    },
    /// A kernel sandbox without a slot index.
    #[error("no device index")]
    NoDeviceIndex,
    /// A socket sandbox without a socket.
    #[error("no NBD socket")]
    NoSocket,
    /// The socket probe failed.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The probe's task did not return.
    #[error("{0}")]
    ProbeTask(String),
}

fn socket_of(uri: &str) -> Option<PathBuf> {
    uri.split_once("socket=").map(|(_, p)| PathBuf::from(p))
}

/// An error with its sources, `: `-separated.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

/// Fault injection: acts on `STATE/faults/kill-connection.ID` if present.
fn inject_faults(core: &Core, sb: &Sandbox, provider: &AnyProvider) {
    let trigger = core.faults_dir().join(format!("kill-connection.{}", sb.id));
    if std::fs::remove_file(&trigger).is_err() {
        return;
    }
    match provider.inject_connection_failure() {
        Ok(true) => {
            tracing::warn!(sandbox = %sb.id, "fault injection: shut down one kernel connection")
        }
        Ok(false) => tracing::warn!(sandbox = %sb.id, "fault injection: no live connection"),
        Err(e) => tracing::warn!(sandbox = %sb.id, "fault injection: {e}"),
    }
}

/// Replaces a kernel sandbox's dead connections with `NBD_CMD_RECONFIGURE`; records a success
/// (event, status, metric) and describes a failure.
async fn reconnect(
    core: &Core,
    sb: &Sandbox,
    provider: &mut AnyProvider,
    dead: usize,
    connections: usize,
) -> Result<(), CheckFailure> {
    let device = sb.status().device_path;
    match provider.reconnect().await {
        Ok(0) => Ok(()),
        Ok(n) => {
            let msg = format!("reconnected {n} connection(s) of {device} with RECONFIGURE");
            tracing::info!(sandbox = %sb.id, "{msg}");
            sb.update(|s| {
                s.recoveries += 1;
                s.message.clone_from(&msg);
            });
            core.metrics.recovery(Recovery::Reconnected);
            core.events.emit(
                EventBus::event(EventKind::Health)
                    .sandbox(&sb.id)
                    .health(Health::Healthy)
                    .message(msg),
            );
            Ok(())
        }
        Err(e) => {
            core.metrics.recovery(Recovery::ReconnectFailed);
            Err(CheckFailure::ReconnectFailed {
                dead,
                connections,
                device,
                error: e,
            })
        }
    }
}

/// Retries of a failed check before it counts (each after a doubling pause).
const CONFIRM_RETRIES: u32 = 2;
/// The pause before the first retry.
const CONFIRM_BACKOFF: Duration = Duration::from_millis(100);

impl CheckFailure {
    /// Whether an immediate retry may see something else (a probe that met a busy moment),
    /// as opposed to a verdict that a retry cannot change within the round.
    fn is_transient(&self) -> bool {
        !matches!(
            self,
            CheckFailure::RequestStuck { .. } | CheckFailure::ReconnectFailed { .. }
        )
    }
}

/// Checks one sandbox under its lifecycle lock, confirming a failure by retrying, and records
/// the verdict (health, state, events) before the lock is released. `None` when it was busy, or
/// holds no served disk.
pub(super) async fn check(core: &Core, sb: &Sandbox) -> Option<Result<(), CheckFailure>> {
    let served = |s: SandboxState| matches!(s, SandboxState::Running | SandboxState::Failed);
    if !served(sb.state()) {
        return None;
    }
    let mut live = sb.live.try_lock().ok()?;
    if !served(sb.state()) {
        return None;
    }
    reap_exited_vm(core, sb, &mut live);
    let provider = live.provider.as_mut()?;
    let mut r = probe(core, sb, provider).await;
    let mut pause = CONFIRM_BACKOFF;
    for _ in 0..CONFIRM_RETRIES {
        match &r {
            Err(f) if f.is_transient() => {
                tracing::debug!(sandbox = %sb.id, "health check failed, confirming: {f}");
                tokio::time::sleep(pause).await;
                pause *= 2;
                r = probe(core, sb, provider).await;
            }
            _ => break,
        }
    }
    super::record(core, sb, &r);
    drop(live);
    Some(r)
}

/// A VM that has exited (the guest powered off, or QEMU died) is reaped and reported; the disk
/// stays served, and the record no longer names the VM (a restart adopts the disk alone).
fn reap_exited_vm(core: &Core, sb: &Sandbox, live: &mut Live) {
    let Some(vm) = live.vm.as_mut() else {
        return;
    };
    if let Some(how) = vm.exited() {
        let msg = format!("the VM exited ({how})");
        live.vm = None;
        if sb.state() == SandboxState::Running {
            if let Some(p) = live.provider.as_ref() {
                if let Err(e) = crate::daemon::persist::save_running(core, sb, live, p, None) {
                    tracing::warn!(sandbox = %sb.id, "rewriting the record of a sandbox whose VM exited: {e}");
                }
            }
        }
        sb.update(|s| {
            s.vm_pid = 0;
            s.message.clone_from(&msg);
        });
        core.events.emit(
            EventBus::event(EventKind::Sandbox)
                .sandbox(&sb.id)
                .state(sb.state())
                .message(msg),
        );
    }
}

/// One look at a served sandbox: repair dead kernel connections, then the checks.
async fn probe(core: &Core, sb: &Sandbox, provider: &mut AnyProvider) -> Result<(), CheckFailure> {
    provider
        .path(Duration::ZERO, std::future::ready(()))
        .await
        .map_err(CheckFailure::NotReady)?;
    if let Some(h) = provider.connection_health() {
        if h.dead > 0 {
            reconnect(core, sb, provider, h.dead, h.connections).await?;
        }
    }
    if core.config.fault_injection {
        // After the recovery step, so the fault stands until the next round (a failure
        // between rounds, as in life).
        inject_faults(core, sb, provider);
    }
    let provider = &*provider;
    if let Some(age) = provider.oldest_request_age() {
        let limit = core.stuck_request();
        if age > limit {
            return Err(CheckFailure::RequestStuck { age, limit });
        }
    }
    let status = sb.status();
    match provider {
        AnyProvider::Kernel(_) => {
            let index = status.device_index.ok_or(CheckFailure::NoDeviceIndex)?;
            match core.kernel.slot_connected(index) {
                Ok(true) => Ok(()),
                Ok(false) => Err(CheckFailure::SlotDisconnected(index)),
                Err(source) => Err(CheckFailure::Sysfs { index, source }),
            }
        }
        _ => {
            let sock = socket_of(&status.nbd_uri).ok_or(CheckFailure::NoSocket)?;
            let t = core.probe_timeout();
            let refused = || provider.nbd_stats().map_or(0, |s| s.refused_connections);
            let refused_before = refused();
            match tokio::task::spawn_blocking(move || probe_nbd_socket(&sock, t)).await {
                // The export is at a connection limit (`limits.max_connections_per_export` or the
                // shared budget) and closed the probe at once, as it closes every connection past
                // it: its accept loop answered, so it is alive. Clients holding connections are
                // not a failure of the sandbox (marking it FAILED would be wrong: it serves them).
                Ok(Err(e)) if e.is_closed_at_once() && refused() > refused_before => Ok(()),
                Ok(r) => r.map_err(CheckFailure::from),
                Err(e) => Err(CheckFailure::ProbeTask(e.to_string())),
            }
        }
    }
}
