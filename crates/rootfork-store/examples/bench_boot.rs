//! Benchmark: replays a recorded boot read trace against a template in object storage.
//!
//! Run by `scripts/bench-store`, which records the trace (a real QEMU boot of the demo template
//! through nbdkit's log filter) and starts the S3 server. Compares, in one run and against the
//! same server: fetching the whole raw image, fetching the whole build data, lazy cold reads at
//! several chunk sizes (optionally with injected per-request latency), and warm reads (after a
//! restart, with the cache re-verified, and in-process). For fast cold starts it also compares,
//! per chunk size and latency: lazy cold without readahead (recording the boot trace), lazy cold
//! with readahead, and a cold start that fetches the stored boot trace and prefetches it in the
//! background before replaying.
//!
//! Usage: `bench_boot IMAGE TRACE` with `ROOTFORK_S3_*` set as in `tests/s3.rs`.
//! Optional: `BENCH_CHUNKS` (comma-separated KiB, default `4096,1024,256`), `BENCH_RUNS`
//! (default 3), `BENCH_LATENCY_MS` (default 20).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use rootfork_block::layered::{BuildId, BuildOptions, BuildResolver, LocalStore};
use rootfork_block::BlockDevice;
use rootfork_store::{
    Backend, CacheConfig, FetchPolicy, ObjectSource, ObjectStoreSource, RemoteStore, S3Config,
    SourceFuture, StatsSnapshot, StoreConfig,
};

const MIB: f64 = 1048576.0;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (run scripts/bench-store)"))
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Adds a fixed latency to every request (first-byte latency of a remote object store).
struct Latency<S> {
    inner: S,
    delay: Duration,
}

impl<S: ObjectSource> ObjectSource for Latency<S> {
    fn get_range(&self, key: &str, range: Range<u64>) -> SourceFuture<'_> {
        let key = key.to_owned();
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.get_range(&key, range).await
        })
    }

    fn get(&self, key: &str) -> SourceFuture<'_> {
        let key = key.to_owned();
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.get(&key).await
        })
    }
}

fn config(cache: &Path, chunk: u64, readahead: bool) -> StoreConfig {
    StoreConfig {
        backend: Backend::S3(S3Config {
            endpoint: Some(env("ROOTFORK_S3_ENDPOINT")),
            bucket: env("ROOTFORK_S3_BUCKET"),
            region: "us-east-1".into(),
            access_key_id: env("ROOTFORK_S3_ACCESS_KEY"),
            secret_access_key: env("ROOTFORK_S3_SECRET_KEY"),
            allow_http: true,
        }),
        prefix: "bench".into(),
        fetch: FetchPolicy {
            chunk_size: chunk,
            readahead,
            ..FetchPolicy::default()
        },
        cache: CacheConfig {
            dir: cache.to_owned(),
            budget: 1 << 30,
        },
        runtime_threads: 2,
    }
}

fn open_store(cache: &Path, chunk: u64, latency: Option<Duration>, readahead: bool) -> RemoteStore {
    let cfg = config(cache, chunk, readahead);
    let store = cfg.object_store().expect("S3 client");
    let plain = ObjectStoreSource(store.clone());
    let source: Arc<dyn ObjectSource> = match latency {
        Some(delay) => Arc::new(Latency {
            inner: plain,
            delay,
        }),
        None => Arc::new(plain),
    };
    RemoteStore::with_parts(&cfg, store, source).expect("remote store")
}

fn read_trace(path: &Path) -> Vec<(u64, usize)> {
    std::fs::read_to_string(path)
        .expect("trace file")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut it = l.split_whitespace();
            let o = it.next().unwrap().parse().unwrap();
            let n = it.next().unwrap().parse().unwrap();
            (o, n)
        })
        .collect()
}

fn replay(dev: &dyn BlockDevice, trace: &[(u64, usize)]) {
    let mut buf = Vec::new();
    for &(o, n) in trace {
        buf.resize(n, 0);
        dev.read_at(&mut buf, o).expect("trace read");
    }
}

