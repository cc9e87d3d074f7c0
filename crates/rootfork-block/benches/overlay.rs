//! Overlay benchmarks, each beside its peer measured in the same run:
//! * creation over 1 GiB and 64 GiB sparse templates, beside creating and sizing a plain file;
//! * 4 KiB random reads of unwritten and of written blocks, beside `pread` on the template file;
//! * 4 KiB random writes, beside `pwrite` on a plain file;
//! * 1 MiB sequential reads (unwritten and written), beside `pread` on the template file.
//!
//! After the criterion groups, a paired table alternates batches of each benchmark and its peer
//! (both under the same machine load) and prints medians and ratios as Markdown.
//!
//! Run with `cargo bench -p rootfork-block --bench overlay` (`-- paired` for the table only). Files live in `$BENCH_DIR` (default:
//! the system temp dir); the page cache is warmed before the read benchmarks.

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use rootfork_block::{BlockDevice, Overlay, OverlayOptions, TemplateFile, TemplatePath};

/// Size of the template the I/O benchmarks use (fits the page cache comfortably).
const TEMPLATE_SIZE: u64 = 128 << 20;
const BLOCK: usize = 4096;
const SEQ: usize = 1 << 20;
/// Rounds of the paired comparison.
const ROUNDS: usize = 401;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

static SEQNO: AtomicU64 = AtomicU64::new(0);

fn unique(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}-{}", SEQNO.fetch_add(1, Ordering::Relaxed)))
}

/// Random block offsets inside `size` bytes (xorshift, fixed seed).
fn offsets(size: u64, align: u64, n: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (size / align)) * align
        })
        .collect()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn warm(file: &File, size: u64) {
    let mut buf = vec![0u8; SEQ];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(SEQ as u64) as usize;
        file.read_exact_at(&mut buf[..n], off).unwrap();
        off += n as u64;
    }
}

/// Times `make` alone, `iters` times; what it returns is dropped outside the timing.
fn timed<T>(iters: u64, mut make: impl FnMut() -> T) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t = Instant::now();
        let out = make();
        total += t.elapsed();
        drop(black_box(out));
    }
    total
}

fn creation(c: &mut Criterion) {
    let dir = bench_dir();
    let mut group = c.benchmark_group("create");
    // The cache on the bench dir's file system, and on tmpfs (no journal) when there is one.
    let mut cache_dirs = vec![("disk", bench_dir())];
    if Path::new("/dev/shm").is_dir() {
        cache_dirs.push(("tmpfs", tempfile::tempdir_in("/dev/shm").unwrap()));
    }
    for (name, size) in [("1GiB", 1u64 << 30), ("64GiB", 64u64 << 30)] {
        let path = dir.path().join(format!("sparse-{name}.img"));
        File::create(&path).unwrap().set_len(size).unwrap();
        let base: Arc<dyn BlockDevice> =
            Arc::new(TemplateFile::open(&TemplatePath::new(&path)).unwrap());
        for (fs, cache_dir) in &cache_dirs {
            let cache_dir = cache_dir.path();
            group.bench_function(format!("{fs}/file_create_set_len/{name}"), |b| {
                b.iter_custom(|iters| {
                    timed(iters, || {
                        let p = unique(cache_dir, "plain");
                        let f = File::options()
                            .read(true)
                            .write(true)
                            .create_new(true)
                            .open(&p)
                            .unwrap();
                        f.set_len(size).unwrap();
                        RemoveOnDrop(p)
                    })
                })
            });
            group.bench_function(format!("{fs}/overlay_create/{name}"), |b| {
                b.iter_custom(|iters| {
                    timed(iters, || {
                        let p = unique(cache_dir, "cache");
                        Overlay::create(base.clone(), &p, OverlayOptions::default()).unwrap()
                    })
                })
            });
        }
    }
    group.finish();
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The shared setup of the I/O benchmarks.
struct Io {
    _dir: tempfile::TempDir,
    template: File,
    scratch: File,
    unwritten: Overlay,
    written: Overlay,
}

fn io_setup() -> Io {
    let dir = bench_dir();
    let path = dir.path().join("template.img");
    std::fs::write(&path, pattern(TEMPLATE_SIZE as usize, 1)).unwrap();
    let template = File::open(&path).unwrap();
    let base: Arc<dyn BlockDevice> =
        Arc::new(TemplateFile::open(&TemplatePath::new(&path)).unwrap());
    let unwritten = Overlay::create(
        base.clone(),
        &dir.path().join("c1"),
        OverlayOptions::default(),
    )
    .unwrap();
    let written = Overlay::create(base, &dir.path().join("c2"), OverlayOptions::default()).unwrap();
    let data = pattern(SEQ, 2);
    let mut off = 0;
    while off < TEMPLATE_SIZE {
        written.write_at(&data, off).unwrap();
        off += SEQ as u64;
    }
    let scratch = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.path().join("scratch"))
        .unwrap();
    scratch.set_len(TEMPLATE_SIZE).unwrap();
    warm(&template, TEMPLATE_SIZE);
    let mut buf = vec![0u8; SEQ];
    let mut off = 0;
    while off < TEMPLATE_SIZE {
        written.read_at(&mut buf, off).unwrap();
        off += SEQ as u64;
    }
    Io {
        _dir: dir,
        template,
        scratch,
        unwritten,
        written,
    }
}

