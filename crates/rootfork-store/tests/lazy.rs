//! The lazy remote store against `object_store`'s in-memory and local file system backends:
//! upload once, lazy chunk fetches, single flight, failures, timeouts, corruption, eviction and
//! a warm cache across restarts.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};

use common::*;
use object_store::memory::InMemory;
use object_store::ObjectStore;
use rootfork_block::layered::{BuildResolver, DiffSource, LayerDiff, MemData};
use rootfork_block::BlockDevice;
use rootfork_store::{Backend, ObjectStoreSource, RemoteStore};

fn memory_store(
    dir: &std::path::Path,
) -> (
    RemoteStore,
    Arc<Faulty<ObjectStoreSource>>,
    Arc<dyn ObjectStore>,
) {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let faulty = Faulty::new(ObjectStoreSource(store.clone()));
    let cfg = config(dir, Backend::Memory);
    let remote = RemoteStore::with_parts(&cfg, store.clone(), faulty.clone()).unwrap();
    (remote, faulty, store)
}

fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    dev.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn uploads_once_and_fetches_only_touched_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(24 * MIB, 1);
    let (local, base) = local_base(dir.path(), &img);
    let (remote, faulty, _) = memory_store(dir.path());
    let r = remote.upload(&local, &base).unwrap();
    assert_eq!(r.uploaded, vec![base]);
    let again = remote.upload(&local, &base).unwrap();
    assert!(
        again.uploaded.is_empty() && again.skipped == vec![base],
        "uploaded once"
    );

    let t = remote.open(&base).unwrap();
    let before = remote.stats();
    assert_eq!(
        faulty.ranges.load(Ordering::SeqCst),
        0,
        "open fetches maps only"
    );
    assert_eq!(
        read(&t, 5 * MIB + 100, 4096),
        img[(5 * MIB + 100) as usize..][..4096]
    );
    let s = remote.stats();
    assert_eq!(
        s.chunks_fetched - before.chunks_fetched,
        1,
        "one chunk for one small read"
    );
    assert_eq!(s.bytes_fetched - before.bytes_fetched, 4 * MIB);
    // Same chunk again: a cache hit, no request.
    read(&t, 5 * MIB + 8192, 4096);
    assert_eq!(remote.stats().chunks_fetched, s.chunks_fetched);
    assert!(remote.stats().cache_hits > s.cache_hits);
    // The whole device reads back exactly; every chunk of the data fetched once.
    assert_eq!(read(&t, 0, img.len()), img);
    let data_len = local.map(&base).unwrap().header.data_len;
    assert_eq!(remote.stats().chunks_fetched, data_len.div_ceil(4 * MIB));
    assert_eq!(
        faulty.ranges.load(Ordering::SeqCst),
        data_len.div_ceil(4 * MIB)
    );
}

#[test]
fn a_build_damaged_locally_is_never_published() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(20 * MIB, 9);
    let (local, base) = local_base(dir.path(), &img);
    let path = local.data_path(&base);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(13 * MIB) as usize] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let (remote, _faulty, _) = memory_store(dir.path());
    let err = remote.upload(&local, &base).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    assert!(matches!(
        remote.open(&base),
        Err(rootfork_block::layered::LayerError::MissingBuild(_))
    ));
}

#[test]
fn concurrent_reads_of_one_chunk_share_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(8 * MIB, 2);
    let (local, base) = local_base(dir.path(), &img);
    let (remote, faulty, _) = memory_store(dir.path());
    remote.upload(&local, &base).unwrap();
    let t = Arc::new(remote.open(&base).unwrap());
    faulty.delay_ms.store(300, Ordering::SeqCst);
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let (t, barrier) = (t.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                read(t.as_ref(), i * 40_000, 4096)
            })
        })
        .collect();
    for (i, th) in threads.into_iter().enumerate() {
        let off = i * 40_000;
        assert_eq!(th.join().unwrap(), img[off..off + 4096]);
    }
    assert_eq!(
        faulty.ranges.load(Ordering::SeqCst),
        1,
        "one request for eight readers"
    );
    let s = remote.stats();
    assert_eq!(s.chunks_fetched, 1);
    assert!(s.shared_waits >= 1);
}

