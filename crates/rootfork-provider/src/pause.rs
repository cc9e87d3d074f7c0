//! What a pause leaves behind, and the base a resumed sandbox is stacked on.
//!
//! A pause exports the overlay's dirty blocks as a [`DiffMap`] plus a packed data file. A resume
//! opens the template read-only, lays the diff over it as a read-only [`DiffLayer`], and gives the
//! sandbox a fresh overlay on top of that, so the template and the paused diff both stay
//! untouched and a paused sandbox can be resumed more than once. The daemon keeps templates and
//! pauses as builds of the layered format instead ([`BaseImage::Build`]): a sandbox is stacked
//! on the top build of its chain, read through a [`LayeredTemplate`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rootfork_block::layered::{BuildId, BuildResolver, LayeredTemplate};
use rootfork_block::{BlockDevice, DiffLayer, DiffMap, Grown, TemplateFile, TemplatePath};

use crate::error::Result;

/// A paused sandbox's disk, relative to its template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PausedDisk {
    /// The runs that differ from the template, in ascending offset order.
    pub map: DiffMap,
    /// The packed data file the map's data runs point into.
    pub data: PathBuf,
}

impl PausedDisk {
    /// The data file.
    pub fn data_path(&self) -> &Path {
        &self.data
    }
}

/// What a sandbox's overlay is stacked on.
#[derive(Debug, Clone)]
pub enum BaseImage {
    /// A template, for a fresh sandbox.
    Template(TemplatePath),
    /// A template plus a paused sandbox's diff, for a resume.
    Resumed {
        /// The template the paused sandbox was forked from.
        template: TemplatePath,
        /// Its exported diff.
        paused: PausedDisk,
    },
    /// A build of the layered format and its ancestors: a template's base build, or a paused
    /// sandbox's layer over it.
    Build {
        /// Where the chain's builds are found.
        builds: BuildSource,
        /// The top build.
        top: BuildId,
    },
}

/// A shared [`BuildResolver`] (a local store, or one that shares open data files between
/// sandboxes).
#[derive(Clone)]
pub struct BuildSource(pub Arc<dyn BuildResolver + Send + Sync>);

impl std::fmt::Debug for BuildSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BuildSource")
    }
}

impl BaseImage {
    /// The template file at the bottom (`None` for a build, whose bottom is a base build).
    pub fn template(&self) -> Option<&TemplatePath> {
        match self {
            BaseImage::Template(t) | BaseImage::Resumed { template: t, .. } => Some(t),
            BaseImage::Build { .. } => None,
        }
    }

    /// Opens the base read-only (the template with `O_RDONLY`; the diff as a read-only layer).
    /// A diff of a disk larger than its template (`OverlayOptions::disk_size`) lies over the
    /// template [`Grown`] to the diff's size.
    pub fn open(&self) -> Result<Arc<dyn BlockDevice>> {
        let template = match self {
            BaseImage::Template(t) | BaseImage::Resumed { template: t, .. } => t,
            BaseImage::Build { builds, top } => {
                return Ok(Arc::new(LayeredTemplate::open(builds.0.as_ref(), top)?))
            }
        };
        let template: Arc<dyn BlockDevice> = Arc::new(TemplateFile::open(template)?);
        match self {
            BaseImage::Template(_) | BaseImage::Build { .. } => Ok(template),
            BaseImage::Resumed { paused, .. } => {
                let below: Arc<dyn BlockDevice> = if paused.map.size > template.size() {
                    Arc::new(Grown::new(template, paused.map.size)?)
                } else {
                    template
                };
                Ok(Arc::new(DiffLayer::open(
                    below,
                    paused.map.clone(),
                    &paused.data,
                )?))
            }
        }
    }
}