fn io(c: &mut Criterion) {
    let io = io_setup();
    let offs = offsets(TEMPLATE_SIZE, BLOCK as u64, 1 << 16);
    let mut buf = vec![0u8; SEQ];

    let mut random_read = |group: &str, ov: &Overlay, buf: &mut [u8]| {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Bytes(BLOCK as u64));
        let mut i = 0;
        g.bench_function("pread_template", |b| {
            b.iter(|| {
                i = (i + 1) & (offs.len() - 1);
                io.template
                    .read_exact_at(&mut buf[..BLOCK], offs[i])
                    .unwrap();
                black_box(&buf[..BLOCK]);
            })
        });
        g.bench_function("overlay", |b| {
            b.iter(|| {
                i = (i + 1) & (offs.len() - 1);
                ov.read_at(&mut buf[..BLOCK], offs[i]).unwrap();
                black_box(&buf[..BLOCK]);
            })
        });
        g.finish();
    };
    random_read("read_4k_random_unwritten", &io.unwritten, &mut buf);
    random_read("read_4k_random_written", &io.written, &mut buf);

    let mut g = c.benchmark_group("write_4k_random");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    let data = pattern(BLOCK, 3);
    let mut i = 0;
    g.bench_function("pwrite_file", |b| {
        b.iter(|| {
            i = (i + 1) & (offs.len() - 1);
            io.scratch.write_all_at(&data, offs[i]).unwrap();
        })
    });
    g.bench_function("overlay", |b| {
        b.iter(|| {
            i = (i + 1) & (offs.len() - 1);
            io.unwritten.write_at(&data, offs[i]).unwrap();
        })
    });
    g.finish();

    let mut g = c.benchmark_group("read_1m_sequential");
    g.throughput(Throughput::Bytes(SEQ as u64));
    let mut off = 0u64;
    let mut next = || {
        off = (off + SEQ as u64) % TEMPLATE_SIZE;
        off
    };
    g.bench_function("pread_template", |b| {
        b.iter(|| {
            io.template.read_exact_at(&mut buf, next()).unwrap();
            black_box(&buf);
        })
    });
    // A fresh overlay so the random-write benchmark above left no written blocks in it.
    let dir = bench_dir();
    let fresh = Overlay::create(
        io.unwritten.base().clone(),
        &dir.path().join("c3"),
        OverlayOptions::default(),
    )
    .unwrap();
    g.bench_function("overlay_unwritten", |b| {
        b.iter(|| {
            fresh.read_at(&mut buf, next()).unwrap();
            black_box(&buf);
        })
    });
    g.bench_function("overlay_written", |b| {
        b.iter(|| {
            io.written.read_at(&mut buf, next()).unwrap();
            black_box(&buf);
        })
    });
    g.finish();
}

