//! [`RemoteStore`]: layered templates served from an object store, fetched lazily.
//!
//! Objects are `<prefix>/<build id>/map` and `<prefix>/<build id>/data`. Opening a template
//! fetches the maps it needs (small) and nothing else; each build's data is a [`RemoteData`] that
//! reads through the chunk cache, fetching a chunk the first time any byte of it is read, and
//! reading the next chunk ahead in the background when reads move sequentially
//! ([`FetchPolicy::readahead`](crate::FetchPolicy::readahead)).
//!
//! [`RemoteStore::open_recording`] opens a template whose reads are also logged (an
//! [`AccessLog`]), the boot trace that [`RemoteStore::prefetch`] replays on later cold starts.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use object_store::ObjectStore;
use rootfork_block::layered::{
    BuildData, BuildId, BuildMap, BuildResolver, LayerError, LayerResult, LayeredTemplate,
    RequestScope,
};

use crate::bridge::Bridge;
use crate::cache::{ChunkCache, ChunkKey};
use crate::config::StoreConfig;
use crate::error::{FetchError, StoreError};
use crate::fetch::{Ahead, Fetcher, Verify};
use crate::source::{ObjectSource, ObjectStoreSource};
use crate::stats::{FetchStats, StatsSnapshot};
use crate::trace::{AccessLog, Recorder};

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) prefix: String,
    pub(crate) fetcher: Fetcher,
    pub(crate) stats: Arc<FetchStats>,
    /// What fetching a build's chunks needs, for every build whose map this store has decoded
    /// (a few bytes per MiB of data; builds are immutable, so entries never go stale).
    pub(crate) builds: Mutex<HashMap<BuildId, Arc<BuildInfo>>>,
    /// Budget of the chunk cache.
    pub(crate) cache_budget: u64,
    /// Readahead fetches in flight.
    readaheads: AtomicUsize,
    /// Background tasks (prefetches and readaheads) not finished yet.
    background: Mutex<usize>,
    background_done: Condvar,
}

/// Everything needed to fetch one build's chunks.
#[derive(Debug)]
pub(crate) struct BuildInfo {
    pub(crate) id: BuildId,
    /// Object key of its data.
    pub(crate) key: String,
    /// Data length.
    pub(crate) len: u64,
    /// Fetch chunk size for this build.
    pub(crate) chunk: u64,
    pub(crate) verify: Verify,
}

impl BuildInfo {
    /// Chunks in the data.
    pub(crate) fn chunks(&self) -> u64 {
        self.len.div_ceil(self.chunk)
    }

    /// The cache key and object range of chunk `index` (which must be below `chunks()`).
    pub(crate) fn chunk_at(&self, index: u64) -> (ChunkKey, std::ops::Range<u64>) {
        let start = index * self.chunk;
        let key = ChunkKey {
            build: self.id,
            chunk_size: self.chunk,
            index,
        };
        (key, start..(start + self.chunk).min(self.len))
    }
}

/// Counts one background task for [`RemoteStore::wait_background`] while alive.
pub(crate) struct BackgroundTask(Arc<Inner>);

impl BackgroundTask {
    pub(crate) fn new(inner: &Arc<Inner>) -> Self {
        *inner.background.lock() += 1;
        BackgroundTask(inner.clone())
    }
}

impl Drop for BackgroundTask {
    fn drop(&mut self) {
        let mut n = self.0.background.lock();
        *n -= 1;
        if *n == 0 {
            self.0.background_done.notify_all();
        }
    }
}

/// Releases a readahead slot when its task ends, however it ends.
struct ReadaheadSlot(Arc<Inner>);

