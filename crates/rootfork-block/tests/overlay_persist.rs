//! Persisted overlay state (`OverlayOptions::persist_state`) and `Overlay::reopen`.
//!
//! * A property test runs random writes, write-zeroes, trims, flushes and FUA-style writes
//!   (write + flush) against an overlay and a byte model, "crashes" at random points (the overlay
//!   is dropped with no flush, keeping its files, as when the process dies) and reopens it: every
//!   acknowledged write must read back, and the block states (stats, block status) must be the
//!   ones before the crash. At some crash points it reopens from the checkpoint instead (as after
//!   a power loss, with nothing lost since the page cache is intact): every block must then read
//!   as it did at the last flush or as it does now, never anything else.
//! * A real SIGKILL: this test binary re-runs itself as a child that writes and reports each
//!   acknowledged write; the parent kills it with SIGKILL mid-stream and reopens.
//! * Concurrent writers sharing state words (live copy) and racing flushes (checkpoint).
//! * Typed errors for missing, damaged and mismatched state files; grown disks, quota and the
//!   zeroed-data slot across a reopen; both files removed on drop.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use rootfork_block::{
    state_path, BlockDevice, BlockError, Contents, Durability, Overlay, OverlayOptions, StateCopy,
    StateField,
};

fn persisted(bs: u32, durability: Durability) -> OverlayOptions {
    OverlayOptions {
        block_size: bs,
        durability,
        keep_cache: true,
        persist_state: true,
        ..OverlayOptions::default()
    }
}

/// A dropped overlay that keeps its files: what a dead process leaves behind.
fn crash(ov: Overlay) {
    drop(ov);
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u64,
        fua: bool,
    },
    WriteZeroBlock {
        block: u64,
    },
    Zeroes {
        off: u64,
        len: u64,
        punch: bool,
    },
    Trim {
        off: u64,
        len: u64,
    },
    Flush,
    /// Process death: drop and reopen (live copy).
    Crash,
    /// Power loss with nothing lost: drop and reopen from the checkpoint.
    PowerLoss,
}

fn range(size: u64, bs: u64) -> impl Strategy<Value = (u64, u64)> {
    (0..size, 1..=6 * bs, any::<bool>()).prop_map(move |(off, len, aligned)| {
        let (off, len) = if aligned {
            ((off / bs) * bs, (len / bs).max(1) * bs)
        } else {
            (off, len)
        };
        (off, len.min(size - off))
    })
}

