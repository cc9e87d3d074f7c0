//! The overlay's per-block state map: 2 bits a block, 32 blocks to an `AtomicU64`.
//!
//! Readers load words without any lock; writers change a block's state with one compare-and-swap
//! on its word, after the cache holds the block's new contents (see `write.rs` for the ordering).
//! The map starts as zeroed memory (`zeroed.rs`: fresh zero pages from the kernel for large maps),
//! so creating the map for a 64 GiB device costs no per-block work: "all zero" is "every block
//! absent".
//!
//! The four codes are [`Slot`]s: absent `00`, data `01`, zero `10` and *zeroed data* `11`, a data
//! block whose cache bytes were zeroed in place (`NO_HOLE`). The read and write paths see
//! [`BlockState`]s, where zeroed data is plain data (its low bit is set like data's: the cache holds
//! its zeroes), so they never tell the two apart; only block status and export do ([`Slot`]).

use std::sync::atomic::{AtomicU64, Ordering};

use super::zeroed::ZeroedWords;
use crate::device::BlockState;
use crate::error::{BlockError, Result};

/// Blocks held by one word of the map.
pub(crate) const BLOCKS_PER_WORD: u64 = 32;

/// Every 2-bit field of a word set to 0b01.
const LOW_BITS: u64 = 0x5555_5555_5555_5555;

/// What the map stores for a block: a [`BlockState`], with data split by whether its cache bytes
/// are known to be zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Read from the base.
    Absent,
    /// Held in the cache.
    Data,
    /// Reads as zeroes, nothing allocated.
    Zero,
    /// Held in the cache, which was zeroed in place: allocated and reading as zeroes.
    ZeroedData,
}

impl Slot {
    fn code(self) -> u64 {
        match self {
            Slot::Absent => 0,
            Slot::Data => 1,
            Slot::Zero => 2,
            Slot::ZeroedData => 3,
        }
    }

    fn decode(bits: u64) -> Slot {
        match bits & 3 {
            0 => Slot::Absent,
            1 => Slot::Data,
            2 => Slot::Zero,
            _ => Slot::ZeroedData,
        }
    }

    /// The state the read and write paths see.
    pub(crate) fn state(self) -> BlockState {
        match self {
            Slot::Absent => BlockState::Absent,
            Slot::Data | Slot::ZeroedData => BlockState::Data,
            Slot::Zero => BlockState::Zero,
        }
    }
}

impl From<BlockState> for Slot {
    fn from(state: BlockState) -> Slot {
        match state {
            BlockState::Absent => Slot::Absent,
            BlockState::Data => Slot::Data,
            BlockState::Zero => Slot::Zero,
        }
    }
}

/// A word with every field set to `slot`.
fn pattern(slot: Slot) -> u64 {
    slot.code() * LOW_BITS
}

/// The bits of each field that tell `state` apart: both bits, except for data, which is every
/// code with the low bit set (data and zeroed data).
fn class_mask(state: BlockState) -> u64 {
    match state {
        BlockState::Data => LOW_BITS,
        BlockState::Absent | BlockState::Zero => !0,
    }
}

fn index(state: BlockState) -> usize {
    match state {
        BlockState::Absent => 0,
        BlockState::Data => 1,
        BlockState::Zero => 2,
    }
}

/// The state of every block of a device.
pub(crate) struct StateMap {
    words: ZeroedWords,
    blocks: u64,
    /// Blocks in each state, indexed by the state's code.
    counts: [AtomicU64; 3],
}

impl StateMap {
    /// A map of `blocks` blocks, all [`BlockState::Absent`].
    pub(crate) fn new(blocks: u64) -> Result<StateMap> {
        let words = usize::try_from(blocks.div_ceil(BLOCKS_PER_WORD))
            .map_err(|_| BlockError::InvalidArgument("device too large for the state map"))?;
        let words = ZeroedWords::new(words)?;
        Ok(StateMap {
            words,
            blocks,
            counts: [AtomicU64::new(blocks), AtomicU64::new(0), AtomicU64::new(0)],
        })
    }

    /// Number of blocks.
    pub(crate) fn blocks(&self) -> u64 {
        self.blocks
    }

    fn word(&self, block: u64) -> &AtomicU64 {
        &self.words[(block / BLOCKS_PER_WORD) as usize]
    }

