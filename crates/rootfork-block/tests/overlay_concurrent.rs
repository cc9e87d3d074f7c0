//! Multi-threaded model test: concurrent writers and readers on one overlay.
//!
//! The device is cut into chunks of 4 blocks:
//! * owned chunks: chunk `c` belongs to writer `c % WRITERS`, which runs random writes,
//!   write-zeroes and trims inside its chunks against its own model and reads them back as it
//!   goes, so every result is deterministic although all writers run at once;
//! * quarter chunks: every writer rewrites its own quarter of these blocks over and over. Those are
//!   partial-block writes racing on the same blocks, so a read-modify-write that is not under the
//!   range lock loses updates; at the end every quarter must hold its owner's last write;
//! * overlap chunks: writers write overlapping, unaligned ranges with a constant byte; at the end
//!   every byte must hold the last value one of the writers wrote there (or the template's byte);
//! * frozen chunks: set up before the threads start and never written again; reader threads read
//!   them continuously while the writers run, and every read must match exactly.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use common::*;
use rand::{Rng, SeedableRng};
use rootfork_block::{BlockDevice, BlockState, Overlay, OverlayOptions};

const WRITERS: usize = 4;
const READERS: usize = 2;
const CHUNK_BLOCKS: u64 = 4;
const OWNED_CHUNKS: u64 = 96;
const QUARTER_CHUNKS: u64 = 4;
const OVERLAP_CHUNKS: u64 = 4;
const FROZEN_CHUNKS: u64 = 4;
const OPS: usize = 1200;

/// One write to the overlap chunks: `len` bytes at `off` set to `value`.
#[derive(Clone, Copy)]
struct Stamp {
    off: u64,
    len: u64,
    value: u8,
}

struct WriterResult {
    model: Model,
    /// (block, data) of this writer's last write to its quarter of each quarter block.
    quarters: Vec<Option<Vec<u8>>>,
    stamps: Vec<Stamp>,
}