fn op(size: u64, bs: u64) -> impl Strategy<Value = Op> {
    let blocks = size.div_ceil(bs);
    prop_oneof![
        8 => (range(size, bs), any::<u64>(), prop::bool::weighted(0.1))
            .prop_map(|((off, len), seed, fua)| Op::Write { off, len, seed, fua }),
        1 => (0..blocks).prop_map(|block| Op::WriteZeroBlock { block }),
        2 => (range(size, bs), any::<bool>()).prop_map(|((off, len), punch)| Op::Zeroes { off, len, punch }),
        2 => range(size, bs).prop_map(|(off, len)| Op::Trim { off, len }),
        2 => Just(Op::Flush),
        1 => Just(Op::Crash),
        1 => Just(Op::PowerLoss),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

fn run(bs: u32, size: u64, durability: Durability, ops: &[Op]) {
    let template = template_bytes(size as usize, 0xc0ffee ^ u64::from(bs));
    let (tfile, base) = template_file(&template);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let opts = persisted(bs, durability);
    let mut ov = Overlay::create(base.clone(), &cache, opts).unwrap();
    let mut now = template.clone();
    let mut at_flush = template.clone();
    let mut generation = 0;

    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Write {
                off,
                len,
                seed,
                fua,
            } => {
                let mut data = vec![0u8; len as usize];
                fill_pattern(&mut data, seed);
                ov.write_at(&data, off).unwrap();
                now[off as usize..(off + len) as usize].copy_from_slice(&data);
                if fua {
                    ov.flush().unwrap();
                    at_flush.clone_from(&now);
                }
            }
            Op::WriteZeroBlock { block } => {
                let off = block * u64::from(bs);
                let len = u64::from(bs).min(size - off);
                ov.write_at(&vec![0u8; len as usize], off).unwrap();
                now[off as usize..(off + len) as usize].fill(0);
            }
            Op::Zeroes { off, len, punch } => {
                ov.write_zeroes(off, len, punch).unwrap();
                now[off as usize..(off + len) as usize].fill(0);
            }
            Op::Trim { off, len } => {
                ov.trim(off, len).unwrap();
                now[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => {
                ov.flush().unwrap();
                at_flush.clone_from(&now);
            }
            Op::Crash => {
                let stats = ov.stats();
                let status = ov.block_status(0, size).unwrap();
                crash(ov);
                let (back, report) = Overlay::reopen(base.clone(), &cache, opts).unwrap();
                generation += 1;
                assert_eq!(report.copy, StateCopy::Live, "op {i}");
                assert_eq!(report.generation, generation);
                assert_eq!(report.blocks_data, stats.blocks_data, "op {i}");
                assert_eq!(report.blocks_zero, stats.blocks_zero, "op {i}");
                assert_same(&read_all(&back), &now, &format!("op {i}: after a crash"));
                assert_eq!(back.block_status(0, size).unwrap(), status, "op {i}");
                ov = back;
            }
            Op::PowerLoss => {
                if durability == Durability::Ephemeral {
                    continue;
                }
                crash(ov);
                let (back, report) =
                    Overlay::reopen_from_checkpoint(base.clone(), &cache, opts).unwrap();
                generation += 1;
                assert_eq!(report.copy, StateCopy::Checkpoint);
                let got = read_all(&back);
                // Per block: as at the last flush, or as now (nothing was really lost).
                for (b, chunk) in got.chunks(bs as usize).enumerate() {
                    let r = b * bs as usize..b * bs as usize + chunk.len();
                    assert!(
                        chunk == &at_flush[r.clone()] || chunk == &now[r.clone()],
                        "op {i}: block {b} reads neither its flushed nor its current contents"
                    );
                }
                now.clone_from(&got);
                at_flush.clone_from(&got);
                ov = back;
            }
        }
    }
    crash(ov);
    let (ov, _) = Overlay::reopen(
        base,
        &cache,
        OverlayOptions {
            keep_cache: false,
            ..opts
        },
    )
    .unwrap();
    assert_same(&read_all(&ov), &now, "final contents");
    drop(ov);
    assert!(!cache.exists() && !state_path(&cache).exists());
    assert_same(&std::fs::read(tfile.path()).unwrap(), &template, "template");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn crashes_keep_every_acknowledged_write_512(ops in prop::collection::vec(op(150 * 512 + 100, 512), 50..400)) {
        run(512, 150 * 512 + 100, Durability::Durable, &ops);
    }

    #[test]
    fn crashes_keep_every_acknowledged_write_4k(ops in prop::collection::vec(op(90 * 4096, 4096), 50..400)) {
        run(4096, 90 * 4096, Durability::Durable, &ops);
    }

    #[test]
    fn crashes_keep_every_acknowledged_write_ephemeral(ops in prop::collection::vec(op(70 * 4096 - 300, 4096), 50..300)) {
        run(4096, 70 * 4096 - 300, Durability::Ephemeral, &ops);
    }
}

/// Environment variable that turns this test binary into the writer child of the SIGKILL test.
const CHILD_ENV: &str = "ROOTFORK_PERSIST_SIGKILL_CHILD";
const SIGKILL_BLOCKS: u64 = 256;

/// The contents of write `n` of the SIGKILL test: 4 KiB at block `(n * 7) % 256`, or a trim of
/// it for every fifth write.
fn sigkill_write(ov: &Overlay, n: u64) {
    let off = (n * 7) % SIGKILL_BLOCKS * 4096;
    if n % 5 == 4 {
        ov.trim(off, 4096).unwrap();
    } else {
        let mut data = vec![0u8; 4096];
        fill_pattern(&mut data, n);
        ov.write_at(&data, off).unwrap();
    }
}

#[test]
fn sigkill_keeps_every_acknowledged_write() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        // The child: write forever, acknowledging each write on stdout, until killed.
        let dir = Path::new(&dir);
        let base = sparse_template(dir, SIGKILL_BLOCKS * 4096);
        let ov = Overlay::create(
            base,
            &dir.join("cache"),
            persisted(4096, Durability::Ephemeral),
        )
        .unwrap();
        for n in 0.. {
            sigkill_write(&ov, n);
            println!("acked {n}");
        }
        unreachable!();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkill_keeps_every_acknowledged_write",
            "--nocapture",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = None;
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("acked ") {
            acked = Some(n.parse::<u64>().unwrap());
            if acked >= Some(3000) {
                break;
            }
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    let acked = acked.expect("the child acknowledged no write");
    assert!(acked >= 3000, "the child stopped early at {acked}");

    // The child may have completed writes after the last one we read; replay them on a model
    // until it matches, which also proves nothing acknowledged is missing.
    let base = sparse_template(&dir.path().join("again"), SIGKILL_BLOCKS * 4096);
    let (ov, report) = Overlay::reopen(
        base.clone(),
        &dir.path().join("cache"),
        persisted(4096, Durability::Ephemeral),
    )
    .unwrap();
    assert_eq!(report.copy, StateCopy::Live);
    let got = read_all(&ov);
    let model_dir = tempfile::tempdir().unwrap();
    let model =
        Overlay::create(base, &model_dir.path().join("m"), OverlayOptions::default()).unwrap();
    for n in 0..=acked {
        sigkill_write(&model, n);
    }
    let mut n = acked + 1;
    while read_all(&model) != got {
        assert!(
            n <= acked + 64,
            "the reopened disk matches no point at or after acknowledged write {acked}"
        );
        sigkill_write(&model, n);
        n += 1;
    }
}

/// A template file of `size` zero bytes (a hole) in a new directory `dir`.
fn sparse_template(dir: &Path, size: u64) -> Arc<rootfork_block::TemplateFile> {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("template");
    if !path.exists() {
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    }
    Arc::new(rootfork_block::TemplateFile::open(&rootfork_block::TemplatePath::new(&path)).unwrap())
}

#[test]
fn concurrent_writers_sharing_words_lose_no_live_state() {
    // 4 KiB blocks: one state word covers 32 blocks, two 16-block lock regions, so threads
    // owning neighbouring regions change the same word at the same time. Each round every thread
    // flips one block of its region between data and zero at once (so every request changes a
    // word), then the overlay is dropped and reopened: a lost live-copy update shows as a block
    // in its previous state.
    let dir = tempfile::tempdir().unwrap();
    let blocks = 64u64;
    let base = sparse_template(&dir.path().join("t"), blocks * 4096);
    let cache = dir.path().join("cache");
    let opts = persisted(4096, Durability::Ephemeral);
    let mut ov = Arc::new(Overlay::create(base.clone(), &cache, opts).unwrap());
    for round in 0..150u64 {
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (ov, barrier) = (ov.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let block = t * 16 + (round * 7 + t * 3) % 16;
                    let mut b = [0u8; 1];
                    ov.read_at(&mut b, block * 4096).unwrap();
                    barrier.wait();
                    if b[0] == 0 {
                        ov.write_at(&[t as u8 + 1; 4096], block * 4096).unwrap();
                    } else {
                        ov.trim(block * 4096, 4096).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let want = read_all(ov.as_ref());
        let status = ov.block_status(0, blocks * 4096).unwrap();
        crash(Arc::into_inner(ov).unwrap());
        let (back, _) = Overlay::reopen(base.clone(), &cache, opts).unwrap();
        assert_same(&read_all(&back), &want, &format!("round {round}"));
        assert_eq!(back.block_status(0, blocks * 4096).unwrap(), status);
        ov = Arc::new(back);
    }
}

#[test]
fn a_flush_racing_writers_checkpoints_everything_acknowledged_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 1024u64;
    let base = sparse_template(&dir.path().join("t"), blocks * 4096);
    let cache = dir.path().join("cache");
    let opts = persisted(4096, Durability::Durable);
    let ov = Arc::new(Overlay::create(base.clone(), &cache, opts).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let (ov, stop) = (ov.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ov.flush().unwrap();
            }
        })
    };
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let ov = ov.clone();
            std::thread::spawn(move || {
                let mut x = t + 11;
                for i in 0..800u64 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let block = ((x >> 33) % (blocks / 3)) * 3 + t;
                    if i % 4 == 3 {
                        ov.trim(block * 4096, 4096).unwrap();
                    } else {
                        ov.write_at(&[(i % 250) as u8 + 1; 4096], block * 4096)
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flusher.join().unwrap();
    ov.flush().unwrap();
    let want = read_all(ov.as_ref());
    drop(Arc::into_inner(ov).unwrap());
    let (back, report) = Overlay::reopen_from_checkpoint(base, &cache, opts).unwrap();
    assert_eq!(report.copy, StateCopy::Checkpoint);
    assert_same(&read_all(&back), &want, "checkpoint after the last flush");
}

#[test]
fn create_makes_both_files_and_drop_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = sparse_template(&dir.path().join("t"), 1 << 20);
    let cache = dir.path().join("cache");
    let opts = OverlayOptions {
        keep_cache: false,
        ..persisted(4096, Durability::Durable)
    };
    let ov = Overlay::create(base.clone(), &cache, opts).unwrap();
    assert!(cache.exists() && state_path(&cache).exists());
    drop(ov);
    assert!(!cache.exists() && !state_path(&cache).exists());

    // Without persist_state there is no state file and nothing to reopen.
    let ov = Overlay::create(
        base.clone(),
        &cache,
        OverlayOptions {
            keep_cache: true,
            ..OverlayOptions::default()
        },
    )
    .unwrap();
    assert!(!state_path(&cache).exists());
    drop(ov);
    let e = Overlay::reopen(base.clone(), &cache, opts).unwrap_err();
    assert!(matches!(e, BlockError::StateMissing(_)), "{e}");
    assert_eq!(e.errno(), libc::ENOENT);
    std::fs::remove_file(&cache).unwrap();

    // A stale state file is never reused by create, and the cache it made is removed again.
    std::fs::write(state_path(&cache), b"stale").unwrap();
    let e = Overlay::create(base, &cache, opts).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST, "{e}");
    assert!(!cache.exists());
}

#[test]
fn damaged_and_mismatched_state_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = sparse_template(&dir.path().join("t"), 1 << 20);
    let cache = dir.path().join("cache");
    let opts = persisted(4096, Durability::Durable);
    let ov = Overlay::create(base.clone(), &cache, opts).unwrap();
    ov.write_at(&[1u8; 8192], 4096).unwrap();
    crash(ov);
    let state = state_path(&cache);
    let good = std::fs::read(&state).unwrap();

    let mismatch =
        |opts: OverlayOptions, base: Arc<dyn BlockDevice>, want: StateField| match Overlay::reopen(
            base, &cache, opts,
        ) {
            Err(BlockError::StateMismatch { field, .. }) => assert_eq!(field, want),
            other => panic!("{want}: {other:?}"),
        };
    mismatch(
        persisted(8192, Durability::Durable),
        base.clone(),
        StateField::BlockSize,
    );
    let bigger = sparse_template(&dir.path().join("t2"), 2 << 20);
    mismatch(opts, bigger, StateField::BaseSize);
    let grown = OverlayOptions {
        disk_size: Some(4 << 20),
        ..opts
    };
    mismatch(grown, base.clone(), StateField::DeviceSize);

    let damaged = |bytes: &[u8], what: &str| {
        std::fs::write(&state, bytes).unwrap();
        let e = Overlay::reopen(base.clone(), &cache, opts).unwrap_err();
        assert!(matches!(e, BlockError::StateDamaged(_)), "{what}: {e}");
        assert_eq!(e.errno(), libc::EUCLEAN);
    };
    damaged(b"", "empty");
    damaged(&good[..50], "truncated header");
    damaged(&good[..good.len() - 8], "truncated map");
    let mut flipped = good.clone();
    flipped[20] ^= 0x10;
    damaged(&flipped, "flipped bit");
    let mut magic = good.clone();
    magic[0] = b'X';
    damaged(&magic, "magic");

    // The good file still reopens, and a cache of the wrong length is a mismatch.
    std::fs::write(&state, &good).unwrap();
    let (ov, _) = Overlay::reopen(base.clone(), &cache, opts).unwrap();
    crash(ov);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cache)
        .unwrap()
        .set_len(4096)
        .unwrap();
    mismatch(opts, base, StateField::CacheSize);
}

