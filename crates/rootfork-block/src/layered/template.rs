//! [`LayeredTemplate`]: a read-only [`BlockDevice`] serving a base build plus diff layers.
//!
//! Opening a layer reads its map, then the map of every ancestor build its mapping references,
//! and refuses the whole template unless each one is the build the layer's lineage names
//! (same id, generation and ancestry), has the same geometry, and has a data file of exactly the
//! recorded length. A read resolves each byte range with one binary search in the (already
//! merged) mapping and goes straight to the owning build's data.
//!
//! Data checksums are verified **lazily**: the first read touching a checksum chunk of a build
//! verifies that whole chunk (from the read's own buffer when it covers the chunk, otherwise by
//! reading the chunk), and remembers success in a per-build bitmap. A chunk that fails
//! verification fails the request with `EIO` and stays unverified, so every later read of it
//! fails too; no byte of it is ever returned. Opening stays O(map size) however large the data.
//! A source that verifies on its own ([`BuildData::verifies_checksums`], e.g. the object store's
//! chunk fetcher) is trusted to do so and not checked twice.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::error::{LayerError, LayerResult};
use super::format::{BuildHeader, BuildMap};
use super::id::BuildId;
use super::mapping::{Mapping, RunKind};
use super::scope::RequestScope;
use super::source::BuildData;
use crate::device::{BlockDevice, BlockState, Extent};
use crate::error::{BlockError, Result};
use crate::status::{self, Contents, RangeStatus};

/// Finds builds by id: a local store directory, an object store, or a test fixture.
pub trait BuildResolver {
    /// The decoded, validated map of build `id`.
    fn map(&self, id: &BuildId) -> LayerResult<BuildMap>;

    /// The data of a build whose map was returned by [`BuildResolver::map`].
    fn data(&self, map: &BuildMap) -> LayerResult<Arc<dyn BuildData>>;
}

/// One build's data with its checksums and the verified-chunk bitmap.
struct CheckedData {
    id: BuildId,
    data: Arc<dyn BuildData>,
    chunk_size: u64,
    crcs: Vec<u32>,
    verified: Vec<AtomicU64>,
}

fn checksum_error(id: &BuildId, chunk: u64) -> BlockError {
    BlockError::io(
        "layered template: data checksum mismatch",
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("build {id} chunk {chunk} fails its checksum"),
        ),
    )
}

impl CheckedData {
    fn new(map: &BuildMap, data: Arc<dyn BuildData>) -> Self {
        let words = map.chunk_crcs.len().div_ceil(64);
        // A self-verifying source starts with every chunk marked verified.
        let initial = if data.verifies_checksums() {
            u64::MAX
        } else {
            0
        };
        CheckedData {
            id: map.header.id,
            data,
            chunk_size: u64::from(map.header.chunk_size),
            crcs: map.chunk_crcs.clone(),
            verified: (0..words).map(|_| AtomicU64::new(initial)).collect(),
        }
    }

    fn is_verified(&self, chunk: u64) -> bool {
        let (w, b) = ((chunk / 64) as usize, chunk % 64);
        self.verified[w].load(Ordering::Acquire) & (1 << b) != 0
    }

    fn mark_verified(&self, chunk: u64) {
        let (w, b) = ((chunk / 64) as usize, chunk % 64);
        self.verified[w].fetch_or(1 << b, Ordering::AcqRel);
    }

    fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        let start = chunk * self.chunk_size;
        (start, (start + self.chunk_size).min(self.data.len()))
    }

    /// Reads `buf` at `offset` of the data, verifying every chunk it touches first time round.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.data
            .read_at(buf, offset)
            .map_err(|e| BlockError::io("layered template: reading build data", e))?;
        let end = offset + buf.len() as u64;
        let mut scratch = Vec::new();
        for chunk in offset / self.chunk_size..end.div_ceil(self.chunk_size) {
            if self.is_verified(chunk) {
                continue;
            }
            let (cs, ce) = self.chunk_range(chunk);
            let crc = if cs >= offset && ce <= end {
                crc32c::crc32c(&buf[(cs - offset) as usize..(ce - offset) as usize])
            } else {
                scratch.resize((ce - cs) as usize, 0);
                self.data
                    .read_at(&mut scratch, cs)
                    .map_err(|e| BlockError::io("layered template: reading build data", e))?;
                crc32c::crc32c(&scratch)
            };
            if crc != self.crcs[chunk as usize] {
                return Err(checksum_error(&self.id, chunk));
            }
            self.mark_verified(chunk);
        }
        Ok(())
    }
}

