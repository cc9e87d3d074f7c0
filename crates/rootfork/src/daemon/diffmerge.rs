//! Folding a second pause into the first: a sandbox resumed from a pause serves
//! template + diff A + overlay, so its next pause exports diff B relative to template + A. The
//! providers resume from one diff over the template, so the daemon merges A and B into one diff
//! relative to the template: wherever B has a run, B wins; elsewhere A's runs stay. Data runs are
//! copied into a new packed file in ascending device order; zero runs stay zero runs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rootfork_block::{DiffKind, DiffMap, DiffRun};

/// Where a merged run's bytes come from.
#[derive(Debug, Clone, Copy)]
enum Src {
    A,
    B,
}

/// Pieces of `a` not covered by any run of `b` (both ascending and non-overlapping).
fn uncovered(a: &[DiffRun], b: &[DiffRun]) -> Vec<DiffRun> {
    let mut out = Vec::new();
    let mut j = 0;
    for r in a {
        let mut start = r.offset;
        let end = r.end();
        while j < b.len() && b[j].end() <= start {
            j += 1;
        }
        let mut k = j;
        while start < end {
            match b.get(k) {
                Some(br) if br.offset < end => {
                    if br.offset > start {
                        out.push(piece(r, start, br.offset));
                    }
                    start = start.max(br.end());
                    k += 1;
                }
                _ => {
                    out.push(piece(r, start, end));
                    start = end;
                }
            }
        }
    }
    out
}

/// The part `[start, end)` of run `r`.
fn piece(r: &DiffRun, start: u64, end: u64) -> DiffRun {
    DiffRun {
        offset: start,
        len: end - start,
        kind: match r.kind {
            DiffKind::Data { data_offset } => DiffKind::Data {
                data_offset: data_offset + (start - r.offset),
            },
            DiffKind::Zero => DiffKind::Zero,
        },
    }
}

/// Merges `b` (over template + `a`) into `a`, writing the packed data to `out` (a new file).
pub fn merge(
    a: &DiffMap,
    a_data: &Path,
    b: &DiffMap,
    b_data: &Path,
    out: &Path,
) -> std::io::Result<DiffMap> {
    if a.size != b.size {
        return Err(std::io::Error::other(format!(
            "diff sizes differ: {} vs {}",
            a.size, b.size
        )));
    }
    let mut runs: Vec<(DiffRun, Src)> = uncovered(&a.runs, &b.runs)
        .into_iter()
        .map(|r| (r, Src::A))
        .collect();
    runs.extend(b.runs.iter().map(|r| (*r, Src::B)));
    runs.sort_by_key(|(r, _)| r.offset);
    let (fa, fb) = (File::open(a_data)?, File::open(b_data)?);
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let mut merged = Vec::with_capacity(runs.len());
    for (r, src) in runs {
        let kind = match r.kind {
            DiffKind::Zero => DiffKind::Zero,
            DiffKind::Data { data_offset } => {
                let f = match src {
                    Src::A => &fa,
                    Src::B => &fb,
                };
                let mut done = 0u64;
                while done < r.len {
                    let n = ((r.len - done) as usize).min(buf.len());
                    f.read_exact_at(&mut buf[..n], data_offset + done)?;
                    dst.write_all_at(&buf[..n], pos + done)?;
                    done += n as u64;
                }
                let at = pos;
                pos += r.len;
                DiffKind::Data { data_offset: at }
            }
        };
        merged.push(DiffRun {
            offset: r.offset,
            len: r.len,
            kind,
        });
    }
    dst.sync_all()?;
    let map = DiffMap {
        size: a.size,
        block_size: b.block_size,
        runs: merged,
    };
    map.validate()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(offset: u64, len: u64, data_offset: u64) -> DiffRun {
        DiffRun {
            offset,
            len,
            kind: DiffKind::Data { data_offset },
        }
    }

    fn zero(offset: u64, len: u64) -> DiffRun {
        DiffRun {
            offset,
            len,
            kind: DiffKind::Zero,
        }
    }

    /// Applies a diff to a byte vector.
    fn apply(dev: &mut [u8], map: &DiffMap, data: &[u8]) {
        for r in &map.runs {
            let (o, l) = (r.offset as usize, r.len as usize);
            match r.kind {
                DiffKind::Zero => dev[o..o + l].fill(0),
                DiffKind::Data { data_offset } => dev[o..o + l]
                    .copy_from_slice(&data[data_offset as usize..data_offset as usize + l]),
            }
        }
    }

    #[test]
    fn merged_diff_equals_applying_both() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64u64;
        let template: Vec<u8> = (0..size as u8).collect();
        // A: data at [0,8) and [20,36), zeroes at [40,48).
        let a = DiffMap {
            size,
            block_size: 4,
            runs: vec![data(0, 8, 0), data(20, 16, 8), zero(40, 8)],
        };
        let a_bytes: Vec<u8> = (100..124).collect();
        // B: overlaps A's middle, splits A's second run, covers A's zero run partly, adds more.
        let b = DiffMap {
            size,
            block_size: 4,
            runs: vec![data(4, 4, 0), zero(24, 4), data(28, 4, 4), data(44, 12, 8)],
        };
        let b_bytes: Vec<u8> = (200..220).collect();
        let (pa, pb, po) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("o"),
        );
        std::fs::write(&pa, &a_bytes).unwrap();
        std::fs::write(&pb, &b_bytes).unwrap();
        let m = merge(&a, &pa, &b, &pb, &po).unwrap();
        let mut want = template.clone();
        apply(&mut want, &a, &a_bytes);
        apply(&mut want, &b, &b_bytes);
        let mut got = template.clone();
        apply(&mut got, &m, &std::fs::read(&po).unwrap());
        assert_eq!(got, want);
        // Ascending, packed.
        assert!(m.runs.windows(2).all(|w| w[0].end() <= w[1].offset));
        assert_eq!(m.data_len(), std::fs::metadata(&po).unwrap().len());
    }

    #[test]
    fn sizes_must_match() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiffMap {
            size: 8,
            block_size: 4,
            runs: vec![],
        };
        let b = DiffMap {
            size: 16,
            block_size: 4,
            runs: vec![],
        };
        let p = dir.path().join("x");
        std::fs::write(&p, b"").unwrap();
        assert!(merge(&a, &p, &b, &p, &dir.path().join("o")).is_err());
    }
}