#[test]
fn grown_disks_quota_and_zeroed_data_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let base = sparse_template(&dir.path().join("t"), 1 << 20);
    let cache = dir.path().join("cache");
    let opts = OverlayOptions {
        disk_size: Some(2 << 20),
        quota: Some(6 * 4096),
        ..persisted(4096, Durability::Durable)
    };
    let ov = Overlay::create(base.clone(), &cache, opts).unwrap();
    // Three blocks in the grown tail, one zeroed in place, one punched.
    ov.write_at(&[7u8; 3 * 4096], (1 << 20) + 4096).unwrap();
    ov.write_zeroes(0, 2 * 4096, false).unwrap();
    ov.write_zeroes(10 * 4096, 4096, true).unwrap();
    ov.flush().unwrap();
    let status = ov.block_status(0, 2 << 20).unwrap();
    crash(ov);
    for from_checkpoint in [false, true] {
        let (ov, report) = if from_checkpoint {
            Overlay::reopen_from_checkpoint(base.clone(), &cache, opts).unwrap()
        } else {
            Overlay::reopen(base.clone(), &cache, opts).unwrap()
        };
        assert_eq!(ov.size(), 2 << 20);
        assert_eq!((report.blocks_data, report.blocks_zero), (5, 1));
        assert_eq!(ov.block_status(0, 2 << 20).unwrap(), status);
        assert_eq!(status[0].contents, Contents::Zeroes);
        let mut b = vec![0u8; 3 * 4096];
        ov.read_at(&mut b, (1 << 20) + 4096).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        crash(ov);
    }
    // The quota counts the reopened data blocks: five held, one more fits, two do not.
    let (ov, _) = Overlay::reopen(base, &cache, opts).unwrap();
    let e = ov.write_at(&[1u8; 2 * 4096], 100 * 4096).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    ov.write_at(&[1u8; 4096], 100 * 4096).unwrap();
}