#[test]
fn failed_and_timed_out_fetches_are_eio_never_cached_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(8 * MIB, 3);
    let (local, base) = local_base(dir.path(), &img);
    let (remote, faulty, _) = memory_store(dir.path());
    remote.upload(&local, &base).unwrap();
    let t = remote.open(&base).unwrap();
    let mut buf = vec![0u8; 4096];

    faulty.fail.store(true, Ordering::SeqCst);
    let err = t.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    let s = remote.stats();
    assert_eq!(s.retries, 3, "retried with backoff");
    assert_eq!(s.failures, 1);
    assert!(remote.cache().is_empty(), "failures are not cached");

    faulty.fail.store(false, Ordering::SeqCst);
    faulty.delay_ms.store(60_000, Ordering::SeqCst);
    let err = t.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(remote.stats().timeouts, 1);
    assert!(remote.cache().is_empty());

    faulty.delay_ms.store(0, Ordering::SeqCst);
    t.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, img[..4096]);
    assert_eq!(remote.cache().len(), 1);
}

#[test]
fn a_read_spanning_many_missing_chunks_has_one_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(24 * MIB, 8);
    let (local, base) = local_base(dir.path(), &img);
    // Readahead off: this test counts the demand read's own fetches.
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let faulty = Faulty::new(ObjectStoreSource(store.clone()));
    let mut cfg = config(dir.path(), Backend::Memory);
    cfg.fetch.readahead = false;
    let remote = RemoteStore::with_parts(&cfg, store, faulty.clone()).unwrap();
    remote.upload(&local, &base).unwrap();
    let t = remote.open(&base).unwrap();
    // Each request answers after 1 s, inside the 1.5 s deadline on its own.
    faulty.delay_ms.store(1000, Ordering::SeqCst);
    // 16 MiB of device bytes need four 4 MiB data chunks: four slow fetches in a row would take
    // 4 s and succeed; with one deadline for the read the second fetch runs out of time.
    let mut buf = vec![0u8; (16 * MIB) as usize];
    let started = std::time::Instant::now();
    assert_eq!(t.read_at(&mut buf, 0).unwrap_err().errno(), libc::EIO);
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_millis(3000),
        "took {took:?}"
    );
    assert_eq!(
        faulty.ranges.load(Ordering::SeqCst),
        2,
        "the second fetch was cut short"
    );
    assert_eq!(remote.stats().timeouts, 1);
    // The chunk that did arrive in time is cached; the rest is fetched by later reads.
    assert_eq!(remote.cache().len(), 1);
    faulty.delay_ms.store(0, Ordering::SeqCst);
    t.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, img[..buf.len()]);
}

#[test]
fn corrupt_chunks_are_detected_and_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(8 * MIB, 4);
    let (local, base) = local_base(dir.path(), &img);
    let (remote, faulty, _) = memory_store(dir.path());
    remote.upload(&local, &base).unwrap();
    let t = remote.open(&base).unwrap();
    faulty.corrupt.store(true, Ordering::SeqCst);
    let mut buf = vec![0u8; 4096];
    assert_eq!(t.read_at(&mut buf, 0).unwrap_err().errno(), libc::EIO);
    assert!(remote.stats().checksum_failures >= 1);
    assert!(remote.cache().is_empty());
    faulty.corrupt.store(false, Ordering::SeqCst);
    t.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, img[..4096]);
}

