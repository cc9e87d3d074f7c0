//! The daemon's build store: every disk image the daemon keeps is a build of the layered format
//! (`rootfork_block::layered`: immutable, checksummed, its lineage in its map) under
//! `STATE/store/<build id>/{data,map}`. A template is a base build; each pause writes the
//! sandbox's changes as a layer over the build its overlay sat on, so the chain grows by one per
//! pause and a pause writes only what changed since the last one. A chain deeper than
//! `store.max_layers` is flattened into one layer over the template's base build (a sandbox
//! reads through at most that many of its own builds). Forks share their parent's layer: a
//! build is never written twice.
//!
//! Which builds are in use is never stored on its own: it is the template records' base builds
//! plus the lineage of every sandbox's layer ([`Builds::track`]), rebuilt from the records at
//! start. A build no template or sandbox uses is removed ([`Builds::collect`]), after a pause, a
//! delete and at start; the creation of a build and the record that names it happen under
//! [`Builds::pin`], so a collection never sees a build between the two.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use rootfork_block::layered::{
    BuildData, BuildId, BuildMap, BuildResolver, FileData, LayerError, LayerResult, LocalStore,
};
use rootfork_provider::{BaseImage, BuildSource};
use rootfork_store::{AccessLog, RemoteStore};

use crate::daemon::core::Core;

/// What a sandbox's disk is stacked on, or was saved as by its last pause: a layer (or, for a
/// fork of a template, never), with what the chain above its template holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The top build.
    pub id: BuildId,
    /// Its generation (the number of layers over the template's base build).
    pub generation: u64,
    /// Bytes of data in the layers above the base build (the sandbox's changes as stored).
    pub diff_bytes: u64,
    /// The device size.
    pub size: u64,
}

impl Layer {
    /// The layer a map describes; `diff_bytes` counts the data of every build of its lineage
    /// but the last (the base), read from their maps.
    pub fn of(store: &dyn BuildResolver, map: &BuildMap) -> LayerResult<Layer> {
        let mut diff_bytes = map.header.data_len;
        let above_base = map.lineage.len().saturating_sub(1);
        for id in map.lineage.iter().take(above_base).skip(1) {
            diff_bytes += store.map(id)?.header.data_len;
        }
        Ok(Layer {
            id: map.header.id,
            generation: map.header.generation,
            diff_bytes,
            size: map.header.size,
        })
    }

    /// The layer of build `id`.
    pub fn load(store: &dyn BuildResolver, id: &BuildId) -> LayerResult<Layer> {
        Layer::of(store, &store.map(id)?)
    }
}

/// The builds a sandbox reads: the local store first, whose data files are opened once and
/// shared by every sandbox reading them (all the sandboxes of a template read one open base
/// build), then the object store (`--store`) for builds this host does not have, read lazily
/// through the chunk cache.
#[derive(Debug)]
struct SharedFiles {
    store: LocalStore,
    open: parking_lot::Mutex<BTreeMap<BuildId, Weak<FileData>>>,
    remote: Option<RemoteStore>,
}

impl SharedFiles {
    /// Whether build `id` is here (its map is: a local build is published map last).
    fn is_local(&self, id: &BuildId) -> bool {
        self.store.map_path(id).is_file()
    }
}

impl BuildResolver for SharedFiles {
    fn map(&self, id: &BuildId) -> LayerResult<BuildMap> {
        match &self.remote {
            Some(remote) if !self.is_local(id) => remote.map(id),
            _ => self.store.map(id),
        }
    }

    fn data(&self, map: &BuildMap) -> LayerResult<Arc<dyn BuildData>> {
        let id = map.header.id;
        if let Some(remote) = &self.remote {
            if !self.is_local(&id) {
                return remote.data(map);
            }
        }
        let mut open = self.open.lock();
        if let Some(d) = open.get(&id).and_then(Weak::upgrade) {
            return Ok(d);
        }
        let path = self.store.data_path(&id);
        let d = Arc::new(
            FileData::open(&path)
                .map_err(|e| LayerError::io(format!("opening {}", path.display()), e))?,
        );
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(id, Arc::downgrade(&d));
        Ok(d)
    }
}

