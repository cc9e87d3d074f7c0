//! The on-disk format of a persisted state map (`<cache>.state`): header and layout.
//!
//! ```text
//! offset 0           header (84 bytes, one sector; the rest of the first 4 KiB is zero)
//! offset 4096        live copy: one little-endian u64 per map word (32 blocks a word)
//! checkpoint_offset  checkpoint copy: the same words, rounded up to 4 KiB after the live copy
//! ```
//!
//! Header fields, little-endian: magic `RFKSTATE`, version (u32), block size (u32), device size
//! (u64), base size (u64), generation (u64), boot id (16 bytes), map words (u64), live offset
//! (u64), checkpoint offset (u64), CRC32C of the bytes before it (u32). Every field that can be
//! derived (words, offsets) is checked against its derivation, so [`Header::decode`] accepts only
//! headers this code could have written. It is the one parser of untrusted state-file bytes and
//! never panics (property-tested below).

use std::path::{Path, PathBuf};

use super::options::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use super::state_map::BLOCKS_PER_WORD;
use crate::error::{BlockError, Result};

/// Bytes of the header.
pub(crate) const HEADER_LEN: usize = 84;
/// The header's magic.
const MAGIC: [u8; 8] = *b"RFKSTATE";
/// The format version this code writes and reads.
const VERSION: u32 = 1;
/// Alignment of the two copies of the map.
const ALIGN: u64 = 4096;

/// The state file beside `cache_path`: the cache's name with `.state` appended.
pub fn state_path(cache_path: &Path) -> PathBuf {
    let mut name = cache_path.as_os_str().to_owned();
    name.push(".state");
    PathBuf::from(name)
}

/// A state file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub block_size: u32,
    pub device_size: u64,
    pub base_size: u64,
    /// Bumped by every reopen.
    pub generation: u64,
    /// The boot the live copy belongs to.
    pub boot_id: [u8; 16],
}

impl Header {
    /// Words of the map of this device.
    pub(crate) fn words(&self) -> u64 {
        self.device_size
            .div_ceil(u64::from(self.block_size))
            .div_ceil(BLOCKS_PER_WORD)
    }

    /// Blocks of this device.
    pub(crate) fn blocks(&self) -> u64 {
        self.device_size.div_ceil(u64::from(self.block_size))
    }

    /// Byte offset of the live copy.
    pub(crate) fn live_offset(&self) -> u64 {
        ALIGN
    }

    /// Byte offset of the checkpoint copy.
    pub(crate) fn checkpoint_offset(&self) -> u64 {
        ALIGN + (self.words() * 8).div_ceil(ALIGN) * ALIGN
    }

    /// Length of a complete state file.
    pub(crate) fn file_len(&self) -> u64 {
        self.checkpoint_offset() + self.words() * 8
    }

    /// The header's bytes.
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.device_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.base_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.generation.to_le_bytes());
        b[40..56].copy_from_slice(&self.boot_id);
        b[56..64].copy_from_slice(&self.words().to_le_bytes());
        b[64..72].copy_from_slice(&self.live_offset().to_le_bytes());
        b[72..80].copy_from_slice(&self.checkpoint_offset().to_le_bytes());
        let crc = crc32c::crc32c(&b[..80]);
        b[80..84].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a header read from a state file of `file_len` bytes.
    pub(crate) fn decode(b: &[u8], file_len: u64) -> Result<Header> {
        let damaged = BlockError::StateDamaged;
        if b.len() < HEADER_LEN {
            return Err(damaged("the header is truncated"));
        }
        if b[0..8] != MAGIC {
            return Err(damaged("bad magic"));
        }
        if crc32c::crc32c(&b[..80]) != u32_at(b, 80) {
            return Err(damaged("header checksum mismatch"));
        }
        if u32_at(b, 8) != VERSION {
            return Err(damaged("unknown format version"));
        }
        let mut boot_id = [0u8; 16];
        boot_id.copy_from_slice(&b[40..56]);
        let header = Header {
            block_size: u32_at(b, 12),
            device_size: u64_at(b, 16),
            base_size: u64_at(b, 24),
            generation: u64_at(b, 32),
            boot_id,
        };
        if !header.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&header.block_size)
        {
            return Err(damaged("bad block size"));
        }
        // Sizes beyond 2^62 would overflow the layout arithmetic; no real device is that big.
        if header.device_size > 1 << 62 || header.base_size > header.device_size {
            return Err(damaged("bad device or base size"));
        }
        if u64_at(b, 56) != header.words()
            || u64_at(b, 64) != header.live_offset()
            || u64_at(b, 72) != header.checkpoint_offset()
        {
            return Err(damaged("layout fields do not match the device size"));
        }
        if file_len < header.file_len() {
            return Err(damaged("the file is shorter than its map"));
        }
        Ok(header)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            block_size: 4096,
            device_size: 10 << 20,
            base_size: 8 << 20,
            generation: 3,
            boot_id: [7; 16],
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let h = sample();
        assert_eq!(h.words(), (10 << 20) / 4096 / 32);
        assert_eq!(h.live_offset(), 4096);
        assert_eq!(h.checkpoint_offset(), 8192);
        assert_eq!(Header::decode(&h.encode(), h.file_len()).unwrap(), h);
        assert!(Header::decode(&h.encode(), h.file_len() - 1).is_err());
    }

    #[test]
    fn state_path_appends_a_suffix() {
        assert_eq!(
            state_path(Path::new("/x/cache.img")),
            Path::new("/x/cache.img.state")
        );
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let h = sample();
        let good = h.encode();
        for i in 0..HEADER_LEN * 8 {
            let mut b = good;
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                matches!(
                    Header::decode(&b, u64::MAX),
                    Err(BlockError::StateDamaged(_))
                ),
                "bit {i}"
            );
        }
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), len in any::<u64>()) {
            let _ = Header::decode(&bytes, len);
        }

        #[test]
        fn hostile_fields_with_a_valid_checksum_never_panic(
            fields in proptest::collection::vec(any::<u8>(), 72),
            len in any::<u64>(),
        ) {
            // Any field values behind the right magic and version and a correct CRC: only the
            // field checks stand between them and the layout arithmetic.
            let mut b = [0u8; HEADER_LEN];
            b[0..8].copy_from_slice(&MAGIC);
            b[8..80].copy_from_slice(&fields);
            b[8..12].copy_from_slice(&VERSION.to_le_bytes());
            let crc = crc32c::crc32c(&b[..80]);
            b[80..84].copy_from_slice(&crc.to_le_bytes());
            if let Ok(h) = Header::decode(&b, len) {
                prop_assert!(h.file_len() <= len);
                prop_assert_eq!(h.encode(), b);
            }
        }
    }
}
