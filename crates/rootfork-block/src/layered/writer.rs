//! Writing a build atomically: a pending directory, a checksummed data file, then the map.
//!
//! A build is staged in `<store>/.pending-<id>/` — data file first, checksummed chunk by chunk as
//! it is written, then the map — every file `fsync`ed, then the directory is renamed to
//! `<store>/<id>/` and the store directory `fsync`ed. A crash leaves either no build or a
//! complete one (plus a stale pending directory that is never read). A pending build dropped
//! without [`PendingBuild::commit`] removes its directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::error::{LayerError, LayerResult};
use super::format::BuildMap;
use super::id::BuildId;

/// File name of a build's data inside its directory.
pub const DATA_FILE: &str = "data";
/// File name of a build's map inside its directory.
pub const MAP_FILE: &str = "map";

fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Appends data to a build's data file, computing the chunk checksums on the way.
pub(crate) struct DataWriter {
    file: io::BufWriter<File>,
    chunk_size: u64,
    len: u64,
    crcs: Vec<u32>,
    current: u32,
}

impl DataWriter {
    fn new(file: File, chunk_size: u32) -> Self {
        DataWriter {
            file: io::BufWriter::with_capacity(1 << 20, file),
            chunk_size: u64::from(chunk_size),
            len: 0,
            crcs: Vec::new(),
            current: 0,
        }
    }

    /// Bytes written so far (the data offset of the next byte).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends `buf`.
    pub fn append(&mut self, mut buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)?;
        while !buf.is_empty() {
            let in_chunk = self.len % self.chunk_size;
            let take = ((self.chunk_size - in_chunk) as usize).min(buf.len());
            self.current = crc32c::crc32c_append(self.current, &buf[..take]);
            self.len += take as u64;
            buf = &buf[take..];
            if self.len.is_multiple_of(self.chunk_size) {
                self.crcs.push(self.current);
                self.current = 0;
            }
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<Vec<u32>> {
        if !self.len.is_multiple_of(self.chunk_size) {
            self.crcs.push(self.current);
        }
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(self.crcs)
    }
}

/// A build being written; removed on drop unless committed.
pub(crate) struct PendingBuild {
    store: PathBuf,
    dir: PathBuf,
    id: BuildId,
    data: Option<DataWriter>,
}

impl PendingBuild {
    /// Starts build `id` in the store directory `store`.
    pub fn create(store: &Path, id: BuildId, chunk_size: u32) -> LayerResult<Self> {
        let dir = store.join(format!(".pending-{id}"));
        fs::create_dir_all(store)
            .map_err(|e| LayerError::io(format!("creating store {}", store.display()), e))?;
        fs::create_dir(&dir)
            .map_err(|e| LayerError::io(format!("creating {}", dir.display()), e))?;
        let mut pending = PendingBuild {
            store: store.to_owned(),
            dir,
            id,
            data: None,
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(pending.dir.join(DATA_FILE))
            .map_err(|e| LayerError::io("creating build data", e))?;
        pending.data = Some(DataWriter::new(file, chunk_size));
        Ok(pending)
    }

    /// The data file being written.
    pub fn data(&mut self) -> &mut DataWriter {
        self.data.as_mut().expect("data writer lives until commit")
    }

    /// Closes the data file and returns its length and chunk checksums, for the map.
    pub fn finish_data(&mut self) -> LayerResult<(u64, Vec<u32>)> {
        let w = self.data.take().expect("finish_data is called once");
        let len = w.len();
        let crcs = w
            .finish()
            .map_err(|e| LayerError::io("writing build data", e))?;
        Ok((len, crcs))
    }

    /// Writes `map` and publishes the build under its id. `map` must describe this build.
    pub fn commit(mut self, map: &BuildMap) -> LayerResult<PathBuf> {
        assert_eq!(map.header.id, self.id, "map of another build");
        assert!(self.data.is_none(), "finish_data before commit");
        let bytes = map.encode();
        let path = self.dir.join(MAP_FILE);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| LayerError::io("creating build map", e))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| LayerError::io("writing build map", e))?;
        fsync_dir(&self.dir).map_err(|e| LayerError::io("syncing build directory", e))?;
        let dest = self.store.join(self.id.to_string());
        fs::rename(&self.dir, &dest)
            .map_err(|e| LayerError::io(format!("publishing {}", dest.display()), e))?;
        self.dir = PathBuf::new();
        fsync_dir(&self.store).map_err(|e| LayerError::io("syncing store directory", e))?;
        Ok(dest)
    }
}

impl Drop for PendingBuild {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