/// [`SharedFiles`] recording which chunks of the object store's builds are read (a template's
/// first boot on a host that reads it from the store: `remote/boot.rs`).
#[derive(Debug)]
struct RecordingFiles {
    inner: Arc<SharedFiles>,
    log: AccessLog,
}

impl BuildResolver for RecordingFiles {
    fn map(&self, id: &BuildId) -> LayerResult<BuildMap> {
        self.inner.map(id)
    }

    fn data(&self, map: &BuildMap) -> LayerResult<Arc<dyn BuildData>> {
        match &self.inner.remote {
            Some(remote) if !self.inner.is_local(&map.header.id) => {
                Ok(remote.data_recording(map, &self.log))
            }
            _ => self.inner.data(map),
        }
    }
}

/// The store and who uses which build.
#[derive(Debug)]
pub struct Builds {
    store: LocalStore,
    shared: Arc<SharedFiles>,
    /// The layer each sandbox uses (running: stacked on; paused: saved as).
    uses: parking_lot::Mutex<BTreeMap<String, BuildId>>,
    /// Held shared from a build's creation until the record naming it is written; exclusively
    /// by a collection.
    pins: tokio::sync::RwLock<()>,
    /// Flatten a chain deeper than this.
    max_layers: u64,
    /// Wakes the collector task ([`collector`]).
    wake: tokio::sync::Notify,
}

impl Builds {
    /// The store in `dir`, over the object store `remote` when there is one.
    pub fn new(dir: &Path, max_layers: u64, remote: Option<RemoteStore>) -> Builds {
        let store = LocalStore::new(dir);
        Builds {
            shared: Arc::new(SharedFiles {
                store: store.clone(),
                open: Default::default(),
                remote,
            }),
            store,
            uses: Default::default(),
            pins: Default::default(),
            max_layers: max_layers.max(1),
            wake: Default::default(),
        }
    }

    /// The local store.
    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// Where builds are found: here, then in the object store.
    pub fn resolver(&self) -> &dyn BuildResolver {
        self.shared.as_ref()
    }

    /// [`Builds::resolver`], to move into a blocking task.
    pub fn resolver_arc(&self) -> Arc<dyn BuildResolver + Send + Sync> {
        self.shared.clone()
    }

    /// The object store, when `--store` names one.
    pub fn remote(&self) -> Option<&RemoteStore> {
        self.shared.remote.as_ref()
    }

    /// The deepest chain a pause leaves before flattening.
    pub fn max_layers(&self) -> u64 {
        self.max_layers
    }

    /// What an overlay over build `top` is stacked on.
    pub fn base(&self, top: BuildId) -> BaseImage {
        BaseImage::Build {
            builds: BuildSource(self.shared.clone()),
            top,
        }
    }

    /// [`Builds::base`], recording the reads of builds that come from the object store into
    /// the returned log.
    pub fn base_recording(&self, top: BuildId) -> (BaseImage, AccessLog) {
        let log = AccessLog::new();
        let base = BaseImage::Build {
            builds: BuildSource(Arc::new(RecordingFiles {
                inner: self.shared.clone(),
                log: log.clone(),
            })),
            top,
        };
        (base, log)
    }

    /// Whether build `id` is in the local store (its map is there).
    pub fn exists(&self, id: &BuildId) -> bool {
        self.shared.is_local(id)
    }

    /// A build's data file (what the VMM check compares against, and what `list` sizes).
    pub fn data_path(&self, id: &BuildId) -> PathBuf {
        self.store.data_path(id)
    }

    /// Holds off collections until the guard drops: taken before a build is created and kept
    /// until the record naming it is written and [`Builds::track`]ed.
    pub async fn pin(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.pins.read().await
    }

    /// [`Builds::pin`] from a blocking thread (never from an async task).
    pub fn pin_blocking(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.pins.blocking_read()
    }

