//! Health and repair of an attachment's connections.
//!
//! A connection is *dead* when its dispatch has finished (its reader ended on an I/O error, a
//! panic or a shutdown) or when a reconnect removed it and was cancelled before replacing it.
//! [`Attachment::connection_health`] reports it; [`Attachment::reconnect`] replaces every dead
//! connection with `NBD_CMD_RECONFIGURE`:
//!
//! 1. each dead dispatch is shut down (`SHUT_RDWR` on our end, so the kernel's receive returns 0
//!    and it marks its socket dead) and joined; its place becomes a vacancy;
//! 2. one new socketpair and dispatch per vacancy;
//! 3. `RECONFIGURE {INDEX, SOCKETS{ITEM{FD}}…, BACKEND_IDENTIFIER}` (the kernel refuses a device
//!    connected with an identifier unless the request repeats it);
//! 4. our copies of the kernel ends are closed, and each new connection is checked: the kernel
//!    puts a socket only in place of one it has already marked dead, and silently drops the rest
//!    (`nbd_reconnect_socket` returns `-ENOSPC`, which `nbd_genl_reconfigure` turns into
//!    success). A dropped socket has no other reference once our copy is closed, so our end
//!    shows `POLLHUP` at once — no timing guess. Those dispatches are stopped, and
//!    the rest is retried with bounded backoff (the kernel marks a socket dead asynchronously,
//!    in its receive worker) until `connect_wait` has passed, then [`AttachError::NotReconnected`].
//!
//! Cancellation: the only awaits are between attempts, when every new dispatch is either part
//! of the attachment or stopped and joined; a vacancy left by a dropped future counts as dead, so
//! the next `reconnect` fills it.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::netlink::{NbdControl, NlError, ReconfigureRequest};

use super::guards::Dispatches;
use super::seams::Dispatcher;
use super::wait::stage_boundary;
use super::{AttachError, Attachment};

/// Live state of an attachment's connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionHealth {
    /// The connections the device was attached with.
    pub connections: usize,
    /// Of which dead: their dispatch has finished (or a cancelled reconnect left the place
    /// empty). [`Attachment::reconnect`] replaces them.
    pub dead: usize,
    /// Requests received by the live dispatches and not yet answered.
    pub in_flight: usize,
    /// How long the oldest request still waiting for a dispatch has waited.
    pub oldest_request_age: Option<Duration>,
}

impl Attachment {
    /// Live state of the connections (cheap: atomics and thread states, no syscalls).
    pub fn connection_health(&self) -> ConnectionHealth {
        let Some(d) = self.dispatches.as_ref() else {
            return ConnectionHealth {
                connections: self.connections,
                dead: self.connections,
                ..Default::default()
            };
        };
        let finished = d.0.iter().filter(|c| c.is_finished()).count();
        ConnectionHealth {
            connections: self.connections,
            dead: finished + self.connections.saturating_sub(d.0.len()),
            in_flight: d.in_flight(),
            oldest_request_age: d.0.iter().filter_map(|c| c.oldest_request_age()).max(),
        }
    }

