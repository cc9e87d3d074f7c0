//! The overlay's write path: writes, write-zeroes and trims.
//!
//! Every mutation locks the stripes of the regions it touches (`range_lock.rs`), so a
//! read-modify-write of a partial block never interleaves with another change to that block,
//! while requests on other regions run in parallel.
//!
//! Ordering rules (what keeps a failed request harmless):
//! 1. Partial head and tail blocks are merged (which may read the base) *before* anything is
//!    written, so a failing base read fails the request with nothing changed.
//! 2. A block's new contents reach the cache (`pwrite`, `fallocate`) *before* its state changes.
//!    If the cache write fails (`EIO`, `ENOSPC`) the state is left alone: a block that was absent
//!    or zero still reads exactly as before, and whatever the failed write left in the cache under
//!    it is punched out again (best effort) so a full file system gets its space back. A block
//!    that already held data keeps the data state; like a disk sector it may hold a mix of old
//!    and new bytes after a failed overwrite.
//!    A block zeroed in place (`NO_HOLE`, zeroed data) that a failed write touched becomes plain
//!    data, so block status never calls a mix of bytes zeroes. With a persisted state
//!    (`persist.rs`) the changed map words are written to the state file's live copy after the
//!    map changes and before the request returns.
//! 3. Blocks are handled in ascending order and the request stops at the first failure: blocks
//!    before it hold the new contents, the failed block and those after it their previous ones.

use super::state_map::{Slot, BLOCKS_PER_WORD};
use super::Overlay;
use crate::device::BlockState;
use crate::error::{BlockError, Result};
use crate::sys;

/// What a mutation writes.
#[derive(Clone, Copy)]
pub(super) enum Payload<'a> {
    /// Client bytes; whole blocks of zeroes among them are stored as zero blocks.
    Bytes(&'a [u8]),
    /// Zeroes; with `punch` they become zero blocks (deallocated), without it the cache is
    /// zeroed in place and the blocks stay allocated (NBD's `NO_HOLE`).
    Zeroes { punch: bool },
}

impl Overlay {
    /// Applies `payload` to `len` bytes at `offset`.
    pub(super) fn mutate(&self, offset: u64, len: u64, payload: Payload<'_>) -> Result<()> {
        if self.is_frozen() {
            return Err(BlockError::Shutdown);
        }
        BlockError::check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = offset >> self.shift;
        let last = (end - 1) >> self.shift;
        let _guard = self.locks.lock(first, last);
        // Re-checked under the lock: `freeze` drains every stripe after setting the flag.
        if self.is_frozen() {
            return Err(BlockError::Shutdown);
        }
        self.check_quota(first, last, payload)?;

        let head = self.merge_partial(first, offset, end, payload)?;
        let tail = if last != first {
            self.merge_partial(last, offset, end, payload)?
        } else {
            None
        };
        let full_start = if head.is_some() { first + 1 } else { first };
        let full_end = if tail.is_some() { last } else { last + 1 };

        if let Some(block) = head {
            self.store_merged(first, &block, payload)?;
        }
        if full_start < full_end {
            self.store_full(full_start, full_end, offset, payload)?;
        }
        if let Some(block) = tail {
            self.store_merged(last, &block, payload)?;
        }
        Ok(())
    }

    /// `ENOSPC` when the blocks `first..=last` that are not data yet would take the overlay past
    /// its quota (writes of bytes and zeroes kept allocated; punched zeroes allocate nothing).
    /// Blocks that turn out to hold only zeroes are stored as zero blocks, so the check is
    /// conservative by at most one request; concurrent requests on other regions may together
    /// pass the quota by what they allocate at once.
    fn check_quota(&self, first: u64, last: u64, payload: Payload<'_>) -> Result<()> {
        let Some(quota) = self.quota_blocks else {
            return Ok(());
        };
        if matches!(payload, Payload::Zeroes { punch: true }) {
            return Ok(());
        }
        let mut new = 0;
        let mut block = first;
        while block <= last {
            let (state, end) = self.map.run(block, last + 1);
            if state != BlockState::Data {
                new += end - block;
            }
            block = end;
        }
        let (_, data, _) = self.map.counts();
        if new > 0 && data + new > quota {
            return Err(BlockError::errno_io(
                "the overlay's quota is full",
                libc::ENOSPC,
            ));
        }
        Ok(())
    }

    /// If `block` is only partly covered by `offset..end`, its current contents with the
    /// payload's part applied.
    fn merge_partial(
        &self,
        block: u64,
        offset: u64,
        end: u64,
        payload: Payload<'_>,
    ) -> Result<Option<Vec<u8>>> {
        let (start, stop) = (self.block_start(block), self.block_end(block));
        if offset <= start && end >= stop {
            return Ok(None);
        }
        let mut buf = vec![0u8; (stop - start) as usize];
        self.read_range(&mut buf, start)?;
        let (from, to) = (offset.max(start), end.min(stop));
        let dst = &mut buf[(from - start) as usize..(to - start) as usize];
        match payload {
            Payload::Bytes(src) => {
                dst.copy_from_slice(&src[(from - offset) as usize..(to - offset) as usize])
            }
            Payload::Zeroes { .. } => dst.fill(0),
        }
        Ok(Some(buf))
    }