    /// The slot of one block.
    pub(crate) fn slot(&self, block: u64) -> Slot {
        debug_assert!(block < self.blocks);
        let shift = (block % BLOCKS_PER_WORD) * 2;
        Slot::decode(self.word(block).load(Ordering::Acquire) >> shift)
    }

    /// The state of one block.
    pub(crate) fn get(&self, block: u64) -> BlockState {
        self.slot(block).state()
    }

    /// The state of `start` and the end (exclusive, at most `limit`) of the run of blocks from
    /// `start` that share it (data and zeroed data are one state here). Whole words in that
    /// state are skipped at once.
    pub(crate) fn run(&self, start: u64, limit: u64) -> (BlockState, u64) {
        let state = self.get(start);
        let end = self.scan(start, limit, pattern(Slot::from(state)), class_mask(state));
        (state, end)
    }

    /// Like [`StateMap::run`] with data and zeroed data told apart.
    pub(crate) fn slot_run(&self, start: u64, limit: u64) -> (Slot, u64) {
        let slot = self.slot(start);
        (slot, self.scan(start, limit, pattern(slot), !0))
    }

    /// The end (exclusive, at most `limit`) of the run from `start` of blocks whose bits under
    /// `mask` equal `pat`'s.
    fn scan(&self, start: u64, limit: u64, pat: u64, mask: u64) -> u64 {
        debug_assert!(start < limit && limit <= self.blocks);
        let mut block = start;
        loop {
            let shift = (block % BLOCKS_PER_WORD) * 2;
            let diff = ((self.word(block).load(Ordering::Acquire) ^ pat) & mask) >> shift;
            if diff != 0 {
                let end = block + u64::from(diff.trailing_zeros() / 2);
                return end.min(limit);
            }
            block = (block / BLOCKS_PER_WORD + 1) * BLOCKS_PER_WORD;
            if block >= limit {
                return limit;
            }
        }
    }

    /// Sets blocks `start..end` to `state` and returns how many of them were in each state
    /// before (indexed like [`StateMap::counts`]).
    #[cfg(test)]
    pub(crate) fn set(&self, start: u64, end: u64, state: BlockState) -> [u64; 3] {
        self.set_slot(start, end, Slot::from(state))
    }

    /// Sets blocks `start..end` to `slot`; returns the same as [`StateMap::set`].
    #[cfg(test)]
    pub(crate) fn set_slot(&self, start: u64, end: u64, slot: Slot) -> [u64; 3] {
        self.apply(start, end, slot).0
    }

