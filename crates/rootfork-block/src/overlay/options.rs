//! How an overlay is set up: block size, durability and whether its cache outlives it.

use crate::error::{BlockError, Result};

/// Whether `flush` makes the overlay's writes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `flush` is `fdatasync` of the cache file: after it returns, completed writes survive a
    /// host crash (needed when the cache is kept for pause/resume). With
    /// [`OverlayOptions::persist_state`] it also makes a durable checkpoint of the block state,
    /// so a power loss keeps every write acknowledged before the flush.
    Durable,
    /// `flush` is a no-op: the cache dies with the sandbox, so syncing it buys nothing.
    #[default]
    Ephemeral,
}

/// Options of [`Overlay::create`](super::Overlay::create).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayOptions {
    /// Size of the overlay's blocks (the copy-on-write unit): a power of two, 512 bytes to 16 MiB.
    pub block_size: u32,
    /// What `flush` does.
    pub durability: Durability,
    /// Keep the cache file when the overlay is dropped (by default it is unlinked).
    pub keep_cache: bool,
    /// The most bytes of data blocks the overlay may hold (`None`: up to the device's size). A
    /// write that would allocate past it fails with `ENOSPC`, so a sandbox that fills its quota
    /// sees a full disk of its own, not the host's.
    pub quota: Option<u64>,
    /// The disk's size when larger than its base's: the tail reads as zeroes until written
    /// (`None`, or a size not larger than the base's: the base's size).
    pub disk_size: Option<u64>,
    /// Keep the block state in a file beside the cache (`<cache>.state`,
    /// [`state_path`](super::state_path)) so [`Overlay::reopen`](super::Overlay::reopen) can
    /// serve the disk again after the process dies (every acknowledged write survives) and, with
    /// [`Durability::Durable`], after a power loss (every write acknowledged before a completed
    /// flush survives). Off by default: no state file, no extra system call on any write.
    pub persist_state: bool,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        OverlayOptions {
            block_size: 4096,
            durability: Durability::default(),
            keep_cache: false,
            quota: None,
            disk_size: None,
            persist_state: false,
        }
    }
}

/// Smallest block size accepted.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted.
pub const MAX_BLOCK_SIZE: u32 = 16 * 1024 * 1024;

impl OverlayOptions {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if !self.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return Err(BlockError::InvalidArgument(
                "overlay block size must be a power of two from 512 bytes to 16 MiB",
            ));
        }
        Ok(())
    }
}
