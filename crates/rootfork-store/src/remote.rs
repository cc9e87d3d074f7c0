//! [`RemoteStore`]: layered templates served from an object store, fetched lazily.
//!
//! Objects are `<prefix>/<build id>/map` and `<prefix>/<build id>/data`. Opening a template
//! fetches the maps it needs (small) and nothing else; each build's data is a [`RemoteData`] that
//! reads through the chunk cache, fetching a chunk the first time any byte of it is read.

use std::io;
use std::sync::Arc;

use object_store::ObjectStore;
use rootfork_block::layered::{
    BuildData, BuildId, BuildMap, BuildResolver, LayerError, LayerResult, LayeredTemplate,
    RequestScope,
};

use crate::bridge::Bridge;
use crate::cache::{ChunkCache, ChunkKey};
use crate::config::StoreConfig;
use crate::error::{FetchError, StoreError};
use crate::fetch::{Fetcher, Verify};
use crate::source::{ObjectSource, ObjectStoreSource};
use crate::stats::{FetchStats, StatsSnapshot};

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) prefix: String,
    pub(crate) fetcher: Fetcher,
    pub(crate) stats: Arc<FetchStats>,
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

    /// Opens the layered template whose top build is `id`, reading lazily from the store.
    pub fn open(&self, id: &BuildId) -> LayerResult<LayeredTemplate> {
        LayeredTemplate::open(self, id)
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
        let sub = u64::from(map.header.chunk_size);
        let chunk = self.inner.fetcher.policy().chunk_size.max(sub);
        Ok(Arc::new(RemoteData {
            inner: self.inner.clone(),
            id: map.header.id,
            key: self.key(&map.header.id, rootfork_block::layered::DATA_FILE),
            len: map.header.data_len,
            chunk,
            verify: Verify {
                crcs: map.chunk_crcs.clone().into(),
                sub,
            },
        }))
    }
}

/// One build's data in the object store, read through the chunk cache.
pub struct RemoteData {
    inner: Arc<Inner>,
    id: BuildId,
    key: String,
    len: u64,
    chunk: u64,
    verify: Verify,
}

impl BuildData for RemoteData {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        // One deadline for the whole request this read belongs to (see `RequestScope`), however
        // many chunks and mapping runs it needs, so it answers within the fetch timeout.
        let started = RequestScope::started().unwrap_or_else(std::time::Instant::now);
        let deadline = started + self.inner.fetcher.policy().timeout;
        let mut pos = offset;
        while pos < end {
            let index = pos / self.chunk;
            let start = index * self.chunk;
            let stop = (start + self.chunk).min(self.len);
            let key = ChunkKey {
                build: self.id,
                chunk_size: self.chunk,
                index,
            };
            let data = self
                .inner
                .fetcher
                .chunk(key, &self.key, start..stop, &self.verify, deadline)
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
