//! The copy-on-write overlay: a writable view of a read-only base device.
//!
//! Writes land in a sparse cache file the size of the device; a 2-bit-per-block state map
//! (`state_map.rs`) says for every block whether it is still read from the base (absent), held in
//! the cache (data) or reads as zeroes with no storage (zero). The data path has no device-wide
//! lock: reads only load the map (`read.rs`), mutations lock the stripes of the regions they touch
//! (`range_lock.rs`, `write.rs`). Creating an overlay opens one file, sets its length and
//! allocates a zeroed map, so it costs the same for a 1 GiB and a 64 GiB template apart from the
//! map's allocation. `export.rs` turns the data and zero blocks into a [`DiffMap`](crate::DiffMap);
//! `status.rs` answers block status queries through the base.
//!
//! With [`OverlayOptions::persist_state`] the map is also kept in a state file beside the cache
//! (`state_file.rs` format, `persist.rs` live copy and flush checkpoints, `reopen.rs`), so
//! [`Overlay::reopen`] can serve the disk again after process death or power loss.
//!
//! See `docs/overlay.md` for the design and the ordering rules that keep failed writes harmless
//! and crashes consistent.

mod boot_id;
mod export;
mod options;
mod persist;
mod range_lock;
mod read;
mod reopen;
mod state_file;
mod state_map;
mod stats;
mod status;
mod write;
mod zeroed;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use options::{Durability, OverlayOptions, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
pub use reopen::{ReopenReport, StateCopy};
pub use state_file::state_path;
pub use stats::OverlayStats;

use crate::device::{BlockDevice, Extent};
use crate::error::{BlockError, Result};
use crate::grown::Grown;
use crate::status::RangeStatus;
use persist::PersistedState;
use range_lock::RangeLocks;
use state_file::Header;
use state_map::StateMap;
use stats::Counters;

/// A copy-on-write overlay over a read-only base device.
pub struct Overlay {
    base: Arc<dyn BlockDevice>,
    cache: File,
    cache_path: PathBuf,
    keep_cache: bool,
    durability: Durability,
    size: u64,
    block_size: u32,
    /// log2 of `block_size`.
    shift: u32,
    map: StateMap,
    locks: RangeLocks,
    frozen: AtomicBool,
    counters: Counters,
    /// [`OverlayOptions::quota`] in blocks.
    quota_blocks: Option<u64>,
    /// The persisted state map ([`OverlayOptions::persist_state`]).
    persist: Option<PersistedState>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("cache_path", &self.cache_path)
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .field("durability", &self.durability)
            .field("frozen", &self.is_frozen())
            .finish_non_exhaustive()
    }
}

