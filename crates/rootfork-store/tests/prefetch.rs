//! Fast cold starts against the in-memory backend: boot trace recording, the trace object,
//! parallel prefetch (single flight shared with demand reads, soft failures, budget, cancel)
//! and readahead on sequential reads.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use rootfork_block::layered::BuildId;
use rootfork_block::BlockDevice;
use rootfork_store::{
    Backend, BootTrace, FetchError, ObjectStoreSource, PrefetchOptions, RemoteStore, StoreError,
    TraceError,
};

/// A store over `store` with 1 MiB chunks, its cache in `dir/cache`, reads counted by `Faulty`.
fn store_over(
    dir: &Path,
    store: &Arc<dyn ObjectStore>,
    readahead: bool,
    budget: Option<u64>,
) -> (RemoteStore, Arc<Faulty<ObjectStoreSource>>) {
    let faulty = Faulty::new(ObjectStoreSource(store.clone()));
    let mut cfg = config(dir, Backend::Memory);
    cfg.fetch.chunk_size = MIB;
    cfg.fetch.readahead = readahead;
    if let Some(b) = budget {
        cfg.cache.budget = b;
    }
    let remote = RemoteStore::with_parts(&cfg, store.clone(), faulty.clone()).unwrap();
    (remote, faulty)
}

/// Uploads a dense image of `mib` MiB; returns the object store and the build.
fn uploaded(dir: &Path, mib: u64) -> (Arc<dyn ObjectStore>, BuildId, Vec<u8>) {
    let img = dense_image(mib * MIB, 3);
    let (local, base) = local_base(dir, &img);
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let (up, _) = store_over(&dir.join("up"), &store, false, None);
    up.upload(&local, &base).unwrap();
    (store, base, img)
}

/// Reads 4 KiB inside chunk `chunk` (1 MiB chunks) and checks the bytes.
fn read_chunk(dev: &dyn BlockDevice, img: &[u8], chunk: u64) {
    let off = chunk * MIB + 12345;
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, off).unwrap();
    assert_eq!(buf, img[off as usize..][..4096]);
}

fn indices(t: &BootTrace) -> Vec<u64> {
    t.chunks.iter().map(|c| c.index).collect()
}

#[test]
fn recording_keeps_first_access_order_and_the_trace_object_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (store, base, img) = uploaded(dir.path(), 12);
    let (remote, _) = store_over(&dir.path().join("a"), &store, false, None);
    let (t, log) = remote.open_recording(&base).unwrap();
    assert!(log.is_empty(), "opening reads no data");
    for c in [5, 2, 5, 0, 2, 7, 0] {
        read_chunk(&t, &img, c);
    }
    // A read spanning chunks 9 and 10 records both, in order.
    let mut buf = vec![0u8; 8192];
    t.read_at(&mut buf, 10 * MIB - 4096).unwrap();
    let trace = log.trace();
    assert_eq!(indices(&trace), vec![5, 2, 0, 7, 9, 10]);
    assert!(trace
        .chunks
        .iter()
        .all(|c| c.build == base && c.chunk_size == MIB));
    // A plain open records nothing and is unaffected.
    read_chunk(&remote.open(&base).unwrap(), &img, 3);
    assert_eq!(log.len(), 6);

    // Stored next to the build, fetched back intact.
    assert!(matches!(
        remote.boot_trace(&base),
        Err(StoreError::Fetch(FetchError::NotFound { .. }))
    ));
    remote.put_boot_trace(&base, &trace).unwrap();
    assert_eq!(remote.boot_trace(&base).unwrap(), trace);
    // A damaged trace object is a typed error the caller can ignore.
    let key = ObjectPath::from(remote.key(&base, rootfork_store::BOOT_TRACE_FILE));
    let mut bytes = trace.encode();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    let s = store.clone();
    remote
        .bridge()
        .run(async move { s.put(&key, PutPayload::from(bytes)).await })
        .unwrap()
        .unwrap();
    assert!(matches!(
        remote.boot_trace(&base),
        Err(StoreError::Trace(TraceError::Checksum))
    ));
}

