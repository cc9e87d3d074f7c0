//! A zero-initialised array of `AtomicU64` whose allocation costs O(1) in its length.
//!
//! Small arrays come from the global allocator (`alloc_zeroed`). Large ones are fresh anonymous
//! memory from `mmap(MAP_ANONYMOUS | MAP_PRIVATE | MAP_NORESERVE)`: the kernel hands out zero
//! pages lazily, so a 64 GiB device's 4 MiB state map costs one system call and nothing per block.
//! (The allocator alone cannot promise that: once a large block has been freed, glibc raises its
//! mmap threshold and serves the next `calloc` from the heap with a full `memset`.) This maps
//! anonymous memory only, never storage, so it cannot fault on I/O errors.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::num::NonZeroUsize;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};

use crate::error::{BlockError, Result};

/// Arrays of at least this many bytes are mapped rather than allocated.
const MMAP_BYTES: usize = 64 * 1024;

/// A zero-initialised `[AtomicU64]`.
pub(crate) struct ZeroedWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
    mapped: bool,
}

// SAFETY: the array is owned memory of `AtomicU64`s, which are `Send` and `Sync`.
unsafe impl Send for ZeroedWords {}
// SAFETY: as above; shared access only hands out `&[AtomicU64]`.
unsafe impl Sync for ZeroedWords {}

impl ZeroedWords {
    /// `len` words, all zero.
    pub(crate) fn new(len: usize) -> Result<ZeroedWords> {
        let too_big = || BlockError::InvalidArgument("device too large for the state map");
        let layout = Layout::array::<AtomicU64>(len).map_err(|_| too_big())?;
        if layout.size() == 0 {
            return Ok(ZeroedWords {
                ptr: NonNull::dangling(),
                len: 0,
                mapped: false,
            });
        }
        if layout.size() >= MMAP_BYTES {
            let size = NonZeroUsize::new(layout.size()).ok_or_else(too_big)?;
            // SAFETY: a fresh private anonymous mapping aliases nothing; it is unmapped only in
            // `drop` with the same length.
            let ptr = unsafe {
                mmap_anonymous(
                    None,
                    size,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
                )
            }
            .map_err(|e| BlockError::io("mapping the state map", e.into()))?;
            return Ok(ZeroedWords {
                ptr: ptr.cast(),
                len,
                mapped: true,
            });
        }
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) }.cast::<AtomicU64>();
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| BlockError::errno_io("allocating the state map", libc::ENOMEM))?;
        Ok(ZeroedWords {
            ptr,
            len,
            mapped: false,
        })
    }
}

impl Deref for ZeroedWords {
    type Target = [AtomicU64];

    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` points to `len` initialised (zero bytes are a valid `AtomicU64`) and
        // suitably aligned words that live as long as `self` (or is dangling with `len == 0`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for ZeroedWords {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let bytes = self.len * std::mem::size_of::<AtomicU64>();
        if self.mapped {
            // SAFETY: the mapping was created in `new` with exactly `bytes` bytes and no
            // reference into it outlives `self`.
            let _ = unsafe { munmap(self.ptr.cast(), bytes) };
        } else if let Ok(layout) = Layout::array::<AtomicU64>(self.len) {
            // SAFETY: allocated in `new` by the global allocator with this same layout.
            unsafe { dealloc(self.ptr.as_ptr().cast(), layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn small_and_large_arrays_start_zeroed_and_are_writable() {
        for len in [0, 1, 100, MMAP_BYTES / 8, 1 << 20] {
            let w = ZeroedWords::new(len).unwrap();
            assert_eq!(w.len(), len);
            assert!(w.iter().all(|x| x.load(Ordering::Relaxed) == 0));
            if len > 0 {
                w[len - 1].store(7, Ordering::Relaxed);
                assert_eq!(w[len - 1].load(Ordering::Relaxed), 7);
            }
        }
    }
}
