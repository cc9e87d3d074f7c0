//! The persisted state map: a live copy written before every reply, a checkpoint written at flush.
//!
//! * **Live copy** (process death). After a mutation changes the in-memory map and before it is
//!   acknowledged, [`PersistedState::record`] `pwrite`s the changed words to the live copy. The
//!   page cache outlives the process, so after a SIGKILL the live copy is exact. Words are written
//!   under a striped lock and re-loaded under it, so two writers of neighbouring blocks sharing a
//!   word can never leave the older value last in the file. Overwrites of data blocks change no
//!   state and cost nothing.
//! * **Checkpoint** (power loss, [`Durability::Durable`](super::Durability::Durable) only).
//!   Mutations also mark their words dirty. [`PersistedState::checkpoint`] (run by `flush`)
//!   *first* loads the dirty words, *then* `fdatasync`s the cache, then writes the loaded words to
//!   the checkpoint copy and `fdatasync`s the state file. A block's state only changes after its
//!   cache write returned, so every state loaded before the cache sync points at cache bytes that
//!   sync made durable; a write racing the checkpoint either made it into the loaded words (and
//!   its bytes into the sync) or stays dirty for the next one. One checkpoint runs at a time.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;

use parking_lot::{Mutex, MutexGuard};

use super::state_file::{Header, HEADER_LEN};
use super::state_map::StateMap;
use super::zeroed::ZeroedWords;
use crate::error::{BlockError, Result};
use crate::sys;

/// Stripes of the live-copy word locks.
const WORD_STRIPES: usize = 64;
/// Map words in one 4 KiB page of the state file: the unit a checkpoint writes.
const WORDS_PER_PAGE: usize = 512;

/// An open state file and the bookkeeping that keeps its two copies honest.
pub(crate) struct PersistedState {
    file: File,
    header: Header,
    /// Whether flushes write checkpoints (and so whether words are tracked as dirty).
    durable: bool,
    /// One bit per map word changed since the last checkpoint loaded it.
    dirty: ZeroedWords,
    word_locks: Box<[Mutex<()>]>,
    checkpoint_lock: Mutex<()>,
}

/// Both copies of the map as read from a state file.
pub(crate) struct Copies {
    pub live: Vec<u8>,
    pub checkpoint: Vec<u8>,
}