impl Drop for ReadaheadSlot {
    fn drop(&mut self) {
        self.0.readaheads.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    /// The fetch information of the build `map` describes, registered for prefetching.
    pub(crate) fn build_info(&self, map: &BuildMap, key: String) -> Arc<BuildInfo> {
        let sub = u64::from(map.header.chunk_size);
        let info = Arc::new(BuildInfo {
            id: map.header.id,
            key,
            len: map.header.data_len,
            chunk: self.fetcher.policy().chunk_size.max(sub),
            verify: Verify {
                crcs: map.chunk_crcs.clone().into(),
                sub,
            },
        });
        self.builds.lock().insert(info.id, info.clone());
        info
    }
}

/// Starts a background fetch of chunk `index` of `info` unless the readahead bound is reached
/// or the chunk is cached or being fetched.
fn read_ahead(inner: &Arc<Inner>, info: &Arc<BuildInfo>, index: u64) {
    let policy = inner.fetcher.policy();
    if index >= info.chunks() {
        return;
    }
    let (key, range) = info.chunk_at(index);
    if inner.fetcher.present(&key) {
        return;
    }
    if inner.readaheads.fetch_add(1, Ordering::AcqRel) >= policy.readahead_inflight {
        inner.readaheads.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let slot = ReadaheadSlot(inner.clone());
    let task = BackgroundTask::new(inner);
    let (inner, info) = (inner.clone(), info.clone());
    inner.fetcher.bridge().handle().clone().spawn(async move {
        let _slot = slot;
        let _task = task;
        inner
            .fetcher
            .fill(key, &info.key, range, &info.verify, Ahead::Readahead)
            .await;
    });
}

/// Builds in an object store, read lazily through a local chunk cache.
#[derive(Clone)]
pub struct RemoteStore {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("store", &self.inner.store.to_string())
            .field("prefix", &self.inner.prefix)
            .field("fetcher", &self.inner.fetcher)
            .finish()
    }
}

impl RemoteStore {
    /// Connects to the configured object store and opens the chunk cache.
    pub fn new(cfg: &StoreConfig) -> Result<Self, StoreError> {
        cfg.validate()?;
        let store = cfg.object_store()?;
        let source = Arc::new(ObjectStoreSource(store.clone()));
        Self::with_parts(cfg, store, source)
    }

    /// A store whose reads go through `source` (a test seam) and uploads through `store`.
    pub fn with_parts(
        cfg: &StoreConfig,
        store: Arc<dyn ObjectStore>,
        source: Arc<dyn ObjectSource>,
    ) -> Result<Self, StoreError> {
        cfg.validate()?;
        let stats = Arc::new(FetchStats::default());
        let cache = ChunkCache::open(&cfg.cache, stats.clone())
            .map_err(|e| StoreError::io(format!("opening cache {}", cfg.cache.dir.display()), e))?;
        let bridge = Bridge::new(cfg.runtime_threads)
            .map_err(|e| StoreError::io("starting the store runtime", e))?;
        let fetcher = Fetcher::new(bridge, source, cfg.fetch, cache, stats.clone());
        Ok(RemoteStore {
            inner: Arc::new(Inner {
                store,
                prefix: cfg.prefix.trim_matches('/').to_owned(),
                fetcher,
                stats,
                builds: Mutex::new(HashMap::new()),
                cache_budget: cfg.cache.budget,
                readaheads: AtomicUsize::new(0),
                background: Mutex::new(0),
                background_done: Condvar::new(),
            }),
        })
    }

    /// Object key of a build's file (`map` or `data`).
    pub fn key(&self, id: &BuildId, file: &str) -> String {
        if self.inner.prefix.is_empty() {
            format!("{id}/{file}")
        } else {
            format!("{}/{id}/{file}", self.inner.prefix)
        }
    }

    /// `rest` under the store's prefix.
    pub fn prefixed(&self, rest: &str) -> String {
        if self.inner.prefix.is_empty() {
            rest.to_owned()
        } else {
            format!("{}/{rest}", self.inner.prefix)
        }
    }

    /// Opens the layered template whose top build is `id`, reading lazily from the store.
    pub fn open(&self, id: &BuildId) -> LayerResult<LayeredTemplate> {
        LayeredTemplate::open(self, id)
    }

    /// Opens the template like [`open`](Self::open) and records which chunks of which builds
    /// its reads touch, in first-access order (readahead and prefetch fetches are not reads and
    /// are not recorded). Take [`AccessLog::trace`] when the boot is done and store it with
    /// [`put_boot_trace`](Self::put_boot_trace).
    pub fn open_recording(&self, id: &BuildId) -> LayerResult<(LayeredTemplate, AccessLog)> {
        let log = AccessLog::new();
        let resolver = Recording {
            store: self,
            log: log.clone(),
        };
        let t = LayeredTemplate::open(&resolver, id)?;
        Ok((t, log))
    }

    /// Build `map`'s data read through the cache, its reads recorded into `log` (for a
    /// resolver of its own that mixes this store's builds with others, as the daemon's does).
    pub fn data_recording(&self, map: &BuildMap, log: &AccessLog) -> Arc<dyn BuildData> {
        self.remote_data(map, Some(log))
    }

