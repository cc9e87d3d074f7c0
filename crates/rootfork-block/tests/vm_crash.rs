//! Power-loss test of persisted overlays on a real file system, run inside the test VM
//! (`tests/vm/crash/`, suite `scripts/test.d/34-crash-vm.sh`) with `--ignored`.
//!
//! The VM puts ext4 on a `dm-log-writes` device, so every write that reaches the "disk" is logged
//! in completion order, and writes reach the log only once a flush covered them. Then:
//!
//! 1. `writer`: creates an overlay (`persist_state`, `Durability::Durable`) with its cache and
//!    state file on that ext4, over a template outside it; runs rounds of writes, partial writes,
//!    write-zeroes and trims (each round touches a block at most once), each ended by a flush and
//!    a log mark `round-N`; then one more round with no flush.
//! 2. `replay_and_check` (after unmount and removal of the target): replays the log onto a
//!    memory image and at every mark and at a few points between marks copies the image to a
//!    scratch device, mounts it (ext4 replays its journal, as after a power loss), reopens the
//!    overlay from its checkpoint, and checks it: at mark `round-N` the disk is exactly what the
//!    writes of rounds 1..=N made it (every write acknowledged before a completed flush
//!    survives); between marks every 512-byte sector reads its contents after round N or after
//!    round N + 1 (old or new, never anything else); the template is untouched. At the end of the
//!    log (after the unmount wrote everything back) the live copy, reopened as after process
//!    death, holds the unflushed round too.
//!
//! Environment: `ROOTFORK_CRASH_DIR` (the writer's ext4 mount), `ROOTFORK_CRASH_DM` (the
//! log-writes target's name, for `dmsetup message ... mark`), `ROOTFORK_CRASH_LOG` (the log
//! device), `ROOTFORK_CRASH_SCRATCH` (a scratch block device at least as large as the data
//! device), `ROOTFORK_CRASH_SIZE` (bytes of the data device), `ROOTFORK_CRASH_MNT` (a mount point
//! for the checks), `ROOTFORK_CRASH_TEMPLATE` (the template's path, outside the crash image).

mod common;
mod log_writes;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::fill_pattern;
use rootfork_block::{
    BlockDevice, Durability, Overlay, OverlayOptions, StateCopy, TemplateFile, TemplatePath,
};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 1024;
const SIZE: u64 = BLOCK * BLOCKS;
/// Rounds ended by a flush; one more follows without.
const ROUNDS: u64 = 10;
const OPS_PER_ROUND: u64 = 24;
/// Points checked between two marks.
const MID_POINTS: usize = 2;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (run inside the crash VM)"))
}

fn opts() -> OverlayOptions {
    OverlayOptions {
        block_size: BLOCK as u32,
        durability: Durability::Durable,
        keep_cache: true,
        persist_state: true,
        ..OverlayOptions::default()
    }
}

fn template_contents() -> Vec<u8> {
    let mut t = vec![0u8; SIZE as usize];
    fill_pattern(&mut t, 0x7e57);
    t
}

fn template(path: &Path) -> Arc<TemplateFile> {
    Arc::new(TemplateFile::open(&TemplatePath::new(path)).unwrap())
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zeroes { off: u64, len: u64, punch: bool },
}

/// The operations of `round`: deterministic, 512-byte aligned, no two touching the same block.
fn round_ops(round: u64) -> Vec<Op> {
    let mut x = round.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut used = std::collections::HashSet::new();
    let mut ops = Vec::new();
    while (ops.len() as u64) < OPS_PER_ROUND {
        let block = next() % (BLOCKS - 1);
        let blocks = 1 + next() % 2;
        if (block..block + blocks).any(|b| used.contains(&b)) {
            continue;
        }
        used.extend(block..block + blocks);
        // Sub-block ranges for partial writes (read-modify-write), whole blocks otherwise.
        let (off, len) = match next() % 3 {
            0 => {
                let first = next() % 8;
                let n = 1 + next() % (8 * blocks - first);
                (block * BLOCK + first * 512, n * 512)
            }
            _ => (block * BLOCK, blocks * BLOCK),
        };
        ops.push(match next() % 7 {
            0 => Op::Zeroes {
                off,
                len,
                punch: true,
            },
            1 => Op::Zeroes {
                off,
                len,
                punch: false,
            },
            _ => Op::Write {
                off,
                len,
                seed: next(),
            },
        });
    }
    ops
}