/// A read-only device over a layered template (a base build plus zero or more layers).
pub struct LayeredTemplate {
    top: BuildMap,
    builds: Vec<Option<CheckedData>>,
    /// What "unchanged" means for the `changed` flag of [`BlockDevice::block_status`].
    base: BaseView,
}

/// The base build of a layered template, as its block status needs it.
enum BaseView {
    /// The top is the base build: nothing is changed.
    Top,
    /// The base build's mapping.
    Known(Mapping),
    /// The base build's map cannot be read (a store holding only what the top references):
    /// every run a layer decided counts as changed.
    Unknown,
}

impl std::fmt::Debug for LayeredTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredTemplate")
            .field("header", &self.top.header)
            .field("runs", &self.top.mapping.runs().len())
            .finish()
    }
}

/// Checks that `found` is the ancestor `index` levels below `top` says it should be.
fn check_ancestor(top: &BuildMap, index: usize, found: &BuildMap) -> LayerResult<()> {
    let expected = top.lineage[index];
    if found.header.id != expected {
        return Err(LayerError::WrongBuild {
            expected,
            found: found.header.id,
        });
    }
    let expected_generation = top.header.generation - index as u64;
    if found.header.generation != expected_generation || found.lineage[..] != top.lineage[index..] {
        let fmt = |l: &[BuildId]| {
            l.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join("<-")
        };
        return Err(LayerError::WrongParent {
            layer: top.header.id,
            ancestor: expected,
            expected_generation,
            expected_lineage: fmt(&top.lineage[index..]),
            found: format!(
                "generation {} with lineage {}",
                found.header.generation,
                fmt(&found.lineage)
            ),
        });
    }
    check_geometry(&found.header, &top.header)
}

/// Checks that a child build (or a diff) fits over its ancestor: the same block size, and a
/// device at least as large (a layer may grow the device: the bytes past the ancestor's end
/// read as zeros until written; it never shrinks it).
pub(crate) fn check_geometry(ancestor: &BuildHeader, child: &BuildHeader) -> LayerResult<()> {
    let (expected, found) = (ancestor, child);
    if expected.size > found.size || expected.block_size != found.block_size {
        return Err(LayerError::Geometry {
            expected_size: expected.size,
            expected_block_size: expected.block_size,
            found_size: found.size,
            found_block_size: found.block_size,
        });
    }
    Ok(())
}

impl LayeredTemplate {
    /// Opens the layered template whose top build is `id`.
    pub fn open(resolver: &dyn BuildResolver, id: &BuildId) -> LayerResult<Self> {
        let top = resolver.map(id)?;
        if top.header.id != *id {
            return Err(LayerError::WrongBuild {
                expected: *id,
                found: top.header.id,
            });
        }
        Self::open_map(resolver, top)
    }