impl Overlay {
    /// Creates an overlay over `base` with a new cache file at `cache_path`.
    ///
    /// The cache is created with `O_EXCL` (an existing file is an error, never reused) and
    /// truncated to the device size, so it starts as one hole. Every block starts absent. With
    /// [`OverlayOptions::disk_size`] larger than the base, the base is [`Grown`] to it first.
    /// With [`OverlayOptions::persist_state`] the state file [`state_path`]`(cache_path)` is
    /// created beside it (also `O_EXCL`); with [`Durability::Durable`] too, both files and their
    /// directory are synced before this returns.
    pub fn create(
        base: Arc<dyn BlockDevice>,
        cache_path: &Path,
        opts: OverlayOptions,
    ) -> Result<Overlay> {
        opts.validate()?;
        let base_size = base.size();
        let base = grow(base, &opts)?;
        let size = base.size();
        let blocks = size.div_ceil(u64::from(opts.block_size));
        let map = StateMap::new(blocks)?;
        let cache = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(cache_path)
            .map_err(|e| BlockError::io("creating the overlay cache", e))?;
        if let Err(e) = cache.set_len(size) {
            let _ = std::fs::remove_file(cache_path);
            return Err(BlockError::io("sizing the overlay cache", e));
        }
        let persist = if opts.persist_state {
            match Self::create_state(cache_path, &cache, &opts, size, base_size) {
                Ok(p) => Some(p),
                Err(e) => {
                    let _ = std::fs::remove_file(cache_path);
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(Self::assemble(base, cache, cache_path, &opts, map, persist))
    }

    /// Creates the state file of a new overlay (and syncs everything for a durable one).
    fn create_state(
        cache_path: &Path,
        cache: &File,
        opts: &OverlayOptions,
        size: u64,
        base_size: u64,
    ) -> Result<PersistedState> {
        let header = Header {
            block_size: opts.block_size,
            device_size: size,
            base_size,
            generation: 0,
            boot_id: boot_id::current()?,
        };
        let durable = opts.durability == Durability::Durable;
        let state_path = state_path(cache_path);
        let persist = PersistedState::create(&state_path, header, durable)?;
        if durable {
            let synced = cache.sync_all().and_then(|()| sync_parent_dir(cache_path));
            if let Err(e) = synced {
                let _ = std::fs::remove_file(&state_path);
                return Err(BlockError::io("syncing the new overlay cache", e));
            }
        }
        Ok(persist)
    }

    /// An overlay from its parts.
    fn assemble(
        base: Arc<dyn BlockDevice>,
        cache: File,
        cache_path: &Path,
        opts: &OverlayOptions,
        map: StateMap,
        persist: Option<PersistedState>,
    ) -> Overlay {
        let shift = opts.block_size.trailing_zeros();
        Overlay {
            size: base.size(),
            base,
            cache,
            cache_path: cache_path.to_path_buf(),
            keep_cache: opts.keep_cache,
            durability: opts.durability,
            block_size: opts.block_size,
            shift,
            locks: RangeLocks::new(map.blocks(), shift),
            map,
            frozen: AtomicBool::new(false),
            counters: Counters::default(),
            quota_blocks: opts.quota.map(|q| q >> shift),
            persist,
        }
    }

    /// The path of the cache file.
    pub fn cache_path(&self) -> &Path {
        &self.cache_path
    }

    /// What `flush` does on this overlay.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The base device (the template).
    pub fn base(&self) -> &Arc<dyn BlockDevice> {
        &self.base
    }

    /// A snapshot of the overlay's counters.
    pub fn stats(&self) -> OverlayStats {
        let (absent, data, zero) = self.map.counts();
        OverlayStats {
            blocks_absent: absent,
            blocks_data: data,
            blocks_zero: zero,
            bytes_read_base: Counters::get(&self.counters.read_base),
            bytes_read_cache: Counters::get(&self.counters.read_cache),
            bytes_written: Counters::get(&self.counters.written),
        }
    }

    /// Refuses every further write, write-zeroes and trim with [`BlockError::Shutdown`] and waits
    /// for the ones in flight to finish; reads keep working. Used before a pause exports the
    /// overlay. Idempotent.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
        // Mutations re-check the flag after taking their stripe locks, so once every stripe has
        // been taken and released here none is running and none can start.
        drop(self.locks.lock_all());
    }

    /// Accepts writes again after [`Overlay::freeze`]: a pause that failed after the freeze
    /// (e.g. no space for the diff) gives the sandbox its writable disk back. Idempotent.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Whether [`Overlay::freeze`] was called (and not undone by [`Overlay::thaw`]).
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// First byte of `block`.
    fn block_start(&self, block: u64) -> u64 {
        block << self.shift
    }

    /// One past the last byte of `block` (the last block may be short).
    fn block_end(&self, block: u64) -> u64 {
        ((block + 1) << self.shift).min(self.size)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if !self.keep_cache {
            let _ = std::fs::remove_file(&self.cache_path);
            if self.persist.is_some() {
                let _ = std::fs::remove_file(state_path(&self.cache_path));
            }
        }
    }
}

/// `base`, grown to [`OverlayOptions::disk_size`] when that is larger.
fn grow(base: Arc<dyn BlockDevice>, opts: &OverlayOptions) -> Result<Arc<dyn BlockDevice>> {
    Ok(match opts.disk_size {
        Some(size) if size > base.size() => Arc::new(Grown::new(base, size)?),
        _ => base,
    })
}

/// `fsync` of the directory holding `path`, so a new file's name survives a power loss.
fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

impl BlockDevice for Overlay {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        BlockError::check_range(offset, buf.len() as u64, self.size)?;
        self.read_range(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.mutate(offset, buf.len() as u64, write::Payload::Bytes(buf))?;
        Counters::add(&self.counters.written, buf.len() as u64);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        self.mutate(offset, len, write::Payload::Zeroes { punch })
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.mutate(offset, len, write::Payload::Zeroes { punch: true })
    }

    fn flush(&self) -> Result<()> {
        match (self.durability, &self.persist) {
            (Durability::Durable, Some(persist)) => persist
                .checkpoint(&self.map, &self.cache)
                .map_err(|e| BlockError::io("checkpointing the overlay state", e)),
            (Durability::Durable, None) => self
                .cache
                .sync_data()
                .map_err(|e| BlockError::io("syncing the overlay cache", e)),
            (Durability::Ephemeral, _) => Ok(()),
        }
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        BlockError::check_range(offset, len, self.size)?;
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let last = (end - 1) >> self.shift;
            let (state, run_end) = self.map.run(pos >> self.shift, last + 1);
            let run_end = self.block_start(run_end).min(end);
            out.push(Extent {
                len: run_end - pos,
                state,
            });
            pos = run_end;
        }
        Ok(out)
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        Some(self.base.as_ref())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<RangeStatus>> {
        self.status_range(offset, len)
    }
}