    /// Waits until every background fetch (prefetches and readaheads) has finished. For tests
    /// and benchmarks; a reader never needs it. Do not call it from the store's runtime.
    pub fn wait_background(&self) {
        let mut n = self.inner.background.lock();
        while *n > 0 {
            self.inner.background_done.wait(&mut n);
        }
    }

    /// One build's data, reading through the cache; reads logged to `log` if given.
    fn remote_data(&self, map: &BuildMap, log: Option<&AccessLog>) -> Arc<RemoteData> {
        let key = self.key(&map.header.id, rootfork_block::layered::DATA_FILE);
        let info = self.inner.build_info(map, key);
        let recorder = log.map(|l| l.recorder(info.id, info.chunk, info.chunks()));
        Arc::new(RemoteData {
            inner: self.inner.clone(),
            info,
            last: AtomicU64::new(u64::MAX),
            recorder,
        })
    }

    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// The chunk cache.
    pub fn cache(&self) -> &ChunkCache {
        self.inner.fetcher.cache()
    }

    /// The object store client.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.store
    }

    /// The store's runtime bridge.
    pub fn bridge(&self) -> &Bridge {
        self.inner.fetcher.bridge()
    }
}

impl BuildResolver for RemoteStore {
    fn map(&self, id: &BuildId) -> LayerResult<BuildMap> {
        let key = self.key(id, rootfork_block::layered::MAP_FILE);
        let bytes = self.inner.fetcher.fetch_object(&key).map_err(|e| match e {
            FetchError::NotFound { .. } => LayerError::MissingBuild(*id),
            other => LayerError::io(format!("fetching map {key}"), other.to_io()),
        })?;
        BuildMap::decode(&bytes, &id.to_string())
    }

    fn data(&self, map: &BuildMap) -> LayerResult<Arc<dyn BuildData>> {
        Ok(self.remote_data(map, None))
    }
}

/// The store as a resolver whose build data records reads into an [`AccessLog`].
struct Recording<'a> {
    store: &'a RemoteStore,
    log: AccessLog,
}

impl BuildResolver for Recording<'_> {
    fn map(&self, id: &BuildId) -> LayerResult<BuildMap> {
        self.store.map(id)
    }

    fn data(&self, map: &BuildMap) -> LayerResult<Arc<dyn BuildData>> {
        Ok(self.store.remote_data(map, Some(&self.log)))
    }
}

/// One build's data in the object store, read through the chunk cache.
pub struct RemoteData {
    inner: Arc<Inner>,
    info: Arc<BuildInfo>,
    /// Chunk index of the latest read (`u64::MAX` before the first), for readahead.
    last: AtomicU64,
    recorder: Option<Recorder>,
}

impl RemoteData {
    /// Notes a read of chunk `index`: records it, and on a sequential step (the previous read
    /// was in chunk `index - 1`) reads chunk `index + 1` ahead.
    fn touch(&self, index: u64) {
        if let Some(r) = &self.recorder {
            r.record(index);
        }
        let prev = self.last.swap(index, Ordering::Relaxed);
        if self.inner.fetcher.policy().readahead && prev != u64::MAX && prev + 1 == index {
            read_ahead(&self.inner, &self.info, index + 1);
        }
    }
}

impl BuildData for RemoteData {
    fn len(&self) -> u64 {
        self.info.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.info.len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        // One deadline for the whole request this read belongs to (see `RequestScope`), however
        // many chunks and mapping runs it needs, so it answers within the fetch timeout.
        let started = RequestScope::started().unwrap_or_else(std::time::Instant::now);
        let deadline = started + self.inner.fetcher.policy().timeout;
        let mut pos = offset;
        while pos < end {
            let index = pos / self.info.chunk;
            let (key, range) = self.info.chunk_at(index);
            let (start, stop) = (range.start, range.end);
            self.touch(index);
            let data = self
                .inner
                .fetcher
                .chunk(key, &self.info.key, range, &self.info.verify, deadline)
                .map_err(|e| e.to_io())?;
            let n = (stop.min(end) - pos) as usize;
            let at = (pos - offset) as usize;
            data.read(&mut buf[at..at + n], pos - start)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn verifies_checksums(&self) -> bool {
        // Every chunk is checked when fetched and before a chunk found in the cache at start is
        // served (see `fetch`).
        true
    }
}
