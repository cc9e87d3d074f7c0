//! The overlay's block status: its own blocks are changes, absent ones are whatever its base says.
//!
//! Data blocks are [`Contents::Data`], blocks zeroed in place (`NO_HOLE`) [`Contents::Zeroes`]
//! (allocated), zero blocks [`Contents::Hole`]; all three differ from the template. A run of
//! absent blocks is described by the base's own [`BlockDevice::block_status`](crate::BlockDevice::block_status), so under a resumed
//! sandbox's overlay the paused diff's runs stay changed and the template's holes stay holes.
//! Like reads, this takes no lock: it describes each block as it was at some moment during the
//! call.

use super::state_map::Slot;
use super::Overlay;
use crate::error::{BlockError, Result};
use crate::status::{self, Contents, RangeStatus};

impl Overlay {
    /// [`BlockDevice::block_status`](crate::BlockDevice::block_status) of the overlay.
    pub(super) fn status_range(&self, offset: u64, len: u64) -> Result<Vec<RangeStatus>> {
        BlockError::check_range(offset, len, self.size)?;
        let mut out = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let end = offset + len;
        let last = (end - 1) >> self.shift;
        let mut pos = offset;
        while pos < end {
            let (slot, run_end) = self.map.slot_run(pos >> self.shift, last + 1);
            let run_end = self.block_start(run_end).min(end);
            let n = run_end - pos;
            match slot {
                Slot::Data => status::push(&mut out, n, Contents::Data, true),
                Slot::ZeroedData => status::push(&mut out, n, Contents::Zeroes, true),
                Slot::Zero => status::push(&mut out, n, Contents::Hole, true),
                Slot::Absent => {
                    if status::inherit(self.base.as_ref(), pos, n, &mut out)? < n {
                        break;
                    }
                }
            }
            pos = run_end;
        }
        Ok(out)
    }
}