    /// Stores one merged partial block.
    fn store_merged(&self, block: u64, buf: &[u8], payload: Payload<'_>) -> Result<()> {
        match payload {
            Payload::Zeroes { punch: false } => self.store_data(block, block + 1, buf),
            _ if sys::is_zero(buf) => self.store_zero(block, block + 1),
            _ => self.store_data(block, block + 1, buf),
        }
    }

    /// Stores the fully covered blocks `start..end` of a request at `offset`.
    fn store_full(&self, start: u64, end: u64, offset: u64, payload: Payload<'_>) -> Result<()> {
        match payload {
            Payload::Zeroes { punch: true } => self.store_zero(start, end),
            Payload::Zeroes { punch: false } => self.store_zeroes_allocated(start, end),
            Payload::Bytes(src) => {
                let slice = |a: u64, b: u64| {
                    &src[(self.block_start(a) - offset) as usize
                        ..(self.block_end(b - 1) - offset) as usize]
                };
                // Split into runs of all-zero and other blocks; each run is one cache operation.
                let mut run_start = start;
                let mut run_zero = sys::is_zero(slice(start, start + 1));
                for block in start + 1..=end {
                    let zero = block < end && sys::is_zero(slice(block, block + 1));
                    if block < end && zero == run_zero {
                        continue;
                    }
                    if run_zero {
                        self.store_zero(run_start, block)?;
                    } else {
                        self.store_data(run_start, block, slice(run_start, block))?;
                    }
                    run_start = block;
                    run_zero = zero;
                }
                Ok(())
            }
        }
    }

    /// Writes `data` (exactly blocks `start..end`) to the cache, then marks them data.
    fn store_data(&self, start: u64, end: u64, data: &[u8]) -> Result<()> {
        if let Err(e) = sys::pwrite_all(&self.cache, data, self.block_start(start)) {
            self.discard_failed(start, end);
            return Err(BlockError::io("writing the overlay cache", e));
        }
        self.set_state(start, end, Slot::Data)
    }

    /// Punches blocks `start..end` out of the cache, then marks them zero.
    fn store_zero(&self, start: u64, end: u64) -> Result<()> {
        if self.map.all(start, end, BlockState::Zero) {
            return Ok(());
        }
        // Punch whole blocks even past the end of a short last block (with KEEP_SIZE that is
        // allowed), so its page is deallocated instead of zeroed in place.
        let (from, to) = (self.block_start(start), self.block_start(end));
        match sys::punch_hole(&self.cache, from, to - from) {
            // Without hole punching the stale bytes stay allocated but are never read: zero
            // blocks read as a memset.
            Err(e) if !sys::is_unsupported(&e) => {
                return Err(BlockError::io("punching the overlay cache", e))
            }
            _ => {}
        }
        self.set_state(start, end, Slot::Zero)
    }

    /// Zeroes blocks `start..end` in the cache keeping them allocated, then marks them zeroed
    /// data (data to the read path, allocated zeroes to block status).
    fn store_zeroes_allocated(&self, start: u64, end: u64) -> Result<()> {
        let (from, to) = (self.block_start(start), self.block_end(end - 1));
        if let Err(e) = sys::zero_allocated(&self.cache, from, to - from) {
            self.discard_failed(start, end);
            return Err(BlockError::io("zeroing the overlay cache", e));
        }
        self.set_state(start, end, Slot::ZeroedData)
    }

    /// Sets blocks `start..end` (non-empty) to `slot` in the map and, when the state is
    /// persisted and a word changed, in the state file's live copy: the state reaches the kernel
    /// before the request is acknowledged.
    fn set_state(&self, start: u64, end: u64, slot: Slot) -> Result<()> {
        let (_, changed) = self.map.apply(start, end, slot);
        match &self.persist {
            Some(persist) if changed => {
                let words = |b: u64| (b / BLOCKS_PER_WORD) as usize;
                persist
                    .record(&self.map, words(start), words(end - 1))
                    .map_err(|e| BlockError::io("writing the overlay state file", e))
            }
            _ => Ok(()),
        }
    }

    /// After a failed cache write to blocks `start..end`: deallocates whatever it left under the
    /// blocks that are not data (their state says the cache is not read there), best effort, and
    /// demotes zeroed-data blocks to plain data, since their bytes may now be a mix.
    fn discard_failed(&self, start: u64, end: u64) {
        let mut block = start;
        while block < end {
            let (slot, run_end) = self.map.slot_run(block, end);
            match slot {
                Slot::Data => {}
                Slot::ZeroedData => {
                    // Best effort like the punch below: the request fails either way.
                    let _ = self.set_state(block, run_end, Slot::Data);
                }
                Slot::Absent | Slot::Zero => {
                    let (from, to) = (self.block_start(block), self.block_start(run_end));
                    let _ = sys::punch_hole(&self.cache, from, to - from);
                }
            }
            block = run_end;
        }
    }
}
