//! Object storage shared with other hosts (`rootfork serve --store URL`): where paused sandboxes
//! go so that any host sharing the store can resume them.
//!
//! The builds (templates' base builds, pauses' layers) are the store's objects
//! (`rootfork_store::RemoteStore`); beside them each sandbox that left its host's records has a
//! manifest saying who holds it (`manifest.rs`). A pause writes its layer locally and returns; a
//! background task uploads the chain and then publishes the manifest (`upload.rs`); another
//! host's `resume ID` for a sandbox it does not know reads the manifest, takes the sandbox over
//! and reads its chain lazily through the chunk cache (`resume.rs`). A sandbox is held by one
//! host at a time: a host resumes a sandbox it once held only when the store still names it as
//! the holder.

pub mod boot;
pub mod gc;
mod manifest;
mod resume;
mod upload;
mod url;

pub use manifest::{Held, Keys, ManifestError, SandboxManifest, TemplateManifest, VmStateManifest};
pub use resume::{claim_for_resume, list_in_store, resume_from_store};
pub use upload::{enqueue, release_on_delete, uploader};
pub use url::StoreUrl;

use std::time::Duration;

use rootfork_store::{CacheConfig, FetchPolicy, RemoteStore, StoreConfig};
use serde::{Deserialize, Serialize};

use crate::daemon::core::{Core, Dirs};
use crate::daemon::sandbox::Sandbox;
use crate::daemon::StartError;
use crate::error::DaemonError;

/// Where a sandbox stands in the object store, as its record keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreLink {
    /// The store has a manifest of this sandbox that names this host as its holder (written
    /// by this host: uploading, paused or running).
    #[serde(default)]
    pub manifest: bool,
    /// Its last pause's layer is complete in the store and the manifest says paused.
    #[serde(default)]
    pub published: bool,
    /// Its last pause's layer is still to be uploaded (a build id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

impl StoreLink {
    /// Whether the store knows nothing of it (what records of sandboxes without a store hold).
    pub fn is_nowhere(&self) -> bool {
        *self == StoreLink::default()
    }
}

/// This daemon as a holder of sandboxes.
#[derive(Debug, Clone)]
pub struct Holder {
    /// Its instance id (the state directory's identity, `nbd-instance-id`).
    pub id: String,
    /// Its host name, for people.
    pub host: String,
}

/// The object store as the daemon uses it.
#[derive(Debug)]
pub struct Remote {
    /// The store (its builds, its client, its runtime).
    pub store: RemoteStore,
    keys: Keys,
    /// This daemon.
    pub holder: Holder,
    /// The upload queue (sandbox ids), read by [`uploader`].
    queue: tokio::sync::mpsc::UnboundedSender<String>,
    queue_rx: parking_lot::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
}

/// How long a resume with `wait` waits for another host's upload.
pub const RESUME_WAIT: Duration = Duration::from_secs(600);

/// Connects to the object store `url`, with its chunk cache in `STATE/chunk-cache` bounded by
/// `cache_bytes`.
pub fn connect(url: &StoreUrl, dirs: &Dirs, cache_bytes: u64) -> Result<RemoteStore, StartError> {
    let (backend, prefix) = url.backend();
    let cfg = StoreConfig {
        backend,
        prefix: prefix.clone(),
        fetch: FetchPolicy::default(),
        cache: CacheConfig {
            dir: dirs.chunk_cache.clone(),
            budget: cache_bytes,
        },
        runtime_threads: 2,
    };
    RemoteStore::new(&cfg).map_err(|source| StartError::Store {
        url: url.to_string(),
        source,
    })
}

impl Remote {
    /// The daemon's use of `store` (whose key prefix is `prefix`), as `holder`.
    pub fn new(store: RemoteStore, prefix: &str, holder: Holder) -> Remote {
        let (queue, rx) = tokio::sync::mpsc::unbounded_channel();
        Remote {
            store,
            keys: Keys::new(prefix),
            holder,
            queue,
            queue_rx: parking_lot::Mutex::new(Some(rx)),
        }
    }

