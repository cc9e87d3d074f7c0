//! Adoption and hand-over: a still-configured `/dev/nbdN` passed from one process of a rootfork
//! instance to the next without the kernel ever disconnecting it.
//!
//! [`Attachment::hand_over`] (the old process, at a planned stop): flush the device fd, wait
//! (bounded) for the requests in flight to be answered, shut every connection down (the kernel
//! marks its sockets dead and, with a `dead_conn_timeout`, holds new I/O until a reconnect), leave
//! the device connected and keep the claim as it stands until the process exits — to the next
//! process this looks exactly like a crash.
//!
//! [`Attacher::adopt`] (the next process): claim that slot again (its flock is free once the old
//! process is gone), check that sysfs shows it connected, with this instance's backend
//! identifier for the sandbox and the dispatcher's size, open the device fd and hand the kernel
//! one new socketpair per connection with `NBD_CMD_RECONFIGURE` (no `CONNECT`). It must finish
//! within the device's `dead_conn_timeout`: after that the kernel fails the held I/O.
//!
//! [`Attacher::disconnect_own`] ends a device of this instance that cannot be adopted: claim,
//! check the backend identifier, `DISCONNECT`, wait for quiescence, release.

use std::time::Instant;

use super::guards::{Connected, Dispatches};
use super::seams::Dispatcher;
use super::wait::until;
use super::{AttachError, AttachOptions, Attacher, Attachment, MAX_CONNECTIONS};

impl Attacher {
    /// Serves slot `index` again for `opts.sandbox`: a device this instance connected (with the
    /// backend identifier naming `backend_sandbox`: the sandbox itself, or the warm slot it was
    /// bound to) whose previous owner (an earlier process of this instance) is gone.
    /// `opts.connections` must be
    /// the number of connections it was connected with (the kernel only takes a socket in place
    /// of a dead one). See the module docs.
    ///
    /// Refused without touching the device: a slot claimed by a live process
    /// ([`crate::PoolError::Held`]), one not connected ([`AttachError::NotConnected`]) or
    /// connected by someone else ([`AttachError::BackendMismatch`]). Any later failure (another
    /// size, no socket taken) disconnects the device and releases the slot, as a failed attach
    /// does.
    pub async fn adopt(
        &self,
        dispatcher: &dyn Dispatcher,
        index: u32,
        backend_sandbox: &str,
        opts: &AttachOptions,
    ) -> Result<Attachment, AttachError> {
        let started = Instant::now();
        let r = self
            .adopt_inner(dispatcher, index, backend_sandbox, opts, started)
            .await;
        if let Err(e) = &r {
            self.pool.record_failure(e.errno());
        }
        r
    }

    async fn adopt_inner(
        &self,
        dispatcher: &dyn Dispatcher,
        index: u32,
        backend_sandbox: &str,
        opts: &AttachOptions,
        started: Instant,
    ) -> Result<Attachment, AttachError> {
        if opts.connections == 0 || opts.connections > MAX_CONNECTIONS {
            return Err(AttachError::Invalid("connections must be 1..=64"));
        }
        let mut lease = self.pool.claim_own(index, &opts.sandbox)?;
        let backend = self.check_own(index, backend_sandbox)?;
        // Ours and connected: from here on a failure disconnects it.
        let connected = Connected::new(self.control.clone(), index);
        let st = self
            .pool
            .sysfs()
            .slot(index)
            .map_err(|source| AttachError::Sysfs { index, source })?;
        let size = dispatcher.size();
        if st.size_sectors * 512 != size {
            return Err(AttachError::SizeMismatch {
                index,
                expected: size,
                got: st.size_sectors * 512,
            });
        }
        super::record_in_claim(&mut lease, opts)?;
        let file = self
            .nodes
            .open(index)
            .map_err(|source| AttachError::Open { index, source })?;
        lease.set_connected(true);
        let mut attachment = Attachment {
            index,
            size,
            connections: opts.connections,
            backend,
            control: self.control.clone(),
            reconnect_wait: opts.connect_wait,
            connect_latency: started.elapsed(),
            file: Some(file),
            connected: Some(connected),
            // Every connection is a vacancy: the reconnect fills them all.
            dispatches: Some(Dispatches::default()),
            lease: Some(lease),
            nodes: self.nodes.clone(),
            drain_wait: opts.drain_wait,
            quiesce_wait: opts.quiesce_wait,
        };
        // On error the attachment's drop disconnects and releases.
        attachment.reconnect(dispatcher).await?;
        attachment.connect_latency = started.elapsed();
        tracing::info!(
            index,
            sandbox = %opts.sandbox,
            elapsed_us = attachment.connect_latency.as_micros() as u64,
            "adopted a connected nbd device"
        );
        Ok(attachment)
    }

