//! Uploading builds from a [`LocalStore`] to the object store, once.
//!
//! A build is uploaded data first, map last: a map in the store means its data is complete, and
//! a build whose map is already there is skipped. Large data goes up as a multipart upload in
//! 8 MiB parts with a bounded number in flight.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use rootfork_block::layered::{BuildId, BuildResolver, LocalStore, DATA_FILE, MAP_FILE};
use tokio::io::AsyncReadExt;

use crate::error::StoreError;
use crate::remote::RemoteStore;

const PART: usize = 8 << 20;

/// What an upload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadReport {
    /// Builds uploaded now, base first.
    pub uploaded: Vec<BuildId>,
    /// Builds already in the store.
    pub skipped: Vec<BuildId>,
    /// Bytes sent (data and maps).
    pub bytes: u64,
}

fn req(context: String) -> impl FnOnce(object_store::Error) -> StoreError {
    move |source| StoreError::Request { context, source }
}

async fn exists(store: &Arc<dyn ObjectStore>, key: &str) -> Result<bool, StoreError> {
    match store.head(&ObjectPath::from(key)).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(req(format!("checking {key}"))(e)),
    }
}

async fn put_file(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    path: PathBuf,
) -> Result<u64, StoreError> {
    let io = |e| StoreError::io(format!("reading {}", path.display()), e);
    let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
    let len = file.metadata().await.map_err(io)?.len();
    let location = ObjectPath::from(key);
    if len <= PART as u64 {
        let mut buf = Vec::with_capacity(len as usize);
        file.read_to_end(&mut buf).await.map_err(io)?;
        store
            .put(&location, PutPayload::from(Bytes::from(buf)))
            .await
            .map_err(req(format!("uploading {key}")))?;
        return Ok(len);
    }
    let upload = store
        .put_multipart(&location)
        .await
        .map_err(req(format!("starting upload of {key}")))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
    let mut buf = vec![0u8; PART];
    let mut sent = 0u64;
    while sent < len {
        let n = ((len - sent) as usize).min(PART);
        file.read_exact(&mut buf[..n]).await.map_err(io)?;
        writer
            .wait_for_capacity(4)
            .await
            .map_err(req(format!("uploading {key}")))?;
        writer.write(&buf[..n]);
        sent += n as u64;
    }
    writer
        .finish()
        .await
        .map_err(req(format!("finishing upload of {key}")))?;
    Ok(len)
}

impl RemoteStore {
    /// Uploads the template whose top build is `top` — every build of its lineage that is not
    /// in the store yet, base first. The local chain must open cleanly first.
    pub fn upload(&self, local: &LocalStore, top: &BuildId) -> Result<UploadReport, StoreError> {
        local.open(top)?;
        let lineage = local.map(top)?.lineage;
        let mut report = UploadReport::default();
        for id in lineage.iter().rev() {
            let store = self.inner.store.clone();
            let map_key = self.key(id, MAP_FILE);
            let data_key = self.key(id, DATA_FILE);
            let map_path = local.map_path(id);
            let data_path = local.data_path(id);
            let sent = self.bridge().run(async move {
                if exists(&store, &map_key).await? {
                    return Ok::<_, StoreError>(None);
                }
                let data = put_file(&store, &data_key, data_path).await?;
                let map = put_file(&store, &map_key, map_path).await?;
                Ok(Some(data + map))
            })??;
            match sent {
                Some(n) => {
                    report.bytes += n;
                    report.uploaded.push(*id);
                }
                None => report.skipped.push(*id),
            }
        }
        Ok(report)
    }
}