struct Row {
    mode: String,
    chunk: String,
    requests: u64,
    bytes: u64,
    times: Vec<Duration>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn delta(a: StatsSnapshot, b: StatsSnapshot) -> (u64, u64) {
    (b.requests - a.requests, b.bytes_fetched - a.bytes_fetched)
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [image, trace_path] = &args[..] else {
        eprintln!("usage: bench_boot IMAGE TRACE");
        std::process::exit(2);
    };
    let chunks: Vec<u64> = env_or("BENCH_CHUNKS", "4096,1024,256")
        .split(',')
        .map(|s| s.trim().parse::<u64>().expect("chunk KiB") << 10)
        .collect();
    let runs: usize = env_or("BENCH_RUNS", "3").parse().unwrap();
    let latency = Duration::from_millis(env_or("BENCH_LATENCY_MS", "20").parse().unwrap());
    let trace = read_trace(trace_path);
    let work = tempfile::tempdir().expect("temp dir");
    let image_len = std::fs::metadata(image).unwrap().len();

    // Import with the smallest chunk as checksum granularity so every fetch size divides evenly.
    let local = LocalStore::new(work.path().join("local"));
    let sub = (*chunks.iter().min().unwrap()).min(1 << 20) as u32;
    let opts = BuildOptions {
        chunk_size: sub,
        ..BuildOptions::default()
    };
    let base: BuildId = local.import_image(image, opts).unwrap().header.id;
    let data_len = local.map(&base).unwrap().header.data_len;
    let uploader = open_store(&work.path().join("upload-cache"), chunks[0], None, false);
    uploader.upload(&local, &base).unwrap();
    let raw_key = format!("bench/raw/{base}");
    {
        let store = uploader.object_store().clone();
        let bytes = std::fs::read(image).unwrap();
        let key = raw_key.clone();
        uploader
            .bridge()
            .run(async move {
                store
                    .put(&ObjectPath::from(key), PutPayload::from(bytes))
                    .await
            })
            .unwrap()
            .unwrap();
    }
    let mut touched = std::collections::BTreeSet::new();
    for &(o, n) in &trace {
        for b in o / 4096..(o + n as u64).div_ceil(4096) {
            touched.insert(b);
        }
    }
    let trace_bytes: u64 = trace.iter().map(|t| t.1 as u64).sum();
    println!(
        "image {:.1} MiB raw; build data {:.2} MiB (zero blocks dropped); boot trace {} reads, {:.2} MiB, {:.2} MiB distinct ({:.1}% of the image)",
        image_len as f64 / MIB,
        data_len as f64 / MIB,
        trace.len(),
        trace_bytes as f64 / MIB,
        (touched.len() * 4096) as f64 / MIB,
        (touched.len() * 4096) as f64 * 100.0 / image_len as f64
    );

    let mut rows = Vec::new();
    // Whole objects.
    for (mode, key) in [
        ("whole raw image, one GET", raw_key.clone()),
        ("whole build data, one GET", uploader.key(&base, "data")),
    ] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..runs {
            let store = uploader.object_store().clone();
            let key = key.clone();
            let t = Instant::now();
            let b = uploader
                .bridge()
                .run(async move {
                    let r = store.get(&ObjectPath::from(key)).await?;
                    r.bytes().await
                })
                .unwrap()
                .unwrap();
            times.push(t.elapsed());
            bytes = b.len() as u64;
        }
        rows.push(Row {
            mode: mode.into(),
            chunk: "-".into(),
            requests: 1,
            bytes,
            times,
        });
    }
    // Local layered template (no network): the floor.
    {
        let t_local = local.open(&base).unwrap();
        let mut times = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            replay(&t_local, &trace);
            times.push(t.elapsed());
        }
        rows.push(Row {
            mode: "local layered build (page cache)".into(),
            chunk: "-".into(),
            requests: 0,
            bytes: 0,
            times,
        });
    }
    let mut notes = Vec::new();
    for &chunk in &chunks {
        let mut modes: Vec<(String, Option<Duration>)> = vec![("".into(), None)];
        if (chunk == 4 << 20 || chunk == 1 << 20) && !latency.is_zero() {
            modes.push((
                format!(", +{} ms/request", latency.as_millis()),
                Some(latency),
            ));
        }
        let label = format!("{} KiB", chunk >> 10);
        for (suffix, lat) in modes {
            let tag = format!("{chunk}-{}", lat.is_some());
            // Lazy cold without readahead (the first run's reads are the boot trace), then warm.
            let (mut times, mut req, mut bytes) = (Vec::new(), 0, 0);
            let (mut warm_restart, mut warm_proc) = (Vec::new(), Vec::new());
            let mut warm_fetch = (0, 0);
            let mut boot_trace = None;
            for run in 0..runs {
                let cache = work.path().join(format!("cache-{tag}-{run}"));
                {
                    let rs = open_store(&cache, chunk, lat, false);
                    let s0 = rs.stats();
                    let t = Instant::now();
                    let (tpl, log) = rs.open_recording(&base).unwrap();
                    replay(&tpl, &trace);
                    times.push(t.elapsed());
                    (req, bytes) = delta(s0, rs.stats());
                    boot_trace.get_or_insert_with(|| log.trace());
                    let t = Instant::now();
                    replay(&tpl, &trace);
                    warm_proc.push(t.elapsed());
                }
                let rs = open_store(&cache, chunk, lat, false);
                let s0 = rs.stats();
                let t = Instant::now();
                let tpl = rs.open(&base).unwrap();
                replay(&tpl, &trace);
                warm_restart.push(t.elapsed());
                warm_fetch = delta(s0, rs.stats());
            }
            rows.push(Row {
                mode: format!("lazy cold{suffix}"),
                chunk: label.clone(),
                requests: req,
                bytes,
                times,
            });
            // Lazy cold with readahead.
            let (mut times, mut req, mut bytes) = (Vec::new(), 0, 0);
            for run in 0..runs {
                let cache = work.path().join(format!("cache-ra-{tag}-{run}"));
                let rs = open_store(&cache, chunk, lat, true);
                let s0 = rs.stats();
                let t = Instant::now();
                let tpl = rs.open(&base).unwrap();
                replay(&tpl, &trace);
                times.push(t.elapsed());
                rs.wait_background();
                (req, bytes) = delta(s0, rs.stats());
            }
            rows.push(Row {
                mode: format!("lazy cold, readahead{suffix}"),
                chunk: label.clone(),
                requests: req,
                bytes,
                times,
            });
            // Cold start with the boot trace: fetch it and start the prefetch while the template
            // opens, then replay.
            let boot_trace = boot_trace.expect("at least one run");
            uploader.put_boot_trace(&base, &boot_trace).unwrap();
            let (mut times, mut req, mut bytes) = (Vec::new(), 0, 0);
            let mut last = None;
            for run in 0..runs {
                let cache = work.path().join(format!("cache-pf-{tag}-{run}"));
                let rs = open_store(&cache, chunk, lat, true);
                let s0 = rs.stats();
                let t = Instant::now();
                // The trace GET and the template's map GET are independent: run them side by
                // side, as a daemon creating a sandbox would.
                let (tpl, handle) = std::thread::scope(|s| {
                    let opening = s.spawn(|| rs.open(&base).unwrap());
                    let bt = rs.boot_trace(&base).unwrap();
                    let handle = rs.prefetch(&bt);
                    (opening.join().unwrap(), handle)
                });
                replay(&tpl, &trace);
                times.push(t.elapsed());
                let report = handle.wait();
                rs.wait_background();
                (req, bytes) = delta(s0, rs.stats());
                last = Some((report, rs.stats()));
            }
            rows.push(Row {
                mode: format!("cold + boot-trace prefetch, readahead{suffix}"),
                chunk: label.clone(),
                requests: req,
                bytes,
                times,
            });
            if let Some((r, s)) = last {
                notes.push(format!(
                    "{label}{suffix}: boot trace {} chunks; prefetch fetched {}, skipped {}, failed {}; \
                     {} demand reads served by prefetched chunks, {} by readahead",
                    boot_trace.chunks.len(),
                    r.fetched,
                    r.skipped,
                    r.failed,
                    s.prefetch_hits,
                    s.readahead_hits
                ));
            }
            if lat.is_none() {
                rows.push(Row {
                    mode: "warm, same process".into(),
                    chunk: label.clone(),
                    requests: 0,
                    bytes: 0,
                    times: warm_proc,
                });
                rows.push(Row {
                    mode: "warm, restarted (cache re-verified; maps refetched)".into(),
                    chunk: label.clone(),
                    requests: warm_fetch.0,
                    bytes: warm_fetch.1,
                    times: warm_restart,
                });
            }
        }
    }
    println!();
    println!(
        "| {:<52} | {:>8} | {:>8} | {:>12} | {:>9} | {:>12} |",
        "mode", "chunk", "requests", "fetched MiB", "% image", "time (median)"
    );
    println!(
        "|{:-<54}|{:->10}|{:->10}|{:->14}|{:->11}|{:->15}|",
        "", "", "", "", "", ""
    );
    for r in rows {
        let t = median(r.times);
        println!(
            "| {:<52} | {:>8} | {:>8} | {:>12.2} | {:>8.1}% | {:>10.2} ms |",
            r.mode,
            r.chunk,
            r.requests,
            r.bytes as f64 / MIB,
            r.bytes as f64 * 100.0 / image_len as f64,
            t.as_secs_f64() * 1000.0
        );
    }
    println!(
        "\n(requests and bytes include the build map fetched at open, and for the prefetch rows the \
         boot-trace GET and the map fetched by the prefetch; medians of {runs} runs)"
    );
    for n in notes {
        println!("{n}");
    }
}
