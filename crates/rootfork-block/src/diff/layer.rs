//! A read-only device: a base with a diff applied on top.
//!
//! Lookups binary-search the diff's runs; a request is cut at run boundaries into base reads
//! (gaps), data-file reads and zero fills. This is the device a resumed sandbox's new overlay is
//! stacked on.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use super::map::{DiffKind, DiffMap};
use crate::device::{BlockDevice, BlockState, Extent};
use crate::error::{BlockError, Result};
use crate::sys;

/// A base device with a diff applied, read-only.
pub struct DiffLayer {
    base: Arc<dyn BlockDevice>,
    map: DiffMap,
    data: File,
}

impl std::fmt::Debug for DiffLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiffLayer")
            .field("size", &self.map.size)
            .field("runs", &self.map.runs.len())
            .finish_non_exhaustive()
    }
}

impl DiffLayer {
    /// Opens the diff's data file (`O_RDONLY`) and checks the map against the base and the file.
    pub fn open(base: Arc<dyn BlockDevice>, map: DiffMap, data: &Path) -> Result<DiffLayer> {
        map.validate()?;
        if map.size != base.size() {
            return Err(BlockError::InvalidArgument(
                "diff size differs from its base device",
            ));
        }
        let data = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(data)
            .map_err(|e| BlockError::io("opening the diff data file", e))?;
        let len = data
            .metadata()
            .map_err(|e| BlockError::io("inspecting the diff data file", e))?
            .len();
        if len < map.data_len() {
            return Err(BlockError::InvalidArgument(
                "diff data file is shorter than its map",
            ));
        }
        Ok(DiffLayer { base, map, data })
    }

    /// The diff this layer applies.
    pub fn map(&self) -> &DiffMap {
        &self.map
    }

    /// Calls `f(state, pos, end, data_offset)` for each piece of `offset..end`, in order.
    fn walk(
        &self,
        offset: u64,
        end: u64,
        mut f: impl FnMut(BlockState, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let runs = &self.map.runs;
        let mut i = self.map.first_ending_after(offset);
        let mut pos = offset;
        while pos < end {
            match runs.get(i) {
                Some(run) if run.offset <= pos => {
                    let stop = run.end().min(end);
                    match run.kind {
                        DiffKind::Data { data_offset } => f(
                            BlockState::Data,
                            pos,
                            stop,
                            data_offset + (pos - run.offset),
                        )?,
                        DiffKind::Zero => f(BlockState::Zero, pos, stop, 0)?,
                    }
                    pos = stop;
                    i += 1;
                }
                next => {
                    let stop = next.map_or(end, |r| r.offset.min(end));
                    f(BlockState::Absent, pos, stop, 0)?;
                    pos = stop;
                }
            }
        }
        Ok(())
    }
}

impl BlockDevice for DiffLayer {
    fn size(&self) -> u64 {
        self.map.size
    }

    fn block_size(&self) -> u32 {
        self.map.block_size
    }

    crate::device::read_only_write_side!();

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        BlockError::check_range(offset, buf.len() as u64, self.map.size)?;
        let end = offset + buf.len() as u64;
        self.walk(offset, end, |state, pos, stop, data_offset| {
            let chunk = &mut buf[(pos - offset) as usize..(stop - offset) as usize];
            match state {
                BlockState::Absent => self.base.read_at(chunk, pos),
                BlockState::Data => sys::pread_exact(&self.data, chunk, data_offset)
                    .map_err(|e| BlockError::io("reading the diff data file", e)),
                BlockState::Zero => {
                    chunk.fill(0);
                    Ok(())
                }
            }
        })
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        BlockError::check_range(offset, len, self.map.size)?;
        let mut out: Vec<Extent> = Vec::new();
        self.walk(offset, offset + len, |state, pos, stop, _| {
            match out.last_mut() {
                Some(last) if last.state == state => last.len += stop - pos,
                _ => out.push(Extent {
                    len: stop - pos,
                    state,
                }),
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        Some(self.base.as_ref())
    }
}
