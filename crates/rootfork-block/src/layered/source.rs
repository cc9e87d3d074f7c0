//! Where a build's data bytes come from: the [`BuildData`] seam.
//!
//! A [`LayeredTemplate`](super::LayeredTemplate) only needs positional reads of each build's
//! data file. Locally that is a file opened read-only and read with `pread` ([`FileData`]; no
//! mmap, so a bad sector or a truncated file is one `EIO`, never a `SIGBUS`). The object store
//! crate plugs in a lazily fetched, chunk-cached implementation; tests plug in faulty ones.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Read access to one build's data file.
pub trait BuildData: Send + Sync {
    /// Length of the data in bytes.
    fn len(&self) -> u64;

    /// Whether the data is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads exactly `buf.len()` bytes at `offset` (within `len()`).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Whether this source itself verifies every byte it returns against the build's chunk
    /// checksums (a remote source checks each chunk as it is fetched and before it serves a
    /// cached one). A [`LayeredTemplate`](super::LayeredTemplate) then skips its own lazy
    /// verification of this build instead of reading every chunk twice.
    fn verifies_checksums(&self) -> bool {
        false
    }
}

/// A build's data in a local file, opened `O_RDONLY`.
#[derive(Debug)]
pub struct FileData {
    file: File,
    len: u64,
}

impl FileData {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(FileData { file, len })
    }
}

impl BuildData for FileData {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // read_exact_at turns a short read (file truncated underneath us) into UnexpectedEof.
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::from_raw_os_error(libc::EIO)
            } else {
                e
            }
        })
    }
}

/// A build's data held in memory (for tests and tiny layers).
#[derive(Debug, Clone)]
pub struct MemData(pub Vec<u8>);

impl BuildData for MemData {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}
