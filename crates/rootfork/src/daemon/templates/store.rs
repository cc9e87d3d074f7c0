//! The template store: each template a base build of the layered format in the daemon's build
//! store (`STATE/store/<build id>`, see `builds.rs`) with a `STATE/templates/NAME.json` record
//! naming it. An import copies the source into a hidden temporary image (holes stay holes),
//! imports that as a build (written to a pending directory, fsynced, renamed into place), then
//! writes the record atomically, so a crash never leaves half a template under a name (a build
//! no record names is collected at the next start). Templates of older daemons, raw images at
//! `STATE/templates/NAME.img`, are imported as builds when the store opens (the image is
//! removed once the record names the build).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rootfork_block::layered::{BuildId, BuildOptions, BuildResolver, LocalStore};
use serde::{Deserialize, Serialize};

use crate::daemon::model::{TemplateFormat, TemplateInfo};
use crate::error::{DaemonError, ImportError, Result};
use crate::events::now_unix_ms;
use crate::names;

/// Template sizes must be a multiple of this.
pub const TEMPLATE_ALIGN: u64 = rootfork_block::TEMPLATE_BLOCK_SIZE as u64;

const CHUNK: usize = 1 << 20;

/// A template's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateMeta {
    /// Its name.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// `raw` or `ext4`.
    pub format: String,
    /// When it was imported.
    pub created_unix_ms: i64,
    /// Where it came from.
    pub source: String,
    /// Its base build (absent in the records of daemons before the build store: their image is
    /// `NAME.img`, imported when the store opens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
}

impl TemplateMeta {
    /// Its base build.
    pub fn build_id(&self) -> Option<BuildId> {
        self.build.as_deref().and_then(|b| b.parse().ok())
    }
}

/// What an import may read.
#[derive(Debug, Clone, Copy)]
pub struct ImportPolicy<'a> {
    /// Whether block devices may be imported (else regular files only).
    pub allow_block_devices: bool,
    /// When set, the source must resolve to a file inside one of these directories.
    pub allowed_dirs: Option<&'a [PathBuf]>,
}

/// The store.
#[derive(Debug)]
pub struct TemplateStore {
    dir: PathBuf,
    builds: LocalStore,
    /// Name → record. Also the lock that orders template deletion against sandbox creation.
    pub(crate) map: parking_lot::Mutex<BTreeMap<String, TemplateMeta>>,
    importing: parking_lot::Mutex<std::collections::BTreeSet<String>>,
}

