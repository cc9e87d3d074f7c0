//! The periodic health check of every served sandbox.
//!
//! * socket provider: the provider must still report its device ready, and the export must
//!   answer: the probe connects to the sandbox's NBD socket, reads the server's newstyle greeting
//!   (`NBDMAGIC` `IHAVEOPT`), sends `NBD_OPT_ABORT` and hangs up, all within the probe timeout —
//!   so a dead or wedged accept/handshake thread is caught;
//! * kernel provider: the provider must still report its device ready and sysfs must show the
//!   slot connected (`pid` present);
//! * no request stuck: the oldest NBD request waiting for the server (received, queued or
//!   executing on the device, reply not yet queued; see rootfork-nbd's `oldest_request_age`)
//!   must not have waited longer than `health.stuck_request_secs`. Only the socket provider
//!   exposes its dispatcher's request ages; the kernel provider's dispatchers sit inside the
//!   rootfork-kernel attachment, so for it this part is not checked yet.
//!
//! One failed check marks the sandbox DEGRADED; a second consecutive one marks it FAILED (its
//! state too) with the reason, and both are events. A passing check after DEGRADED makes it
//! HEALTHY again. Recovery by `NBD_CMD_RECONFIGURE` (new sockets for a dead dispatcher) needs an
//! attachment-level reconnect that rootfork-kernel does not offer yet, so a failed kernel device
//! is reported, not repaired; see docs/daemon.md.
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

use crate::api::v1::{EventKind, HealthState, SandboxState};
use crate::daemon::core::Core;
use crate::daemon::sandbox::Sandbox;
use crate::events::EventBus;

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
    let provider = live.provider.as_ref()?;
    if let Err(e) = provider.path(Duration::ZERO, std::future::ready(())).await {
        return Some(Err(format!("provider no longer ready: {e}")));
    }
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
                    s.health = HealthState::Healthy;
                });
                if before != HealthState::Healthy {
                    core.events.emit(
                        EventBus::event(EventKind::Health)
                            .sandbox(&sb.id)
                            .health(HealthState::Healthy)
                            .message("recovered"),
                    );
                }
            }
            Err(why) => {
                let mut health = HealthState::Degraded;
                sb.update(|s| {
                    s.failed_checks += 1;
                    if s.failed_checks >= FAILS_TO_MARK_FAILED {
                        health = HealthState::Failed;
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
                if health == HealthState::Failed && sb.state() == SandboxState::Running {
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
