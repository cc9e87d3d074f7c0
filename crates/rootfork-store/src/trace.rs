//! Boot traces: which chunks of which builds a template's first boot read, in first-access
//! order, and their small versioned, checksummed encoding.
//!
//! A [`BootTrace`] is recorded by an [`AccessLog`] (see
//! [`RemoteStore::open_recording`](crate::RemoteStore::open_recording)), stored next to the
//! template's top build as `<prefix>/<build id>/boot-trace`, and replayed by
//! [`RemoteStore::prefetch`](crate::RemoteStore::prefetch) on later cold starts. It is an
//! optimisation only: a missing or damaged trace is an error the caller may ignore.
//!
//! # Encoding (version 1, little-endian)
//!
//! ```text
//! offset  size  field
//! 0       8     magic "RFBTRACE"
//! 8       4     version (1)
//! 12      4     number of builds B
//! 16      8     number of entries E
//! 24      24*B  builds: id (16 bytes), fetch chunk size (u64, a power of two)
//! ..      12*E  entries in first-access order: build index (u32, < B), chunk index (u64)
//! ..      4     CRC-32C of everything before it
//! ```
//!
//! The decoder checks the length against the counts before allocating, then the checksum, then
//! that build ids are distinct, chunk sizes are powers of two and no entry repeats; every
//! failure is a [`TraceError`], never a panic.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rootfork_block::layered::BuildId;

use crate::cache::ChunkKey;

/// Object name of a template's boot trace, next to its top build's `map` and `data`.
pub const BOOT_TRACE_FILE: &str = "boot-trace";

const MAGIC: &[u8; 8] = b"RFBTRACE";
const VERSION: u32 = 1;
const HEADER: usize = 24;
const BUILD_LEN: usize = 24;
const ENTRY_LEN: usize = 12;

/// Why a boot trace could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// Too short, or not a boot trace.
    #[error("not a boot trace (bad magic or too short)")]
    BadMagic,
    /// Written by a newer format.
    #[error("boot trace version {0} is not supported")]
    UnsupportedVersion(u32),
    /// The checksum does not match.
    #[error("boot trace checksum mismatch")]
    Checksum,
    /// Inconsistent content.
    #[error("malformed boot trace: {0}")]
    Malformed(&'static str),
}

/// The chunks a boot read, in first-access order, each named by build, chunk size and index.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BootTrace {
    /// Chunks in the order they were first read; no chunk appears twice.
    pub chunks: Vec<ChunkKey>,
}