    /// Opens the layered template whose top build's map is `top`.
    pub fn open_map(resolver: &dyn BuildResolver, top: BuildMap) -> LayerResult<Self> {
        let mut referenced = vec![false; top.lineage.len()];
        for r in top.mapping.runs() {
            if let RunKind::Data { build, .. } = r.kind {
                referenced[build as usize] = true;
            }
        }
        let mut maps: Vec<Option<BuildMap>> = vec![None; top.lineage.len()];
        for (i, used) in referenced.iter().enumerate() {
            if !used {
                continue;
            }
            let m = if i == 0 {
                top.clone()
            } else {
                let m = resolver.map(&top.lineage[i])?;
                check_ancestor(&top, i, &m)?;
                m
            };
            maps[i] = Some(m);
        }
        for r in top.mapping.runs() {
            if let RunKind::Data { build, data_offset } = r.kind {
                let m = maps[build as usize]
                    .as_ref()
                    .expect("referenced build has a map");
                if data_offset + r.len > m.header.data_len {
                    return Err(LayerError::malformed(
                        top.header.id,
                        format!(
                            "run at {} reaches past the {} data bytes of build {}",
                            r.offset, m.header.data_len, m.header.id
                        ),
                    ));
                }
            }
        }
        let mut builds = Vec::with_capacity(maps.len());
        for m in &maps {
            builds.push(match m {
                None => None,
                Some(m) => {
                    let data = resolver.data(m)?;
                    if data.len() != m.header.data_len {
                        return Err(LayerError::DataLength {
                            id: m.header.id,
                            expected: m.header.data_len,
                            found: data.len(),
                        });
                    }
                    Some(CheckedData::new(m, data))
                }
            });
        }
        let last = top.lineage.len() - 1;
        let base = match (last, maps.get(last)) {
            (0, _) => BaseView::Top,
            (_, Some(Some(m))) => BaseView::Known(m.mapping.clone()),
            // Unreferenced, so not needed to read: only to tell zeroes it had from zeroes a
            // layer wrote. A store may not hold it.
            _ => match resolver.map(&top.lineage[last]) {
                Ok(m) => {
                    check_ancestor(&top, last, &m)?;
                    BaseView::Known(m.mapping)
                }
                Err(_) => BaseView::Unknown,
            },
        };
        Ok(LayeredTemplate { top, builds, base })
    }

    /// The top build's map (its header, lineage and merged mapping).
    pub fn build_map(&self) -> &BuildMap {
        &self.top
    }

    /// The top build's id.
    pub fn id(&self) -> BuildId {
        self.top.header.id
    }

    /// The merged mapping.
    pub fn mapping(&self) -> &Mapping {
        &self.top.mapping
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.top.header.size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }
}

impl BlockDevice for LayeredTemplate {
    fn size(&self) -> u64 {
        self.top.header.size
    }

    fn block_size(&self) -> u32 {
        self.top.header.block_size
    }

    crate::device::read_only_write_side!();

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let _request = RequestScope::enter();
        for run in self.top.mapping.lookup(offset, buf.len() as u64) {
            let at = (run.offset - offset) as usize;
            let piece = &mut buf[at..at + run.len as usize];
            match run.kind {
                RunKind::Zero => piece.fill(0),
                RunKind::Data { build, data_offset } => self.builds[build as usize]
                    .as_ref()
                    .expect("referenced build is open")
                    .read(piece, data_offset)?,
            }
        }
        Ok(())
    }

    /// A layer's own data and zero runs are changes relative to the template at the bottom of
    /// its chain (its base build), except zero runs where the base reads zeroes too; the base's
    /// own data is unchanged; bytes past the base's end (a grown device) count as changed, as
    /// they do over a grown template file.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<RangeStatus>> {
        self.check_range(offset, len)?;
        let base_index = self.top.lineage.len() as u32 - 1;
        let mut out = Vec::new();
        for run in self.top.mapping.lookup(offset, len) {
            match (run.kind, &self.base) {
                (RunKind::Data { build, .. }, _) => {
                    status::push(&mut out, run.len, Contents::Data, build < base_index)
                }
                (RunKind::Zero, BaseView::Top) => {
                    status::push(&mut out, run.len, Contents::Hole, false)
                }
                (RunKind::Zero, BaseView::Unknown) => {
                    status::push(&mut out, run.len, Contents::Hole, true)
                }
                (RunKind::Zero, BaseView::Known(base)) => {
                    let inside = run.len.min(base.size().saturating_sub(run.offset));
                    for b in base.lookup(run.offset, inside) {
                        let changed = b.kind != RunKind::Zero;
                        status::push(&mut out, b.len, Contents::Hole, changed);
                    }
                    status::push(&mut out, run.len - inside, Contents::Hole, true);
                }
            }
        }
        Ok(out)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        for run in self.top.mapping.lookup(offset, len) {
            let state = match run.kind {
                RunKind::Zero => BlockState::Zero,
                RunKind::Data { .. } => BlockState::Data,
            };
            match out.last_mut() {
                Some(last) if last.state == state => last.len += run.len,
                _ => out.push(Extent {
                    len: run.len,
                    state,
                }),
            }
        }
        Ok(out)
    }
}