/// Detects an ext2/3/4 superblock (magic 0xEF53 at byte 1080).
pub fn detect_format(file: &mut File) -> std::io::Result<TemplateFormat> {
    let mut magic = [0u8; 2];
    file.seek(SeekFrom::Start(1080))?;
    let n = file.read(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(if n == 2 && u16::from_le_bytes(magic) == 0xEF53 {
        TemplateFormat::Ext4
    } else {
        TemplateFormat::Raw
    })
}

impl TemplateStore {
    /// Opens (creating) the store in `dir` over the build store `builds` (where imports go) and
    /// `resolver` (where a template's base build is found: here, or in the object store),
    /// loading every complete template, removing leftovers of interrupted imports and importing
    /// the raw images of older daemons as builds.
    pub fn open(
        dir: &Path,
        builds: &LocalStore,
        resolver: &dyn BuildResolver,
    ) -> Result<TemplateStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| DaemonError::io(format!("creating {}", dir.display()), e))?;
        let mut map = BTreeMap::new();
        let rd = std::fs::read_dir(dir)
            .map_err(|e| DaemonError::io(format!("reading {}", dir.display()), e))?;
        for ent in rd.flatten() {
            let p = ent.path();
            let fname = ent.file_name().to_string_lossy().into_owned();
            if fname.starts_with(".import-") {
                tracing::info!(file = %p.display(), "removing an interrupted template import");
                let _ = std::fs::remove_file(&p);
                continue;
            }
            let Some(name) = fname.strip_suffix(".json") else {
                continue;
            };
            let meta: Option<TemplateMeta> = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .filter(|m: &TemplateMeta| m.name == name && names::template_name(name).is_ok());
            let Some(mut meta) = meta else {
                tracing::warn!(record = %p.display(), "ignoring a template record that cannot be read");
                continue;
            };
            if meta.build.is_none() {
                if let Err(e) = migrate_image(dir, builds, &mut meta) {
                    tracing::warn!(record = %p.display(), "ignoring a template whose image could not be imported as a build (kept as it was): {e}");
                    continue;
                }
            }
            let fits = meta.build_id().is_some_and(|id| {
                resolver
                    .map(&id)
                    .is_ok_and(|m| m.header.size == meta.size_bytes && m.header.generation == 0)
            });
            if fits {
                map.insert(meta.name.clone(), meta);
            } else {
                tracing::warn!(record = %p.display(), "ignoring a template record whose build is missing or does not match");
            }
        }
        Ok(TemplateStore {
            dir: dir.to_owned(),
            builds: builds.clone(),
            map: parking_lot::Mutex::new(map),
            importing: Default::default(),
        })
    }

    /// A template's base build.
    pub fn build(&self, name: &str) -> Option<BuildId> {
        self.map.lock().get(name).and_then(TemplateMeta::build_id)
    }

    /// Every template's base build.
    pub fn builds(&self) -> Vec<BuildId> {
        self.map
            .lock()
            .values()
            .filter_map(TemplateMeta::build_id)
            .collect()
    }

    /// The data file of a template's base build (what a VMM must never open).
    pub fn data_path(&self, name: &str) -> Option<PathBuf> {
        self.build(name).map(|id| self.builds.data_path(&id))
    }

    /// Whether there are no templates.
    pub fn is_empty(&self) -> bool {
        self.map.lock().is_empty()
    }

    /// A template's record.
    pub fn get(&self, name: &str) -> Option<TemplateMeta> {
        self.map.lock().get(name).cloned()
    }

    /// Every record.
    pub fn list(&self) -> Vec<TemplateMeta> {
        self.map.lock().values().cloned().collect()
    }

    /// What `list` shows of a record, used by `sandboxes` sandboxes.
    pub fn info(&self, m: &TemplateMeta, sandboxes: u32) -> TemplateInfo {
        let path = m
            .build_id()
            .map(|id| self.builds.build_dir(&id))
            .unwrap_or_default();
        let allocated = m.build_id().map_or(0, |id| {
            [self.builds.data_path(&id), self.builds.map_path(&id)]
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|md| md.blocks() * 512)
                .sum()
        });
        TemplateInfo {
            name: m.name.clone(),
            size_bytes: m.size_bytes,
            format: TemplateFormat::from_name(&m.format),
            allocated_bytes: allocated,
            created_unix_ms: m.created_unix_ms,
            sandboxes,
            path,
        }
    }

    /// Checks an import request before any work: a valid, unused name and a readable source of
    /// a usable size that `policy` allows. Reserves the name until [`Self::finish_import`] or
    /// [`Self::abort_import`].
    pub fn begin_import(
        &self,
        name: &str,
        source: &Path,
        policy: &ImportPolicy<'_>,
    ) -> Result<(File, u64)> {
        names::template_name(name)?;
        if !source.is_absolute() {
            return Err(ImportError::NotAbsolute(source.to_owned()).into());
        }
        // Non-blocking, so a FIFO cannot hold the import at open().
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(source)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ImportError::Missing(source.to_owned()),
                _ => ImportError::Unreadable {
                    path: source.to_owned(),
                    source: e,
                },
            })?;
        let md = file
            .metadata()
            .map_err(|e| DaemonError::io("stat source", e))?;
        let size = if md.file_type().is_block_device() {
            if !policy.allow_block_devices {
                return Err(ImportError::BlockDeviceRefused(source.to_owned()).into());
            }
            let mut f = &file;
            f.seek(SeekFrom::End(0))
                .map_err(|e| DaemonError::io("sizing source device", e))?
        } else if md.is_file() {
            md.len()
        } else {
            return Err(ImportError::NotFileOrDevice(source.to_owned()).into());
        };
        if let Some(dirs) = policy.allowed_dirs {
            // The file actually opened (symlinks resolved), not the name asked for.
            let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map_err(|e| DaemonError::io("resolving the source path", e))?;
            let inside = dirs.iter().any(|d| {
                std::fs::canonicalize(d).is_ok_and(|d| opened.starts_with(&d) && opened != d)
            });
            if !inside {
                return Err(ImportError::OutsideImportDirs(source.to_owned()).into());
            }
        }
        if size == 0 || size % TEMPLATE_ALIGN != 0 {
            return Err(ImportError::BadSize {
                path: source.to_owned(),
                size,
            }
            .into());
        }
        let map = self.map.lock();
        let mut importing = self.importing.lock();
        if map.contains_key(name) || importing.contains(name) {
            return Err(DaemonError::TemplateExists(name.to_owned()));
        }
        importing.insert(name.to_owned());
        Ok((file, size))
    }

    fn tmp_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".import-{name}"))
    }

    /// Copies `src` (blocking) into the store's temporary file, calling `progress(done)` after
    /// every chunk; all-zero chunks become holes.
    pub fn copy_in(
        &self,
        name: &str,
        mut src: File,
        size: u64,
        mut progress: impl FnMut(u64),
    ) -> Result<PathBuf> {
        let tmp = self.tmp_path(name);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| DaemonError::io(format!("creating {}", tmp.display()), e))?;
        let mut buf = vec![0u8; CHUNK];
        let mut done = 0u64;
        let r = (|| -> std::io::Result<()> {
            while done < size {
                let want = ((size - done) as usize).min(CHUNK);
                src.read_exact(&mut buf[..want])?;
                if buf[..want].iter().all(|&b| b == 0) {
                    out.seek(SeekFrom::Current(want as i64))?;
                } else {
                    out.write_all(&buf[..want])?;
                }
                done += want as u64;
                progress(done);
            }
            out.set_len(size)?;
            out.sync_all()
        })();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(DaemonError::io(format!("copying into template {name}"), e));
        }
        Ok(tmp)
    }

    /// Imports a finished temporary image as a base build and records it; the temporary image
    /// is removed either way.
    pub fn finish_import(
        &self,
        name: &str,
        tmp: &Path,
        format: TemplateFormat,
        source: &str,
    ) -> Result<TemplateMeta> {
        let r = (|| {
            let size = std::fs::metadata(tmp)
                .map_err(|e| DaemonError::io("stat import", e))?
                .len();
            let build = self
                .builds
                .import_image(tmp, BuildOptions::default())
                .map_err(DaemonError::Layer)?;
            let meta = TemplateMeta {
                name: name.to_owned(),
                size_bytes: size,
                format: format.as_str().to_owned(),
                created_unix_ms: now_unix_ms(),
                source: source.to_owned(),
                build: Some(build.header.id.to_string()),
            };
            write_record(&self.dir, &meta)
                .map_err(|e| DaemonError::io("writing the template record", e))?;
            self.map.lock().insert(name.to_owned(), meta.clone());
            Ok(meta)
        })();
        let _ = std::fs::remove_file(tmp);
        self.importing.lock().remove(name);
        r
    }

    /// Records the template a sandbox taken over from the object store was forked from, when
    /// this host has none of that name (its base build stays in the store, read lazily). A
    /// template of that name with another base build is a conflict.
    pub fn adopt_from_store(&self, t: &crate::daemon::remote::TemplateManifest) -> Result<()> {
        names::template_name(&t.name)?;
        let mut map = self.map.lock();
        if let Some(have) = map.get(&t.name) {
            if have.build.as_deref() == Some(t.build.as_str()) {
                return Ok(());
            }
            return Err(DaemonError::NoMove(format!(
                "template {:?} here is another image (build {}) than the sandbox's (build {})",
                t.name,
                have.build.as_deref().unwrap_or("none"),
                t.build
            )));
        }
        if self.importing.lock().contains(&t.name) {
            return Err(DaemonError::TemplateExists(t.name.clone()));
        }
        let meta = TemplateMeta {
            name: t.name.clone(),
            size_bytes: t.size_bytes,
            format: t.format.clone(),
            created_unix_ms: now_unix_ms(),
            source: "object store".into(),
            build: Some(t.build.clone()),
        };
        write_record(&self.dir, &meta)
            .map_err(|e| DaemonError::io("writing the template record", e))?;
        map.insert(meta.name.clone(), meta);
        tracing::info!(template = %t.name, build = %t.build, "recorded a template from the object store");
        Ok(())
    }

    /// Gives up a reserved import.
    pub fn abort_import(&self, name: &str) {
        let _ = std::fs::remove_file(self.tmp_path(name));
        self.importing.lock().remove(name);
    }

    /// Removes a template's record; its build goes with the next collection of unused builds.
    /// The caller has removed it from the map under the lock.
    pub fn remove_files(&self, name: &str) {
        let p = self.dir.join(format!("{name}.json"));
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %p.display(), "removing template file: {e}");
            }
        }
        if let Err(e) = sync_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "syncing the template directory: {e}");
        }
    }
}

