//! Shared helpers for the provider tests: templates, checksums and a watch on how the template
//! is opened.

#![allow(dead_code)]

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Writes a template of `mib` MiB whose every 4 KiB block starts with its block number, with a
/// hole in the middle, and makes it read-only.
pub fn make_template(dir: &Path, mib: u64) -> PathBuf {
    let path = dir.join("template.img");
    let size = mib << 20;
    let mut data = vec![0u8; size as usize];
    for (i, block) in data.chunks_mut(4096).enumerate() {
        if i % 7 == 3 {
            continue; // leave some blocks zero
        }
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        block[8..16].copy_from_slice(b"template");
    }
    std::fs::write(&path, &data).unwrap();
    let mut perm = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o444);
    std::fs::set_permissions(&path, perm).unwrap();
    path
}

/// Hex SHA-256 of a file.
pub fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Watches a file with inotify and reports whether anyone closed it after opening it for
/// writing (`IN_CLOSE_WRITE`) or modified it (`IN_MODIFY`).
pub struct WriteWatch {
    fd: OwnedFd,
}

impl WriteWatch {
    /// Starts watching `path`.
    pub fn new(path: &Path) -> Self {
        // SAFETY: inotify_init1 takes no pointers; the result is checked below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            raw >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        let wd = unsafe {
            libc::inotify_add_watch(
                fd.as_raw_fd(),
                c.as_ptr(),
                libc::IN_CLOSE_WRITE | libc::IN_MODIFY | libc::IN_CLOSE_NOWRITE,
            )
        };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        WriteWatch { fd }
    }

    /// (writable opens closed or modifications, read-only opens closed) seen so far.
    pub fn events(&self) -> (u32, u32) {
        let mut buf = [0u8; 4096];
        let (mut write, mut read) = (0, 0);
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            while off + std::mem::size_of::<libc::inotify_event>() <= n as usize {
                // SAFETY: the kernel wrote a whole inotify_event at `off`; read_unaligned copes
                // with the byte buffer's alignment.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr().add(off).cast()) };
                if ev.mask & (libc::IN_CLOSE_WRITE | libc::IN_MODIFY) != 0 {
                    write += 1;
                }
                if ev.mask & libc::IN_CLOSE_NOWRITE != 0 {
                    read += 1;
                }
                off += std::mem::size_of::<libc::inotify_event>() + ev.len as usize;
            }
        }
        (write, read)
    }
}

/// A future that never completes (no cancellation).
pub fn never() -> std::future::Pending<()> {
    std::future::pending()
}
