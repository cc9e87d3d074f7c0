//! Diff export: the overlay's data and zero blocks as a [`DiffMap`] plus a packed data file.
//!
//! The runs come out in ascending offset order (maximal runs of one state, so no two neighbours
//! share a kind); data runs are packed back to back into the data file with `copy_file_range`
//! (falling back to `pread`/`pwrite` across file systems). The export holds every stripe lock, so
//! it is a consistent snapshot even if writes are still arriving; they wait until it is done.
//! A pause calls [`Overlay::freeze`] first, which makes that moot.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
            let (state, end) = self.map.run(block, blocks);
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
}
