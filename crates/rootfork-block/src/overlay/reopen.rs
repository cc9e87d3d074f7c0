//! Reopening a persisted overlay (cache + `<cache>.state`) after process death or power loss.
//!
//! Which copy of the map is trusted follows from the boot id in the header: the same boot means
//! the process died but the kernel did not, so the page cache holds every `pwrite` and the live
//! copy is exact; another boot means power was lost (or the host rebooted), so only what was
//! synced survived and the checkpoint is the map to use. Before the overlay serves requests the
//! chosen copy is written over the live copy, blocks not holding data are punched out of the
//! cache (orphans of writes that never reached the map), the header gets this boot's id and the
//! next generation, and with [`Durability::Durable`] the state file is synced.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use super::persist::PersistedState;
use super::state_file::{state_path, Header};
use super::state_map::{Slot, StateMap};
use super::{boot_id, grow, Durability, Overlay, OverlayOptions};
use crate::device::BlockDevice;
use crate::error::{BlockError, Result, StateField};
use crate::sys;

/// Which copy of the persisted map a reopen used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateCopy {
    /// The live copy: the state file was last written in this boot (process death), so every
    /// acknowledged write is there.
    Live,
    /// The durable checkpoint: the state file comes from an earlier boot (power loss or
    /// reboot), so writes acknowledged before the last completed flush are there and later ones
    /// read old or new data.
    Checkpoint,
}

/// What [`Overlay::reopen`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReopenReport {
    /// The copy of the map that was used.
    pub copy: StateCopy,
    /// Blocks held in the cache.
    pub blocks_data: u64,
    /// Blocks that read as zeroes with nothing allocated.
    pub blocks_zero: u64,
    /// How many times the overlay has been opened before this one (0 at create, +1 per reopen).
    pub generation: u64,
}

impl Overlay {
    /// Reopens the overlay whose cache is `cache_path` and whose state is
    /// [`state_path`]`(cache_path)`, over the same `base` and with the same options it was
    /// created with (`persist_state` is implied). Picks the live copy of the map after process
    /// death and the checkpoint after a power loss (see [`StateCopy`]).
    ///
    /// A missing state file is [`BlockError::StateMissing`], one that cannot be trusted
    /// [`BlockError::StateDamaged`], one describing another disk (block size, device size,
    /// base size, cache length) [`BlockError::StateMismatch`]. Dropping the result without
    /// `keep_cache` removes both files, as for [`Overlay::create`].
    pub fn reopen(
        base: Arc<dyn BlockDevice>,
        cache_path: &Path,
        opts: OverlayOptions,
    ) -> Result<(Overlay, ReopenReport)> {
        Self::reopen_with(base, cache_path, opts, None)
    }

    /// Like [`Overlay::reopen`], but always uses the checkpoint, as after a power loss. For
    /// checking a crash image taken in the same boot (the crash tests) and for operators who
    /// distrust the live copy.
    pub fn reopen_from_checkpoint(
        base: Arc<dyn BlockDevice>,
        cache_path: &Path,
        opts: OverlayOptions,
    ) -> Result<(Overlay, ReopenReport)> {
        Self::reopen_with(base, cache_path, opts, Some(StateCopy::Checkpoint))
    }

    fn reopen_with(
        base: Arc<dyn BlockDevice>,
        cache_path: &Path,
        opts: OverlayOptions,
        force: Option<StateCopy>,
    ) -> Result<(Overlay, ReopenReport)> {
        opts.validate()?;
        let opts = OverlayOptions {
            persist_state: true,
            ..opts
        };
        let (file, header, copies) = PersistedState::open(&state_path(cache_path))?;
        let base_size = base.size();
        let base = grow(base, &opts)?;
        let size = base.size();
        check(
            StateField::BlockSize,
            header.block_size.into(),
            opts.block_size.into(),
        )?;
        check(StateField::BaseSize, header.base_size, base_size)?;
        check(StateField::DeviceSize, header.device_size, size)?;

        let cache = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(cache_path)
            .map_err(|e| BlockError::io("opening the overlay cache", e))?;
        let cache_len = cache
            .metadata()
            .map_err(|e| BlockError::io("reading the overlay cache", e))?
            .len();
        check(StateField::CacheSize, cache_len, size)?;

        let now = boot_id::current()?;
        let copy = force.unwrap_or(if header.boot_id == now {
            StateCopy::Live
        } else {
            StateCopy::Checkpoint
        });
        let chosen = match copy {
            StateCopy::Live => &copies.live,
            StateCopy::Checkpoint => &copies.checkpoint,
        };
        let map = StateMap::from_le_words(header.blocks(), chosen)?;
        let durable = opts.durability == Durability::Durable;
        let mut persist = PersistedState::with(file, header, durable)?;
        let io = |e| BlockError::io("rewriting the overlay state file", e);
        // The live copy must say what the map says before anything is acknowledged.
        let canonical: Vec<u8> = (0..map.word_count())
            .flat_map(|i| map.load_word(i).to_le_bytes())
            .collect();
        persist.write_copy(true, &canonical).map_err(io)?;
        // Words where the checkpoint lags the map are due at the next checkpoint.
        for (i, (c, m)) in copies
            .checkpoint
            .chunks_exact(8)
            .zip(canonical.chunks_exact(8))
            .enumerate()
        {
            if c != m {
                persist.mark_dirty(i);
            }
        }
        let header = Header {
            generation: header.generation.saturating_add(1),
            boot_id: now,
            ..header
        };
        persist.write_header(header).map_err(io)?;
        if durable {
            persist.sync().map_err(io)?;
        }
        let overlay = Self::assemble(base, cache, cache_path, &opts, map, Some(persist));
        overlay.punch_orphans();
        let (_, data, zero) = overlay.map.counts();
        let report = ReopenReport {
            copy,
            blocks_data: data,
            blocks_zero: zero,
            generation: header.generation,
        };
        Ok((overlay, report))
    }

    /// Deallocates the cache under every block that is not data (best effort): bytes of writes
    /// that never reached the map, which the map says are never read.
    fn punch_orphans(&self) {
        let blocks = self.map.blocks();
        let mut block = 0;
        while block < blocks {
            let (slot, end) = self.map.slot_run(block, blocks);
            if matches!(slot, Slot::Absent | Slot::Zero) {
                let (from, to) = (self.block_start(block), self.block_start(end));
                let _ = sys::punch_hole(&self.cache, from, to - from);
            }
            block = end;
        }
    }
}

/// [`BlockError::StateMismatch`] unless the state file's value equals the requested one.
fn check(field: StateField, in_file: u64, requested: u64) -> Result<()> {
    if in_file == requested {
        Ok(())
    } else {
        Err(BlockError::StateMismatch {
            field,
            in_file,
            requested,
        })
    }
}