    /// Runs `f` (a request to the object store) on the store's runtime, whose client it is.
    async fn on_store<T, F>(
        &self,
        f: impl FnOnce(std::sync::Arc<dyn object_store::ObjectStore>, Keys) -> F,
    ) -> Result<T, ManifestError>
    where
        F: std::future::Future<Output = Result<T, ManifestError>> + Send + 'static,
        T: Send + 'static,
    {
        let fut = f(self.store.object_store().clone(), self.keys.clone());
        self.store
            .bridge()
            .handle()
            .spawn(fut)
            .await
            .map_err(|_| ManifestError::Shutdown)?
    }

    /// The manifest of sandbox `id`, if the store has one.
    pub async fn manifest(&self, id: &str) -> Result<Option<SandboxManifest>, ManifestError> {
        let id = id.to_owned();
        self.on_store(move |store, keys| async move {
            let key = keys.sandbox(&id);
            match manifest::get::<SandboxManifest>(store.as_ref(), &key).await? {
                Some(m) => Ok(Some(m.check(&key)?)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Writes the manifest of a sandbox.
    pub async fn put_manifest(&self, m: SandboxManifest) -> Result<(), ManifestError> {
        self.on_store(move |store, keys| async move {
            manifest::put(store.as_ref(), &keys.sandbox(&m.id), &m).await
        })
        .await
    }

    /// Removes the manifest of sandbox `id`.
    pub async fn delete_manifest(&self, id: &str) -> Result<(), ManifestError> {
        let id = id.to_owned();
        self.on_store(move |store, keys| async move {
            manifest::delete(store.as_ref(), &keys.sandbox(&id)).await
        })
        .await
    }

    /// Writes a template's manifest unless the store has one of that name.
    pub async fn publish_template(&self, t: TemplateManifest) -> Result<(), ManifestError> {
        self.on_store(move |store, keys| async move {
            let key = keys.template(&t.name);
            if manifest::get::<TemplateManifest>(store.as_ref(), &key)
                .await?
                .is_none()
            {
                manifest::put(store.as_ref(), &key, &t).await?;
            }
            Ok(())
        })
        .await
    }

    /// Every sandbox manifest in the store (unreadable ones are logged and left out).
    pub async fn manifests(&self) -> Result<Vec<SandboxManifest>, ManifestError> {
        self.on_store(move |store, keys| async move {
            use tokio_stream::StreamExt;
            let mut metas = Vec::new();
            let mut listing = store.list(Some(&keys.sandboxes()));
            while let Some(meta) = listing.next().await {
                metas.push(meta?);
            }
            drop(listing);
            let mut out = Vec::new();
            for meta in metas {
                match manifest::get::<SandboxManifest>(store.as_ref(), &meta.location).await {
                    Ok(Some(m)) => match m.check(&meta.location) {
                        Ok(m) => out.push(m),
                        Err(e) => tracing::warn!("skipping a sandbox manifest: {e}"),
                    },
                    Ok(None) => {}
                    Err(e) => tracing::warn!("skipping a sandbox manifest: {e}"),
                }
            }
            out.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(out)
        })
        .await
    }

    /// Collects the store's unreferenced builds ([`gc::collect`]).
    pub async fn collect(
        &self,
        min_age: Duration,
        dry_run: bool,
    ) -> Result<gc::GcReport, gc::GcError> {
        gc::collect(&self.store, &self.keys, min_age, dry_run).await
    }

    /// Removes every VM state the store holds for sandbox `id`.
    pub async fn delete_vm_states(&self, id: &str) -> Result<(), ManifestError> {
        let dir = Keys::vm_state_dir(id);
        let prefix = object_store::path::Path::from(self.store.prefixed(&dir));
        self.on_store(move |store, _| async move {
            use tokio_stream::StreamExt;
            let mut keys = Vec::new();
            let mut listing = store.list(Some(&prefix));
            while let Some(m) = listing.next().await {
                keys.push(m?.location);
            }
            drop(listing);
            for k in keys {
                manifest::delete(store.as_ref(), &k).await?;
            }
            Ok(())
        })
        .await
    }

    /// Queues sandbox `id`'s pending upload.
    fn enqueue(&self, id: &str) {
        let _ = self.queue.send(id.to_owned());
    }
}

/// Uploads a paused VM's state files as the VM state of sandbox `id`'s pause at `layer`.
/// Blocks the calling thread.
pub fn upload_vm_state(
    store: &RemoteStore,
    id: &str,
    layer: &str,
    v: &crate::daemon::snapshot::VmState,
) -> Result<VmStateManifest, rootfork_store::StoreError> {
    let dir = format!("{}/{layer}", Keys::vm_state_dir(id));
    let state = format!("{dir}/state");
    let mut bytes = store.upload_file(&state, &v.path)?;
    let memory = match &v.memory {
        Some(m) => {
            let key = format!("{dir}/memory");
            bytes += store.upload_file(&key, m)?;
            Some(key)
        }
        None => None,
    };
    Ok(VmStateManifest {
        state,
        memory,
        bytes,
        vmgenid: v.vmgenid,
    })
}

/// Downloads a VM state from the store into `state` (and `memory` for Firecracker's), as
/// this host's files of a paused sandbox. Blocks the calling thread; a failure removes what
/// it wrote.
pub fn download_vm_state(
    store: &RemoteStore,
    m: &VmStateManifest,
    state: &std::path::Path,
    memory: &std::path::Path,
) -> Result<crate::daemon::snapshot::VmState, rootfork_store::StoreError> {
    let mut bytes = store.download_file(&m.state, state)?;
    let mem = match &m.memory {
        Some(key) => match store.download_file(key, memory) {
            Ok(n) => {
                bytes += n;
                Some(memory.to_owned())
            }
            Err(e) => {
                let _ = std::fs::remove_file(state);
                return Err(e);
            }
        },
        None => None,
    };
    Ok(crate::daemon::snapshot::VmState {
        path: state.to_owned(),
        memory: mem,
        bytes,
        vmgenid: m.vmgenid,
    })
}

/// The manifest of `sb` as this host holds it, in `state`, with `layer`.
pub(crate) fn manifest_of(
    core: &Core,
    remote: &Remote,
    sb: &Sandbox,
    state: Held,
    layer: Option<String>,
    vm_state: Option<VmStateManifest>,
) -> Result<SandboxManifest, DaemonError> {
    let t = core
        .templates
        .get(&sb.template)
        .ok_or_else(|| DaemonError::TemplateNotFound(sb.template.clone()))?;
    Ok(SandboxManifest {
        version: manifest::MANIFEST_VERSION,
        id: sb.id.clone(),
        template: TemplateManifest {
            name: t.name.clone(),
            build: t.build.clone().unwrap_or_default(),
            size_bytes: t.size_bytes,
            format: t.format.clone(),
        },
        provider: sb.kind.as_str().to_owned(),
        vm: sb.vm.clone(),
        disk_size: sb.disk_size,
        quota: sb.quota,
        created_unix_ms: sb.created_unix_ms,
        state,
        layer,
        pause_count: sb.status().pause_count,
        vm_state,
        holder: remote.holder.id.clone(),
        holder_host: remote.holder.host.clone(),
        updated_unix_ms: crate::events::now_unix_ms(),
    })
}

/// A store error as the API reports it: the store cannot be reached or answered badly.
pub(crate) fn unavailable(what: &str, e: ManifestError) -> DaemonError {
    DaemonError::StoreUnavailable(format!("{what}: {e}"))
}

/// This host's name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
