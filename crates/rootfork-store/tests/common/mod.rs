//! Shared fixtures of the store tests: images, configs and a fault-injecting object source.
#![allow(dead_code)]

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rootfork_block::layered::{BuildId, BuildOptions, LocalStore};
use rootfork_store::{Backend, CacheConfig, FetchPolicy, ObjectSource, SourceFuture, StoreConfig};

pub const MIB: u64 = 1 << 20;

/// A deterministic image: `size` bytes, data in most 4 KiB blocks, zeroes in every fifth one.
pub fn image_bytes(size: u64, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| {
            if (i / 4096) % 5 == 4 {
                0
            } else {
                (i as u8).wrapping_mul(7).wrapping_add(seed) | 1
            }
        })
        .collect()
}

/// Imports `bytes` as a base build into a local store under `dir`.
pub fn local_base(dir: &Path, bytes: &[u8]) -> (LocalStore, BuildId) {
    let img = dir.join("image.raw");
    std::fs::write(&img, bytes).unwrap();
    let local = LocalStore::new(dir.join("local"));
    let map = local.import_image(&img, BuildOptions::default()).unwrap();
    (local, map.header.id)
}

/// A store configuration with a short deadline for tests.
pub fn config(dir: &Path, backend: Backend) -> StoreConfig {
    StoreConfig {
        backend,
        prefix: "templates".into(),
        fetch: FetchPolicy {
            timeout: Duration::from_millis(1500),
            retries: 3,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            ..FetchPolicy::default()
        },
        cache: CacheConfig {
            dir: dir.join("cache"),
            budget: 256 * MIB,
        },
        runtime_threads: 2,
    }
}

/// Wraps a source: counts range requests, and can delay, fail or corrupt them.
pub struct Faulty<S> {
    pub inner: S,
    pub ranges: AtomicU64,
    pub delay_ms: AtomicU64,
    pub fail: AtomicBool,
    pub corrupt: AtomicBool,
}

impl<S> Faulty<S> {
    pub fn new(inner: S) -> Arc<Self> {
        Arc::new(Faulty {
            inner,
            ranges: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            corrupt: AtomicBool::new(false),
        })
    }
}

impl<S: ObjectSource> ObjectSource for Faulty<S> {
    fn get_range(&self, key: &str, range: Range<u64>) -> SourceFuture<'_> {
        let key = key.to_owned();
        Box::pin(async move {
            self.ranges.fetch_add(1, Ordering::SeqCst);
            let d = self.delay_ms.load(Ordering::SeqCst);
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d)).await;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(rootfork_store::SourceError::Other(
                    "injected failure".into(),
                ));
            }
            let b = self.inner.get_range(&key, range).await?;
            if self.corrupt.load(Ordering::SeqCst) {
                let mut v = b.to_vec();
                let mid = v.len() / 2;
                v[mid] ^= 0x55;
                return Ok(v.into());
            }
            Ok(b)
        })
    }

    fn get(&self, key: &str) -> SourceFuture<'_> {
        self.inner.get(key)
    }
}

/// An image with no zero block, so a base build's data offsets equal device offsets (and a
/// device offset names its data chunk directly).
pub fn dense_image(size: u64, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1)
        .collect()
}

/// Waits until `cond` holds (a hang guard of a minute, not a timing assertion).
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never happened: {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
