//! Pre-connected ("warm") slots: a device connected to the kernel ahead of time, serving a
//! [`SwitchableDevice`] that is bound to a sandbox's overlay at attach time, so that attaching
//! costs no netlink connect, no dispatcher start and no wait for the kernel.
//!
//! A warm slot is used once: binding is permanent (a `OnceLock`, so the data path takes no lock),
//! and the slot is closed like any attachment when the sandbox ends. Before binding, reads return
//! zeroes (the kernel's partition scan at connect time reads a few sectors) and writes fail with
//! `ESHUTDOWN`; binding drops the device's page cache (`BLKFLSBUF`) so nothing read before the
//! bind is ever served from cache, after waiting for reads sent before the bind to finish (a page
//! still locked for such a read would survive the flush and be filled with zeroes after it). The export size is fixed at connect time, so a warm slot only
//! fits devices of exactly its size.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rootfork_block::{
    BlockDevice, BlockError, BlockState, Extent, RangeStatus, Result as BlockResult,
};

use super::{AttachError, Attachment};

/// A device of fixed size whose contents come from a device bound later, once.
pub struct SwitchableDevice {
    size: u64,
    block_size: u32,
    inner: OnceLock<Arc<dyn BlockDevice>>,
}

impl std::fmt::Debug for SwitchableDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchableDevice")
            .field("size", &self.size)
            .field("bound", &self.inner.get().is_some())
            .finish()
    }
}

/// Why a bind failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The device has another size than the slot was connected with.
    #[error("the device has {got} bytes, the warm slot {expected}")]
    SizeMismatch {
        /// The slot's size.
        expected: u64,
        /// The device's size.
        got: u64,
    },
    /// The slot was bound already.
    #[error("the warm slot is already bound")]
    AlreadyBound,
    /// The device is read-only; warm slots are connected writable.
    #[error("read-only devices cannot be bound to a writable warm slot")]
    ReadOnly,
}

impl SwitchableDevice {
    /// An unbound device of `size` bytes.
    pub fn new(size: u64, block_size: u32) -> Self {
        SwitchableDevice {
            size,
            block_size,
            inner: OnceLock::new(),
        }
    }

    /// Binds `device` for good.
    pub fn bind(&self, device: Arc<dyn BlockDevice>) -> Result<(), BindError> {
        if device.size() != self.size {
            return Err(BindError::SizeMismatch {
                expected: self.size,
                got: device.size(),
            });
        }
        if device.is_read_only() {
            return Err(BindError::ReadOnly);
        }
        self.inner.set(device).map_err(|_| BindError::AlreadyBound)
    }

    fn bound(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.inner.get()
    }

    fn check(&self, offset: u64, len: u64) -> BlockResult<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(BlockError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }
}

