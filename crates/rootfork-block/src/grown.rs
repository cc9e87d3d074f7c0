//! [`Grown`]: a read-only device larger than the one below it, whose tail reads as zeroes. A
//! sandbox asked for a disk larger than its template (`sandbox create --disk-size`) stacks its
//! overlay (and a resumed sandbox its diff) on the template grown this way; the guest can then
//! grow its file system into the tail.

use std::sync::Arc;

use crate::device::{BlockDevice, BlockState, Extent};
use crate::error::{BlockError, Result};

/// `base`, followed by zeroes up to `size` bytes.
pub struct Grown {
    base: Arc<dyn BlockDevice>,
    size: u64,
}

impl std::fmt::Debug for Grown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grown")
            .field("base_size", &self.base.size())
            .field("size", &self.size)
            .finish()
    }
}

impl Grown {
    /// `base` grown to `size` bytes: at least the base's size and a whole number of its blocks.
    pub fn new(base: Arc<dyn BlockDevice>, size: u64) -> Result<Grown> {
        let block = u64::from(base.block_size().max(1));
        if size < base.size() || !size.is_multiple_of(block) {
            return Err(BlockError::InvalidArgument(
                "a grown disk must be at least its base's size and a multiple of its block size",
            ));
        }
        Ok(Grown { base, size })
    }
}

impl BlockDevice for Grown {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.base.block_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        BlockError::check_range(offset, buf.len() as u64, self.size)?;
        let below = self
            .base
            .size()
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        if below > 0 {
            self.base.read_at(&mut buf[..below], offset)?;
        }
        buf[below..].fill(0);
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        BlockError::check_range(offset, len, self.size)?;
        let base_size = self.base.size();
        let below = base_size.saturating_sub(offset).min(len);
        let mut out = if below > 0 {
            self.base.extents(offset, below)?
        } else {
            Vec::new()
        };
        let covered: u64 = out.iter().map(|e| e.len).sum();
        if covered == below && len > below {
            out.push(Extent {
                len: len - below,
                state: BlockState::Zero,
            });
        }
        Ok(out)
    }

    crate::device::read_only_write_side!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read-only device of `blocks` 4 KiB blocks, each filled with its index + 1.
    struct Numbered(u64);

    impl BlockDevice for Numbered {
        fn size(&self) -> u64 {
            self.0 * 4096
        }
        fn block_size(&self) -> u32 {
            4096
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            BlockError::check_range(offset, buf.len() as u64, self.size())?;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) / 4096 + 1) as u8;
            }
            Ok(())
        }
        fn extents(&self, _offset: u64, len: u64) -> Result<Vec<Extent>> {
            Ok(vec![Extent {
                len,
                state: BlockState::Data,
            }])
        }
        crate::device::read_only_write_side!();
    }

    #[test]
    fn the_tail_reads_as_zeroes_and_is_reported_as_zero() {
        let g = Grown::new(Arc::new(Numbered(2)), 4 * 4096).unwrap();
        assert_eq!(g.size(), 16384);
        let mut buf = vec![0xffu8; 8192];
        g.read_at(&mut buf, 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 2));
        assert!(buf[4096..].iter().all(|&b| b == 0));
        assert_eq!(
            g.extents(4096, 3 * 4096).unwrap(),
            vec![
                Extent {
                    len: 4096,
                    state: BlockState::Data
                },
                Extent {
                    len: 8192,
                    state: BlockState::Zero
                }
            ]
        );
        let st = g.block_status(0, 4 * 4096).unwrap();
        assert!(st.iter().all(|s| !s.changed), "{st:?}");
        assert!(g.read_at(&mut buf, 3 * 4096).is_err(), "past the end");
        assert!(g.write_at(&[1], 0).is_err(), "read-only");
    }

    #[test]
    fn a_size_smaller_than_the_base_or_unaligned_is_refused() {
        assert!(Grown::new(Arc::new(Numbered(2)), 4096).is_err());
        assert!(Grown::new(Arc::new(Numbered(2)), 3 * 4096 + 1).is_err());
        assert!(Grown::new(Arc::new(Numbered(2)), 2 * 4096).is_ok());
    }
}
