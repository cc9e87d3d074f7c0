//! A reader of the `dm-log-writes` on-disk log and a replay of it onto a memory image, for the
//! power-loss test (`tests/vm_crash.rs`); busybox has no `replay-log`.
//!
//! The format, as the kernel's `drivers/md/dm-log-writes.c` writes it (all little-endian; a
//! "sector" is the data device's logical block size, given in the super block):
//!
//! * sector 0: the super block — magic `0x6a736677736872` (u64), version 1 (u64), number of
//!   entries (u64), sector size (u32);
//! * from sector 1, one entry after another: a header sector — target sector (u64), number of
//!   sectors (u64), flags (u64: 1 flush, 2 FUA, 4 discard, 8 mark, 16 metadata), data length
//!   (u64; for a mark, the mark's name follows the header in the same sector) — then, unless it
//!   is a discard, the written sectors themselves.
//!
//! Entries are logged in the order the writes completed, and writes only once a flush covered
//! them, so replaying a prefix of the log gives the device as a power loss at that moment would
//! have left it.

#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const MAGIC: u64 = 0x006a_7366_7773_6872;
const VERSION: u64 = 1;
/// Entry flags.
pub const FLUSH: u64 = 1;
pub const FUA: u64 = 2;
pub const DISCARD: u64 = 4;
pub const MARK: u64 = 8;

/// One logged write, flush, discard or mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// First sector written (in the log's sector size).
    pub sector: u64,
    /// Sectors written or discarded.
    pub nr_sectors: u64,
    pub flags: u64,
    /// The mark's name, for marks.
    pub mark: Option<String>,
    /// Byte offset in the log of the written data (meaningless without data).
    pub data_at: u64,
}

/// A parsed log.
#[derive(Debug)]
pub struct Log {
    pub sector_size: u64,
    pub entries: Vec<Entry>,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("dm-log-writes log: {what}"),
    )
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Reads the super block and every entry header of the log in `log` (`log_len` bytes long).
pub fn parse(log: &File, log_len: u64) -> io::Result<Log> {
    let mut sb = [0u8; 28];
    log.read_exact_at(&mut sb, 0)?;
    if u64_at(&sb, 0) != MAGIC {
        return Err(bad("bad magic"));
    }
    if u64_at(&sb, 8) != VERSION {
        return Err(bad("unknown version"));
    }
    let count = u64_at(&sb, 16);
    let sector_size = u64::from(u32::from_le_bytes([sb[24], sb[25], sb[26], sb[27]]));
    if !sector_size.is_power_of_two() || !(512..=65536).contains(&sector_size) {
        return Err(bad("bad sector size"));
    }
    let mut entries = Vec::new();
    let mut pos = sector_size;
    let mut header = vec![0u8; sector_size as usize];
    for _ in 0..count {
        if pos + sector_size > log_len {
            return Err(bad("entry past the end of the log"));
        }
        log.read_exact_at(&mut header, pos)?;
        let (sector, nr_sectors, flags, data_len) = (
            u64_at(&header, 0),
            u64_at(&header, 8),
            u64_at(&header, 16),
            u64_at(&header, 24),
        );
        pos += sector_size;
        let mark = if flags & MARK != 0 {
            let len = (data_len as usize).min(header.len() - 32);
            Some(String::from_utf8_lossy(&header[32..32 + len]).into_owned())
        } else if data_len != 0 {
            return Err(bad("inline data is not supported"));
        } else {
            None
        };
        let data_at = pos;
        if flags & DISCARD == 0 {
            pos = nr_sectors
                .checked_mul(sector_size)
                .and_then(|n| pos.checked_add(n))
                .filter(|end| *end <= log_len)
                .ok_or_else(|| bad("entry data past the end of the log"))?;
        }
        entries.push(Entry {
            sector,
            nr_sectors,
            flags,
            mark,
            data_at,
        });
    }
    Ok(Log {
        sector_size,
        entries,
    })
}

impl Log {
    /// Applies `entry` to `image`: its data is copied in, a discard is zeroed.
    pub fn apply(&self, log: &File, entry: &Entry, image: &mut [u8]) -> io::Result<()> {
        if entry.mark.is_some() || entry.nr_sectors == 0 {
            return Ok(());
        }
        let start = entry.sector * self.sector_size;
        let len = entry.nr_sectors * self.sector_size;
        let end = start
            .checked_add(len)
            .filter(|end| *end <= image.len() as u64)
            .ok_or_else(|| bad("a write past the end of the device"))?;
        let dst = &mut image[start as usize..end as usize];
        if entry.flags & DISCARD != 0 {
            dst.fill(0);
            Ok(())
        } else {
            log.read_exact_at(dst, entry.data_at)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A log as the kernel would write it: super, a write of 2 sectors at sector 3, a flush, a
    /// mark "m1", a discard of sector 4.
    fn sample() -> Vec<u8> {
        let ss = 512usize;
        let mut log = vec![0u8; ss];
        log[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        log[8..16].copy_from_slice(&VERSION.to_le_bytes());
        log[16..24].copy_from_slice(&4u64.to_le_bytes());
        log[24..28].copy_from_slice(&512u32.to_le_bytes());
        let mut entry = |sector: u64, n: u64, flags: u64, mark: &[u8], data: &[u8]| {
            let mut h = vec![0u8; ss];
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&n.to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            h[24..32].copy_from_slice(&(mark.len() as u64).to_le_bytes());
            h[32..32 + mark.len()].copy_from_slice(mark);
            log.extend_from_slice(&h);
            log.extend_from_slice(data);
        };
        entry(3, 2, 0, b"", &[7u8; 1024]);
        entry(0, 0, FLUSH, b"", &[]);
        entry(0, 0, MARK, b"m1", &[]);
        entry(4, 1, DISCARD, b"", &[]);
        log
    }

    #[test]
    fn parses_and_replays_a_log() {
        let bytes = sample();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        let log = parse(&f, bytes.len() as u64).unwrap();
        assert_eq!(log.entries.len(), 4);
        assert_eq!(log.entries[2].mark.as_deref(), Some("m1"));
        assert_eq!(log.entries[1].flags, FLUSH);
        let mut image = vec![1u8; 8 * 512];
        for e in &log.entries[..2] {
            log.apply(&f, e, &mut image).unwrap();
        }
        assert!(image[3 * 512..5 * 512].iter().all(|&b| b == 7));
        assert!(image[..3 * 512].iter().all(|&b| b == 1));
        log.apply(&f, &log.entries[3], &mut image).unwrap();
        assert!(image[4 * 512..5 * 512].iter().all(|&b| b == 0));
        assert!(image[3 * 512..4 * 512].iter().all(|&b| b == 7));
    }

    #[test]
    fn truncated_or_foreign_logs_are_errors() {
        let bytes = sample();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes[..bytes.len() - 1600]).unwrap();
        assert!(parse(&f, (bytes.len() - 1600) as u64).is_err());
        let mut g = tempfile::tempfile().unwrap();
        g.write_all(&[0u8; 4096]).unwrap();
        assert!(parse(&g, 4096).is_err());
    }
}
