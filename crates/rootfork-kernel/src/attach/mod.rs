//! Attachments: an overlay served to the kernel as `/dev/nbdN`.
//!
//! [`Attacher::attach`] runs claim → socketpairs → kernel-mode dispatchers → `NBD_CMD_CONNECT` →
//! wait until sysfs shows the device connected (bounded backoff, no spin) → verify the size →
//! open and keep a device fd. Every step's resource is held by a guard declared after the previous
//! one's, so an error or a dropped future unwinds in reverse: disconnect, stop dispatchers,
//! release the claim. Each step ends at a cancellation point.
//!
//! [`Attachment::close`] is the orderly path: flush (`fsync` + `BLKFLSBUF`) → close the fd → drain
//! the dispatchers → `NBD_CMD_DISCONNECT` → join the dispatchers → wait until the slot is
//! quiescent → release. Dropping an [`Attachment`] without `close` still disconnects, stops and
//! releases, but does not wait for quiescence (the pool re-checks it before reuse).
//!
//! [`Attachment::connection_health`] and [`Attachment::reconnect`] (`reconnect.rs`) watch and
//! repair the connections while attached: a dead dispatch is replaced with
//! `NBD_CMD_RECONFIGURE`.
//!
//! The netlink requests are short blocking syscalls with a receive timeout; they run inline on
//! the calling task, which is what keeps cancellation exact: a request is either not started or
//! finished (and its guard armed) when the future can be dropped.

mod adopt;
mod error;
mod guards;
mod nbd_dispatch;
mod reconnect;
mod seams;
mod wait;
mod warm;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use error::AttachError;
pub use nbd_dispatch::NbdDispatcher;
pub use reconnect::{peer_gone, ConnectionHealth};
pub use seams::{DeviceNodes, Dispatch, Dispatcher, HostNodes};
pub use warm::{BindError, SwitchableDevice, WarmSlot};

use crate::identity::device_path;
use crate::netlink::{ConnectRequest, NbdControl, NlError};
use crate::pool::{DevicePool, Lease};
use guards::{Connected, Dispatches};
use wait::{stage_boundary, until};

/// The logical block size rootfork gives the kernel by default: 512, so every file system a
/// template can hold mounts (ext4 with 1 KiB blocks, the `mkfs.ext4` default below 512 MiB, is
/// refused on a device whose logical blocks are larger than its own: `bad block size 1024`).
///
/// The nbd driver sets the physical block size to the same value (`nbd_set_size` calls both
/// `blk_queue_logical_block_size` and `blk_queue_physical_block_size` with
/// `NBD_ATTR_BLOCK_SIZE_BYTES`; the netlink family has no separate physical or minimum-I/O hint),
/// so the device cannot tell file systems that 4 KiB is the overlay's block. A write smaller than
/// an overlay block is merged with a read-modify-write in the overlay (`rootfork-block`), and the
/// NBD engine accepts any alignment (`ServeOptions::min_block_size` 1). docs/kernel.md has the
/// measured cost against 4096.
pub const BLOCK_SIZE: u64 = 512;

/// The most sockets one device may have.
pub const MAX_CONNECTIONS: usize = 64;

/// The most slots one attach tries after `CONNECT` is refused with `EBUSY`.
const MAX_BUSY_SKIPS: usize = 64;

/// How to attach.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// The sandbox the device is for (in the claim and the backend identifier).
    pub sandbox: String,
    /// Sockets (kernel connections) for the device.
    pub connections: usize,
    /// The logical (and, in the nbd driver, physical) block size (`NBD_ATTR_BLOCK_SIZE_BYTES`),
    /// [`BLOCK_SIZE`] (512) by default; the kernel accepts powers of two from 512 to the page
    /// size. The device size must be a multiple of it. A file system whose block is smaller than
    /// this does not mount (4096 refuses ext4 with 1 KiB or 2 KiB blocks).
    pub block_size: u64,
    /// The kernel's request timeout; must exceed the worst backend latency.
    pub timeout: Duration,
    /// How long the kernel waits for a dead connection to be replaced, if at all.
    pub dead_conn_timeout: Option<Duration>,
    /// `NBD_CFLAG_*`.
    pub client_flags: u64,
    /// Bound on waiting for sysfs to show the device connected, and on
    /// [`Attachment::reconnect`]'s retries.
    pub connect_wait: Duration,
    /// Bound on waiting for in-flight requests before disconnecting.
    pub drain_wait: Duration,
    /// Bound on waiting for quiescence after disconnecting.
    pub quiesce_wait: Duration,
    /// The overlay's cache file, recorded in the claim so a reclaim can remove it.
    pub cache_path: Option<PathBuf>,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            sandbox: String::new(),
            connections: 1,
            block_size: BLOCK_SIZE,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: None,
            client_flags: 0,
            connect_wait: Duration::from_secs(10),
            drain_wait: Duration::from_secs(10),
            quiesce_wait: Duration::from_secs(10),
            cache_path: None,
        }
    }
}