fn run(bs: u32, seed: u64) {
    let bsz = u64::from(bs);
    let chunk = CHUNK_BLOCKS * bsz;
    let chunks = OWNED_CHUNKS + QUARTER_CHUNKS + OVERLAP_CHUNKS + FROZEN_CHUNKS;
    let size = chunks * chunk;
    let quarter_start = OWNED_CHUNKS * chunk;
    let overlap_start = quarter_start + QUARTER_CHUNKS * chunk;
    let frozen_start = overlap_start + OVERLAP_CHUNKS * chunk;
    let quarter_blocks = QUARTER_CHUNKS * CHUNK_BLOCKS;
    // Quarter writes go to the first few blocks only, so they collide often.
    let hot_blocks = 3;

    let template = template_bytes(size as usize, seed);
    let (_tfile, base) = template_file(&template);
    let dir = tempfile::tempdir().unwrap();
    let opts = OverlayOptions {
        block_size: bs,
        ..OverlayOptions::default()
    };
    let ov = Arc::new(Overlay::create(base, &dir.path().join("cache"), opts).unwrap());

    // Frozen chunks: some data, some zero, some absent, set up before the race.
    let mut frozen = Model::new(&template, bs);
    let mut data = vec![0u8; (2 * chunk) as usize];
    fill_pattern(&mut data, seed ^ 0xf00d);
    ov.write_at(&data, frozen_start).unwrap();
    frozen.write(frozen_start, &data);
    ov.write_zeroes(frozen_start + 2 * chunk + 100, chunk, true)
        .unwrap();
    frozen.zero(frozen_start + 2 * chunk + 100, chunk, true);
    let frozen_expect = frozen.read(frozen_start, size - frozen_start).to_vec();

    let done = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(WRITERS + READERS));

    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (ov, done, start) = (ov.clone(), done.clone(), start.clone());
            let expect = frozen_expect.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100 + r as u64);
                start.wait();
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) || reads < 100 {
                    let off = rng.gen_range(0..expect.len() as u64);
                    let len = rng.gen_range(0..=(expect.len() as u64 - off).min(3 * bsz));
                    let mut buf = vec![0u8; len as usize];
                    ov.read_at(&mut buf, frozen_start + off).unwrap();
                    assert_same(
                        &buf,
                        &expect[off as usize..(off + len) as usize],
                        "concurrent read of frozen chunks",
                    );
                    reads += 1;
                }
                reads
            })
        })
        .collect();

    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (ov, start) = (ov.clone(), start.clone());
            let template = template.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + t as u64);
                let mut model = Model::new(&template, bs);
                let mut quarters = vec![None; quarter_blocks as usize];
                let mut stamps = Vec::new();
                let q = bsz / 4;
                start.wait();
                for i in 0..OPS {
                    match rng.gen_range(0..13) {
                        // Own quarter of a shared block: a partial-block write.
                        0 | 10..=12 => {
                            let b = rng.gen_range(0..hot_blocks);
                            let mut buf = vec![0u8; q as usize];
                            fill_pattern(&mut buf, rng.gen());
                            ov.write_at(&buf, quarter_start + b * bsz + t as u64 * q)
                                .unwrap();
                            quarters[b as usize] = Some(buf);
                        }
                        // Overlapping unaligned writes of a constant byte.
                        1 => {
                            let span = OVERLAP_CHUNKS * chunk;
                            let off = rng.gen_range(0..span);
                            let len = rng.gen_range(1..=(span - off).min(2 * bsz));
                            let value = (t as u8 + 1) * 16 + (i % 15) as u8 + 1;
                            ov.write_at(&vec![value; len as usize], overlap_start + off)
                                .unwrap();
                            stamps.push(Stamp { off, len, value });
                        }
                        // Anything inside one of this writer's own chunks.
                        kind => {
                            let c = rng.gen_range(0..OWNED_CHUNKS / WRITERS as u64)
                                * WRITERS as u64
                                + t as u64;
                            let off = c * chunk + rng.gen_range(0..chunk);
                            let len = rng.gen_range(0..=(c * chunk + chunk - off));
                            match kind {
                                2..=5 => {
                                    let mut buf = vec![0u8; len as usize];
                                    if rng.gen_ratio(4, 5) {
                                        fill_pattern(&mut buf, rng.gen());
                                    }
                                    ov.write_at(&buf, off).unwrap();
                                    model.write(off, &buf);
                                }
                                6 | 7 => {
                                    let punch = rng.gen();
                                    ov.write_zeroes(off, len, punch).unwrap();
                                    model.zero(off, len, punch);
                                }
                                8 => {
                                    ov.trim(off, len).unwrap();
                                    model.zero(off, len, true);
                                }
                                _ => {
                                    let mut buf = vec![0u8; len as usize];
                                    ov.read_at(&mut buf, off).unwrap();
                                    assert_same(&buf, model.read(off, len), "owned chunk read");
                                }
                            }
                        }
                    }
                }
                WriterResult {
                    model,
                    quarters,
                    stamps,
                }
            })
        })
        .collect();

    let results: Vec<WriterResult> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() >= 100);
    }

    let all = read_all(ov.as_ref());
    let extents = ov.extents(0, size).unwrap();
    let mut states = Vec::new();
    for e in &extents {
        assert_eq!(e.len % bsz, 0);
        states.extend(std::iter::repeat_n(e.state, (e.len / bsz) as usize));
    }

    // Owned chunks: exactly each owner's model, bytes and states.
    for c in 0..OWNED_CHUNKS {
        let owner = &results[(c % WRITERS as u64) as usize].model;
        let (a, b) = ((c * chunk) as usize, ((c + 1) * chunk) as usize);
        assert_same(&all[a..b], &owner.data[a..b], &format!("owned chunk {c}"));
        let blocks = (c * CHUNK_BLOCKS) as usize..((c + 1) * CHUNK_BLOCKS) as usize;
        assert_eq!(
            &states[blocks.clone()],
            &owner.states[blocks],
            "chunk {c} states"
        );
    }

    // Quarter chunks: no lost updates.
    for b in 0..quarter_blocks {
        for (t, r) in results.iter().enumerate() {
            let at = (quarter_start + b * bsz + t as u64 * (bsz / 4)) as usize;
            let got = &all[at..at + (bsz / 4) as usize];
            match &r.quarters[b as usize] {
                Some(want) => assert_same(got, want, &format!("quarter {t} of block {b}")),
                None => assert_same(got, &template[at..at + got.len()], "unwritten quarter"),
            }
        }
    }

    // Overlap chunks: every byte is the last value some writer wrote there.
    for off in 0..OVERLAP_CHUNKS * chunk {
        let got = all[(overlap_start + off) as usize];
        let allowed: Vec<u8> = results
            .iter()
            .filter_map(|r| {
                r.stamps
                    .iter()
                    .rev()
                    .find(|s| s.off <= off && off < s.off + s.len)
                    .map(|s| s.value)
            })
            .collect();
        if allowed.is_empty() {
            assert_eq!(got, template[(overlap_start + off) as usize], "byte {off}");
        } else {
            assert!(
                allowed.contains(&got),
                "overlap byte {off}: {got} not in {allowed:?}"
            );
        }
    }

    assert_same(
        &all[frozen_start as usize..],
        &frozen_expect,
        "frozen chunks",
    );

    let count = |s| states.iter().filter(|x| **x == s).count() as u64;
    let stats = ov.stats();
    assert_eq!(
        (stats.blocks_absent, stats.blocks_data, stats.blocks_zero),
        (
            count(BlockState::Absent),
            count(BlockState::Data),
            count(BlockState::Zero)
        )
    );
}

#[test]
fn concurrent_writers_and_readers_4k() {
    for seed in 1..=3 {
        run(4096, seed);
    }
}

#[test]
fn concurrent_writers_and_readers_512() {
    run(512, 10);
}