    /// Replaces every dead connection: shuts down and joins the dead dispatch, new socketpair,
    /// new dispatch from `dispatcher`, `NBD_CMD_RECONFIGURE` with the new kernel ends (same
    /// index, backend identifier repeated). Returns how many were replaced (0 when none was
    /// dead). Cancellation-safe like attach. See the module docs.
    ///
    /// `dispatcher` must serve the same device the attachment was made with (its size is
    /// checked; the kernel fixed the size at connect).
    pub async fn reconnect(&mut self, dispatcher: &dyn Dispatcher) -> Result<usize, AttachError> {
        let index = self.index;
        if dispatcher.size() != self.size {
            return Err(AttachError::Invalid(
                "reconnect needs a dispatcher of the attached device's size",
            ));
        }
        let dispatches = self
            .dispatches
            .as_mut()
            .expect("present until close or drop");
        // 1. Stop and join the dead ones: each leaves a vacancy.
        let (dead, live): (Vec<_>, Vec<_>) = std::mem::take(&mut dispatches.0)
            .into_iter()
            .partition(|d| d.is_finished());
        dispatches.0 = live;
        for d in dead {
            d.shutdown();
            d.wait();
        }
        let wanted = self.connections.saturating_sub(dispatches.0.len());
        if wanted == 0 {
            return Ok(0);
        }
        tracing::info!(index, dead = wanted, "reconnecting dead NBD connections");

        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let missing = self.connections - dispatches.0.len();
            let taken = offer(
                dispatcher,
                self.control.as_ref(),
                index,
                &self.backend,
                missing,
                dispatches,
            )?;
            if taken == missing {
                tracing::info!(
                    index,
                    replaced = wanted,
                    attempts,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "NBD connections reconnected"
                );
                return Ok(wanted);
            }
            tracing::debug!(
                index,
                offered = missing,
                taken,
                "the kernel had fewer dead sockets than offered; retrying"
            );
            let spent = started.elapsed();
            if spent >= self.reconnect_wait {
                return Err(AttachError::NotReconnected {
                    index,
                    missing: missing - taken,
                    attempts,
                    waited_ms: spent.as_millis() as u64,
                });
            }
            stage_boundary().await;
            tokio::time::sleep(pause.min(self.reconnect_wait - spent)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

/// One attempt: `n` new connections offered to the kernel with one RECONFIGURE; the ones it
/// took join `into`, the others are stopped and joined. Returns how many it took.
fn offer(
    dispatcher: &dyn Dispatcher,
    control: &dyn NbdControl,
    index: u32,
    backend: &str,
    n: usize,
    into: &mut Dispatches,
) -> Result<usize, AttachError> {
    // The new dispatches are held by a guard (stop + join on drop) until sorted.
    let mut fresh = Dispatches::default();
    let mut probes = Vec::with_capacity(n);
    let mut kernel_ends = Vec::with_capacity(n);
    for _ in 0..n {
        let (ours, kernels) = UnixStream::pair().map_err(AttachError::Socket)?;
        probes.push(ours.try_clone().map_err(AttachError::Socket)?);
        fresh
            .0
            .push(dispatcher.spawn(ours).map_err(AttachError::Dispatch)?);
        kernel_ends.push(kernels);
    }
    let req = ReconfigureRequest {
        index,
        sockets: kernel_ends.iter().map(|s| s.as_raw_fd()).collect(),
        backend_identifier: Some(backend.to_owned()),
        ..Default::default()
    };
    let sent = control.reconfigure(&req);
    // The kernel holds its own references to the ends it took; the others close with ours.
    drop(kernel_ends);
    match sent {
        Ok(()) => Ok(sort(fresh, &probes, into)),
        // Nothing was taken: the guard stops and joins the new dispatches.
        Err(source @ NlError::NotSent(_)) => Err(AttachError::Reconfigure { index, source }),
        // The kernel handles the sockets one by one and stops at the first it refuses, keeping
        // the ones it already put in place: keep those too, and let the caller retry the rest.
        Err(source @ NlError::Refused { .. }) => match sort(fresh, &probes, into) {
            0 => Err(AttachError::Reconfigure { index, source }),
            taken => {
                tracing::warn!(
                    index,
                    taken,
                    offered = n,
                    "RECONFIGURE refused after taking some sockets: {source}"
                );
                Ok(taken)
            }
        },
        // The kernel may have taken some: keep those (the others are dead, and the next
        // reconnect replaces them).
        Err(source) => {
            sort(fresh, &probes, into);
            Err(AttachError::Reconfigure { index, source })
        }
    }
}

/// Moves the connections of `fresh` whose kernel end is still open into `into`; stops and joins
/// the ones whose peer is gone. Returns how many were moved.
fn sort(mut fresh: Dispatches, probes: &[UnixStream], into: &mut Dispatches) -> usize {
    let mut taken = 0;
    for (d, probe) in fresh.0.drain(..).zip(probes) {
        if peer_gone(probe) || d.is_finished() {
            d.shutdown();
            d.wait();
        } else {
            into.0.push(d);
            taken += 1;
        }
    }
    taken
}

/// Whether the other end of `ours` is closed (or ours shut down): `POLLHUP` without waiting.
/// This is how a socket the kernel dropped (or never took) is told from a live connection.
pub fn peer_gone(ours: &UnixStream) -> bool {
    // A closed peer of a stream socket sets our end's shutdown to both directions, which poll
    // always reports as POLLHUP (no events need asking for).
    let mut fds = [PollFd::new(ours.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => true,
    }
}
