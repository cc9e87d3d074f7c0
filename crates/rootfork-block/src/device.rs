//! The [`BlockDevice`] trait: what the NBD dispatcher needs from a disk.
//!
//! All methods take `&self` and positional offsets so that requests from many connections and
//! worker threads can run in parallel without a device-wide lock; implementations synchronise
//! internally at whatever granularity they need.

use crate::error::Result;
use crate::status::RangeStatus;

/// The allocation state of a range of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockState {
    /// Not allocated in this layer: reads come from the layer below (the template).
    Absent,
    /// Allocated in this layer, holding data.
    Data,
    /// Reads as zeroes; no storage is allocated for it.
    Zero,
}

/// A run of bytes sharing one [`BlockState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes.
    pub len: u64,
    /// Its state.
    pub state: BlockState,
}

/// A random-access block device.
pub trait BlockDevice: Send + Sync {
    /// Size of the device in bytes.
    fn size(&self) -> u64;

    /// The device's natural block size in bytes (a power of two); requests of any alignment are
    /// accepted, but aligned ones are the fast path.
    fn block_size(&self) -> u32;

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool {
        false
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes `len` bytes at `offset` read as zeroes. With `punch` the storage may be deallocated;
    /// without it the range must stay allocated (NBD's `NO_HOLE`).
    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<()>;

    /// Tells the device that `len` bytes at `offset` are no longer needed. What they read
    /// afterwards is unspecified by the NBD protocol; rootfork devices make them read as zeroes.
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    /// Makes every completed write durable (or a no-op on an ephemeral device).
    fn flush(&self) -> Result<()>;

    /// The states of `len` bytes at `offset`, in order, covering at least the first byte and at
    /// most the whole range.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    /// The device this one reads [`BlockState::Absent`] ranges from, if any.
    fn backing(&self) -> Option<&dyn BlockDevice> {
        None
    }

    /// The status of `len` bytes at `offset` as a client sees the device, through every layer
    /// below it: what each run reads as, whether storage backs it, and whether it may differ
    /// from the template at the bottom of the stack. In order, covering at least the first byte
    /// and at most the whole range, adjacent equal runs merged.
    ///
    /// Unlike [`BlockDevice::extents`] this recurses into the backing device, so it is for
    /// metadata queries (NBD `BLOCK_STATUS`), not the read path. The default
    /// ([`status::stacked`](crate::status::stacked)) is right for any device whose extents are
    /// truthful; override it only to say more (the overlay reports blocks zeroed in place as
    /// [`Contents::Zeroes`](crate::Contents::Zeroes)), and forward it in wrappers.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<RangeStatus>> {
        crate::status::stacked(self, offset, len)
    }
}

/// Expands, inside an `impl BlockDevice for …` block, the write side of a read-only device:
/// every write entry point refuses with [`BlockError::ReadOnly`](crate::BlockError::ReadOnly)
/// (`EPERM` on the wire) and flush has nothing to do.
macro_rules! read_only_write_side {
    () => {
        fn is_read_only(&self) -> bool {
            true
        }

        fn write_at(&self, _buf: &[u8], _offset: u64) -> $crate::Result<()> {
            Err($crate::BlockError::ReadOnly)
        }

        fn write_zeroes(&self, _offset: u64, _len: u64, _punch: bool) -> $crate::Result<()> {
            Err($crate::BlockError::ReadOnly)
        }

        fn trim(&self, _offset: u64, _len: u64) -> $crate::Result<()> {
            Err($crate::BlockError::ReadOnly)
        }

        fn flush(&self) -> $crate::Result<()> {
            Ok(())
        }
    };
}
pub(crate) use read_only_write_side;
