//! Template store: layered templates kept in object storage and fetched lazily in chunks.
//!
//! Builds (see `rootfork_block::layered`) are uploaded once to an object store — S3-compatible
//! or a local directory through the `object_store` crate — and served from there by
//! [`RemoteStore::open`], which returns a [`LayeredTemplate`](rootfork_block::LayeredTemplate)
//! whose build data is fetched on demand in fixed-size chunks into a local chunk cache:
//!
//! - concurrent reads of one missing chunk share one fetch (single flight, [`fetch`]);
//! - each fetch is retried with exponential backoff inside one deadline that is shorter than the
//!   kernel's NBD I/O timeout, so a dead store becomes `EIO` for that request, in time;
//! - every fetched chunk is checked against the build's checksums before it is cached or served,
//!   and failed fetches are never cached;
//! - the cache directory is bounded by a byte budget and evicts least recently used chunks;
//! - sequential reads fetch the next chunk ahead ([`FetchPolicy::readahead`]);
//! - fast cold starts: [`RemoteStore::open_recording`] records which chunks a boot reads (an
//!   [`AccessLog`]), [`RemoteStore::put_boot_trace`] stores that [`BootTrace`] next to the
//!   build, and [`RemoteStore::prefetch`] fetches its chunks in parallel in the background.
//!
//! The synchronous block read path reaches the async object store through [`Bridge`], a runtime
//! owned by the store; it never calls `block_on` (so it is safe from any thread).
//!
//! Design and measurements: `docs/template-store.md`.

mod bridge;
mod cache;
mod config;
mod error;
pub mod fetch;
mod prefetch;
mod remote;
mod source;
mod stats;
mod trace;
mod upload;

pub use bridge::Bridge;
pub use cache::{ChunkCache, ChunkKey};
pub use config::{Backend, CacheConfig, FetchPolicy, S3Config, StoreConfig, DEFAULT_FETCH_CHUNK};
pub use error::{FetchError, StoreError};
pub use prefetch::{PrefetchHandle, PrefetchOptions, PrefetchReport};
pub use remote::RemoteStore;
pub use source::{ObjectSource, ObjectStoreSource, SourceError, SourceFuture};
pub use stats::{FetchStats, StatsSnapshot};
pub use trace::{AccessLog, BootTrace, TraceError, BOOT_TRACE_FILE};
pub use upload::UploadReport;
