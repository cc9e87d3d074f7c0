//! Garbage collection of the object store: builds that no manifest *in the store* references.
//!
//! The roots are every template manifest's base build and every sandbox manifest's layer
//! (paused: its disk; running or uploading: the layer its holder runs on or uploads), each with
//! its whole lineage (read from the store's maps). Every other build is removed, unless one of
//! its objects is younger than `min_age`: an upload whose manifest is not written yet looks
//! unreferenced, and the age keeps it. So one host's collection never removes what another host
//! resumed from or is uploading. A root whose map cannot be read stops the collection (what it
//! references is unknown), and nothing is removed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use rootfork_block::layered::{BuildId, BuildResolver};
use rootfork_store::RemoteStore;

use super::manifest::{self, Keys, ManifestError, SandboxManifest, TemplateManifest};

/// What a collection found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Builds in the store.
    pub builds: usize,
    /// Builds referenced by a manifest (with their lineages).
    pub referenced: usize,
    /// Unreferenced builds removed (or, in a dry run, that would be).
    pub removed: Vec<BuildId>,
    /// Their bytes.
    pub removed_bytes: u64,
    /// Unreferenced builds kept because they are younger than the minimum age.
    pub young: usize,
}

/// Why a collection stopped.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] ManifestError),
    /// A referenced build's map could not be read: nothing was removed.
    #[error("build {build} (referenced by {by}) cannot be read, so nothing was removed: {why}")]
    Unreadable {
        /// The build.
        build: String,
        /// What references it.
        by: String,
        /// Why.
        why: String,
    },
}

/// One object of a build.
struct Object {
    location: ObjectPath,
    size: u64,
    age: Duration,
}

/// Collects the store `store` (keys under `keys`): removes unreferenced builds older than
/// `min_age`, or with `dry_run` only reports them.
pub async fn collect(
    store: &RemoteStore,
    keys: &Keys,
    min_age: Duration,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let (client, keys2) = (store.object_store().clone(), keys.clone());
    // Listing and manifests on the store's runtime (its client's).
    let (objects, roots) = store
        .bridge()
        .handle()
        .spawn(async move {
            use tokio_stream::StreamExt;
            let now = chrono_now();
            let mut builds: BTreeMap<BuildId, Vec<Object>> = BTreeMap::new();
            let mut roots: Vec<(String, String)> = Vec::new();
            let mut listing = client.list(keys2.root().as_ref());
            let mut metas = Vec::new();
            while let Some(m) = listing.next().await {
                metas.push(m.map_err(ManifestError::from)?);
            }
            drop(listing);
            for meta in metas {
                let rel = keys2.relative(&meta.location);
                let mut parts = rel.splitn(2, '/');
                let (first, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                if let Ok(id) = first.parse::<BuildId>() {
                    let age = Duration::from_millis(
                        now.saturating_sub(meta.last_modified.timestamp_millis())
                            .max(0) as u64,
                    );
                    builds.entry(id).or_default().push(Object {
                        location: meta.location.clone(),
                        size: meta.size,
                        age,
                    });
                    continue;
                }
                match first {
                    "sandboxes" if rest.ends_with(".json") => {
                        if let Some(m) =
                            manifest::get::<SandboxManifest>(client.as_ref(), &meta.location)
                                .await?
                        {
                            if let Some(l) = m.layer {
                                roots.push((l, format!("sandbox {}", m.id)));
                            }
                            roots.push((m.template.build, format!("sandbox {}'s template", m.id)));
                        }
                    }
                    "templates" if rest.ends_with(".json") => {
                        if let Some(t) =
                            manifest::get::<TemplateManifest>(client.as_ref(), &meta.location)
                                .await?
                        {
                            roots.push((t.build, format!("template {}", t.name)));
                        }
                    }
                    _ => {}
                }
            }
            Ok::<_, ManifestError>((builds, roots))
        })
        .await
        .map_err(|_| ManifestError::Shutdown)??;
    // Every root's lineage (maps read through the store's resolver).
    let mut referenced: BTreeSet<BuildId> = BTreeSet::new();
    for (root, by) in roots {
        let unreadable = |why: String| GcError::Unreadable {
            build: root.clone(),
            by: by.clone(),
            why,
        };
        let id: BuildId = root.parse().map_err(|e| unreadable(format!("{e}")))?;
        if referenced.contains(&id) {
            continue;
        }
        let s = store.clone();
        let map = tokio::task::spawn_blocking(move || s.map(&id))
            .await
            .map_err(|e| unreadable(e.to_string()))?
            .map_err(|e| unreadable(e.to_string()))?;
        referenced.extend(map.lineage.iter().copied());
    }
    let mut report = GcReport {
        builds: objects.len(),
        referenced: referenced.len(),
        ..GcReport::default()
    };
    let mut doomed = Vec::new();
    for (id, objs) in objects {
        if referenced.contains(&id) {
            continue;
        }
        if objs.iter().any(|o| o.age < min_age) {
            report.young += 1;
            continue;
        }
        report.removed.push(id);
        report.removed_bytes += objs.iter().map(|o| o.size).sum::<u64>();
        // The map first: a build without its map is incomplete to every reader.
        let mut locs: Vec<ObjectPath> = objs.into_iter().map(|o| o.location).collect();
        locs.sort_by_key(|l| !l.as_ref().ends_with("/map"));
        doomed.extend(locs);
    }
    if !dry_run && !doomed.is_empty() {
        let client = store.object_store().clone();
        store
            .bridge()
            .handle()
            .spawn(async move {
                for loc in doomed {
                    manifest::delete(client.as_ref(), &loc).await?;
                }
                Ok::<_, ManifestError>(())
            })
            .await
            .map_err(|_| ManifestError::Shutdown)??;
    }
    Ok(report)
}

/// The daemon's periodic collection (`store.gc_interval_secs`), until `stop`.
pub async fn periodic(
    core: std::sync::Arc<crate::daemon::core::Core>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (Some(remote), Some(every)) = (core.remote.as_ref(), core.config.store_gc_interval) else {
        return;
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        match remote.collect(core.config.store_gc_min_age, false).await {
            Ok(r) => tracing::info!(
                builds = r.builds,
                removed = r.removed.len(),
                removed_bytes = r.removed_bytes,
                "collected the object store"
            ),
            Err(e) => tracing::warn!("collecting the object store: {e}"),
        }
    }
}

/// Milliseconds since the epoch.
fn chrono_now() -> i64 {
    crate::events::now_unix_ms()
}
