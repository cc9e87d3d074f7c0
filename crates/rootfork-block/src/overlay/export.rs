//! Diff export: the overlay's data and zero blocks as a [`DiffMap`] plus a packed data file.
//!
//! The runs come out in ascending offset order (maximal runs of one kind, so no two neighbours
//! share a kind; blocks zeroed in place are zero runs: the diff says what a range reads as, and
//! a resumed sandbox's fresh cache has nothing allocated for them anyway); data runs are packed back to back into the data file with `copy_file_range`
//! (falling back to `pread`/`pwrite` across file systems). The export holds every stripe lock, so
//! it is a consistent snapshot even if writes are still arriving; they wait until it is done.
//! A pause calls [`Overlay::freeze`] first, which makes that moot.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::state_map::Slot;
use super::Overlay;
use crate::device::BlockState;
use crate::diff::{DiffKind, DiffMap, DiffRun};
use crate::error::{BlockError, Result};
use crate::sys;

impl Overlay {
    /// Writes the overlay's data blocks to a new file at `data_out` (created with `O_EXCL`,
    /// synced before returning) and returns the map of data and zero runs.
    pub fn export_diff(&self, data_out: &Path) -> Result<DiffMap> {
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(data_out)
            .map_err(|e| BlockError::io("creating the diff data file", e))?;
        let result = self.export_into(&out);
        if result.is_err() {
            let _ = std::fs::remove_file(data_out);
        }
        result
    }

    fn export_into(&self, out: &std::fs::File) -> Result<DiffMap> {
        let _all = self.locks.lock_all();
        let blocks = self.map.blocks();
        let mut runs = Vec::new();
        let mut packed = 0u64;
        let mut block = 0;
        while block < blocks {
            let (state, end) = self.export_run(block, blocks);
            let offset = self.block_start(block);
            let len = self.block_end(end - 1) - offset;
            match state {
                BlockState::Absent => {}
                BlockState::Zero => runs.push(DiffRun {
                    offset,
                    len,
                    kind: DiffKind::Zero,
                }),
                BlockState::Data => {
                    sys::copy_range(&self.cache, offset, out, packed, len)
                        .map_err(|e| BlockError::io("copying to the diff data file", e))?;
                    runs.push(DiffRun {
                        offset,
                        len,
                        kind: DiffKind::Data {
                            data_offset: packed,
                        },
                    });
                    packed += len;
                }
            }
            block = end;
        }
        out.sync_all()
            .map_err(|e| BlockError::io("syncing the diff data file", e))?;
        Ok(DiffMap {
            size: self.size,
            block_size: self.block_size,
            runs,
        })
    }

    /// The kind of `block` in the diff and the end of its maximal run (before `limit`): blocks
    /// zeroed in place export as zero runs, next to zero blocks or on their own, since the
    /// diff only says what a range reads as.
    fn export_run(&self, block: u64, limit: u64) -> (BlockState, u64) {
        let kind = |slot: Slot| match slot {
            Slot::ZeroedData => BlockState::Zero,
            other => other.state(),
        };
        let (slot, mut end) = self.map.slot_run(block, limit);
        let state = kind(slot);
        while end < limit {
            let (next, next_end) = self.map.slot_run(end, limit);
            if kind(next) != state {
                break;
            }
            end = next_end;
        }
        (state, end)
    }
}