fn apply(op: Op, ov: Option<&Overlay>, model: &mut [u8]) {
    match op {
        Op::Write { off, len, seed } => {
            let mut data = vec![0u8; len as usize];
            fill_pattern(&mut data, seed);
            if let Some(ov) = ov {
                ov.write_at(&data, off).unwrap();
            }
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        Op::Zeroes { off, len, punch } => {
            if let Some(ov) = ov {
                ov.write_zeroes(off, len, punch).unwrap();
            }
            model[off as usize..(off + len) as usize].fill(0);
        }
    }
}

/// The disk after rounds `1..=n`, for every n from 0 to `ROUNDS + 1`.
fn models() -> Vec<Vec<u8>> {
    let mut out = vec![template_contents()];
    for round in 1..=ROUNDS + 1 {
        let mut m = out.last().unwrap().clone();
        for op in round_ops(round) {
            apply(op, None, &mut m);
        }
        out.push(m);
    }
    out
}

fn mark(dm: &str, name: &str) {
    let st = Command::new("dmsetup")
        .args(["message", dm, "0", "mark", name])
        .status()
        .unwrap();
    assert!(st.success(), "dmsetup message {dm} 0 mark {name}: {st}");
}

#[test]
#[ignore = "runs inside the crash VM (tests/vm/crash)"]
fn writer() {
    let dir = PathBuf::from(env("ROOTFORK_CRASH_DIR"));
    let dm = env("ROOTFORK_CRASH_DM");
    let tpath = PathBuf::from(env("ROOTFORK_CRASH_TEMPLATE"));
    std::fs::write(&tpath, template_contents()).unwrap();
    let ov = Overlay::create(template(&tpath), &dir.join("cache"), opts()).unwrap();
    // `create` synced both files and the directory: from here on the overlay exists.
    mark(&dm, "round-0");
    let mut model = template_contents();
    for round in 1..=ROUNDS + 1 {
        for op in round_ops(round) {
            apply(op, Some(&ov), &mut model);
        }
        if round <= ROUNDS {
            ov.flush().unwrap();
            mark(&dm, &format!("round-{round}"));
        }
    }
    // The process ends without a flush; the unmount after it writes the rest.
    assert_eq!(read_all(&ov), model);
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).unwrap();
    buf
}

/// What a crash point must read.
enum Expect<'a> {
    /// Exactly this (at a mark: everything flushed).
    Exactly(&'a [u8]),
    /// Each sector as in one of the two.
    OldOrNew(&'a [u8], &'a [u8]),
}