    /// Disconnects slot `index`, a device this instance connected with the backend identifier
    /// naming `sandbox`, that will not
    /// be served again, waits for quiescence and releases the slot. The cache file its old claim
    /// named is kept (the caller decides about it).
    pub async fn disconnect_own(
        &self,
        index: u32,
        sandbox: &str,
        opts: &AttachOptions,
    ) -> Result<(), AttachError> {
        let lease = self.pool.claim_own(index, sandbox)?;
        self.check_own(index, sandbox)?;
        Connected::new(self.control.clone(), index)
            .disconnect()
            .map_err(|source| AttachError::Disconnect { index, source })?;
        let sysfs = self.pool.sysfs().clone();
        let quiet = until(opts.quiesce_wait, || match sysfs.slot(index) {
            Ok(s) => s.check_quiescent().is_ok().then_some(()),
            Err(_) => None,
        })
        .await;
        lease.release();
        match quiet {
            Some(()) => Ok(()),
            None => match sysfs
                .slot(index)
                .ok()
                .and_then(|s| s.check_quiescent().err())
            {
                Some(why) => Err(AttachError::NotQuiescent { index, why }),
                None => Ok(()),
            },
        }
    }

    /// The backend identifier of slot `index` when it is connected with the one this instance
    /// gives `sandbox`.
    fn check_own(&self, index: u32, sandbox: &str) -> Result<String, AttachError> {
        let st = self
            .pool
            .sysfs()
            .slot(index)
            .map_err(|source| AttachError::Sysfs { index, source })?;
        if !st.connected() {
            return Err(AttachError::NotConnected { index });
        }
        let expected = self.pool.config().identity.backend(sandbox).to_string();
        if st.backend.as_deref() != Some(expected.as_str()) {
            return Err(AttachError::BackendMismatch {
                index,
                expected,
                got: st.backend,
            });
        }
        Ok(expected)
    }
}

impl Attachment {
    /// Hands the device over to the next process of this instance (see the module docs): it
    /// stays connected, its claim is kept until this process exits. Errors are reported but the
    /// hand-over always completes: a failed flush means the kernel's cached writes may not have
    /// reached the overlay (they are re-sent to the next process only if still dirty).
    pub async fn hand_over(mut self) -> Result<(), AttachError> {
        let index = self.index;
        let flushed = match &self.file {
            Some(f) => self
                .nodes
                .flush(f)
                .map_err(|source| AttachError::Flush { index, source }),
            None => Ok(()),
        };
        drop(self.file.take());
        let mut dispatches = self.dispatches.take().expect("present until close");
        // A request shut down while in flight loses its reply and the kernel re-sends it only
        // after its request timeout: wait (bounded) for a moment with none in flight.
        until(self.drain_wait, || {
            (dispatches.in_flight() == 0).then_some(())
        })
        .await;
        dispatches.stop();
        self.connected.take().expect("present until close").disarm();
        self.lease
            .take()
            .expect("present until close")
            .keep_until_exit();
        tracing::info!(
            index,
            "handed a connected nbd device over to the next process"
        );
        flushed
    }
}