#[test]
fn prefetch_fills_the_cache_so_the_replay_needs_no_gets() {
    let dir = tempfile::tempdir().unwrap();
    let (store, base, img) = uploaded(dir.path(), 16);
    let pattern = [3, 4, 11, 0, 7, 3, 12];
    // First boot: record.
    {
        let (remote, _) = store_over(&dir.path().join("first"), &store, false, None);
        let (t, log) = remote.open_recording(&base).unwrap();
        for c in pattern {
            read_chunk(&t, &img, c);
        }
        remote.put_boot_trace(&base, &log.trace()).unwrap();
    }
    // Next cold start: a fresh cache, the trace prefetched, then the same reads.
    let (remote, faulty) = store_over(&dir.path().join("second"), &store, false, None);
    let trace = remote.boot_trace(&base).unwrap();
    assert_eq!(indices(&trace), vec![3, 4, 11, 0, 7, 12]);
    let t = remote.open(&base).unwrap();
    let report = remote.prefetch(&trace).wait();
    assert!(report.finished);
    assert_eq!((report.fetched, report.skipped, report.failed), (6, 0, 0));
    assert_eq!(faulty.ranges.load(Ordering::SeqCst), 6);
    for c in pattern {
        read_chunk(&t, &img, c);
    }
    assert_eq!(
        faulty.ranges.load(Ordering::SeqCst),
        6,
        "the replay fetched nothing more"
    );
    let s = remote.stats();
    assert_eq!((s.prefetched, s.prefetch_hits), (6, 6));
    assert_eq!(s.chunks_fetched, 6);
    // Prefetching again skips everything.
    let again = remote.prefetch(&trace).wait();
    assert_eq!((again.fetched, again.skipped), (0, 6));

    // A prefetch started before the template is opened fetches the map itself.
    let (cold, faulty) = store_over(&dir.path().join("third"), &store, false, None);
    let report = cold.prefetch(&trace).wait();
    assert_eq!(report.fetched, 6);
    let t = cold.open(&base).unwrap();
    for c in pattern {
        read_chunk(&t, &img, c);
    }
    assert_eq!(faulty.ranges.load(Ordering::SeqCst), 6);
}

#[test]
fn a_demand_read_racing_a_prefetch_of_the_same_chunk_costs_one_get() {
    let dir = tempfile::tempdir().unwrap();
    let (store, base, img) = uploaded(dir.path(), 8);
    let (first, _) = store_over(&dir.path().join("first"), &store, false, None);
    let (t, log) = first.open_recording(&base).unwrap();
    read_chunk(&t, &img, 6);
    let trace = log.trace();

    let (remote, faulty) = store_over(&dir.path().join("second"), &store, false, None);
    let t = remote.open(&base).unwrap();
    faulty.delay_ms.store(300, Ordering::SeqCst);
    let handle = remote.prefetch(&trace);
    wait_until("the prefetch's GET started", || {
        faulty.ranges.load(Ordering::SeqCst) == 1
    });
    // The prefetch's request is in flight: the demand read waits for it.
    read_chunk(&t, &img, 6);
    let report = handle.wait();
    assert_eq!(report.fetched, 1);
    assert_eq!(faulty.ranges.load(Ordering::SeqCst), 1, "exactly one GET");
    let s = remote.stats();
    assert_eq!(s.prefetch_hits, 1);
    assert_eq!(s.chunks_fetched, 1);

    // The other way round: demand reads first, the prefetch finds the chunk and skips it.
    let (remote, faulty) = store_over(&dir.path().join("third"), &store, false, None);
    let t = remote.open(&base).unwrap();
    faulty.delay_ms.store(300, Ordering::SeqCst);
    std::thread::scope(|s| {
        let reader = s.spawn(|| read_chunk(&t, &img, 6));
        wait_until("the demand GET started", || {
            faulty.ranges.load(Ordering::SeqCst) == 1
        });
        let report = remote.prefetch(&trace).wait();
        assert_eq!((report.fetched, report.skipped), (0, 1));
        reader.join().unwrap();
    });
    assert_eq!(faulty.ranges.load(Ordering::SeqCst), 1, "exactly one GET");
    assert_eq!(remote.stats().prefetch_hits, 0);
}

#[test]
fn a_failing_prefetch_is_soft() {
    let dir = tempfile::tempdir().unwrap();
    let (store, base, img) = uploaded(dir.path(), 8);
    let (first, _) = store_over(&dir.path().join("first"), &store, false, None);
    let (t, log) = first.open_recording(&base).unwrap();
    for c in [1, 2, 5] {
        read_chunk(&t, &img, c);
    }
    let trace = log.trace();

    let (remote, faulty) = store_over(&dir.path().join("second"), &store, false, None);
    let t = remote.open(&base).unwrap();
    faulty.fail.store(true, Ordering::SeqCst);
    let report = remote.prefetch(&trace).wait();
    assert_eq!((report.fetched, report.failed), (0, 3));
    assert!(remote.cache().is_empty(), "failures are not cached");
    // Reads fail as they would without prefetch...
    let mut buf = vec![0u8; 4096];
    assert_eq!(t.read_at(&mut buf, MIB).unwrap_err().errno(), libc::EIO);
    // ...and work once the store is back.
    faulty.fail.store(false, Ordering::SeqCst);
    for c in [1, 2, 5] {
        read_chunk(&t, &img, c);
    }
    // A trace naming a build the store does not have fails softly too.
    let mut bogus = trace.clone();
    for c in &mut bogus.chunks {
        c.build = BuildId::random();
    }
    let report = remote.prefetch(&bogus).wait();
    assert_eq!((report.fetched, report.failed), (0, 3));
}

