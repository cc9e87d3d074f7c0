//! The diff map: ascending, non-overlapping runs of data (in a packed file) and zeroes.

use std::fs::File;

use crate::error::{BlockError, Result};
use crate::sys;

/// What a diff run holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiffKind {
    /// The run's bytes are in the data file at `data_offset`.
    Data {
        /// Where the run starts in the packed data file.
        data_offset: u64,
    },
    /// The run reads as zeroes.
    Zero,
}

/// One run of a diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiffRun {
    /// First byte of the run on the device.
    pub offset: u64,
    /// Length in bytes (not zero).
    pub len: u64,
    /// What it holds.
    pub kind: DiffKind,
}

impl DiffRun {
    /// One past the run's last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The changes of a device relative to its base. Ranges not covered by a run are unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiffMap {
    /// Size of the device in bytes.
    pub size: u64,
    /// Block size of the overlay the diff came from.
    pub block_size: u32,
    /// Runs in ascending offset order, not overlapping.
    pub runs: Vec<DiffRun>,
}

impl DiffMap {
    /// Bytes of the data file the map refers to (one past the end of the last data run).
    pub fn data_len(&self) -> u64 {
        self.runs
            .iter()
            .filter_map(|r| match r.kind {
                DiffKind::Data { data_offset } => Some(data_offset + r.len),
                DiffKind::Zero => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Checks that runs are non-empty, ascending, non-overlapping and inside the device, and
    /// that their data offsets do not overflow.
    pub fn validate(&self) -> Result<()> {
        let mut prev_end = 0u64;
        for run in &self.runs {
            if run.len == 0 {
                return Err(BlockError::InvalidArgument("diff run of length zero"));
            }
            let end = run
                .offset
                .checked_add(run.len)
                .ok_or(BlockError::InvalidArgument("diff run overflows"))?;
            if run.offset < prev_end {
                return Err(BlockError::InvalidArgument(
                    "diff runs overlap or are not in ascending order",
                ));
            }
            if end > self.size {
                return Err(BlockError::InvalidArgument("diff run past the device end"));
            }
            if let DiffKind::Data { data_offset } = run.kind {
                data_offset
                    .checked_add(run.len)
                    .ok_or(BlockError::InvalidArgument("diff data offset overflows"))?;
            }
            prev_end = end;
        }
        Ok(())
    }

    /// Index of the first run that ends after `offset`.
    pub(crate) fn first_ending_after(&self, offset: u64) -> usize {
        self.runs.partition_point(|r| r.end() <= offset)
    }

    /// Writes the diff into `target` (a copy of the base, at least `size` bytes): data runs are
    /// copied from `data` with `copy_file_range`, zero runs are punched (or written as zeroes
    /// where the file system cannot punch). Does not sync `target`.
    pub fn apply_to(&self, data: &File, target: &File) -> Result<()> {
        self.validate()?;
        for run in &self.runs {
            match run.kind {
                DiffKind::Data { data_offset } => {
                    sys::copy_range(data, data_offset, target, run.offset, run.len)
                        .map_err(|e| BlockError::io("applying a diff data run", e))?
                }
                DiffKind::Zero => sys::punch_or_zero(target, run.offset, run.len)
                    .map_err(|e| BlockError::io("applying a diff zero run", e))?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(offset: u64, len: u64) -> DiffRun {
        DiffRun {
            offset,
            len,
            kind: DiffKind::Zero,
        }
    }

    #[test]
    fn validate_rejects_bad_maps() {
        let ok = DiffMap {
            size: 100,
            block_size: 512,
            runs: vec![run(0, 10), run(10, 5), run(90, 10)],
        };
        ok.validate().unwrap();
        for runs in [
            vec![run(0, 10), run(5, 10)],
            vec![run(20, 10), run(0, 10)],
            vec![run(95, 10)],
            vec![run(5, 0)],
            vec![run(u64::MAX, 2)],
        ] {
            let m = DiffMap { runs, ..ok.clone() };
            assert_eq!(m.validate().unwrap_err().errno(), libc::EINVAL, "{m:?}");
        }
    }

    #[test]
    fn data_len_and_lookup() {
        let m = DiffMap {
            size: 100,
            block_size: 512,
            runs: vec![
                run(0, 10),
                DiffRun {
                    offset: 20,
                    len: 30,
                    kind: DiffKind::Data { data_offset: 0 },
                },
                DiffRun {
                    offset: 60,
                    len: 5,
                    kind: DiffKind::Data { data_offset: 30 },
                },
            ],
        };
        assert_eq!(m.data_len(), 35);
        assert_eq!(m.first_ending_after(0), 0);
        assert_eq!(m.first_ending_after(10), 1);
        assert_eq!(m.first_ending_after(49), 1);
        assert_eq!(m.first_ending_after(50), 2);
        assert_eq!(m.first_ending_after(65), 3);
    }
}
