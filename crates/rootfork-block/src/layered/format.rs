//! The on-disk map of a build: header, lineage, mapping and data checksums, byte for byte.
//!
//! All integers are little-endian. A map file is:
//!
//! ```text
//! offset size  field
//!      0    8  magic "RFBUILD\0"
//!      8    4  format version (1)
//!     12    4  block size (power of two, 512..=1 MiB)
//!     16    8  device size in bytes
//!     24    8  generation (0 for a base build, parent's + 1 for a layer)
//!     32   16  build id
//!     48   16  parent build id (all zero for a base build)
//!     64    8  length of this build's data file
//!     72    4  checksum chunk size (power of two, 4 KiB..=64 MiB)
//!     76    4  lineage length L (= generation + 1)
//!     80    8  run count R
//!     88    8  chunk count C (= ceil(data length / chunk size))
//!     96   28  reserved, zero
//!    124    4  CRC-32C of bytes 0..124 (the header)
//!    128 16*L  lineage: this build's id, its parent's, ..., the base build's
//!      . 32*R  runs, ascending, tiling [0, size):
//!                offset u64, len u64, data offset u64, build index u32 (0xffffffff = zeroes),
//!                reserved u32 (zero)
//!      .  4*C  CRC-32C of each chunk of this build's data file (the last may be short)
//!      .    4  CRC-32C of every preceding byte of the map
//! ```
//!
//! Decoding checks, in order: length, magic, version, header checksum, table lengths against the
//! file length (so a corrupt count cannot make us allocate), whole-map checksum, then the
//! consistency of every field. Only then is a [`BuildMap`] returned.

use super::error::{LayerError, LayerResult};
use super::id::BuildId;
use super::mapping::{MapRun, Mapping, RunKind};

/// The magic at the start of every map.
pub const MAGIC: [u8; 8] = *b"RFBUILD\0";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 128;
const RUN_LEN: usize = 32;
const ZERO_BUILD: u32 = u32::MAX;
/// Longest lineage accepted (bounds allocation on decode).
pub const MAX_GENERATIONS: u64 = 1 << 16;

/// The fixed header of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildHeader {
    /// Device block size.
    pub block_size: u32,
    /// Device size in bytes.
    pub size: u64,
    /// 0 for a base build, parent's + 1 for a layer.
    pub generation: u64,
    /// This build.
    pub id: BuildId,
    /// The build this one is a layer over.
    pub parent: Option<BuildId>,
    /// Length of this build's data file.
    pub data_len: u64,
    /// Granularity of the data checksums.
    pub chunk_size: u32,
}

/// Everything in a build's map file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildMap {
    /// The header.
    pub header: BuildHeader,
    /// This build's id, then its parent's, ..., back to the base build.
    pub lineage: Vec<BuildId>,
    /// The whole-device mapping; build indices point into `lineage`.
    pub mapping: Mapping,
    /// CRC-32C of each `chunk_size` chunk of this build's data file.
    pub chunk_crcs: Vec<u32>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn id_at(b: &[u8], at: usize) -> Option<BuildId> {
    BuildId::from_bytes(b[at..at + 16].try_into().expect("16 bytes"))
}

/// Number of checksum chunks for a data file.
pub fn chunk_count(data_len: u64, chunk_size: u32) -> u64 {
    data_len.div_ceil(u64::from(chunk_size))
}

