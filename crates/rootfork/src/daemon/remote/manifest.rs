//! What the object store says about sandboxes and templates, beside the builds: one small JSON
//! object per sandbox that left its host's records (`PREFIX/sandboxes/ID.json`) and one per
//! template a host published (`PREFIX/templates/NAME.json`).
//!
//! A sandbox manifest says who holds the sandbox and in which state:
//!
//! - `running` on host H (H resumed it, or took it from another host): nobody else may resume it;
//! - `uploading` by host H (H paused it and its layer is on its way to the store): another host
//!   answers `UNAVAILABLE` naming H, or waits;
//! - `paused` by host H with layer L (every byte of L's chain is in the store): any host may
//!   resume it, and the one that does writes `running` with itself as the holder first.
//!
//! Manifests are written whole (one PUT each); builds are written before the manifest that names
//! them, so a manifest never names a build that is not complete in the store.

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::daemon::spec::VmSpec;

/// The manifest format this daemon writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// Where a sandbox stands in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Held {
    /// Running on its holder.
    Running,
    /// Paused by its holder, the layer on its way to the store.
    Uploading,
    /// Paused, every byte of its chain in the store: any host may resume it.
    Paused,
}

/// A sandbox as the store knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxManifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Its id.
    pub id: String,
    /// Its template's name, base build, size and format (another host may not have it).
    pub template: TemplateManifest,
    /// `socket` or `kernel`.
    pub provider: String,
    /// Its VM settings.
    pub vm: Option<VmSpec>,
    /// Its disk's size.
    pub disk_size: u64,
    /// Its quota.
    pub quota: Option<u64>,
    /// When it was created.
    pub created_unix_ms: i64,
    /// Its state in the store.
    pub state: Held,
    /// The layer its last pause left (a build id), complete in the store when `paused`; while
    /// `running`, the layer it runs on (the store keeps that chain: its holder may read it).
    pub layer: Option<String>,
    /// Pauses so far.
    pub pause_count: u32,
    /// When its pause saved a running VM's memory and device state: where those files are in
    /// the store (complete when `paused`); another host downloads them to restore the VM.
    pub vm_state: Option<VmStateManifest>,
    /// The holder's instance id (its state directory's identity).
    pub holder: String,
    /// The holder's host name, for people.
    pub holder_host: String,
    /// When the manifest was written.
    pub updated_unix_ms: i64,
}

/// A paused VM's saved state in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStateManifest {
    /// The state file's key, below the prefix (QEMU's migration stream, or Firecracker's
    /// snapshot).
    pub state: String,
    /// Firecracker's guest memory file's key; `None` for QEMU.
    pub memory: Option<String>,
    /// The files' total size.
    pub bytes: u64,
    /// QEMU: the machine has a VM generation ID device.
    pub vmgenid: bool,
}

/// A template as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateManifest {
    /// Its name.
    pub name: String,
    /// Its base build.
    pub build: String,
    /// Its size.
    pub size_bytes: u64,
    /// `raw` or `ext4`.
    pub format: String,
}

/// Why a manifest could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The object store failed or could not be reached.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// The object is not a manifest this daemon reads.
    #[error("{key}: {why}")]
    Malformed {
        /// Its key.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// The store's runtime is gone (the daemon is stopping).
    #[error("the store's runtime stopped")]
    Shutdown,
}

/// Keys of the objects beside the builds.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (no slashes at either end; may be empty).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_matches('/').to_owned(),
        }
    }

    fn key(&self, rest: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rest)
        } else {
            ObjectPath::from(format!("{}/{rest}", self.prefix))
        }
    }

    /// A sandbox's manifest.
    pub fn sandbox(&self, id: &str) -> ObjectPath {
        self.key(&format!("sandboxes/{id}.json"))
    }

    /// Where a paused sandbox's VM state files go (below the prefix; relative, as
    /// `RemoteStore::upload_file` takes it): one directory per sandbox, one per layer in it.
    pub fn vm_state_dir(id: &str) -> String {
        format!("vmstate/{id}")
    }

    /// The directory of sandbox manifests.
    pub fn sandboxes(&self) -> ObjectPath {
        self.key("sandboxes")
    }

    /// A template's manifest.
    pub fn template(&self, name: &str) -> ObjectPath {
        self.key(&format!("templates/{name}.json"))
    }

    /// The prefix every key starts with (`None`: the store's root).
    pub fn root(&self) -> Option<ObjectPath> {
        (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()))
    }

    /// `key` without the prefix.
    pub fn relative(&self, key: &ObjectPath) -> String {
        let k = key.as_ref();
        if self.prefix.is_empty() {
            return k.to_owned();
        }
        k.strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or(k)
            .to_owned()
    }
}

/// Reads the JSON object at `key`: `None` when there is none.
pub async fn get<T: serde::de::DeserializeOwned>(
    store: &dyn ObjectStore,
    key: &ObjectPath,
) -> Result<Option<T>, ManifestError> {
    let bytes = match store.get(key).await {
        Ok(r) => r.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ManifestError::Malformed {
            key: key.to_string(),
            why: e.to_string(),
        })
}

/// Writes `value` as the JSON object at `key`, whole.
pub async fn put<T: Serialize>(
    store: &dyn ObjectStore,
    key: &ObjectPath,
    value: &T,
) -> Result<(), ManifestError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ManifestError::Malformed {
        key: key.to_string(),
        why: e.to_string(),
    })?;
    store.put(key, PutPayload::from(bytes)).await?;
    Ok(())
}

/// Removes the object at `key` (none there is fine).
pub async fn delete(store: &dyn ObjectStore, key: &ObjectPath) -> Result<(), ManifestError> {
    match store.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl SandboxManifest {
    /// Whether this daemon reads it.
    pub fn check(self, key: &ObjectPath) -> Result<SandboxManifest, ManifestError> {
        if self.version != MANIFEST_VERSION {
            return Err(ManifestError::Malformed {
                key: key.to_string(),
                why: format!(
                    "manifest version {}; this daemon reads {MANIFEST_VERSION}",
                    self.version
                ),
            });
        }
        Ok(self)
    }
}