/// Writes a template's record atomically (temporary file, fsync, rename, fsync of the directory).
fn write_record(dir: &Path, meta: &TemplateMeta) -> std::io::Result<()> {
    let rec = dir.join(format!("{}.json", meta.name));
    let rec_tmp = dir.join(format!(".import-{}.json", meta.name));
    write_durably(
        &rec_tmp,
        &serde_json::to_vec_pretty(meta).unwrap_or_default(),
    )?;
    std::fs::rename(&rec_tmp, &rec)?;
    sync_dir(dir)
}

/// Imports an older daemon's raw image `NAME.img` as a base build and rewrites the record to
/// name it; the image is removed once the record is durable (a crash before leaves the image
/// and an unnamed build, and the next start imports again).
fn migrate_image(dir: &Path, builds: &LocalStore, meta: &mut TemplateMeta) -> Result<()> {
    let img = dir.join(format!("{}.img", meta.name));
    let len = std::fs::metadata(&img)
        .map_err(|e| DaemonError::io(format!("stat {}", img.display()), e))?
        .len();
    if len != meta.size_bytes {
        return Err(DaemonError::io(
            format!(
                "{} is {len} bytes, its record says {}",
                img.display(),
                meta.size_bytes
            ),
            std::io::ErrorKind::InvalidData.into(),
        ));
    }
    let build = builds
        .import_image(&img, BuildOptions::default())
        .map_err(DaemonError::Layer)?;
    meta.build = Some(build.header.id.to_string());
    write_record(dir, meta).map_err(|e| DaemonError::io("writing the template record", e))?;
    if let Err(e) = std::fs::remove_file(&img) {
        tracing::warn!(image = %img.display(), "removing a migrated template image: {e}");
    }
    tracing::info!(template = %meta.name, build = %build.header.id, "imported an older daemon's template image as a build");
    Ok(())
}

/// Writes `bytes` to a new file at `path` and waits until they are on stable storage.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Makes the directory's entries (a rename, a new or removed file) durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
