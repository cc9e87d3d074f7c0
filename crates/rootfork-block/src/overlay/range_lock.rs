//! Striped range locks that serialise changes to the same blocks without a device-wide lock.
//!
//! The device is cut into regions of 64 KiB (at least one block); region `r` is guarded by stripe
//! `r % stripes`. A request locks the stripes of every region it touches, in ascending stripe
//! order so two requests can never wait on each other in a cycle. Only mutations take these
//! locks (a read-modify-write must not interleave with another change to the same block); reads
//! never do. Writes to different regions proceed in parallel.

use parking_lot::{Mutex, MutexGuard};

/// Bytes a region covers (rounded up to one block).
const REGION_BYTES: u64 = 64 * 1024;

/// Most stripes an overlay has.
const MAX_STRIPES: u64 = 1024;

/// One lock on its own cache line, so threads locking neighbouring stripes do not contend on it.
#[repr(align(64))]
struct Stripe(Mutex<()>);

/// The stripe locks of one overlay.
pub(crate) struct RangeLocks {
    stripes: Box<[Stripe]>,
    /// log2 of the blocks a region holds.
    region_shift: u32,
}

/// Proof that a block range is locked; unlocks on drop.
pub(crate) struct RangeGuard<'a> {
    _guards: Guards<'a>,
}

enum Guards<'a> {
    One { _guard: MutexGuard<'a, ()> },
    Many { _guards: Vec<MutexGuard<'a, ()>> },
}

impl RangeLocks {
    /// Locks for a device of `blocks` blocks of `1 << block_shift` bytes.
    pub(crate) fn new(blocks: u64, block_shift: u32) -> RangeLocks {
        let region_shift = (REGION_BYTES.trailing_zeros()).saturating_sub(block_shift);
        let regions = blocks.div_ceil(1 << region_shift).max(1);
        let stripes = regions.next_power_of_two().min(MAX_STRIPES) as usize;
        RangeLocks {
            stripes: (0..stripes).map(|_| Stripe(Mutex::new(()))).collect(),
            region_shift,
        }
    }

    /// Locks every stripe covering blocks `first..=last`.
    pub(crate) fn lock(&self, first: u64, last: u64) -> RangeGuard<'_> {
        debug_assert!(first <= last);
        let n = self.stripes.len() as u64;
        let (r0, r1) = (first >> self.region_shift, last >> self.region_shift);
        if r0 == r1 {
            return RangeGuard {
                _guards: Guards::One {
                    _guard: self.stripes[(r0 % n) as usize].0.lock(),
                },
            };
        }
        if r1 - r0 + 1 >= n {
            return self.lock_all();
        }
        // Fewer regions than stripes: their stripes are distinct.
        let mut idx: Vec<usize> = (r0..=r1).map(|r| (r % n) as usize).collect();
        idx.sort_unstable();
        RangeGuard {
            _guards: Guards::Many {
                _guards: idx.into_iter().map(|i| self.stripes[i].0.lock()).collect(),
            },
        }
    }

    /// Locks every stripe: no mutation runs while the guard lives.
    pub(crate) fn lock_all(&self) -> RangeGuard<'_> {
        RangeGuard {
            _guards: Guards::Many {
                _guards: self.stripes.iter().map(|s| s.0.lock()).collect(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let locks = Arc::new(RangeLocks::new(100_000, 12));
        let held = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (locks, held) = (locks.clone(), held.clone());
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        // Every range covers block 5000.
                        let first = 5000 - (i * 7 + t) % 40;
                        let last = 5000 + (i * 13 + t) % 300;
                        let _g = locks.lock(first, last);
                        assert!(!held.swap(true, Ordering::SeqCst));
                        held.store(false, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn disjoint_ranges_do_not_block() {
        let locks = RangeLocks::new(100_000, 12);
        let _a = locks.lock(0, 15);
        let _b = locks.lock(16, 40);
        // Whole-device ranges take every stripe.
        drop((_a, _b));
        let _all = locks.lock(0, 99_999);
    }

    #[test]
    fn stripes_for_tiny_and_big_blocks() {
        assert_eq!(RangeLocks::new(1, 9).stripes.len(), 1);
        assert_eq!(RangeLocks::new(10, 16).region_shift, 0);
        assert_eq!(RangeLocks::new(10, 12).region_shift, 4);
        let l = RangeLocks::new(0, 12);
        let _g = l.lock(0, 0);
    }
}