/// Attaches dispatchers to devices of a pool.
#[derive(Clone)]
pub struct Attacher {
    pool: DevicePool,
    control: Arc<dyn NbdControl>,
    nodes: Arc<dyn DeviceNodes>,
}

impl std::fmt::Debug for Attacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attacher")
            .field("pool", &self.pool)
            .finish()
    }
}

impl Attacher {
    /// An attacher over `pool`, talking to the kernel through `control` and `nodes`.
    pub fn new(
        pool: DevicePool,
        control: Arc<dyn NbdControl>,
        nodes: Arc<dyn DeviceNodes>,
    ) -> Self {
        Attacher {
            pool,
            control,
            nodes,
        }
    }

    /// The pool.
    pub fn pool(&self) -> &DevicePool {
        &self.pool
    }

    /// Attaches `dispatcher`'s device to a free slot. See the module docs for the steps.
    pub async fn attach(
        &self,
        dispatcher: &dyn Dispatcher,
        opts: &AttachOptions,
    ) -> Result<Attachment, AttachError> {
        let started = Instant::now();
        let r = self.attach_inner(dispatcher, opts, started).await;
        match &r {
            Ok(a) => self.pool.record_connect_latency(a.connect_latency),
            Err(e) => self.pool.record_failure(e.errno()),
        }
        r
    }

