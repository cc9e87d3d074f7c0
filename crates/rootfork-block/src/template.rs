//! The read-only template device: a file (or block device) opened `O_RDONLY`.
//!
//! Every sandbox reads its unwritten blocks from a shared template, so the template must be
//! impossible to modify from here: it is opened read-only, never mapped into memory (a bad sector
//! must become `EIO` on one request, not a `SIGBUS`), and every write entry point answers
//! [`BlockError::ReadOnly`]. Its path is a distinct type, [`TemplatePath`], that does not convert
//! into a generic path, so it cannot be handed to a VMM or a device API by accident.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::{lseek, Whence};

use crate::device::{BlockDevice, BlockState, Extent};
use crate::error::{BlockError, Result};
use crate::sys;

/// Block size a template reports (the page size: reads of any alignment are accepted).
pub const TEMPLATE_BLOCK_SIZE: u32 = 4096;

/// The path of a template image.
///
/// Deliberately not `AsRef<Path>` and not `Into<PathBuf>`: code that needs the raw path asks for
/// it with [`TemplatePath::as_path`], which keeps template paths from flowing into places that
/// expect device paths.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TemplatePath(PathBuf);

impl TemplatePath {
    /// Wraps a template image path.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TemplatePath(path.into())
    }

    /// The path, for opening or displaying it.
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl fmt::Debug for TemplatePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TemplatePath({:?})", self.0)
    }
}

impl fmt::Display for TemplatePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// A template image opened read-only.
#[derive(Debug)]
pub struct TemplateFile {
    file: File,
    path: TemplatePath,
    size: u64,
}

impl TemplateFile {
    /// Opens a template image (a regular file or a block device) with `O_RDONLY | O_CLOEXEC`.
    pub fn open(path: &TemplatePath) -> Result<TemplateFile> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path.as_path())
            .map_err(|e| BlockError::io("opening the template", e))?;
        let meta = file
            .metadata()
            .map_err(|e| BlockError::io("inspecting the template", e))?;
        let size = if meta.file_type().is_block_device() {
            let end = lseek(file.as_raw_fd(), 0, Whence::SeekEnd)
                .map_err(|e| BlockError::io("sizing the template device", e.into()))?;
            end as u64
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(BlockError::InvalidArgument(
                "a template must be a regular file or a block device",
            ));
        };
        Ok(TemplateFile {
            file,
            path: path.clone(),
            size,
        })
    }

    /// The path the template was opened from.
    pub fn path(&self) -> &TemplatePath {
        &self.path
    }

    /// The status flags of the open file description (`fcntl(F_GETFL)`), so callers and tests can
    /// check that the access mode is `O_RDONLY`.
    pub fn open_flags(&self) -> Result<OFlag> {
        let flags = fcntl(self.file.as_raw_fd(), FcntlArg::F_GETFL)
            .map_err(|e| BlockError::io("reading the template's open flags", e.into()))?;
        Ok(OFlag::from_bits_retain(flags))
    }
}

impl AsFd for TemplateFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl BlockDevice for TemplateFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        TEMPLATE_BLOCK_SIZE
    }

    crate::device::read_only_write_side!();

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        BlockError::check_range(offset, buf.len() as u64, self.size)?;
        sys::pread_exact(&self.file, buf, offset)
            .map_err(|e| BlockError::io("reading the template", e))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        BlockError::check_range(offset, len, self.size)?;
        let map = sys::allocation(&self.file, offset, len)
            .map_err(|e| BlockError::io("mapping the template", e))?;
        Ok(map
            .into_iter()
            .map(|a| Extent {
                len: a.len,
                state: if a.data {
                    BlockState::Data
                } else {
                    BlockState::Zero
                },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn template(bytes: &[u8]) -> (tempfile::NamedTempFile, TemplateFile) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let t = TemplateFile::open(&TemplatePath::new(f.path())).unwrap();
        (f, t)
    }

    #[test]
    fn opens_read_only_and_refuses_writes() {
        let (_f, t) = template(&[7u8; 10000]);
        assert_eq!(t.size(), 10000);
        assert!(t.is_read_only());
        let flags = t.open_flags().unwrap();
        assert_eq!(flags & OFlag::O_ACCMODE, OFlag::O_RDONLY);
        assert!(matches!(t.write_at(&[1], 0), Err(BlockError::ReadOnly)));
        assert!(matches!(
            t.write_zeroes(0, 1, true),
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(t.trim(0, 1), Err(BlockError::ReadOnly)));
        t.flush().unwrap();
        let mut buf = [0u8; 100];
        t.read_at(&mut buf, 9900).unwrap();
        assert_eq!(buf, [7u8; 100]);
        assert!(matches!(
            t.read_at(&mut buf, 9901),
            Err(BlockError::OutOfRange { .. })
        ));
    }

    #[test]
    fn truncated_template_is_eio() {
        let (f, t) = template(&[1u8; 8192]);
        f.as_file().set_len(4096).unwrap();
        let mut buf = [0u8; 4096];
        t.read_at(&mut buf, 0).unwrap();
        let err = t.read_at(&mut buf, 4096).unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
    }

    #[test]
    fn extents_report_holes_as_zero() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        sys::pwrite_all(f.as_file(), &[9u8; 8192], 8192).unwrap();
        let t = TemplateFile::open(&TemplatePath::new(f.path())).unwrap();
        let ext = t.extents(0, 1 << 20).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    len: 8192,
                    state: BlockState::Zero
                },
                Extent {
                    len: 8192,
                    state: BlockState::Data
                },
                Extent {
                    len: (1 << 20) - 16384,
                    state: BlockState::Zero
                },
            ]
        );
        let ext = t.extents(12288, 100).unwrap();
        assert_eq!(
            ext,
            vec![Extent {
                len: 100,
                state: BlockState::Data
            }]
        );
    }

    #[test]
    fn rejects_directories() {
        let d = tempfile::tempdir().unwrap();
        let err = TemplateFile::open(&TemplatePath::new(d.path())).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
    }
}
