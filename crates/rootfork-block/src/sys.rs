//! Positional file I/O helpers shared by the template device, the overlay and the diff layer.
//!
//! Thin wrappers over `pread`/`pwrite`/`fallocate`/`copy_file_range`/`lseek` that retry on `EINTR`
//! and short transfers, and turn "end of file inside the device" into `EIO`: a truncated file must
//! fail one request, never hand back garbage or a short buffer. Nothing here maps memory.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::{copy_file_range, fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

/// A buffer of zeroes for writing real (allocated) zeroes.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Size of the bounce buffer of the `read`/`write` fallback of [`copy_range`].
const COPY_CHUNK: usize = 1024 * 1024;

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Reads exactly `buf.len()` bytes at `offset`; end of file before that is `EIO`.
pub(crate) fn pread_exact(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => return Err(eio()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` at `offset`.
pub(crate) fn pwrite_all(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.write_at(buf, offset) {
            Ok(0) => return Err(eio()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn fallocate_retry(file: &File, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)?, to_off(len)?);
    loop {
        match fallocate(file.as_raw_fd(), mode, off, len) {
            Ok(()) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Whether an errno means "this file system cannot do that fallocate mode".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// Deallocates `len` bytes at `offset` (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`); they read
/// as zeroes afterwards. Returns an `EOPNOTSUPP`-class error if the file system cannot punch.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    fallocate_retry(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Allocates `len` bytes at `offset` (`fallocate` mode 0) so later writes there cannot fail with
/// `ENOSPC`. File systems without `fallocate` are left alone (not an error).
pub(crate) fn allocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match fallocate_retry(file, FallocateFlags::empty(), offset, len) {
        Err(e) if unsupported(&e) => Ok(()),
        other => other,
    }
}

/// Whether `e` is the "cannot punch holes here" class of error of [`punch_hole`].
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    unsupported(e)
}

/// Makes `len` bytes at `offset` read as zeroes while keeping them allocated: `FALLOC_FL_ZERO_RANGE`
/// where the file system has it, else writes real zeroes.
pub(crate) fn zero_allocated(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match fallocate_retry(
        file,
        FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        Err(e) if unsupported(&e) => write_zeroes(file, offset, len),
        other => other,
    }
}

