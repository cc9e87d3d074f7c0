//! [`LocalStore`]: builds kept in a local directory, one sub-directory per build.
//!
//! ```text
//! <store>/<build id>/data   the build's data: its own runs' bytes, packed in ascending order
//! <store>/<build id>/map    the build's map (see the `format` module)
//! ```
//!
//! The store imports raw images as base builds ([`LocalStore::import_image`]) and turns an
//! overlay's exported diff into a new layer ([`LocalStore::create_layer`]); both write atomically
//! (see the `writer` module). Builds are immutable once published.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::unistd::{lseek, Whence};

use super::error::{LayerError, LayerResult};
use super::format::{BuildHeader, BuildMap, MAX_GENERATIONS};
use super::id::BuildId;
use super::mapping::{DiffSource, MapRun, Mapping, RunKind};
use super::source::{BuildData, FileData};
use super::template::{check_geometry, BuildResolver, LayeredTemplate};
use super::writer::{PendingBuild, DATA_FILE, MAP_FILE};

/// Default block size of imported images.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Default checksum chunk size (also the unit a remote store fetches is a multiple of).
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// How a base build is cut.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// Block size: zero detection granularity and the device's block size.
    pub block_size: u32,
    /// Checksum chunk size of the data file.
    pub chunk_size: u32,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            block_size: DEFAULT_BLOCK_SIZE,
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

/// A diff to turn into a layer: ascending, non-overlapping runs and the file holding their data.
pub struct LayerDiff<'a> {
    /// Size of the device the diff was taken from: the parent's, or larger when the sandbox's
    /// disk grew past its template (the bytes past the parent's end read as zeros unless the
    /// diff writes them); never smaller. The diff's own block size does not matter: runs are
    /// byte ranges, and the layer keeps its parent's.
    pub size: u64,
    /// `(offset, len, source)` runs, ascending; data sources are offsets into `data`.
    pub runs: Vec<(u64, u64, DiffSource)>,
    /// The diff's data.
    pub data: &'a dyn BuildData,
}

/// Builds in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

/// Appends a run, coalescing it with the previous one when possible.
fn push_run(runs: &mut Vec<MapRun>, run: MapRun) {
    if let Some(last) = runs.last_mut() {
        let joins = match (last.kind, run.kind) {
            (RunKind::Zero, RunKind::Zero) => true,
            (
                RunKind::Data {
                    build: a,
                    data_offset: x,
                },
                RunKind::Data {
                    build: b,
                    data_offset: y,
                },
            ) => a == b && x + last.len == y,
            _ => false,
        };
        if joins {
            last.len += run.len;
            return;
        }
    }
    runs.push(run);
}

fn validate_diff(diff: &LayerDiff<'_>) -> LayerResult<()> {
    let bad = |m: String| Err(LayerError::InvalidDiff(m));
    let mut pos = 0u64;
    for (i, &(offset, len, src)) in diff.runs.iter().enumerate() {
        if len == 0 {
            return bad(format!("run {i} is empty"));
        }
        if offset < pos {
            return bad(format!("run {i} at {offset} is not ascending or overlaps"));
        }
        let Some(end) = offset.checked_add(len).filter(|&e| e <= diff.size) else {
            return bad(format!(
                "run {i} {offset}+{len} leaves the {}-byte device",
                diff.size
            ));
        };
        if let DiffSource::Data(d) = src {
            if !matches!(d.checked_add(len), Some(e) if e <= diff.data.len()) {
                return bad(format!(
                    "run {i} data {d}+{len} leaves the {}-byte data",
                    diff.data.len()
                ));
            }
        }
        pos = end;
    }
    Ok(())
}