    /// Notes that sandbox `id` uses `layer` (`None`: no layer of its own, only its template).
    pub fn track(&self, id: &str, layer: Option<BuildId>) {
        let mut uses = self.uses.lock();
        match layer {
            Some(l) => uses.insert(id.to_owned(), l),
            None => uses.remove(id),
        };
    }

    /// Asks the collector task for a collection (after something stopped using a build).
    pub fn collect_soon(&self) {
        self.wake.notify_one();
    }

    /// Removes every build that neither `roots` (the templates' base builds) nor a tracked
    /// sandbox's chain uses, once no build is being written. Returns how many were removed.
    pub async fn collect(&self, roots: impl IntoIterator<Item = BuildId>) -> usize {
        let exclusive = self.pins.write().await;
        self.collect_holding(roots, exclusive).await
    }

    /// [`Builds::collect`] at once when no build is being written, else by the collector task
    /// later (a delete or pause does not wait for another sandbox's pause to finish writing).
    pub async fn collect_or_defer(&self, roots: impl IntoIterator<Item = BuildId>) {
        match self.pins.try_write() {
            Ok(exclusive) => {
                self.collect_holding(roots, exclusive).await;
            }
            Err(_) => self.collect_soon(),
        }
    }

    /// The collection, under the exclusive side of the pins. Builds whose maps cannot be read
    /// are kept, as is everything when a used build's lineage cannot be read (what it
    /// references is unknown).
    async fn collect_holding(
        &self,
        roots: impl IntoIterator<Item = BuildId>,
        _exclusive: tokio::sync::RwLockWriteGuard<'_, ()>,
    ) -> usize {
        let mut used: BTreeSet<BuildId> = roots.into_iter().collect();
        let tops: Vec<BuildId> = self.uses.lock().values().copied().collect();
        let (store, builds) = (self.store.clone(), self.resolver_arc());
        // Maps are files, or requests to the object store: off the async workers.
        tokio::task::spawn_blocking(move || {
            for top in tops {
                match builds.map(&top) {
                    Ok(m) => used.extend(m.lineage.iter().copied()),
                    Err(e) => {
                        tracing::warn!(build = %top, "not collecting builds: a sandbox's layer cannot be read: {e}");
                        return 0;
                    }
                }
            }
            remove_unused(&store, &used)
        })
        .await
        .unwrap_or(0)
    }
}

/// The collector task: a collection each time [`Builds::collect_soon`] was called (several calls
/// while one runs make one more), until `stop` says so.
pub async fn collector(core: std::sync::Arc<Core>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = core.builds.wake.notified() => {}
            _ = stop.changed() => return,
        }
        core.builds.collect(core.templates.builds()).await;
    }
}

/// Removes the build directories of `store` not in `used` (and the scratch files of interrupted
/// writes); names that are not build ids are reported and kept.
fn remove_unused(store: &LocalStore, used: &BTreeSet<BuildId>) -> usize {
    let Ok(entries) = std::fs::read_dir(store.root()) else {
        return 0;
    };
    let mut removed = 0;
    for ent in entries.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let Ok(id) = name.parse::<BuildId>() else {
            // `.pending-ID` (a build being written) and `.export-ID` (a pause's scratch file):
            // their writers hold a pin, so under the collection's exclusive lock they are
            // leftovers of an interrupted write.
            if name.starts_with(".pending-") || name.starts_with(".export-") {
                let p = ent.path();
                let r = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                if let Err(e) = r {
                    tracing::warn!(path = %p.display(), "cannot remove an interrupted write: {e}");
                }
            } else {
                tracing::warn!(path = %ent.path().display(), "kept a file the store did not name (remove it by hand if it is not needed)");
            }
            continue;
        };
        if used.contains(&id) {
            continue;
        }
        match std::fs::remove_dir_all(ent.path()) {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(build = %id, "cannot remove an unused build: {e}"),
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed builds no template or sandbox uses");
    }
    removed
}