#[test]
fn cache_stays_within_budget() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(20 * MIB, 5);
    let (local, base) = local_base(dir.path(), &img);
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let mut cfg = config(dir.path(), Backend::Memory);
    cfg.cache.budget = 8 * MIB;
    let remote =
        RemoteStore::with_parts(&cfg, store.clone(), Arc::new(ObjectStoreSource(store))).unwrap();
    remote.upload(&local, &base).unwrap();
    let t = remote.open(&base).unwrap();
    assert_eq!(read(&t, 0, img.len()), img);
    assert!(remote.cache().used() <= 8 * MIB);
    assert!(remote.stats().evictions >= 2);
    // Evicted chunks come back on demand.
    assert_eq!(read(&t, 0, 4096), img[..4096]);
}

#[test]
fn local_backend_warm_cache_survives_restart_and_is_reverified() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_bytes(10 * MIB, 6);
    let (local, base) = local_base(dir.path(), &img);
    let cfg = config(dir.path(), Backend::Local(dir.path().join("bucket")));
    {
        let remote = RemoteStore::new(&cfg).unwrap();
        remote.upload(&local, &base).unwrap();
        let t = remote.open(&base).unwrap();
        assert_eq!(read(&t, 0, img.len()), img);
    }
    // Damage one cached chunk on disk while the store is down.
    let victim = std::fs::read_dir(&cfg.cache.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().ends_with(".0"))
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&victim, bytes).unwrap();

    let remote = RemoteStore::new(&cfg).unwrap();
    let t = remote.open(&base).unwrap();
    assert_eq!(read(&t, 0, img.len()), img);
    let s = remote.stats();
    assert_eq!(
        s.chunks_fetched, 1,
        "only the damaged chunk is fetched again"
    );
    assert!(s.cache_hits >= 2);
}

#[test]
fn layered_templates_read_through_the_remote_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = image_bytes(12 * MIB, 7);
    let (local, base) = local_base(dir.path(), &img);
    let data = MemData(vec![0xabu8; 3 * 4096]);
    let diff = LayerDiff {
        size: img.len() as u64,
        runs: vec![
            (4096, 3 * 4096, DiffSource::Data(0)),
            (9 * MIB, MIB, DiffSource::Zero),
        ],
        data: &data,
    };
    let layer = local.create_layer(&base, &diff).unwrap().header.id;
    img[4096..4 * 4096].fill(0xab);
    img[(9 * MIB) as usize..(10 * MIB) as usize].fill(0);
    let (remote, _faulty, _) = memory_store(dir.path());
    let r = remote.upload(&local, &layer).unwrap();
    assert_eq!(r.uploaded, vec![base, layer], "base first, then the layer");
    let t = remote.open(&layer).unwrap();
    assert_eq!(read(&t, 0, img.len()), img);
    // A layer that overwrites everything needs none of its ancestors' data: only it is sent.
    let empty = MemData(Vec::new());
    let all_zero = LayerDiff {
        size: img.len() as u64,
        runs: vec![(0, img.len() as u64, DiffSource::Zero)],
        data: &empty,
    };
    let wiped = local.create_layer(&layer, &all_zero).unwrap().header.id;
    let (remote3, _f3, _) = memory_store(&dir.path().join("third"));
    assert_eq!(
        remote3.upload(&local, &wiped).unwrap().uploaded,
        vec![wiped]
    );
    let t3 = remote3.open(&wiped).unwrap();
    assert!(read(&t3, 0, 8192).iter().all(|&b| b == 0));
    // A layer whose base is missing remotely is refused at open.
    let (remote2, _f, store2) = memory_store(&dir.path().join("other"));
    remote2.upload(&local, &layer).unwrap();
    remote2
        .bridge()
        .run({
            let store2 = store2.clone();
            let key = remote2.key(&base, "map");
            async move {
                object_store::ObjectStoreExt::delete(store2.as_ref(), &key.as_str().into()).await
            }
        })
        .unwrap()
        .unwrap();
    assert!(matches!(
        remote2.open(&layer),
        Err(rootfork_block::layered::LayerError::MissingBuild(id)) if id == base
    ));
}