/// One row of the paired comparison.
struct Paired {
    name: &'static str,
    peer: &'static str,
    peer_ns: f64,
    subject_ns: f64,
    ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `f` `batch` times and returns the mean ns per call; what `f` returns is dropped after
/// the clock stops.
fn time_batch<T>(batch: usize, k: &mut usize, f: &mut impl FnMut(usize) -> T) -> f64 {
    let mut outs = Vec::with_capacity(batch);
    let t = Instant::now();
    for _ in 0..batch {
        outs.push(f(*k));
        *k += 1;
    }
    let ns = t.elapsed().as_nanos() as f64 / batch as f64;
    drop(black_box(outs));
    ns
}

/// Alternates batches of `peer` and `subject` (swapping which goes first every round), so both
/// see the same machine load, and reports medians of the per-op times and of the per-round
/// ratios. Batches are kept short (about half a millisecond) so that most of them run without
/// being preempted; on a busy machine this is far steadier than comparing two criterion runs.
fn paired<A, B>(
    name: &'static str,
    peer_name: &'static str,
    batch: usize,
    rounds: usize,
    mut peer: impl FnMut(usize) -> A,
    mut subject: impl FnMut(usize) -> B,
) -> Paired {
    let mut k = 0usize;
    // Warm-up round.
    time_batch(batch, &mut k, &mut peer);
    time_batch(batch, &mut k, &mut subject);
    let (mut p, mut s, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (a, b) = if round % 2 == 0 {
            let a = time_batch(batch, &mut k, &mut peer);
            (a, time_batch(batch, &mut k, &mut subject))
        } else {
            let b = time_batch(batch, &mut k, &mut subject);
            (time_batch(batch, &mut k, &mut peer), b)
        };
        p.push(a);
        s.push(b);
        r.push(b / a);
    }
    Paired {
        name,
        peer: peer_name,
        peer_ns: median(p),
        subject_ns: median(s),
        ratio: median(r),
    }
}

/// The paired comparison of every benchmark, printed as a Markdown table.
fn paired_table() {
    let io = io_setup();
    let offs = offsets(TEMPLATE_SIZE, BLOCK as u64, 1 << 16);
    let at = |k: usize| offs[k & (offs.len() - 1)];
    let seq = |k: usize| (k as u64 * SEQ as u64) % TEMPLATE_SIZE;
    let buf = std::cell::RefCell::new(vec![0u8; SEQ]);
    let data = pattern(BLOCK, 3);
    let dir = bench_dir();
    let fresh = Overlay::create(
        io.unwritten.base().clone(),
        &dir.path().join("fresh"),
        OverlayOptions::default(),
    )
    .unwrap();
    let mut rows = Vec::new();
    let pread = |len: usize, off: u64| {
        io.template
            .read_exact_at(&mut buf.borrow_mut()[..len], off)
            .unwrap()
    };
    let ovread =
        |ov: &Overlay, len: usize, off: u64| ov.read_at(&mut buf.borrow_mut()[..len], off).unwrap();
    rows.push(paired(
        "read_4k_random_unwritten",
        "pread_template",
        200,
        ROUNDS,
        |k| pread(BLOCK, at(k)),
        |k| ovread(&fresh, BLOCK, at(k)),
    ));
    rows.push(paired(
        "read_4k_random_written",
        "pread_template",
        200,
        ROUNDS,
        |k| pread(BLOCK, at(k)),
        |k| ovread(&io.written, BLOCK, at(k)),
    ));
    let cache = File::open(io.written.cache_path()).unwrap();
    let pread_cache = |len: usize, off: u64| {
        cache
            .read_exact_at(&mut buf.borrow_mut()[..len], off)
            .unwrap()
    };
    rows.push(paired(
        "read_4k_random_written",
        "pread_cache_file",
        200,
        ROUNDS,
        |k| pread_cache(BLOCK, at(k)),
        |k| ovread(&io.written, BLOCK, at(k)),
    ));
    rows.push(paired(
        "read_1m_sequential_written",
        "pread_cache_file",
        4,
        ROUNDS,
        |k| pread_cache(SEQ, seq(k)),
        |k| ovread(&io.written, SEQ, seq(k)),
    ));
    rows.push(paired(
        "read_1m_sequential_unwritten",
        "pread_template",
        4,
        ROUNDS,
        |k| pread(SEQ, seq(k)),
        |k| ovread(&fresh, SEQ, seq(k)),
    ));
    rows.push(paired(
        "read_1m_sequential_written",
        "pread_template",
        4,
        ROUNDS,
        |k| pread(SEQ, seq(k)),
        |k| ovread(&io.written, SEQ, seq(k)),
    ));
    rows.push(paired(
        "write_4k_random",
        "pwrite_file",
        100,
        ROUNDS,
        |k| io.scratch.write_all_at(&data, at(k)).unwrap(),
        |k| io.unwritten.write_at(&data, at(k)).unwrap(),
    ));
    for (label, size) in [("create_1GiB", 1u64 << 30), ("create_64GiB", 64u64 << 30)] {
        let path = dir.path().join(format!("sparse-{size}.img"));
        File::create(&path).unwrap().set_len(size).unwrap();
        let base: Arc<dyn BlockDevice> =
            Arc::new(TemplateFile::open(&TemplatePath::new(&path)).unwrap());
        let cache_dir = bench_dir();
        let cache_dir = cache_dir.path();
        rows.push(paired(
            label,
            "file_create_set_len",
            10,
            ROUNDS,
            |_| {
                let p = unique(cache_dir, "plain");
                let f = File::options()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .unwrap();
                f.set_len(size).unwrap();
                RemoveOnDrop(p)
            },
            |_| {
                let p = unique(cache_dir, "cache");
                Overlay::create(base.clone(), &p, OverlayOptions::default()).unwrap()
            },
        ));
    }
    println!();
    println!("paired comparison (medians of {ROUNDS} alternating rounds):");
    println!();
    println!("| benchmark | peer | peer ns/op | overlay ns/op | ratio overlay/peer |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.3} |",
            r.name, r.peer, r.peer_ns, r.subject_ns, r.ratio
        );
    }
}

fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(40)
        .configure_from_args()
}

criterion_group! {
    name = benches;
    config = criterion();
    targets = creation, io
}

fn main() {
    // `cargo bench -- paired` runs only the paired table; a filter naming a criterion group
    // skips it.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let only_paired = args.iter().any(|a| a == "paired");
    if !only_paired {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    if args.is_empty() || only_paired {
        paired_table();
    }
}