impl LocalStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore { root: root.into() }
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of build `id`.
    pub fn build_dir(&self, id: &BuildId) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// Path of build `id`'s data file.
    pub fn data_path(&self, id: &BuildId) -> PathBuf {
        self.build_dir(id).join(DATA_FILE)
    }

    /// Path of build `id`'s map file.
    pub fn map_path(&self, id: &BuildId) -> PathBuf {
        self.build_dir(id).join(MAP_FILE)
    }

    /// Opens the layered template whose top build is `id`.
    pub fn open(&self, id: &BuildId) -> LayerResult<LayeredTemplate> {
        LayeredTemplate::open(self, id)
    }

    /// Imports a raw image as a base build. Holes (`SEEK_HOLE`) and all-zero blocks become zero
    /// runs; everything else is packed into the data file.
    pub fn import_image(&self, image: &Path, opts: BuildOptions) -> LayerResult<BuildMap> {
        let ctx = |what: &str| format!("{what} {}", image.display());
        let file = File::open(image).map_err(|e| LayerError::io(ctx("opening image"), e))?;
        let size = file
            .metadata()
            .map_err(|e| LayerError::io(ctx("stat of image"), e))?
            .len();
        let bs = u64::from(opts.block_size);
        let id = BuildId::random();
        let header = BuildHeader {
            block_size: opts.block_size,
            size,
            generation: 0,
            id,
            parent: None,
            data_len: 0,
            chunk_size: opts.chunk_size,
        };
        // Validate the options through the decoder's rules before writing anything.
        if !opts.block_size.is_power_of_two() || !(512..=1 << 20).contains(&opts.block_size) {
            return Err(LayerError::malformed(
                id,
                format!("block size {}", opts.block_size),
            ));
        }
        if !opts.chunk_size.is_power_of_two() || !(4096..=64 << 20).contains(&opts.chunk_size) {
            return Err(LayerError::malformed(
                id,
                format!("chunk size {}", opts.chunk_size),
            ));
        }
        let mut pending = PendingBuild::create(&self.root, id, opts.chunk_size)?;
        let mut runs = Vec::new();
        let mut pos = 0u64;
        let mut buf = vec![0u8; (1usize << 20).max(opts.block_size as usize)];
        while pos < size {
            // Find the next data segment; treat "can't tell" as data.
            let data_start = match lseek(file.as_raw_fd(), pos as i64, Whence::SeekData) {
                Ok(o) => (o as u64 / bs * bs).max(pos),
                Err(nix::errno::Errno::ENXIO) => size,
                Err(_) => pos,
            };
            if data_start > pos {
                let end = data_start.min(size);
                push_run(
                    &mut runs,
                    MapRun {
                        offset: pos,
                        len: end - pos,
                        kind: RunKind::Zero,
                    },
                );
                pos = end;
                if pos >= size {
                    break;
                }
            }
            let data_end = match lseek(file.as_raw_fd(), pos as i64, Whence::SeekHole) {
                Ok(o) => (o as u64).div_ceil(bs).saturating_mul(bs).min(size),
                Err(_) => size,
            }
            .max(pos + 1);
            while pos < data_end {
                let n = ((data_end - pos) as usize).min(buf.len());
                let chunk = &mut buf[..n];
                std::os::unix::fs::FileExt::read_exact_at(&file, chunk, pos)
                    .map_err(|e| LayerError::io(ctx("reading image"), e))?;
                for block in chunk.chunks(bs as usize) {
                    let len = block.len() as u64;
                    let kind = if block.iter().all(|&b| b == 0) {
                        RunKind::Zero
                    } else {
                        let data_offset = pending.data().len();
                        pending
                            .data()
                            .append(block)
                            .map_err(|e| LayerError::io("writing build data", e))?;
                        RunKind::Data {
                            build: 0,
                            data_offset,
                        }
                    };
                    push_run(
                        &mut runs,
                        MapRun {
                            offset: pos,
                            len,
                            kind,
                        },
                    );
                    pos += len;
                }
            }
        }
        let (data_len, chunk_crcs) = pending.finish_data()?;
        let mapping = Mapping::new(size, runs).map_err(|r| LayerError::malformed(id, r))?;
        let map = BuildMap {
            header: BuildHeader { data_len, ..header },
            lineage: vec![id],
            mapping,
            chunk_crcs,
        };
        pending.commit(&map)?;
        Ok(map)
    }

    /// Writes `diff` as a new layer over build `parent` and returns its map. The parent (and its
    /// ancestry) must open cleanly and have the diff's geometry.
    pub fn create_layer(&self, parent: &BuildId, diff: &LayerDiff<'_>) -> LayerResult<BuildMap> {
        self.create_layer_over(self, parent, diff)
    }

    /// [`LocalStore::create_layer`] over a parent found through `builds` (which may hold it
    /// elsewhere, e.g. in object storage): the new layer is written here; its map names the
    /// parent's chain, wherever that is.
    pub fn create_layer_over(
        &self,
        builds: &dyn BuildResolver,
        parent: &BuildId,
        diff: &LayerDiff<'_>,
    ) -> LayerResult<BuildMap> {
        let parent_tpl = LayeredTemplate::open(builds, parent)?;
        let pmap = parent_tpl.build_map();
        if pmap.header.generation + 1 >= MAX_GENERATIONS {
            return Err(LayerError::TooManyGenerations {
                parent: *parent,
                generation: pmap.header.generation,
                limit: MAX_GENERATIONS,
            });
        }
        check_geometry(
            &pmap.header,
            &BuildHeader {
                size: diff.size,
                ..pmap.header.clone()
            },
        )?;
        validate_diff(diff)?;
        let parent_mapping = pmap.mapping.grown(diff.size);
        let id = BuildId::random();
        let chunk_size = pmap.header.chunk_size;
        let mut pending = PendingBuild::create(&self.root, id, chunk_size)?;
        let mut own = Vec::with_capacity(diff.runs.len());
        let mut buf = vec![0u8; 1 << 20];
        for &(offset, len, src) in &diff.runs {
            match src {
                DiffSource::Zero => own.push((offset, len, DiffSource::Zero)),
                DiffSource::Data(d) => {
                    let at = pending.data().len();
                    let mut done = 0u64;
                    while done < len {
                        let n = ((len - done) as usize).min(buf.len());
                        diff.data
                            .read_at(&mut buf[..n], d + done)
                            .map_err(|e| LayerError::io("reading diff data", e))?;
                        pending
                            .data()
                            .append(&buf[..n])
                            .map_err(|e| LayerError::io("writing build data", e))?;
                        done += n as u64;
                    }
                    own.push((offset, len, DiffSource::Data(at)));
                }
            }
        }
        let (data_len, chunk_crcs) = pending.finish_data()?;
        let mut lineage = Vec::with_capacity(pmap.lineage.len() + 1);
        lineage.push(id);
        lineage.extend_from_slice(&pmap.lineage);
        let map = BuildMap {
            header: BuildHeader {
                generation: pmap.header.generation + 1,
                id,
                parent: Some(pmap.header.id),
                data_len,
                size: diff.size,
                ..pmap.header.clone()
            },
            lineage,
            mapping: parent_mapping.overlay(&own),
            chunk_crcs,
        };
        pending.commit(&map)?;
        Ok(map)
    }
}

impl BuildResolver for LocalStore {
    fn map(&self, id: &BuildId) -> LayerResult<BuildMap> {
        let path = self.map_path(id);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LayerError::MissingBuild(*id),
            _ => LayerError::io(format!("reading {}", path.display()), e),
        })?;
        BuildMap::decode(&bytes, &id.to_string())
    }

    fn data(&self, map: &BuildMap) -> LayerResult<Arc<dyn BuildData>> {
        let path = self.data_path(&map.header.id);
        let data = FileData::open(&path)
            .map_err(|e| LayerError::io(format!("opening {}", path.display()), e))?;
        Ok(Arc::new(data))
    }
}