/// Writes `len` real zero bytes at `offset`.
pub(crate) fn write_zeroes(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(ZEROES.len() as u64) as usize;
        pwrite_all(file, &ZEROES[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// Makes `len` bytes at `offset` of `file` read as zeroes, deallocating where possible.
pub(crate) fn punch_or_zero(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match punch_hole(file, offset, len) {
        Err(e) if unsupported(&e) => write_zeroes(file, offset, len),
        other => other,
    }
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off`, in the kernel with
/// `copy_file_range` where possible (reflinks or in-kernel copies), else through a bounce buffer
/// (`EXDEV`, `ENOSYS`, `EINVAL`, `EOPNOTSUPP`). A source shorter than the range is `EIO`.
pub(crate) fn copy_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut in_off = to_off(src_off + done)?;
        let mut out_off = to_off(dst_off + done)?;
        let want = (len - done).min(1 << 30) as usize;
        match copy_file_range(
            src.as_fd(),
            Some(&mut in_off),
            dst.as_fd(),
            Some(&mut out_off),
            want,
        ) {
            Ok(0) => return Err(eio()),
            Ok(n) => done += n as u64,
            Err(Errno::EINTR) => {}
            Err(Errno::EXDEV | Errno::ENOSYS | Errno::EINVAL | Errno::EOPNOTSUPP) => {
                return copy_by_buffer(src, src_off + done, dst, dst_off + done, len - done);
            }
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Ok(())
}

/// The `read`/`write` fallback of [`copy_range`].
pub(crate) fn copy_by_buffer(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; (len.min(COPY_CHUNK as u64)) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        pread_exact(src, &mut buf[..n], src_off + done)?;
        pwrite_all(dst, &buf[..n], dst_off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// One piece of a file's allocation map: `len` bytes that are data (`true`) or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Allocation {
    pub len: u64,
    pub data: bool,
}

/// The data/hole layout of `len` bytes at `offset` using `SEEK_DATA`/`SEEK_HOLE`. File systems
/// without them (`EINVAL`/`EOPNOTSUPP`) report everything as data, which is always correct.
pub(crate) fn allocation(file: &File, offset: u64, len: u64) -> io::Result<Vec<Allocation>> {
    let end = offset + len;
    let mut out: Vec<Allocation> = Vec::new();
    let mut push = |len: u64, data: bool| {
        if len == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.data == data => last.len += len,
            _ => out.push(Allocation { len, data }),
        }
    };
    let fd = file.as_raw_fd();
    let mut pos = offset;
    while pos < end {
        let data_at = match lseek(fd, to_off(pos)?, Whence::SeekData) {
            Ok(d) => d as u64,
            // No data at or after `pos`: the rest is a hole.
            Err(Errno::ENXIO) => end,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => {
                return Ok(vec![Allocation { len, data: true }]);
            }
            Err(e) => return Err(io::Error::from(e)),
        };
        let data_at = data_at.min(end);
        push(data_at - pos, false);
        if data_at >= end {
            break;
        }
        let hole_at = match lseek(fd, to_off(data_at)?, Whence::SeekHole) {
            Ok(h) => h as u64,
            Err(Errno::ENXIO) => end,
            Err(e) => return Err(io::Error::from(e)),
        };
        // A hole at or before `data_at` would mean the file changed under us; count one byte of
        // data so the loop always moves forward.
        let hole_at = hole_at.max(data_at + 1).min(end);
        push(hole_at - data_at, true);
        pos = hole_at;
    }
    Ok(out)
}

/// Whether every byte of `buf` is zero (word at a time).
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for chunk in &mut chunks {
        let mut acc = 0u64;
        for word in chunk.chunks_exact(8) {
            acc |= u64::from_ne_bytes(word.try_into().unwrap_or([0xff; 8]));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_any_set_byte() {
        let mut buf = vec![0u8; 4096 + 7];
        assert!(is_zero(&buf));
        for i in [0, 63, 64, 4095, 4096, 4102] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            buf[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn pread_past_end_is_eio() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(100).unwrap();
        let mut buf = [0u8; 50];
        pread_exact(&f, &mut buf, 50).unwrap();
        let err = pread_exact(&f, &mut buf, 60).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn allocation_sees_holes_and_data() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        pwrite_all(&f, &[1u8; 4096], 65536).unwrap();
        let map = allocation(&f, 0, 1 << 20).unwrap();
        let total: u64 = map.iter().map(|a| a.len).sum();
        assert_eq!(total, 1 << 20);
        // ext4 and tmpfs both report the written page as data and the rest as holes.
        assert_eq!(
            map,
            vec![
                Allocation {
                    len: 65536,
                    data: false
                },
                Allocation {
                    len: 4096,
                    data: true
                },
                Allocation {
                    len: (1 << 20) - 65536 - 4096,
                    data: false
                },
            ]
        );
    }

    #[test]
    fn copy_range_and_fallback_agree() {
        let src = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        pwrite_all(&src, &data, 0).unwrap();
        let a = tempfile::tempfile().unwrap();
        let b = tempfile::tempfile().unwrap();
        copy_range(&src, 1000, &a, 5, 200_000).unwrap();
        copy_by_buffer(&src, 1000, &b, 5, 200_000).unwrap();
        let mut ra = vec![0u8; 200_005];
        let mut rb = vec![0u8; 200_005];
        pread_exact(&a, &mut ra, 0).unwrap();
        pread_exact(&b, &mut rb, 0).unwrap();
        assert_eq!(ra, rb);
        assert_eq!(&ra[5..], &data[1000..201_000]);
        let err = copy_range(&src, 299_000, &a, 0, 5000).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }
}
