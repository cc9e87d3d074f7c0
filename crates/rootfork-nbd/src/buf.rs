//! A pool of reusable I/O buffers, so the data path neither allocates nor zeroes per request.
//!
//! Buffers come in power-of-two size classes from 4 KiB up; each class keeps a bounded free list.
//! A [`Buf`] returns itself to its pool when dropped.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

const MIN_CLASS_SHIFT: u32 = 12;
const CLASSES: usize = 14; // 4 KiB .. 32 MiB

/// A pool of buffers shared by the threads of one or more connections.
///
/// It counts the bytes of the buffers it has handed out and not yet got back (and the peak of
/// that), so what a connection pins in buffers can be observed ([`BufPool::in_use`]).
#[derive(Debug)]
pub struct BufPool {
    classes: Vec<Mutex<Vec<Vec<u8>>>>,
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

impl Default for BufPool {
    fn default() -> Self {
        Self::new()
    }
}

impl BufPool {
    /// An empty pool.
    pub fn new() -> Self {
        BufPool {
            classes: (0..CLASSES).map(|_| Mutex::new(Vec::new())).collect(),
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Bytes of the buffers handed out and not yet dropped (their requested lengths).
    pub fn in_use(&self) -> usize {
        self.in_use.load(Relaxed)
    }

    /// The most [`BufPool::in_use`] has been.
    pub fn peak(&self) -> usize {
        self.peak.load(Relaxed)
    }

    fn class_of(len: usize) -> usize {
        let shift = len
            .max(1)
            .next_power_of_two()
            .trailing_zeros()
            .max(MIN_CLASS_SHIFT);
        (shift - MIN_CLASS_SHIFT) as usize
    }

    fn keep(class: usize) -> usize {
        // Keep many small buffers (a whole queue depth of 4 KiB I/O), few big ones.
        match class {
            0..=4 => 256,
            5..=8 => 16,
            _ => 2,
        }
    }

    /// A buffer of exactly `len` bytes (contents unspecified).
    pub fn get(self: &Arc<Self>, len: usize) -> Buf {
        let class = Self::class_of(len);
        let v = if class < CLASSES {
            self.classes[class].lock().pop()
        } else {
            None
        };
        let mut v = v.unwrap_or_else(|| vec![0u8; 1usize << (class as u32 + MIN_CLASS_SHIFT)]);
        // The vector's length stays at the class size so it is always initialised memory.
        debug_assert!(v.len() >= len);
        if v.len() < len {
            v.resize(len, 0);
        }
        let now = self.in_use.fetch_add(len, Relaxed) + len;
        if now > self.peak.load(Relaxed) {
            self.peak.fetch_max(now, Relaxed);
        }
        Buf {
            v,
            len,
            pool: Some(Arc::clone(self)),
        }
    }

    fn put(&self, v: Vec<u8>) {
        let class = Self::class_of(v.len());
        if class < CLASSES && v.len() == 1usize << (class as u32 + MIN_CLASS_SHIFT) {
            let mut list = self.classes[class].lock();
            if list.len() < Self::keep(class) {
                list.push(v);
            }
        }
    }
}

/// A buffer from a [`BufPool`] (or a standalone one).
#[derive(Debug)]
pub struct Buf {
    v: Vec<u8>,
    len: usize,
    pool: Option<Arc<BufPool>>,
}

impl Buf {
    /// A buffer that belongs to no pool.
    pub fn standalone(len: usize) -> Buf {
        Buf {
            v: vec![0u8; len],
            len,
            pool: None,
        }
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[..self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v[..self.len]
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.in_use.fetch_sub(self.len, Relaxed);
            pool.put(std::mem::take(&mut self.v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_class() {
        let pool = Arc::new(BufPool::new());
        let b = pool.get(4096);
        let ptr = b.as_ptr();
        drop(b);
        let b2 = pool.get(1000);
        assert_eq!(b2.len(), 1000);
        assert_eq!(b2.as_ptr(), ptr);
        let big = pool.get(3 << 20);
        assert_eq!(big.len(), 3 << 20);
        assert_eq!(pool.in_use(), 1000 + (3 << 20));
        drop((b2, big));
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.peak(), 1000 + (3 << 20));
    }
}