impl BootTrace {
    /// Bytes of chunk data the trace names (the last chunk of a build counted whole).
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.chunk_size).sum()
    }

    /// Encodes the trace.
    pub fn encode(&self) -> Vec<u8> {
        let mut builds: Vec<(BuildId, u64)> = Vec::new();
        let mut entries = Vec::with_capacity(self.chunks.len());
        for c in &self.chunks {
            let at = match builds
                .iter()
                .position(|&(id, size)| id == c.build && size == c.chunk_size)
            {
                Some(i) => i,
                None => {
                    builds.push((c.build, c.chunk_size));
                    builds.len() - 1
                }
            };
            entries.push((at as u32, c.index));
        }
        let mut out =
            Vec::with_capacity(HEADER + builds.len() * BUILD_LEN + entries.len() * ENTRY_LEN + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(builds.len() as u32).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (id, size) in &builds {
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&size.to_le_bytes());
        }
        for (b, i) in &entries {
            out.extend_from_slice(&b.to_le_bytes());
            out.extend_from_slice(&i.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks an encoded trace.
    pub fn decode(bytes: &[u8]) -> Result<Self, TraceError> {
        if bytes.len() < HEADER + 4 || &bytes[..8] != MAGIC {
            return Err(TraceError::BadMagic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(TraceError::UnsupportedVersion(version));
        }
        let nbuilds = u32_at(12) as u64;
        let nentries = u64_at(16);
        let want = nbuilds
            .checked_mul(BUILD_LEN as u64)
            .and_then(|b| nentries.checked_mul(ENTRY_LEN as u64).map(|e| (b, e)))
            .and_then(|(b, e)| b.checked_add(e))
            .and_then(|n| n.checked_add(HEADER as u64 + 4));
        if want != Some(bytes.len() as u64) {
            return Err(TraceError::Malformed("length does not match the counts"));
        }
        let body = bytes.len() - 4;
        if crc32c::crc32c(&bytes[..body]) != u32_at(body) {
            return Err(TraceError::Checksum);
        }
        let mut builds = Vec::with_capacity(nbuilds as usize);
        for i in 0..nbuilds as usize {
            let o = HEADER + i * BUILD_LEN;
            let id = BuildId::from_bytes(bytes[o..o + 16].try_into().expect("16 bytes"))
                .ok_or(TraceError::Malformed("invalid build id"))?;
            let size = u64_at(o + 16);
            if !size.is_power_of_two() {
                return Err(TraceError::Malformed("chunk size is not a power of two"));
            }
            if builds.contains(&(id, size)) {
                return Err(TraceError::Malformed("a build is listed twice"));
            }
            builds.push((id, size));
        }
        let base = HEADER + builds.len() * BUILD_LEN;
        let mut chunks = Vec::with_capacity(nentries as usize);
        let mut seen = HashSet::with_capacity(nentries as usize);
        for i in 0..nentries as usize {
            let o = base + i * ENTRY_LEN;
            let &(build, chunk_size) = builds.get(u32_at(o) as usize).ok_or(
                TraceError::Malformed("entry names a build outside the table"),
            )?;
            let key = ChunkKey {
                build,
                chunk_size,
                index: u64_at(o + 4),
            };
            if !seen.insert(key) {
                return Err(TraceError::Malformed("a chunk is listed twice"));
            }
            chunks.push(key);
        }
        Ok(BootTrace { chunks })
    }
}

/// Records the chunks a template's builds are read in, first access only, in order.
///
/// Cheap on the read path: a chunk already seen costs one atomic load of its bit; a first
/// access sets the bit and appends to the order list under a short lock. Clones share the log.
#[derive(Debug, Clone, Default)]
pub struct AccessLog {
    order: Arc<Mutex<Vec<ChunkKey>>>,
}

impl AccessLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The chunks read so far, in first-access order.
    pub fn trace(&self) -> BootTrace {
        BootTrace {
            chunks: self.order.lock().clone(),
        }
    }

    /// Chunks recorded so far.
    pub fn len(&self) -> usize {
        self.order.lock().len()
    }

    /// Whether nothing was read yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A recorder for one build's data of `chunks` chunks of `chunk_size` bytes.
    pub(crate) fn recorder(&self, build: BuildId, chunk_size: u64, chunks: u64) -> Recorder {
        Recorder {
            log: self.clone(),
            build,
            chunk_size,
            seen: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
}

/// One build's side of an [`AccessLog`]: a bitmap of chunks already recorded.
#[derive(Debug)]
pub(crate) struct Recorder {
    log: AccessLog,
    build: BuildId,
    chunk_size: u64,
    seen: Box<[AtomicU64]>,
}

impl Recorder {
    /// Notes a read of chunk `index`.
    pub(crate) fn record(&self, index: u64) {
        let Some(word) = self.seen.get((index / 64) as usize) else {
            return;
        };
        let bit = 1u64 << (index % 64);
        if word.load(Ordering::Relaxed) & bit != 0 {
            return;
        }
        // Take the lock before setting the bit so two first readers cannot append out of order
        // or twice: the one that sets the bit appends.
        let mut order = self.log.order.lock();
        if word.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            order.push(ChunkKey {
                build: self.build,
                chunk_size: self.chunk_size,
                index,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> BootTrace {
        let (a, b) = (BuildId::random(), BuildId::random());
        let k = |build, index| ChunkKey {
            build,
            chunk_size: 1 << 20,
            index,
        };
        BootTrace {
            chunks: vec![k(a, 3), k(b, 0), k(a, 0), k(a, 1), k(b, 9)],
        }
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let bytes = t.encode();
        assert_eq!(bytes.len(), HEADER + 2 * BUILD_LEN + 5 * ENTRY_LEN + 4);
        assert_eq!(BootTrace::decode(&bytes).unwrap(), t);
        let empty = BootTrace::default();
        assert_eq!(BootTrace::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn refuses_damage() {
        let bytes = sample().encode();
        assert_eq!(BootTrace::decode(&bytes[..10]), Err(TraceError::BadMagic));
        let mut v = bytes.clone();
        v[0] ^= 1;
        assert_eq!(BootTrace::decode(&v), Err(TraceError::BadMagic));
        let mut v = bytes.clone();
        v[8] = 2;
        assert_eq!(
            BootTrace::decode(&v),
            Err(TraceError::UnsupportedVersion(2))
        );
        let mut v = bytes.clone();
        let last = v.len() - 6;
        v[last] ^= 0x10;
        assert_eq!(BootTrace::decode(&v), Err(TraceError::Checksum));
        assert!(matches!(
            BootTrace::decode(&bytes[..bytes.len() - 1]),
            Err(TraceError::Malformed(_))
        ));
        // A repeated chunk with a valid checksum is still refused.
        let mut t = sample();
        t.chunks.push(t.chunks[0]);
        assert_eq!(
            BootTrace::decode(&t.encode()),
            Err(TraceError::Malformed("a chunk is listed twice"))
        );
    }

    #[test]
    fn recorder_keeps_first_access_order() {
        let log = AccessLog::new();
        let id = BuildId::random();
        let r = log.recorder(id, 4096, 200);
        for i in [5, 5, 130, 0, 5, 130, 199, 0] {
            r.record(i);
        }
        r.record(1000); // outside the build: ignored
        let got: Vec<u64> = log.trace().chunks.iter().map(|c| c.index).collect();
        assert_eq!(got, vec![5, 130, 0, 199]);
    }

    proptest! {
        /// Any byte string decodes to a trace or a typed error, never a panic; flipping any bit
        /// of a valid encoding is always refused.
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = BootTrace::decode(&bytes);
        }

        #[test]
        fn bit_flips_are_refused(bit in 0usize..(HEADER + 2 * BUILD_LEN + 5 * ENTRY_LEN + 4) * 8) {
            let mut v = sample().encode();
            v[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(BootTrace::decode(&v).is_err());
        }

        #[test]
        fn headers_with_valid_checksums_never_panic(
            nb in 0u32..4, ne in 0u64..6, body in proptest::collection::vec(any::<u8>(), 0..200)
        ) {
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&VERSION.to_le_bytes());
            v.extend_from_slice(&nb.to_le_bytes());
            v.extend_from_slice(&ne.to_le_bytes());
            v.extend_from_slice(&body);
            let crc = crc32c::crc32c(&v);
            v.extend_from_slice(&crc.to_le_bytes());
            let _ = BootTrace::decode(&v);
        }
    }
}
