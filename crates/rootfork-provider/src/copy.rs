//! Full copies of a template into a new writable file, cheapest method first.
//!
//! 1. `FICLONE` (reflink): O(1) on btrfs/XFS, shares blocks copy-on-write.
//! 2. `copy_file_range` over the template's data extents (`SEEK_DATA`/`SEEK_HOLE`), so holes stay
//!    holes and the kernel copies without a trip through user space.
//! 3. `pread`/`pwrite` when the kernel refuses both (for example from a block device).
//!
//! The source is only ever read through the `O_RDONLY` [`TemplateFile`]; the copy checks a cancel
//! flag between chunks so a provider closed mid-copy stops promptly.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use rootfork_block::{BlockDevice, TemplateFile};

use crate::error::{ProviderError, Result};

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// Shared extents (`FICLONE`).
    Reflink,
    /// In-kernel copy of the data extents.
    CopyFileRange,
    /// User-space read and write.
    ReadWrite,
}

/// Bytes copied between cancel checks.
const CHUNK: usize = 8 << 20;

nix::ioctl_write_int_bad!(
    /// `FICLONE`: make `fd` share all of the source file's extents.
    ficlone,
    nix::request_code_write!(0x94, 9, std::mem::size_of::<libc::c_int>())
);

/// Copies all of `src` into `dst` (a new, empty file), stopping with `Cancelled` if `cancel` is set.
pub fn copy_template(src: &TemplateFile, dst: &File, cancel: &AtomicBool) -> Result<CopyMethod> {
    let size = src.size();
    // SAFETY: both descriptors are open for the duration of the call; FICLONE reads only the
    // integer source descriptor and does not touch user memory.
    let cloned = unsafe { ficlone(dst.as_raw_fd(), src.as_fd().as_raw_fd()) };
    if cloned.is_ok() {
        return Ok(CopyMethod::Reflink);
    }
    dst.set_len(size)
        .map_err(|e| ProviderError::io("sizing the copy", e))?;
    match copy_extents(src, dst, size, cancel) {
        Ok(()) => Ok(CopyMethod::CopyFileRange),
        Err(CopyError::Unsupported) => {
            read_write(src, dst, 0, size, cancel)?;
            Ok(CopyMethod::ReadWrite)
        }
        Err(CopyError::Other(e)) => Err(e),
    }
}

enum CopyError {
    /// `copy_file_range` or `SEEK_DATA` is not available for these files.
    Unsupported,
    Other(ProviderError),
}

fn unsupported(e: Errno) -> bool {
    matches!(
        e,
        Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::ENXIO
    )
}

fn check(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        Err(ProviderError::Cancelled)
    } else {
        Ok(())
    }
}

fn copy_extents(
    src: &TemplateFile,
    dst: &File,
    size: u64,
    cancel: &AtomicBool,
) -> std::result::Result<(), CopyError> {
    let fd = src.as_fd().as_raw_fd();
    let mut pos: i64 = 0;
    let end = size as i64;
    let mut first = true;
    while pos < end {
        let data = match lseek(fd, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(Errno::ENXIO) if !first => break, // no data after pos: the rest is a hole
            Err(e) if unsupported(e) => return Err(CopyError::Unsupported),
            Err(e) => return Err(CopyError::Other(ProviderError::io("SEEK_DATA", e.into()))),
        };
        let hole = lseek(fd, data, Whence::SeekHole)
            .map_err(|e| CopyError::Other(ProviderError::io("SEEK_HOLE", e.into())))?
            .min(end);
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            check(cancel).map_err(CopyError::Other)?;
            let want = ((hole - off_in) as usize).min(CHUNK);
            match nix::fcntl::copy_file_range(
                src.as_fd(),
                Some(&mut off_in),
                dst.as_fd(),
                Some(&mut off_out),
                want,
            ) {
                Ok(0) => {
                    return Err(CopyError::Other(ProviderError::io(
                        "copy_file_range",
                        std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                    )))
                }
                Ok(_) => {}
                Err(Errno::EINTR) => {}
                Err(e) if first && unsupported(e) => return Err(CopyError::Unsupported),
                Err(e) => {
                    return Err(CopyError::Other(ProviderError::io(
                        "copy_file_range",
                        e.into(),
                    )))
                }
            }
            first = false;
        }
        first = false;
        pos = hole;
    }
    Ok(())
}

fn read_write(
    src: &TemplateFile,
    dst: &File,
    start: u64,
    end: u64,
    cancel: &AtomicBool,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = start;
    while pos < end {
        check(cancel)?;
        let n = ((end - pos) as usize).min(buf.len());
        src.read_at(&mut buf[..n], pos)?;
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], pos)
                .map_err(|e| ProviderError::io("writing the copy", e))?;
        }
        pos += n as u64;
    }
    Ok(())
}
