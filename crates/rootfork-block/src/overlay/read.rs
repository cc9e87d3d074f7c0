//! The overlay's read path: one read per run of blocks in the same state.
//!
//! A request is cut at state boundaries only: a run of absent blocks is one read of the base, a
//! run of data blocks one `pread` of the cache, a run of zero blocks a `memset`. No lock is taken:
//! a block's state only changes after the cache holds its new contents, so a reader sees either
//! the old or the new contents of a block being written concurrently.

use super::stats::Counters;
use super::Overlay;
use crate::device::BlockState;
use crate::error::{BlockError, Result};
use crate::sys;

impl Overlay {
    /// Reads `buf.len()` bytes at `offset` (already range-checked).
    pub(super) fn read_range(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let last = (end - 1) >> self.shift;
        let mut pos = offset;
        while pos < end {
            let (state, run_end) = self.map.run(pos >> self.shift, last + 1);
            let run_end = self.block_start(run_end).min(end);
            let chunk = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            match state {
                BlockState::Absent => {
                    self.base.read_at(chunk, pos)?;
                    Counters::add(&self.counters.read_base, chunk.len() as u64);
                }
                BlockState::Data => {
                    sys::pread_exact(&self.cache, chunk, pos)
                        .map_err(|e| BlockError::io("reading the overlay cache", e))?;
                    Counters::add(&self.counters.read_cache, chunk.len() as u64);
                }
                BlockState::Zero => chunk.fill(0),
            }
            pos = run_end;
        }
        Ok(())
    }
}
