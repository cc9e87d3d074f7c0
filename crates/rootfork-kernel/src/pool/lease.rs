//! [`Lease`]: the move-only claim on one slot. Dropping it always releases the claim (the lock
//! file is unlocked and its record says `released`), so a slot can never leak from this process;
//! whether the slot is reusable is decided by the quiescence check at the next claim.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::lockfile::{LockRecord, RecordState, SlotLock};
use super::{DevicePool, PoolEvent};
use crate::identity::device_path;

/// A claimed slot. Not `Clone`: exactly one owner releases it.
#[derive(Debug)]
pub struct Lease {
    pool: DevicePool,
    index: u32,
    sandbox: String,
    cache: Option<PathBuf>,
    dead_conn_timeout: Option<Duration>,
    pub(super) lock: Option<SlotLock>,
}

impl Lease {
    pub(crate) fn new(pool: DevicePool, index: u32, sandbox: String, lock: SlotLock) -> Self {
        Lease {
            pool,
            index,
            sandbox,
            cache: None,
            dead_conn_timeout: None,
            lock: Some(lock),
        }
    }

    /// The slot index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The device node of the slot.
    pub fn device_path(&self) -> PathBuf {
        device_path(self.index)
    }

    /// The sandbox it was claimed for.
    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    /// The pool it came from.
    pub fn pool(&self) -> &DevicePool {
        &self.pool
    }

    /// Records the attachment's overlay cache file in the lock file, so that a reclaim after a
    /// crash can remove it.
    pub fn set_cache_path(&mut self, cache: &Path) -> io::Result<()> {
        self.cache = Some(cache.to_owned());
        self.write_claim()
    }

    /// Records the device's `dead_conn_timeout` in the lock file: after the owner dies, another
    /// rootfork instance may disconnect the device once this long has passed (the kernel has
    /// failed its I/O by then).
    pub fn set_dead_conn_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.dead_conn_timeout = timeout;
        self.write_claim()
    }

    /// Renames the sandbox the claim is for (a warm slot handed to a sandbox).
    pub fn set_sandbox(&mut self, sandbox: &str) -> io::Result<()> {
        self.sandbox = sandbox.to_owned();
        if let Some(s) = self.pool.shared.local.lock().get_mut(&self.index) {
            s.sandbox = sandbox.to_owned();
        }
        self.write_claim()
    }

    fn write_claim(&mut self) -> io::Result<()> {
        let rec = LockRecord {
            cache: self.cache.clone(),
            dead_conn_timeout_ms: self.dead_conn_timeout.map(|d| d.as_millis() as u64),
            ..self.pool.claim_record(&self.sandbox)
        };
        match &mut self.lock {
            Some(l) => l.write(&rec),
            None => Ok(()),
        }
    }

    /// Marks the device connected or disconnected (listing and events).
    pub(crate) fn set_connected(&self, connected: bool) {
        if let Some(s) = self.pool.shared.local.lock().get_mut(&self.index) {
            s.connected = connected;
        }
        self.pool.emit(if connected {
            PoolEvent::Connected { index: self.index }
        } else {
            PoolEvent::Disconnected { index: self.index }
        });
    }

    /// Keeps the claim for as long as this process lives instead of releasing it: the device may
    /// still be connected (its `DISCONNECT` failed), and a free lock would tell every other
    /// rootfork that its owner is gone. The slot stays listed as claimed; when this process
    /// exits, the lock goes and reclaim takes over.
    pub fn retain(self) {
        tracing::warn!(
            index = self.index,
            "keeping the claim of a device that may still be connected until this process exits"
        );
        self.keep_until_exit();
    }

    /// Keeps the claim, as it stands (`claimed`, with its cache file and `dead_conn_timeout`),
    /// until this process exits: a device handed over to the next process of this instance
    /// ([`crate::Attachment::hand_over`]) looks to it exactly as after a crash.
    pub(crate) fn keep_until_exit(mut self) {
        if let Some(lock) = self.lock.take() {
            self.pool.shared.retained.lock().push(lock);
        }
    }

    /// Releases the claim now (the same as dropping it).
    pub fn release(mut self) {
        self.release_inner();
    }

    fn release_inner(&mut self) {
        let Some(mut lock) = self.lock.take() else {
            return;
        };
        let rec = LockRecord::now(RecordState::Released, &self.sandbox);
        if let Err(e) = lock.write(&rec) {
            // The claim is still released (the lock goes with the file); only the cooldown is lost.
            tracing::warn!(index = self.index, "cannot write the release record: {e}");
        }
        drop(lock);
        let shared = &self.pool.shared;
        shared.local.lock().remove(&self.index);
        shared.metrics.claimed.fetch_sub(1, Ordering::Relaxed);
        shared
            .metrics
            .releases_total
            .fetch_add(1, Ordering::Relaxed);
        self.pool.emit(PoolEvent::Released { index: self.index });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release_inner();
    }
}
