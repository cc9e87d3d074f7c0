//! The [`ObjectSource`] seam: the two reads the lazy fetcher needs from an object store.
//!
//! Production uses [`ObjectStoreSource`] over any `object_store` backend; tests wrap it to count
//! requests, add latency, or fail on demand.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

/// How one request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The object does not exist (not retried).
    #[error("not found")]
    NotFound,
    /// Anything else (retried).
    #[error("{0}")]
    Other(String),
}

/// A boxed request future.
pub type SourceFuture<'a> = Pin<Box<dyn Future<Output = Result<Bytes, SourceError>> + Send + 'a>>;

/// Reads objects.
pub trait ObjectSource: Send + Sync + 'static {
    /// The bytes `range` of object `key`.
    fn get_range(&self, key: &str, range: Range<u64>) -> SourceFuture<'_>;

    /// The whole object `key`.
    fn get(&self, key: &str) -> SourceFuture<'_>;
}

/// An [`ObjectSource`] over an `object_store` client.
#[derive(Debug, Clone)]
pub struct ObjectStoreSource(pub Arc<dyn ObjectStore>);

fn classify(e: object_store::Error) -> SourceError {
    match e {
        object_store::Error::NotFound { .. } => SourceError::NotFound,
        other => SourceError::Other(other.to_string()),
    }
}

impl ObjectSource for ObjectStoreSource {
    fn get_range(&self, key: &str, range: Range<u64>) -> SourceFuture<'_> {
        let path = ObjectPath::from(key);
        Box::pin(async move { self.0.get_range(&path, range).await.map_err(classify) })
    }

    fn get(&self, key: &str) -> SourceFuture<'_> {
        let path = ObjectPath::from(key);
        Box::pin(async move {
            let r = self.0.get(&path).await.map_err(classify)?;
            r.bytes().await.map_err(classify)
        })
    }
}