impl BuildMap {
    /// Serialises the map.
    pub fn encode(&self) -> Vec<u8> {
        let h = &self.header;
        let runs = self.mapping.runs();
        let len = HEADER_LEN
            + 16 * self.lineage.len()
            + RUN_LEN * runs.len()
            + 4 * self.chunk_crcs.len()
            + 4;
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&h.block_size.to_le_bytes());
        b.extend_from_slice(&h.size.to_le_bytes());
        b.extend_from_slice(&h.generation.to_le_bytes());
        b.extend_from_slice(h.id.as_bytes());
        b.extend_from_slice(h.parent.map_or([0u8; 16], |p| *p.as_bytes()).as_slice());
        b.extend_from_slice(&h.data_len.to_le_bytes());
        b.extend_from_slice(&h.chunk_size.to_le_bytes());
        b.extend_from_slice(&(self.lineage.len() as u32).to_le_bytes());
        b.extend_from_slice(&(runs.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.chunk_crcs.len() as u64).to_le_bytes());
        b.resize(124, 0);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        for id in &self.lineage {
            b.extend_from_slice(id.as_bytes());
        }
        for r in runs {
            let (build, data_offset) = match r.kind {
                RunKind::Zero => (ZERO_BUILD, 0),
                RunKind::Data { build, data_offset } => (build, data_offset),
            };
            b.extend_from_slice(&r.offset.to_le_bytes());
            b.extend_from_slice(&r.len.to_le_bytes());
            b.extend_from_slice(&data_offset.to_le_bytes());
            b.extend_from_slice(&build.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        for c in &self.chunk_crcs {
            b.extend_from_slice(&c.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(b.len(), len);
        b
    }

    /// Parses and fully validates a map; `what` names it in errors (an id or a path).
    pub fn decode(b: &[u8], what: &str) -> LayerResult<Self> {
        let bad = |reason: String| LayerError::malformed(what, reason);
        if b.len() < 8 || b[..8] != MAGIC {
            return Err(LayerError::BadMagic { what: what.into() });
        }
        if b.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes is shorter than the header", b.len())));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(LayerError::UnsupportedVersion {
                what: what.into(),
                found: version,
                supported: VERSION,
            });
        }
        if crc32c::crc32c(&b[..124]) != u32_at(b, 124) {
            return Err(LayerError::MapChecksum {
                what: what.into(),
                part: "header",
            });
        }
        let block_size = u32_at(b, 12);
        let size = u64_at(b, 16);
        let generation = u64_at(b, 24);
        let id = id_at(b, 32).ok_or_else(|| bad("zero build id".into()))?;
        let parent = id_at(b, 48);
        let data_len = u64_at(b, 64);
        let chunk_size = u32_at(b, 72);
        let lineage_len = u64::from(u32_at(b, 76));
        let run_count = u64_at(b, 80);
        let chunk_cnt = u64_at(b, 88);
        if !block_size.is_power_of_two() || !(512..=1 << 20).contains(&block_size) {
            return Err(bad(format!("block size {block_size}")));
        }
        if !chunk_size.is_power_of_two() || !(4096..=64 << 20).contains(&chunk_size) {
            return Err(bad(format!("chunk size {chunk_size}")));
        }
        if generation >= MAX_GENERATIONS || lineage_len != generation + 1 {
            return Err(bad(format!(
                "generation {generation} with lineage of {lineage_len}"
            )));
        }
        if (generation == 0) != parent.is_none() {
            return Err(bad(format!(
                "generation {generation} with parent {parent:?}"
            )));
        }
        if chunk_cnt != chunk_count(data_len, chunk_size) {
            return Err(bad(format!(
                "{chunk_cnt} chunk checksums for {data_len} data bytes"
            )));
        }
        let expected_len = (HEADER_LEN as u64)
            .checked_add(16 * lineage_len)
            .and_then(|n| n.checked_add(run_count.checked_mul(RUN_LEN as u64)?))
            .and_then(|n| n.checked_add(chunk_cnt.checked_mul(4)?))
            .and_then(|n| n.checked_add(4));
        if expected_len != Some(b.len() as u64) {
            return Err(bad(format!(
                "map is {} bytes, its counts need {expected_len:?}",
                b.len()
            )));
        }
        let body = b.len() - 4;
        if crc32c::crc32c(&b[..body]) != u32_at(b, body) {
            return Err(LayerError::MapChecksum {
                what: what.into(),
                part: "map",
            });
        }
        let mut at = HEADER_LEN;
        let mut lineage = Vec::with_capacity(lineage_len as usize);
        for _ in 0..lineage_len {
            lineage.push(id_at(b, at).ok_or_else(|| bad("zero id in lineage".into()))?);
            at += 16;
        }
        if lineage[0] != id || lineage.get(1).copied() != parent {
            return Err(bad(
                "lineage does not start with the build and its parent".into()
            ));
        }
        let mut runs = Vec::with_capacity(run_count as usize);
        for i in 0..run_count {
            let offset = u64_at(b, at);
            let len = u64_at(b, at + 8);
            let data_offset = u64_at(b, at + 16);
            let build = u32_at(b, at + 24);
            at += RUN_LEN;
            let kind = if build == ZERO_BUILD {
                RunKind::Zero
            } else if u64::from(build) < lineage_len {
                RunKind::Data { build, data_offset }
            } else {
                return Err(bad(format!("run {i} names build index {build}")));
            };
            if build == 0 && !matches!(data_offset.checked_add(len), Some(e) if e <= data_len) {
                return Err(bad(format!("run {i} reaches past the data")));
            }
            runs.push(MapRun { offset, len, kind });
        }
        let mapping = Mapping::new(size, runs).map_err(bad)?;
        if mapping.runs().len() as u64 != run_count {
            return Err(bad("mapping is not normalised".into()));
        }
        let chunk_crcs = (0..chunk_cnt as usize)
            .map(|i| u32_at(b, at + 4 * i))
            .collect();
        Ok(BuildMap {
            header: BuildHeader {
                block_size,
                size,
                generation,
                id,
                parent,
                data_len,
                chunk_size,
            },
            lineage,
            mapping,
            chunk_crcs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BuildMap {
        let base = BuildId::random();
        let id = BuildId::random();
        let mapping = Mapping::new(
            1 << 20,
            vec![
                MapRun {
                    offset: 0,
                    len: 8192,
                    kind: RunKind::Data {
                        build: 0,
                        data_offset: 0,
                    },
                },
                MapRun {
                    offset: 8192,
                    len: (1 << 20) - 8192,
                    kind: RunKind::Data {
                        build: 1,
                        data_offset: 4096,
                    },
                },
            ],
        )
        .unwrap();
        BuildMap {
            header: BuildHeader {
                block_size: 4096,
                size: 1 << 20,
                generation: 1,
                id,
                parent: Some(base),
                data_len: 8192,
                chunk_size: 4096,
            },
            lineage: vec![id, base],
            mapping,
            chunk_crcs: vec![1, 2],
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(BuildMap::decode(&m.encode(), "t").unwrap(), m);
    }

    #[test]
    fn refuses_damage() {
        let good = sample().encode();
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(
            BuildMap::decode(&b, "t"),
            Err(LayerError::BadMagic { .. })
        ));
        let mut b = good.clone();
        b[8] = 2;
        assert!(matches!(
            BuildMap::decode(&b, "t"),
            Err(LayerError::UnsupportedVersion { found: 2, .. })
        ));
        let mut b = good.clone();
        b[20] ^= 1;
        assert!(matches!(
            BuildMap::decode(&b, "t"),
            Err(LayerError::MapChecksum { part: "header", .. })
        ));
        let mut b = good.clone();
        let n = b.len();
        b[n - 10] ^= 1;
        assert!(matches!(
            BuildMap::decode(&b, "t"),
            Err(LayerError::MapChecksum { part: "map", .. })
        ));
        assert!(BuildMap::decode(&good[..good.len() - 1], "t").is_err());
        assert!(BuildMap::decode(&good[..100], "t").is_err());
        // Every single-byte flip anywhere is refused.
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x40;
            assert!(BuildMap::decode(&b, "t").is_err(), "flip at {i} accepted");
        }
    }
}