    /// Sets blocks `start..end` to `slot`; returns how many of them were in each state before
    /// (indexed like [`StateMap::counts`]) and whether any word changed (a persisted map writes changed words only).
    pub(crate) fn apply(&self, start: u64, end: u64, slot: Slot) -> ([u64; 3], bool) {
        debug_assert!(start <= end && end <= self.blocks);
        let mut changed = false;
        let state = slot.state();
        let pat = pattern(slot);
        let mut before = [0u64; 3];
        let mut block = start;
        while block < end {
            let first = block % BLOCKS_PER_WORD;
            let n = (end - block).min(BLOCKS_PER_WORD - first);
            // Mask of the low bit of each field being changed.
            let low = if n == BLOCKS_PER_WORD {
                LOW_BITS
            } else {
                (LOW_BITS & ((1u64 << (2 * n)) - 1)) << (2 * first)
            };
            let mask = low | (low << 1);
            let old = self
                .word(block)
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    Some((w & !mask) | (pat & mask))
                })
                .unwrap_or_else(|w| w);
            changed |= (old & mask) != (pat & mask);
            // Per field: the low bit set is data (or zeroed data), only the high bit zero.
            let (lo, hi) = (old & low, (old >> 1) & low);
            before[index(BlockState::Data)] += u64::from(lo.count_ones());
            before[index(BlockState::Zero)] += u64::from((hi & !lo).count_ones());
            before[index(BlockState::Absent)] += u64::from((low & !lo & !hi).count_ones());
            block += n;
        }
        let total = end - start;
        for (i, n) in before.iter().enumerate() {
            if *n > 0 {
                self.counts[i].fetch_sub(*n, Ordering::Relaxed);
            }
        }
        if total > 0 {
            self.counts[index(state)].fetch_add(total, Ordering::Relaxed);
        }
        (before, changed)
    }

    /// Number of words.
    pub(crate) fn word_count(&self) -> usize {
        self.words.len()
    }

    /// The current value of word `i` (blocks `32 i .. 32 i + 32`).
    pub(crate) fn load_word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Acquire)
    }

    /// A map of `blocks` blocks whose words are `words` (little-endian u64s, as persisted).
    /// Fields past the last block are cleared, so a hostile file cannot smuggle states in there.
    pub(crate) fn from_le_words(blocks: u64, words: &[u8]) -> Result<StateMap> {
        let map = StateMap::new(blocks)?;
        if words.len() != map.words.len() * 8 {
            return Err(BlockError::InvalidArgument(
                "persisted state map has the wrong length",
            ));
        }
        let mut counts = [0u64; 3];
        for (i, chunk) in words.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            let mut w = u64::from_le_bytes(b);
            let in_word = (blocks - i as u64 * BLOCKS_PER_WORD).min(BLOCKS_PER_WORD);
            let low = if in_word == BLOCKS_PER_WORD {
                LOW_BITS
            } else {
                LOW_BITS & ((1u64 << (2 * in_word)) - 1)
            };
            w &= low | (low << 1);
            let (lo, hi) = (w & low, (w >> 1) & low);
            counts[index(BlockState::Data)] += u64::from(lo.count_ones());
            counts[index(BlockState::Zero)] += u64::from((hi & !lo).count_ones());
            map.words[i].store(w, Ordering::Relaxed);
        }
        counts[index(BlockState::Absent)] =
            blocks - counts[index(BlockState::Data)] - counts[index(BlockState::Zero)];
        for (c, n) in map.counts.iter().zip(counts) {
            c.store(n, Ordering::Relaxed);
        }
        Ok(map)
    }

    /// Blocks currently absent, data (zeroed data included) and zero.
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        (
            self.counts[0].load(Ordering::Relaxed),
            self.counts[1].load(Ordering::Relaxed),
            self.counts[2].load(Ordering::Relaxed),
        )
    }

    /// Whether every block of `start..end` is in `state`.
    pub(crate) fn all(&self, start: u64, end: u64, state: BlockState) -> bool {
        start >= end || self.run(start, end) == (state, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BlockState::*;

    fn naive_runs(map: &StateMap, start: u64, end: u64) -> Vec<(BlockState, u64)> {
        let mut out: Vec<(BlockState, u64)> = Vec::new();
        for b in start..end {
            let s = map.get(b);
            match out.last_mut() {
                Some(last) if last.0 == s => last.1 = b + 1,
                _ => out.push((s, b + 1)),
            }
        }
        out
    }

    fn runs(map: &StateMap, start: u64, end: u64) -> Vec<(BlockState, u64)> {
        let mut out = Vec::new();
        let mut b = start;
        while b < end {
            let r = map.run(b, end);
            out.push(r);
            b = r.1;
        }
        out
    }

    #[test]
    fn set_get_run_and_counts() {
        let map = StateMap::new(200).unwrap();
        assert_eq!(map.counts(), (200, 0, 0));
        assert_eq!(map.run(0, 200), (Absent, 200));
        assert_eq!(map.set(10, 100, Data), [90, 0, 0]);
        assert_eq!(map.set(30, 40, Zero), [0, 10, 0]);
        assert_eq!(map.set(35, 70, Absent), [0, 30, 5]);
        assert_eq!(map.counts(), (200 - 90 + 35, 90 - 10 - 30, 5));
        assert_eq!(map.get(9), Absent);
        assert_eq!(map.get(10), Data);
        assert_eq!(map.get(34), Zero);
        assert_eq!(map.get(35), Absent);
        assert_eq!(map.get(99), Data);
        assert_eq!(map.get(100), Absent);
        for (s, e) in [(0, 200), (3, 150), (31, 33), (64, 128), (199, 200)] {
            assert_eq!(runs(&map, s, e), naive_runs(&map, s, e), "{s}..{e}");
        }
        assert!(map.all(70, 100, Data));
        assert!(!map.all(69, 100, Data));
    }

    #[test]
    fn random_sets_match_a_naive_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 1000;
        let map = StateMap::new(n).unwrap();
        let mut model = vec![Absent; n as usize];
        for _ in 0..2000 {
            let a = rng.gen_range(0..n);
            let b = rng.gen_range(a..=n.min(a + 100));
            let s = [Absent, Data, Zero][rng.gen_range(0..3)];
            let mut before = [0u64; 3];
            for m in &mut model[a as usize..b as usize] {
                before[index(*m)] += 1;
                *m = s;
            }
            assert_eq!(map.set(a, b, s), before);
        }
        for (b, m) in model.iter().enumerate() {
            assert_eq!(map.get(b as u64), *m);
        }
        assert_eq!(runs(&map, 0, n), naive_runs(&map, 0, n));
        let count = |s| model.iter().filter(|m| **m == s).count() as u64;
        assert_eq!(map.counts(), (count(Absent), count(Data), count(Zero)));
    }

    #[test]
    fn zeroed_data_is_data_to_runs_and_counts_but_its_own_slot() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let n = 700;
        let map = StateMap::new(n).unwrap();
        let mut model = vec![Slot::Absent; n as usize];
        let slots = [Slot::Absent, Slot::Data, Slot::Zero, Slot::ZeroedData];
        for _ in 0..1500 {
            let a = rng.gen_range(0..n);
            let b = rng.gen_range(a..=n.min(a + 80));
            let s = slots[rng.gen_range(0..4)];
            let mut before = [0u64; 3];
            for m in &mut model[a as usize..b as usize] {
                before[index(m.state())] += 1;
                *m = s;
            }
            assert_eq!(map.set_slot(a, b, s), before);
        }
        let runs_of = |f: &dyn Fn(u64) -> (u64, u64)| {
            let mut out = Vec::new();
            let mut b = 0;
            while b < n {
                let r = f(b);
                out.push(r);
                b = r.1;
            }
            out
        };
        let naive = |key: &dyn Fn(Slot) -> u64| {
            let mut out: Vec<(u64, u64)> = Vec::new();
            for (b, m) in model.iter().enumerate() {
                match out.last_mut() {
                    Some(last) if last.0 == key(*m) => last.1 = b as u64 + 1,
                    _ => out.push((key(*m), b as u64 + 1)),
                }
            }
            out
        };
        let slot_key = |s: Slot| s.code();
        let state_key = |s: Slot| index(s.state()) as u64;
        assert_eq!(
            runs_of(&|b| {
                let (s, e) = map.slot_run(b, n);
                (s.code(), e)
            }),
            naive(&slot_key)
        );
        assert_eq!(
            runs_of(&|b| {
                let (s, e) = map.run(b, n);
                (index(s) as u64, e)
            }),
            naive(&state_key)
        );
        for (b, m) in model.iter().enumerate() {
            assert_eq!(map.slot(b as u64), *m);
            assert_eq!(map.get(b as u64), m.state());
        }
        let count = |s: BlockState| model.iter().filter(|m| m.state() == s).count() as u64;
        assert_eq!(map.counts(), (count(Absent), count(Data), count(Zero)));
    }

    #[test]
    fn persisted_words_round_trip_and_hostile_tails_are_cleared() {
        let map = StateMap::new(70).unwrap();
        map.set(3, 40, Data);
        map.set_slot(50, 60, Slot::ZeroedData);
        map.set(65, 70, Zero);
        let mut bytes: Vec<u8> = (0..map.word_count())
            .flat_map(|i| map.load_word(i).to_le_bytes())
            .collect();
        // Garbage in the fields past block 70 (the last word holds blocks 64..96).
        bytes[23] = 0xff;
        let back = StateMap::from_le_words(70, &bytes).unwrap();
        for b in 0..70 {
            assert_eq!(back.slot(b), map.slot(b), "block {b}");
        }
        assert_eq!(back.counts(), map.counts());
        assert_eq!(back.load_word(2), map.load_word(2));
        assert!(StateMap::from_le_words(70, &bytes[..16]).is_err());
    }

    #[test]
    fn apply_reports_whether_anything_changed() {
        let map = StateMap::new(100).unwrap();
        assert!(map.apply(10, 20, Slot::Data).1);
        assert!(!map.apply(10, 20, Slot::Data).1);
        assert!(!map.apply(12, 15, Slot::Data).1);
        assert!(map.apply(12, 15, Slot::ZeroedData).1);
        assert!(!map.apply(50, 60, Slot::Absent).1);
    }

    #[test]
    fn empty_map() {
        let map = StateMap::new(0).unwrap();
        assert_eq!(map.blocks(), 0);
        assert_eq!(map.counts(), (0, 0, 0));
    }
}
