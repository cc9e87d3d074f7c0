//! Store configuration: which object store, how chunks are fetched, and the local cache.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::error::StoreError;

/// Default fetch chunk: 4 MiB.
pub const DEFAULT_FETCH_CHUNK: u64 = 4 << 20;

/// An S3-compatible endpoint.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// Endpoint URL (e.g. `http://127.0.0.1:9000`); `None` for AWS itself.
    pub endpoint: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Region (any value for most S3-compatible servers).
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Allow plain `http://` endpoints (loopback test servers).
    pub allow_http: bool,
}

/// Where builds are kept.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A local directory through `object_store`'s local file system store (the default).
    Local(PathBuf),
    /// An in-memory store (tests).
    Memory,
    /// An S3-compatible store.
    S3(S3Config),
}

/// How chunks are fetched.
#[derive(Debug, Clone, Copy)]
pub struct FetchPolicy {
    /// Fetch unit in bytes (rounded up to a multiple of each build's checksum chunk).
    pub chunk_size: u64,
    /// Deadline of one request, measured from the start of its `RequestScope` (every chunk it
    /// needs, retries included). Keep it below the kernel's NBD I/O timeout so the kernel gets
    /// `EIO` for the request rather than tearing the device down.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub retries: u32,
    /// First backoff delay; doubles per retry.
    pub backoff_initial: Duration,
    /// Largest backoff delay.
    pub backoff_max: Duration,
    /// Read ahead on sequential access: a read in chunk `k` right after a read in chunk `k - 1`
    /// of the same build fetches chunk `k + 1` in the background (default on).
    pub readahead: bool,
    /// Most readahead fetches in flight at once, over the whole store (default 2); a sequential
    /// step finding this many running reads ahead nothing.
    pub readahead_inflight: usize,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            chunk_size: DEFAULT_FETCH_CHUNK,
            timeout: Duration::from_secs(10),
            retries: 4,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            readahead: true,
            readahead_inflight: 2,
        }
    }
}

/// The local chunk cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Directory of cached chunks (created if missing).
    pub dir: PathBuf,
    /// Size budget in bytes; least recently used chunks are evicted beyond it.
    pub budget: u64,
}

/// Everything a [`RemoteStore`](crate::RemoteStore) needs.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The object store.
    pub backend: Backend,
    /// Key prefix under which builds live (`<prefix>/<build id>/{data,map}`).
    pub prefix: String,
    /// Fetch behaviour.
    pub fetch: FetchPolicy,
    /// The chunk cache.
    pub cache: CacheConfig,
    /// Worker threads of the store's runtime.
    pub runtime_threads: usize,
}

impl StoreConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), StoreError> {
        let f = &self.fetch;
        if !f.chunk_size.is_power_of_two() || !(64 << 10..=256 << 20).contains(&f.chunk_size) {
            return Err(StoreError::Config(format!(
                "fetch chunk size {} must be a power of two from 64 KiB to 256 MiB",
                f.chunk_size
            )));
        }
        if f.timeout.is_zero() {
            return Err(StoreError::Config("fetch timeout must not be zero".into()));
        }
        if f.readahead && f.readahead_inflight == 0 {
            return Err(StoreError::Config(
                "readahead needs at least one fetch in flight (or turn it off)".into(),
            ));
        }
        if self.cache.budget < f.chunk_size {
            return Err(StoreError::Config(format!(
                "cache budget {} is smaller than one chunk ({})",
                self.cache.budget, f.chunk_size
            )));
        }
        if self.runtime_threads == 0 {
            return Err(StoreError::Config(
                "the runtime needs at least one thread".into(),
            ));
        }
        Ok(())
    }

    /// Builds the `object_store` client for the backend. Its own retries are disabled (the store
    /// retries under its own deadline) and its request timeout is the fetch timeout.
    pub fn object_store(&self) -> Result<Arc<dyn ObjectStore>, StoreError> {
        Ok(match &self.backend {
            Backend::Memory => Arc::new(InMemory::new()),
            Backend::Local(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
                Arc::new(LocalFileSystem::new_with_prefix(dir).map_err(StoreError::Client)?)
            }
            Backend::S3(s3) => {
                let timeout = self.fetch.timeout;
                let client = ClientOptions::new()
                    .with_allow_http(s3.allow_http)
                    .with_timeout(timeout)
                    .with_connect_timeout(timeout.min(Duration::from_secs(2)));
                let retry = RetryConfig {
                    max_retries: 0,
                    retry_timeout: timeout,
                    ..RetryConfig::default()
                };
                let mut b = AmazonS3Builder::new()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_access_key_id(&s3.access_key_id)
                    .with_secret_access_key(&s3.secret_access_key)
                    .with_allow_http(s3.allow_http)
                    .with_virtual_hosted_style_request(false)
                    .with_client_options(client)
                    .with_retry(retry);
                if let Some(ep) = &s3.endpoint {
                    b = b.with_endpoint(ep);
                }
                Arc::new(b.build().map_err(StoreError::Client)?)
            }
        })
    }
}