    async fn attach_inner(
        &self,
        dispatcher: &dyn Dispatcher,
        opts: &AttachOptions,
        started: Instant,
    ) -> Result<Attachment, AttachError> {
        if opts.connections == 0 || opts.connections > MAX_CONNECTIONS {
            return Err(AttachError::Invalid("connections must be 1..=64"));
        }
        let size = dispatcher.size();
        if opts.block_size == 0 || size == 0 || !size.is_multiple_of(opts.block_size) {
            return Err(AttachError::Invalid(
                "the device size must be a non-zero multiple of the block size",
            ));
        }

        // 1.-4. Claim, socketpairs, dispatchers, connect. A slot whose CONNECT is refused with
        // EBUSY has an opener sysfs cannot show (an idle `open` of `/dev/nbdN` by udev, blkid or
        // anyone else holds its config): it is skipped, its claim kept until the attach ends so
        // the next claim moves on, and the next slot is tried.
        let mut skipped: Vec<Lease> = Vec::new();
        let backend = self.pool.config().identity.backend(&opts.sandbox);
        let (lease, dispatches, kernel_ends, connected) = loop {
            let mut lease = match self.pool.claim(&opts.sandbox) {
                Ok(l) => l,
                Err(e) if !skipped.is_empty() => {
                    tracing::warn!(
                        "every other slot is unavailable ({e}) after {} refused CONNECT with EBUSY",
                        skipped.len()
                    );
                    return Err(AttachError::Pool(e));
                }
                Err(e) => return Err(e.into()),
            };
            let index = lease.index();
            record_in_claim(&mut lease, opts)?;
            stage_done(index, "claimed", started);
            stage_boundary().await;

            // 2. Socketpairs, 3. dispatchers on our ends.
            let mut dispatches = Dispatches::default();
            let mut kernel_ends = Vec::with_capacity(opts.connections);
            for _ in 0..opts.connections {
                let (ours, kernels) = UnixStream::pair().map_err(AttachError::Socket)?;
                dispatches
                    .0
                    .push(dispatcher.spawn(ours).map_err(AttachError::Dispatch)?);
                kernel_ends.push(kernels);
            }
            stage_done(index, "dispatching", started);
            stage_boundary().await;

            // 4. Connect. From here on the device may be connected: the guard disconnects on
            // error.
            let req = ConnectRequest {
                index: Some(index),
                size_bytes: size,
                block_size_bytes: opts.block_size,
                timeout_secs: opts.timeout.as_secs().max(1),
                dead_conn_timeout_secs: opts.dead_conn_timeout.map(|d| d.as_secs()),
                server_flags: dispatcher.server_flags(),
                client_flags: opts.client_flags,
                sockets: kernel_ends.iter().map(|s| s.as_raw_fd()).collect(),
                backend_identifier: Some(backend.to_string()),
            };
            match self.control.connect(&req) {
                Ok(_) => {
                    break (
                        lease,
                        dispatches,
                        kernel_ends,
                        Connected::new(self.control.clone(), index),
                    )
                }
                Err(NlError::Refused { errno: libc::EBUSY })
                    if skipped.len() + 1 < MAX_BUSY_SKIPS =>
                {
                    tracing::info!(index, "CONNECT refused with EBUSY (the device is held open); trying the next slot");
                    drop(dispatches);
                    skipped.push(lease);
                    stage_boundary().await;
                }
                Err(source) => {
                    let _maybe = source
                        .may_have_taken_effect()
                        .then(|| Connected::new(self.control.clone(), index));
                    return Err(AttachError::Connect { index, source });
                }
            }
        };
        let index = lease.index();
        stage_done(index, "connected", started);
        drop(skipped);
        // The kernel holds its own references to its ends now.
        drop(kernel_ends);
        stage_boundary().await;

        // 5. Wait until sysfs shows it connected, 6. with the right size.
        let sysfs = self.pool.sysfs().clone();
        let seen = until(opts.connect_wait, || match sysfs.slot(index) {
            Ok(s) if s.connected() && s.size_sectors != 0 => Some(Ok(s)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .await;
        let seen = match seen {
            None => {
                return Err(AttachError::ConnectTimeout {
                    index,
                    waited_ms: opts.connect_wait.as_millis() as u64,
                })
            }
            Some(Err(source)) => return Err(AttachError::Sysfs { index, source }),
            Some(Ok(s)) => s,
        };
        if seen.size_sectors * 512 != size {
            return Err(AttachError::SizeMismatch {
                index,
                expected: size,
                got: seen.size_sectors * 512,
            });
        }
        stage_done(index, "seen_in_sysfs", started);
        stage_boundary().await;

        // 7. Open and keep the device fd.
        let file = self
            .nodes
            .open(index)
            .map_err(|source| AttachError::Open { index, source })?;
        stage_done(index, "opened", started);
        lease.set_connected(true);
        Ok(Attachment {
            index,
            size,
            connections: opts.connections,
            backend: backend.to_string(),
            control: self.control.clone(),
            reconnect_wait: opts.connect_wait,
            connect_latency: started.elapsed(),
            file: Some(file),
            connected: Some(connected),
            dispatches: Some(dispatches),
            lease: Some(lease),
            nodes: self.nodes.clone(),
            drain_wait: opts.drain_wait,
            quiesce_wait: opts.quiesce_wait,
        })
    }
}

/// A debug event at the end of an attach stage, with the time since the attach began (for
/// profiling: `RUST_LOG=rootfork_kernel::attach=debug`).
fn stage_done(index: u32, stage: &'static str, started: Instant) {
    tracing::debug!(
        index,
        stage,
        elapsed_us = started.elapsed().as_micros() as u64,
        "attach stage done"
    );
}

/// A connected `/dev/nbdN` served by dispatchers. Dropping it disconnects and releases the slot;
/// [`Attachment::close`] does so in order and waits for quiescence.
pub struct Attachment {
    index: u32,
    size: u64,
    /// Connections attached with; fewer dispatches than this means vacancies (dead).
    connections: usize,
    /// The backend identifier the device was connected with (RECONFIGURE repeats it).
    backend: String,
    control: Arc<dyn NbdControl>,
    reconnect_wait: Duration,
    connect_latency: Duration,
    // Dropped in this order (see `Drop`): fd, device, dispatchers, claim.
    file: Option<File>,
    connected: Option<Connected>,
    dispatches: Option<Dispatches>,
    lease: Option<Lease>,
    nodes: Arc<dyn DeviceNodes>,
    drain_wait: Duration,
    quiesce_wait: Duration,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("index", &self.index)
            .field("size", &self.size)
            .finish()
    }
}

impl Attachment {
    /// The slot index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The device node (`/dev/nbdN`).
    pub fn device_path(&self) -> PathBuf {
        device_path(self.index)
    }

    /// The device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The backend identifier the device was connected with.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Claim-to-open latency of this attach.
    pub fn connect_latency(&self) -> Duration {
        self.connect_latency
    }

    /// The device fd opened at connect time.
    pub fn file(&self) -> &File {
        self.file
            .as_ref()
            .expect("the file is present until close or drop")
    }

    /// Records a new sandbox name in the slot's claim (for a warm slot handed to a sandbox).
    pub(crate) fn rename(&mut self, sandbox: &str) {
        if let Some(l) = &mut self.lease {
            if let Err(e) = l.set_sandbox(sandbox) {
                tracing::warn!(
                    index = self.index,
                    "cannot record the sandbox of the claim: {e}"
                );
            }
        }
    }

    /// Records the overlay's cache file in the slot's claim (for a warm slot handed to a
    /// sandbox), so a reclaim after a crash removes it.
    pub(crate) fn record_cache(&mut self, cache: &Path) {
        if let Some(l) = &mut self.lease {
            if let Err(e) = l.set_cache_path(cache) {
                tracing::warn!(
                    index = self.index,
                    "cannot record the cache file of the claim: {e}"
                );
            }
        }
    }

    /// `fsync` of the device fd (writeback errors surface here), then `BLKFLSBUF`.
    pub fn flush(&self) -> Result<(), AttachError> {
        self.nodes
            .flush(self.file())
            .map_err(|source| AttachError::Flush {
                index: self.index,
                source,
            })
    }

    /// `BLKFLSBUF` of the device fd alone (see [`DeviceNodes::drop_cache`]).
    pub(crate) fn drop_cache(&self) -> Result<(), AttachError> {
        self.nodes
            .drop_cache(self.file())
            .map_err(|source| AttachError::Flush {
                index: self.index,
                source,
            })
    }

    /// Flushes, disconnects, waits for quiescence and releases the slot. Every step runs even if
    /// an earlier one failed; the first error is returned.
    pub async fn close(mut self) -> Result<(), AttachError> {
        let index = self.index;
        let mut first: Option<AttachError> = None;
        // With every connection dead nothing can serve a flush (it would fail with EIO, or wait
        // `dead_conn_timeout` for a reconnect): skip it, say so, and close the fd only after
        // DISCONNECT, which fails whatever still waits.
        let health = self.connection_health();
        let mut file = self.file.take();
        if health.dead == health.connections {
            first = Some(AttachError::ConnectionsDead {
                index,
                dead: health.dead,
            });
        } else {
            if let Some(f) = &file {
                if let Err(source) = self.nodes.flush(f) {
                    first = Some(AttachError::Flush { index, source });
                }
            }
            drop(file.take());
        }
        let mut dispatches = self.dispatches.take().expect("present until close");
        let connected = self.connected.take().expect("present until close");
        let lease = self.lease.take().expect("present until close");
        stage_boundary().await;

        dispatches.drain();
        until(self.drain_wait, || {
            (dispatches.in_flight() == 0).then_some(())
        })
        .await;
        let disconnect_failed = match connected.disconnect() {
            Ok(()) => false,
            Err(source) => {
                first.get_or_insert(AttachError::Disconnect { index, source });
                true
            }
        };
        drop(file);
        // The kernel sends NBD_CMD_DISC and closes its ends: the dispatchers finish.
        until(self.drain_wait, || dispatches.all_finished().then_some(())).await;
        dispatches.stop();

        let sysfs = lease.pool().sysfs().clone();
        if let Some(why) = sysfs
            .slot(index)
            .ok()
            .and_then(|s| s.check_quiescent().err())
        {
            tracing::info!(index, %why, "teardown still running after DISCONNECT; waiting for quiescence");
            lease.pool().record_teardown_pending(why);
        }
        let last = until(self.quiesce_wait, || match sysfs.slot(index) {
            Ok(s) => s.check_quiescent().is_ok().then_some(Ok(())),
            // An attribute (`pid`, `backend`) removed by the teardown while we read it: the
            // teardown is running, look again.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => None,
            Err(e) => Some(Err(e)),
        })
        .await;
        match last {
            Some(Ok(())) => lease.set_connected(false),
            Some(Err(source)) => {
                first.get_or_insert(AttachError::Sysfs { index, source });
            }
            None => {
                let why = sysfs
                    .slot(index)
                    .ok()
                    .and_then(|s| s.check_quiescent().err());
                if let Some(why) = why {
                    first.get_or_insert(AttachError::NotQuiescent { index, why });
                }
            }
        }
        let still_connected = sysfs.slot(index).is_ok_and(|s| s.connected());
        if disconnect_failed && still_connected {
            // The device still runs: keep the claim, or other rootforks would think its owner
            // is gone and take it.
            lease.retain();
        } else {
            lease.release();
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        drop(self.file.take());
        drop(self.connected.take());
        drop(self.dispatches.take());
        drop(self.lease.take());
    }
}

/// Records what a later reclaim or adoption needs in `lease`'s claim: the overlay's cache file
/// and the device's `dead_conn_timeout`, when `opts` has them.
pub(crate) fn record_in_claim(lease: &mut Lease, opts: &AttachOptions) -> Result<(), AttachError> {
    let index = lease.index();
    if let Some(cache) = &opts.cache_path {
        lease
            .set_cache_path(cache)
            .map_err(|source| AttachError::Sysfs { index, source })?;
    }
    if opts.dead_conn_timeout.is_some() {
        lease
            .set_dead_conn_timeout(opts.dead_conn_timeout)
            .map_err(|source| AttachError::Sysfs { index, source })?;
    }
    Ok(())
}
