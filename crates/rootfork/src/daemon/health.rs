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
//! One failed check marks the sandbox DEGRADED; a second consecutive one marks it FAILED (its
//! state too; `result="marked_failed"`) with the reason, and both are events. A passing check
//! after DEGRADED makes it HEALTHY again.
//!
//! Fault injection (`debug.fault_injection`, off by default, for testing recovery): a file
//! `STATE/faults/kill-connection.ID` makes the round remove it and shut down one connection of
//! kernel sandbox ID (`KernelProvider::inject_connection_failure`) after its recovery step, so
//! the dead connection stands until the next round's recovery.
//!
//! A sandbox whose lifecycle lock is held (an operation in progress) is skipped for that round.
//! The same round reaps a sandbox's QEMU when it has exited (pid cleared, reason in the message,
//! a `SANDBOX` event); the disk stays served.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rootfork_provider::{AnyProvider, Provider};

use crate::daemon::core::Core;
use crate::daemon::model::{Health, SandboxState};
use crate::daemon::sandbox::Sandbox;
use crate::events::{EventBus, EventKind};
use crate::metrics::Recovery;

/// Failed checks in a row that mark a sandbox failed.
pub const FAILS_TO_MARK_FAILED: u32 = 2;

/// Probes an NBD Unix socket's newstyle handshake.
pub fn probe_nbd_socket(path: &std::path::Path, timeout: Duration) -> Result<(), String> {
    let mut s =
        UnixStream::connect(path).map_err(|e| format!("connecting to {}: {e}", path.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).map_err(|e| {
        format!(
            "no NBD greeting on {} within {timeout:?}: {e}",
            path.display()
        )
    })?;
    if &greet[..8] != b"NBDMAGIC" || &greet[8..16] != b"IHAVEOPT" {
        return Err(format!(
            "{} answered with something that is not an NBD greeting",
            path.display()
        ));
    }
    // Client flags (FIXED_NEWSTYLE | NO_ZEROES), then NBD_OPT_ABORT with no data.
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&3u32.to_be_bytes());
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&2u32.to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&msg)
        .map_err(|e| format!("writing to {}: {e}", path.display()))?;
    Ok(())
}

fn socket_of(uri: &str) -> Option<PathBuf> {
    uri.split_once("socket=").map(|(_, p)| PathBuf::from(p))
}

/// An error with its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
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
) -> Result<(), String> {
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
            Err(format!(
                "{dead} of {connections} connection(s) of {device} dead; reconnecting with RECONFIGURE failed: {}",
                chain(&e)
            ))
        }
    }
}

/// Checks one sandbox; `None` when it was busy or not running.
async fn check(core: &Core, sb: &Sandbox) -> Option<Result<(), String>> {
    if sb.state() != SandboxState::Running {
        return None;
    }
    let mut live = sb.live.try_lock().ok()?;
    // A VM that has exited (the guest powered off, or QEMU died) is reaped and reported; the
    // disk stays served.
    if let Some(vm) = live.vm.as_mut() {
        if let Ok(Some(exit)) = vm.try_exit() {
            let msg = format!("the VM exited ({}) after {:?}", exit.status, exit.elapsed);
            live.vm = None;
            sb.update(|s| {
                s.vm_pid = 0;
                s.message.clone_from(&msg);
            });
            core.events.emit(
                EventBus::event(EventKind::Sandbox)
                    .sandbox(&sb.id)
                    .state(SandboxState::Running)
                    .message(msg),
            );
        }
    }
    let provider = live.provider.as_mut()?;
    if let Err(e) = provider.path(Duration::ZERO, std::future::ready(())).await {
        return Some(Err(format!("provider no longer ready: {e}")));
    }
    if let Some(h) = provider.connection_health() {
        if h.dead > 0 {
            if let Err(why) = reconnect(core, sb, provider, h.dead, h.connections).await {
                return Some(Err(why));
            }
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
            return Some(Err(format!(
                "an NBD request has been stuck for {:.1}s (limit {}s)",
                age.as_secs_f64(),
                limit.as_secs_f64()
            )));
        }
    }
    let status = sb.status();
    let r = match provider {
        AnyProvider::Kernel(_) => match status.device_index {
            Some(i) => match core.kernel.slot_connected(i) {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!("nbd{i} is no longer connected")),
                Err(e) => Err(e),
            },
            None => Err("no device index".into()),
        },
        _ => {
            let Some(sock) = socket_of(&status.nbd_uri) else {
                return Some(Err("no NBD socket".into()));
            };
            drop(live);
            let t = core.probe_timeout();
            tokio::task::spawn_blocking(move || probe_nbd_socket(&sock, t))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        }
    };
    Some(r)
}

/// Runs one round over every sandbox.
pub async fn round(core: &Core) {
    let all: Vec<Arc<Sandbox>> = core.sandboxes.read().values().cloned().collect();
    for sb in all {
        let Some(r) = check(core, &sb).await else {
            continue;
        };
        core.metrics.health_check(r.is_ok());
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
            }
            Err(why) => {
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
                    sb.update(|s| s.state = SandboxState::Failed);
                    core.events.emit(
                        EventBus::event(EventKind::Sandbox)
                            .sandbox(&sb.id)
                            .state(SandboxState::Failed)
                            .message(why),
                    );
                }
            }
        }
    }
}

/// The checker task: a round every `interval` until `stop` fires.
pub async fn run(
    core: Arc<Core>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => round(&core).await,
            _ = stop.changed() => return,
        }
    }
}
