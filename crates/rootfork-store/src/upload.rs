//! Uploading builds from a [`LocalStore`] to the object store, once.
//!
//! A build is uploaded data first, map last: a map in the store means its data is complete, and
//! a build whose map is already there is skipped. Large data goes up as a multipart upload in
//! 8 MiB parts with a bounded number in flight. The data is checked against the build's chunk
//! checksums as it streams; a mismatch aborts the upload before the map is written, so a build
//! damaged on local disk never becomes visible in the store.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use rootfork_block::layered::{BuildId, BuildResolver, LocalStore, RunKind, DATA_FILE, MAP_FILE};
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

/// Checks a stream of data against a build's chunk checksums.
struct CrcStream {
    chunk: u64,
    crcs: Vec<u32>,
    pos: u64,
    current: u32,
}

impl CrcStream {
    fn feed(&mut self, mut buf: &[u8]) -> Result<(), u64> {
        while !buf.is_empty() {
            let take = ((self.chunk - self.pos % self.chunk) as usize).min(buf.len());
            self.current = crc32c::crc32c_append(self.current, &buf[..take]);
            self.pos += take as u64;
            buf = &buf[take..];
            if self.pos.is_multiple_of(self.chunk) {
                self.check()?;
            }
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), u64> {
        let index = (self.pos - 1) / self.chunk;
        if self.crcs.get(index as usize) != Some(&self.current) {
            return Err(index * self.chunk);
        }
        self.current = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<(), u64> {
        if !self.pos.is_multiple_of(self.chunk) {
            self.check()?;
        }
        Ok(())
    }
}

async fn put_file(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    path: PathBuf,
    mut crcs: Option<CrcStream>,
) -> Result<u64, StoreError> {
    let bad = |offset: u64| {
        StoreError::io(
            format!("uploading {key}"),
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} fails its checksum at {offset}", path.display()),
            ),
        )
    };
    let io = |e| StoreError::io(format!("reading {}", path.display()), e);
    let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
    let len = file.metadata().await.map_err(io)?.len();
    let location = ObjectPath::from(key);
    if len <= PART as u64 {
        let mut buf = Vec::with_capacity(len as usize);
        file.read_to_end(&mut buf).await.map_err(io)?;
        if let Some(mut c) = crcs {
            c.feed(&buf).and_then(|()| c.finish()).map_err(bad)?;
        }
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
        if let Some(c) = crcs.as_mut() {
            if let Err(offset) = c.feed(&buf[..n]) {
                let _ = writer.abort().await;
                return Err(bad(offset));
            }
        }
        writer
            .wait_for_capacity(4)
            .await
            .map_err(req(format!("uploading {key}")))?;
        writer.write(&buf[..n]);
        sent += n as u64;
    }
    if let Some(Err(offset)) = crcs.map(CrcStream::finish) {
        let _ = writer.abort().await;
        return Err(bad(offset));
    }
    writer
        .finish()
        .await
        .map_err(req(format!("finishing upload of {key}")))?;
    Ok(len)
}

impl RemoteStore {
    /// Uploads the local file `path` as the object `key` (relative to the store's prefix):
    /// multipart in 8 MiB parts when large. Returns its size. Blocks the calling thread.
    pub fn upload_file(&self, key: &str, path: &std::path::Path) -> Result<u64, StoreError> {
        let (store, key, path) = (
            self.inner.store.clone(),
            self.prefixed(key),
            path.to_owned(),
        );
        self.bridge()
            .run(async move { put_file(&store, &key, path, None).await })?
    }

    /// Downloads the object `key` (relative to the store's prefix) into a new file at `path`,
    /// streaming, fsynced. Returns its size. Blocks the calling thread; a failure removes what
    /// it wrote.
    pub fn download_file(&self, key: &str, path: &std::path::Path) -> Result<u64, StoreError> {
        let (store, key, path) = (
            self.inner.store.clone(),
            self.prefixed(key),
            path.to_owned(),
        );
        let r = self.bridge().run({
            let path = path.clone();
            async move {
                use tokio::io::AsyncWriteExt;
                use tokio_stream::StreamExt;
                let io = |e| StoreError::io(format!("writing {}", path.display()), e);
                let got = store
                    .get(&ObjectPath::from(key.as_str()))
                    .await
                    .map_err(req(format!("downloading {key}")))?;
                let mut file = tokio::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .await
                    .map_err(io)?;
                let mut stream = got.into_stream();
                let mut n = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(req(format!("downloading {key}")))?;
                    file.write_all(&chunk).await.map_err(io)?;
                    n += chunk.len() as u64;
                }
                file.sync_all().await.map_err(io)?;
                Ok::<_, StoreError>(n)
            }
        })?;
        if r.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        r
    }

    /// Uploads the template whose top build is `top` — the top build and every ancestor its
    /// mapping references that is not in the store yet, base first (ancestors whose bytes were
    /// all overwritten are never read, so they are not needed). A chain held locally must open
    /// cleanly first; ancestors `local` does not hold (a layer written over a chain read from
    /// this store) must already be in the store.
    pub fn upload(&self, local: &LocalStore, top: &BuildId) -> Result<UploadReport, StoreError> {
        let top_map = local.map(top)?;
        let here = |id: &BuildId| local.map_path(id).is_file();
        if top_map.lineage.iter().all(here) {
            local.open(top)?;
        }
        let mut needed = vec![false; top_map.lineage.len()];
        needed[0] = true;
        for r in top_map.mapping.runs() {
            if let RunKind::Data { build, .. } = r.kind {
                needed[build as usize] = true;
            }
        }
        let lineage: Vec<BuildId> = top_map
            .lineage
            .iter()
            .zip(&needed)
            .filter_map(|(id, &n)| n.then_some(*id))
            .collect();
        // Every local map, read before anything is sent.
        let maps = lineage
            .iter()
            .map(|id| here(id).then(|| local.map(id)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let mut report = UploadReport::default();
        for (id, map) in lineage.iter().zip(maps).rev() {
            let Some(map) = map else {
                // Not here: it must be in the store already.
                let store = self.inner.store.clone();
                let key = self.key(id, MAP_FILE);
                if !self
                    .bridge()
                    .run(async move { exists(&store, &key).await })??
                {
                    return Err(rootfork_block::layered::LayerError::MissingBuild(*id).into());
                }
                report.skipped.push(*id);
                continue;
            };
            let store = self.inner.store.clone();
            let map_key = self.key(id, MAP_FILE);
            let data_key = self.key(id, DATA_FILE);
            let map_path = local.map_path(id);
            let data_path = local.data_path(id);
            let check = CrcStream {
                chunk: u64::from(map.header.chunk_size),
                crcs: map.chunk_crcs,
                pos: 0,
                current: 0,
            };
            let sent = self.bridge().run(async move {
                if exists(&store, &map_key).await? {
                    return Ok::<_, StoreError>(None);
                }
                let data = put_file(&store, &data_key, data_path, Some(check)).await?;
                let map = put_file(&store, &map_key, map_path, None).await?;
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