impl BlockDevice for SwitchableDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        match self.bound() {
            Some(d) => d.read_at(buf, offset),
            None => {
                self.check(offset, buf.len() as u64)?;
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        match self.bound() {
            Some(d) => d.write_at(buf, offset),
            None => Err(BlockError::Shutdown),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> BlockResult<()> {
        match self.bound() {
            Some(d) => d.write_zeroes(offset, len, punch),
            None => Err(BlockError::Shutdown),
        }
    }

    fn trim(&self, offset: u64, len: u64) -> BlockResult<()> {
        match self.bound() {
            Some(d) => d.trim(offset, len),
            None => Err(BlockError::Shutdown),
        }
    }

    fn flush(&self) -> BlockResult<()> {
        match self.bound() {
            Some(d) => d.flush(),
            None => Ok(()),
        }
    }

    fn extents(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        match self.bound() {
            Some(d) => d.extents(offset, len),
            None => {
                self.check(offset, len)?;
                Ok(vec![Extent {
                    len,
                    state: BlockState::Zero,
                }])
            }
        }
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.bound().map(|d| &**d as &dyn BlockDevice)
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<RangeStatus>> {
        match self.bound() {
            Some(d) => d.block_status(offset, len),
            None => rootfork_block::status::stacked(self, offset, len),
        }
    }
}

impl Attachment {
    /// Waits (at most `drain_wait`) until every request the dispatchers received before `since`
    /// is answered and the kernel shows no request in flight (its pages are filled and
    /// unlocked), so that a page-cache flush afterwards drops them.
    fn settle_reads_before(&self, since: Instant) {
        let deadline = Instant::now() + self.drain_wait;
        let sysfs = self.lease.as_ref().map(|l| l.pool().sysfs().clone());
        let mut pause = Duration::from_millis(1);
        loop {
            let ours_done = self.dispatches.as_ref().is_none_or(|d| {
                d.0.iter()
                    .filter_map(|c| c.oldest_request_age())
                    .all(|age| age < since.elapsed())
            });
            let kernel_done = sysfs
                .as_ref()
                .and_then(|s| s.slot(self.index).ok())
                .is_none_or(|s| s.inflight == (0, 0));
            if ours_done && kernel_done {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    index = self.index,
                    ours_done,
                    kernel_done,
                    "requests from before the bind still in flight; dropping the page cache anyway"
                );
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// A connected slot waiting for its device.
pub struct WarmSlot {
    attachment: Attachment,
    device: Arc<SwitchableDevice>,
}

impl std::fmt::Debug for WarmSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmSlot")
            .field("index", &self.attachment.index())
            .field("size", &self.device.size)
            .finish()
    }
}

impl WarmSlot {
    /// Wraps an attachment whose dispatchers serve `device`.
    pub fn new(attachment: Attachment, device: Arc<SwitchableDevice>) -> Self {
        WarmSlot { attachment, device }
    }

    /// [`WarmSlot::new`] for a stock: also drops the page cache now, which the kernel's
    /// partition scan at the attach's open filled with the unbound device's zeroes. The bind
    /// drops it again (anything read since is still dropped there), but then usually finds it
    /// empty, and `BLKFLSBUF` of an empty cache skips the kernel's cross-CPU drain (an IPI and a
    /// work item on every CPU, slow on a busy host's vCPUs), so the create that binds does not
    /// pay for it. On a failed drop the attachment is dropped (disconnected and released without
    /// waiting, see [`Attachment`]).
    pub fn stocked(
        attachment: Attachment,
        device: Arc<SwitchableDevice>,
    ) -> Result<Self, AttachError> {
        attachment.drop_cache()?;
        Ok(WarmSlot::new(attachment, device))
    }

    /// The size of device it fits.
    pub fn size(&self) -> u64 {
        self.device.size
    }

    /// The slot index.
    pub fn index(&self) -> u32 {
        self.attachment.index()
    }

    /// Whether `device` can be bound here.
    pub fn fits(&self, device: &dyn BlockDevice) -> Result<(), BindError> {
        if self.device.inner.get().is_some() {
            return Err(BindError::AlreadyBound);
        }
        if device.size() != self.device.size {
            return Err(BindError::SizeMismatch {
                expected: self.device.size,
                got: device.size(),
            });
        }
        if device.is_read_only() {
            return Err(BindError::ReadOnly);
        }
        Ok(())
    }

    /// Binds `device` (for `sandbox`) and hands out the attachment: no kernel round trip, only a
    /// page-cache flush. Check [`WarmSlot::fits`] first: a failed bind consumes the slot (it is
    /// disconnected and released).
    pub fn bind(
        self,
        device: Arc<dyn BlockDevice>,
        sandbox: &str,
    ) -> Result<Attachment, AttachError> {
        self.bind_with_cache(device, sandbox, None)
    }

    /// [`WarmSlot::bind`], also recording `cache` (the overlay's cache file) in the slot's claim
    /// as a cold attach does, so a reclaim after a crash removes it.
    pub fn bind_with_cache(
        self,
        device: Arc<dyn BlockDevice>,
        sandbox: &str,
        cache: Option<&Path>,
    ) -> Result<Attachment, AttachError> {
        let index = self.index();
        self.device
            .bind(device)
            .map_err(|source| AttachError::Bind { index, source })?;
        let mut attachment = self.attachment;
        // Nothing read while unbound may be served from the page cache. A read the kernel sent
        // before the bind may still be on its way back with zeroes, its page locked for it;
        // `BLKFLSBUF` skips locked pages, so the zeroes would land after the flush. Let those
        // reads finish first.
        attachment.settle_reads_before(Instant::now());
        // Unbound, the device refused every write: nothing needs to be made durable, so no
        // `fsync` (an `NBD_CMD_FLUSH` round trip through the dispatcher to the new overlay),
        // only the page cache dropped.
        attachment.drop_cache()?;
        attachment.rename(sandbox);
        if let Some(cache) = cache {
            attachment.record_cache(cache);
        }
        Ok(attachment)
    }

    /// Disconnects the unused slot and releases it (see [`Attachment::close`]).
    pub async fn close(self) -> Result<(), AttachError> {
        self.attachment.close().await
    }
}
