//! The periodic health check of every served sandbox.
//!
//! * socket provider: the provider must still report its device ready, and the export must
//!   answer: the probe connects to the sandbox's NBD socket, reads the server's newstyle greeting
//!   (`NBDMAGIC` `IHAVEOPT`), sends `NBD_OPT_ABORT` and hangs up, all within the probe timeout —
//!   so a dead or wedged accept/handshake thread is caught;
//! * kernel provider: the provider must still report its device ready, every connection's
//!   dispatcher must be alive — a dead one is *recovered* first (below) — and sysfs must show the
//!   slot connected (`pid` present);
//! * no request stuck (both providers): the oldest NBD request waiting for the server or
//!   dispatcher (received, queued or executing on the device, reply not yet queued; see
//!   rootfork-nbd's `oldest_request_age`) must not have waited longer than
//!   `health.stuck_request_secs`.
//!
//! Recovery: when a kernel sandbox has dead connections (a dispatcher finished: its socket hit
//! an I/O error or its thread ended), the round replaces them with fresh sockets and dispatchers
//! handed to the kernel with `NBD_CMD_RECONFIGURE` (`KernelProvider::reconnect`). Success is a
//! HEALTH event and the sandbox's `message` ("reconnected N connection(s) of /dev/nbdX with
//! RECONFIGURE"), its `recoveries` count and `rootfork_health_recoveries_total{result=
//! "reconnected"}`; the rest of the check then runs as usual. A failed reconnect fails the check
//! with the error (`result="reconnect_failed"`), and the next round tries again. The kernel holds
//! I/O on a dead connection for `kernel.dead_conn_timeout_secs` (default 30 s, longer than the
//! health interval), so the guest sees a pause, not an error, when a round repairs it in time.
//!
//! A check runs under the sandbox's lifecycle lock from its first probe to the recorded verdict,
//! so no pause or delete interleaves with it. A failure that an immediate retry could change (a
//! probe, sysfs) is confirmed first: up to two retries, 100 ms then 200 ms apart; only a failure
//! that survives them counts. One counted failure marks the sandbox DEGRADED; a second
//! consecutive one marks it FAILED (its state too; `result="marked_failed"`) with the reason, and
//! both are events. A pass makes it HEALTHY again, and a FAILED sandbox that passes is RUNNING
//! again (`result="revived"`, a SANDBOX event): FAILED is a verdict on the device, not a dead end.
//! A FAILED sandbox can still be paused (its data saved) or deleted.
//!
//! Fault injection (`debug.fault_injection`, off by default, for testing recovery): a file
//! `STATE/faults/kill-connection.ID` makes the round remove it and shut down one connection of
//! kernel sandbox ID (`KernelProvider::inject_connection_failure`) after its recovery step, so
//! the dead connection stands until the next round's recovery.
//!
//! A sandbox whose lifecycle lock is held (an operation in progress) is skipped for that round.
//! The same round reaps a sandbox's QEMU when it has exited (pid cleared, reason in the message,
//! a `SANDBOX` event); the disk stays served.

mod check;
mod probe;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::daemon::core::Core;
use crate::daemon::model::{Health, SandboxState};
use crate::daemon::sandbox::Sandbox;
use crate::events::{EventBus, EventKind};
use crate::metrics::Recovery;

pub use check::CheckFailure;
pub use probe::{probe_nbd_socket, ProbeError};

/// Failed checks in a row that mark a sandbox failed.
pub const FAILS_TO_MARK_FAILED: u32 = 2;

/// Runs one round over every sandbox.
pub async fn round(core: &Core) {
    round_beating(core, None).await
}

/// One round, stamping `heartbeat` with the time after every sandbox's check and at the end: the
/// loop's sign of life for the service manager's watchdog (`notify.rs`). A check is bounded (probe
/// timeout, retries; a busy sandbox is skipped), so only a hung loop leaves the stamp to age.
async fn round_beating(core: &Core, heartbeat: Option<&watch::Sender<Instant>>) {
    let all: Vec<Arc<Sandbox>> = core.sandboxes.read().values().cloned().collect();
    for sb in all {
        if let Some(r) = check::check(core, &sb).await {
            core.metrics.health_check(r.is_ok());
        }
        if let Some(b) = heartbeat {
            b.send_replace(Instant::now());
        }
    }
    if let Some(b) = heartbeat {
        b.send_replace(Instant::now());
    }
}

/// Records a (confirmed) verdict; the caller holds the sandbox's lifecycle lock.
///
/// A pass makes the sandbox `HEALTHY` (an event when it was not) and a `FAILED` one `RUNNING`
/// again (not one whose VM was lost across a restart: its disk is fine, its guest is gone); a failure makes it `DEGRADED`, and the [`FAILS_TO_MARK_FAILED`]th in a row `FAILED`
/// (health and state).
fn record(core: &Core, sb: &Sandbox, r: &Result<(), CheckFailure>) {
    let before = sb.status().health;
    match r {
        Ok(()) => {
            sb.update(|s| {
                s.failed_checks = 0;
                s.health = Health::Healthy;
            });
            if before != Health::Healthy {
                core.events.emit(
                    EventBus::event(EventKind::Health)
                        .sandbox(&sb.id)
                        .health(Health::Healthy)
                        .message("recovered"),
                );
            }
            if sb.state() == SandboxState::Failed && !sb.status().vm_lost {
                tracing::info!(sandbox = %sb.id, "health check passes again: running");
                core.metrics.recovery(Recovery::Revived);
                core.set_state(
                    sb,
                    SandboxState::Running,
                    Some("the health check passes again".into()),
                );
            }
        }
        Err(failure) => {
            let why = failure.to_string();
            let mut health = Health::Degraded;
            sb.update(|s| {
                s.failed_checks += 1;
                if s.failed_checks >= FAILS_TO_MARK_FAILED {
                    health = Health::Failed;
                }
                s.health = health;
                s.message.clone_from(&why);
            });
            tracing::warn!(sandbox = %sb.id, health = ?health, "health check failed: {why}");
            if health != before {
                core.events.emit(
                    EventBus::event(EventKind::Health)
                        .sandbox(&sb.id)
                        .health(health)
                        .message(why.clone()),
                );
            }
            if health == Health::Failed && sb.state() == SandboxState::Running {
                core.metrics.health_failed();
                core.set_state(sb, SandboxState::Failed, Some(why));
            }
        }
    }
}

/// The checker task: a round every `interval` until `stop` fires, stamping `heartbeat` as it
/// goes (see [`round_beating`]).
pub async fn run(
    core: Arc<Core>,
    interval: Duration,
    heartbeat: watch::Sender<Instant>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => round_beating(&core, Some(&heartbeat)).await,
            _ = stop.changed() => return,
        }
    }
}