#[test]
fn prefetch_stays_within_half_the_cache_and_can_be_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let (store, base, img) = uploaded(dir.path(), 12);
    let (first, _) = store_over(&dir.path().join("first"), &store, false, None);
    let (t, log) = first.open_recording(&base).unwrap();
    for c in 0..10 {
        read_chunk(&t, &img, c);
    }
    let trace = log.trace();

    // An 8 MiB cache: at most 4 MiB of prefetch, the first four chunks in trace order.
    let (remote, _) = store_over(&dir.path().join("small"), &store, false, Some(8 * MIB));
    remote.open(&base).unwrap();
    let report = remote.prefetch(&trace).wait();
    assert_eq!((report.fetched, report.over_budget), (4, 6));
    assert_eq!(
        remote.stats().evictions,
        0,
        "nothing it fetched was evicted"
    );
    assert_eq!(remote.cache().len(), 4);

    // Cancelled while the first fetch runs: the rest never starts.
    let (remote, faulty) = store_over(&dir.path().join("cancel"), &store, false, None);
    remote.open(&base).unwrap();
    faulty.delay_ms.store(200, Ordering::SeqCst);
    let opts = PrefetchOptions {
        concurrency: 1,
        ..PrefetchOptions::default()
    };
    let handle = remote.prefetch_with(&trace, opts);
    wait_until("the first GET started", || {
        faulty.ranges.load(Ordering::SeqCst) >= 1
    });
    handle.cancel();
    let r = handle.wait();
    assert!(r.cancelled >= 1, "{r:?}");
    assert_eq!(r.fetched + r.skipped + r.failed + r.cancelled, 10, "{r:?}");
    assert_eq!(faulty.ranges.load(Ordering::SeqCst), r.fetched);
}

#[test]
fn readahead_follows_sequential_reads_only() {
    let dir = tempfile::tempdir().unwrap();
    let (store, base, img) = uploaded(dir.path(), 16);
    let (remote, faulty) = store_over(&dir.path().join("ra"), &store, true, None);
    let t = remote.open(&base).unwrap();
    // Random order: no chunk follows its predecessor.
    for c in [5, 2, 12, 7] {
        read_chunk(&t, &img, c);
    }
    remote.wait_background();
    assert_eq!(remote.stats().readahead, 0);
    assert_eq!(faulty.ranges.load(Ordering::SeqCst), 4);
    // 13 then 14: a sequential step, so 15 is read ahead.
    read_chunk(&t, &img, 13);
    read_chunk(&t, &img, 14);
    remote.wait_background();
    let s = remote.stats();
    assert_eq!(s.readahead, 1);
    assert_eq!(faulty.ranges.load(Ordering::SeqCst), 7);
    assert!(remote.cache().contains(&rootfork_store::ChunkKey {
        build: base,
        chunk_size: MIB,
        index: 15
    }));
    // Reading it costs no GET and counts as a readahead hit; there is no chunk 16 to read ahead.
    read_chunk(&t, &img, 15);
    remote.wait_background();
    assert_eq!(faulty.ranges.load(Ordering::SeqCst), 7);
    assert_eq!(remote.stats().readahead_hits, 1);

    // Turned off: sequential reads fetch only what they read.
    let (off, faulty) = store_over(&dir.path().join("off"), &store, false, None);
    let t = off.open(&base).unwrap();
    for c in 0..6 {
        read_chunk(&t, &img, c);
    }
    off.wait_background();
    assert_eq!(off.stats().readahead, 0);
    assert_eq!(faulty.ranges.load(Ordering::SeqCst), 6);
}

#[test]
fn dropping_the_store_during_a_prefetch_neither_hangs_nor_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (store, base, img) = uploaded(dir.path(), 8);
    let (first, _) = store_over(&dir.path().join("first"), &store, false, None);
    let (t, log) = first.open_recording(&base).unwrap();
    for c in 0..6 {
        read_chunk(&t, &img, c);
    }
    let trace = log.trace();
    let (remote, faulty) = store_over(&dir.path().join("second"), &store, true, None);
    faulty.delay_ms.store(100, Ordering::SeqCst);
    let handle = remote.prefetch(&trace);
    wait_until("a prefetch GET started", || {
        faulty.ranges.load(Ordering::SeqCst) >= 1
    });
    // The task keeps the store alive until it ends; dropping the caller's side is harmless and
    // the handle still reports the end.
    drop(remote);
    let r = handle.wait();
    assert!(r.finished);
    assert_eq!(r.fetched + r.skipped + r.failed + r.cancelled, 6, "{r:?}");
}