/// Mounts `image` (copied to the scratch device) and checks the overlay in it; returns the
/// failures found.
/// With `live`, the overlay is reopened as after process death (the image comes from this boot,
/// so that is the live copy), else from its checkpoint as after a power loss.
fn check_point(
    image: &[u8],
    what: &str,
    expect: Expect<'_>,
    tpath: &Path,
    live: bool,
) -> Vec<String> {
    let scratch = env("ROOTFORK_CRASH_SCRATCH");
    let mnt = env("ROOTFORK_CRASH_MNT");
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(&scratch)
        .unwrap();
    dev.write_all_at(image, 0).unwrap();
    dev.sync_all().unwrap();
    drop(dev);
    let out = Command::new("mount")
        .args(["-t", "ext4", &scratch, &mnt])
        .output()
        .unwrap();
    if !out.status.success() {
        return vec![format!(
            "{what}: mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )];
    }
    let mut failures = Vec::new();
    let cache = Path::new(&mnt).join("cache");
    let reopened = if live {
        Overlay::reopen(template(tpath), &cache, opts())
    } else {
        Overlay::reopen_from_checkpoint(template(tpath), &cache, opts())
    };
    match reopened {
        Ok((ov, report)) => {
            let want = if live {
                StateCopy::Live
            } else {
                StateCopy::Checkpoint
            };
            assert_eq!(report.copy, want, "{what}");
            let got = read_all(&ov);
            let bad: Vec<usize> = (0..got.len() / 512)
                .filter(|s| {
                    let r = s * 512..(s + 1) * 512;
                    match expect {
                        Expect::Exactly(want) => got[r.clone()] != want[r],
                        Expect::OldOrNew(old, new) => {
                            got[r.clone()] != old[r.clone()] && got[r.clone()] != new[r]
                        }
                    }
                })
                .collect();
            if !bad.is_empty() {
                failures.push(format!(
                    "{what}: {} sectors read wrong, first at byte {}",
                    bad.len(),
                    bad[0] * 512
                ));
            }
            println!(
                "CRASHPOINT {what} generation={} data={} zero={} bad_sectors={}",
                report.generation,
                report.blocks_data,
                report.blocks_zero,
                bad.len()
            );
        }
        Err(e) => failures.push(format!("{what}: reopen failed: {e}")),
    }
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(st.success(), "umount {mnt}");
    failures
}

#[test]
#[ignore = "runs inside the crash VM (tests/vm/crash)"]
fn replay_and_check() {
    let log_path = env("ROOTFORK_CRASH_LOG");
    let size: u64 = env("ROOTFORK_CRASH_SIZE").parse().unwrap();
    let tpath = PathBuf::from(env("ROOTFORK_CRASH_TEMPLATE"));
    let log_file = File::open(&log_path).unwrap();
    let log_len = std::fs::metadata(&log_path).map(|m| m.len()).unwrap();
    // A block device's metadata length is 0; ask the device.
    let log_len = if log_len == 0 {
        use std::io::Seek;
        (&log_file).seek(std::io::SeekFrom::End(0)).unwrap()
    } else {
        log_len
    };
    let log = log_writes::parse(&log_file, log_len).unwrap();
    println!(
        "LOG entries={} sector_size={}",
        log.entries.len(),
        log.sector_size
    );
    let models = models();

    // Where each round starts and ends in the log.
    let mut marks = Vec::new();
    for (i, e) in log.entries.iter().enumerate() {
        if let Some(round) = e.mark.as_deref().and_then(|m| m.strip_prefix("round-")) {
            marks.push((i, round.parse::<usize>().unwrap()));
        }
    }
    let rounds: Vec<usize> = marks.iter().map(|m| m.1).collect();
    assert_eq!(rounds, (0..=ROUNDS as usize).collect::<Vec<_>>(), "marks");

    // Points to check: every mark, and MID_POINTS entries between each mark and the next (the
    // last "next" is the end of the log: the unflushed round and the unmount).
    let mut points: Vec<(usize, Option<usize>)> = Vec::new(); // (entry index, round at a mark)
    for (k, &(at, round)) in marks.iter().enumerate() {
        points.push((at, Some(round)));
        let end = marks.get(k + 1).map_or(log.entries.len(), |m| m.0);
        let span = end - at - 1;
        for j in 1..=MID_POINTS.min(span) {
            points.push((at + j * span / (MID_POINTS.min(span) + 1).max(1), None));
        }
    }
    points.sort();
    points.dedup_by_key(|p| p.0);

    let mut image = vec![0u8; size as usize];
    let mut next = 0;
    let mut round = 0; // the last mark passed
    let mut failures = Vec::new();
    let mut checked = 0;
    for (at, at_mark) in points {
        while next <= at {
            let e = &log.entries[next];
            log.apply(&log_file, e, &mut image).unwrap();
            next += 1;
        }
        if let Some(r) = at_mark {
            round = r;
            failures.extend(check_point(
                &image,
                &format!("entry {at} (mark round-{r})"),
                Expect::Exactly(&models[r]),
                &tpath,
                false,
            ));
        } else {
            failures.extend(check_point(
                &image,
                &format!("entry {at} (between round {round} and {})", round + 1),
                Expect::OldOrNew(&models[round], &models[round + 1]),
                &tpath,
                false,
            ));
        }
        checked += 1;
    }
    // The end of the log: everything, the unflushed round included, was written at unmount.
    while next < log.entries.len() {
        log.apply(&log_file, &log.entries[next], &mut image)
            .unwrap();
        next += 1;
    }
    // The unflushed last round is not in the checkpoint (old or new), but the unmount wrote the
    // live copy, which reopening in this boot uses: exactly everything.
    let last = ROUNDS as usize;
    failures.extend(check_point(
        &image,
        "end of log, checkpoint",
        Expect::OldOrNew(&models[last], &models[last + 1]),
        &tpath,
        false,
    ));
    failures.extend(check_point(
        &image,
        "end of log, live copy",
        Expect::Exactly(&models[last + 1]),
        &tpath,
        true,
    ));
    checked += 2;
    assert_eq!(
        std::fs::read(&tpath).unwrap(),
        template_contents(),
        "template changed"
    );
    println!("CRASHPOINTS checked={checked} failed={}", failures.len());
    assert!(failures.is_empty(), "{failures:#?}");
}