impl PersistedState {
    /// Creates the state file at `path` (`O_EXCL`) for a fresh overlay: every block absent in
    /// both copies. With `durable`, the file is synced before returning.
    pub(crate) fn create(path: &Path, header: Header, durable: bool) -> Result<PersistedState> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| BlockError::io("creating the overlay state file", e))?;
        let init = || -> io::Result<()> {
            file.set_len(header.file_len())?;
            // Reserve the blocks so later state writes cannot fail with ENOSPC (best effort).
            sys::allocate(&file, 0, header.file_len())?;
            sys::pwrite_all(&file, &header.encode(), 0)?;
            if durable {
                file.sync_all()?;
            }
            Ok(())
        };
        if let Err(e) = init() {
            let _ = std::fs::remove_file(path);
            return Err(BlockError::io("initialising the overlay state file", e));
        }
        Self::with(file, header, durable)
    }

    /// Opens an existing state file and reads its header and both copies.
    pub(crate) fn open(path: &Path) -> Result<(File, Header, Copies)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => BlockError::StateMissing(path.to_path_buf()),
                _ => BlockError::io("opening the overlay state file", e),
            })?;
        let len = file
            .metadata()
            .map_err(|e| BlockError::io("reading the overlay state file", e))?
            .len();
        let mut raw = [0u8; HEADER_LEN];
        let got = read_up_to(&file, &mut raw, 0)
            .map_err(|e| BlockError::io("reading the overlay state file", e))?;
        let header = Header::decode(&raw[..got], len)?;
        let map_len = usize::try_from(header.words() * 8)
            .map_err(|_| BlockError::StateDamaged("map too large for this host"))?;
        let read_copy = |offset: u64| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; map_len];
            sys::pread_exact(&file, &mut buf, offset)
                .map_err(|e| BlockError::io("reading the overlay state file", e))?;
            Ok(buf)
        };
        let copies = Copies {
            live: read_copy(header.live_offset())?,
            checkpoint: read_copy(header.checkpoint_offset())?,
        };
        Ok((file, header, copies))
    }

    /// Wraps an open state file whose copies are in sync with the in-memory map.
    pub(crate) fn with(file: File, header: Header, durable: bool) -> Result<PersistedState> {
        let dirty_words = usize::try_from(header.words().div_ceil(64))
            .map_err(|_| BlockError::InvalidArgument("device too large for the state map"))?;
        Ok(PersistedState {
            file,
            header,
            durable,
            dirty: ZeroedWords::new(dirty_words)?,
            word_locks: (0..WORD_STRIPES).map(|_| Mutex::new(())).collect(),
            checkpoint_lock: Mutex::new(()),
        })
    }

    /// Writes `header` (one sector, atomic on the devices we know).
    pub(crate) fn write_header(&mut self, header: Header) -> io::Result<()> {
        sys::pwrite_all(&self.file, &header.encode(), 0)?;
        self.header = header;
        Ok(())
    }

    /// Overwrites a whole copy (`live` or checkpoint) with the bytes of `words`.
    pub(crate) fn write_copy(&self, live: bool, words: &[u8]) -> io::Result<()> {
        let offset = if live {
            self.header.live_offset()
        } else {
            self.header.checkpoint_offset()
        };
        sys::pwrite_all(&self.file, words, offset)
    }

    /// `fdatasync` of the state file.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Marks map word `i` as changed since the last checkpoint.
    pub(crate) fn mark_dirty(&self, i: usize) {
        if self.durable {
            self.dirty[i / 64].fetch_or(1 << (i % 64), Ordering::AcqRel);
        }
    }

    /// After map words `first..=last` changed in memory: writes their current values to the
    /// live copy (and marks them for the next checkpoint).
    pub(crate) fn record(&self, map: &StateMap, first: usize, last: usize) -> io::Result<()> {
        for i in first..=last {
            self.mark_dirty(i);
        }
        let _locks = self.lock_words(first, last);
        let mut buf = Vec::with_capacity((last - first + 1) * 8);
        for i in first..=last {
            buf.extend_from_slice(&map.load_word(i).to_le_bytes());
        }
        sys::pwrite_all(
            &self.file,
            &buf,
            self.header.live_offset() + first as u64 * 8,
        )
    }

    /// Locks the stripes of words `first..=last` in ascending order.
    fn lock_words(&self, first: usize, last: usize) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = if last - first + 1 >= WORD_STRIPES {
            (0..WORD_STRIPES).collect()
        } else {
            (first..=last).map(|i| i % WORD_STRIPES).collect()
        };
        idx.sort_unstable();
        idx.into_iter().map(|i| self.word_locks[i].lock()).collect()
    }

    /// Makes every change acknowledged so far durable: loads the dirty words, syncs `cache`,
    /// writes the loaded words to the checkpoint copy and syncs the state file. On failure the
    /// loaded words stay dirty, so the next flush retries them.
    pub(crate) fn checkpoint(&self, map: &StateMap, cache: &File) -> io::Result<()> {
        let _one = self.checkpoint_lock.lock();
        // Spans of words to write, each inside one page: (first word, values).
        let mut spans: Vec<(usize, Vec<u64>)> = Vec::new();
        for (d, bits) in self.dirty.iter().enumerate() {
            let mut bits = bits.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let first = d * 64 + bits.trailing_zeros() as usize;
                let page_end = (first / WORDS_PER_PAGE + 1) * WORDS_PER_PAGE;
                // The rest of this dirty word's bits that fall in the same page.
                let mut last = first;
                while bits != 0 {
                    let i = d * 64 + bits.trailing_zeros() as usize;
                    if i >= page_end {
                        break;
                    }
                    last = i;
                    bits &= bits - 1;
                }
                match spans.last_mut() {
                    // Dirty words of the next dirty-bitmap word in the same page join the span
                    // (words in between are loaded too: any value loaded before the cache sync
                    // is safe to write).
                    Some((start, vals)) if *start / WORDS_PER_PAGE == first / WORDS_PER_PAGE => {
                        let from = *start + vals.len();
                        vals.extend((from..=last).map(|i| map.load_word(i)));
                    }
                    _ => spans.push((first, (first..=last).map(|i| map.load_word(i)).collect())),
                }
            }
        }
        let result = self.write_checkpoint(&spans, cache);
        if result.is_err() {
            for (start, vals) in &spans {
                for i in *start..*start + vals.len() {
                    self.mark_dirty(i);
                }
            }
        }
        result
    }

    fn write_checkpoint(&self, spans: &[(usize, Vec<u64>)], cache: &File) -> io::Result<()> {
        cache.sync_data()?;
        if spans.is_empty() {
            return Ok(());
        }
        for (start, vals) in spans {
            let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            let offset = self.header.checkpoint_offset() + *start as u64 * 8;
            sys::pwrite_all(&self.file, &bytes, offset)?;
        }
        self.file.sync_data()
    }
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many (fewer only at end of file).
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
