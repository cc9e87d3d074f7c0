//! Flattening: a chain of layers rewritten as one layer over an ancestor, so that a sandbox
//! paused many times reads through a bounded number of builds (each build a template reads is
//! one open data file, and its lineage grows with every pause).
//!
//! The flattened layer holds every byte the layers above the ancestor decided (their data and
//! zero runs, read through the layered template itself), so it serves exactly what the top
//! served; the builds it replaces stay until nothing references them.

use std::io;

use super::error::{LayerError, LayerResult};
use super::format::BuildMap;
use super::id::BuildId;
use super::local::{LayerDiff, LocalStore};
use super::mapping::{DiffSource, RunKind};
use super::source::BuildData;
use super::template::{BuildResolver, LayeredTemplate};
use crate::device::BlockDevice;

/// A layered template read as a diff's data: data offsets are device offsets.
struct DeviceData<'a>(&'a LayeredTemplate);

impl BuildData for DeviceData<'_> {
    fn len(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset).map_err(|e| match e {
            crate::error::BlockError::Io { source, .. } => source,
            other => io::Error::other(other.to_string()),
        })
    }
}

impl LocalStore {
    /// Writes the template whose top build is `top` as a single layer over `onto`, one of its
    /// ancestors (e.g. the template's base build): the new layer's generation is `onto`'s + 1.
    pub fn flatten(&self, top: &BuildId, onto: &BuildId) -> LayerResult<BuildMap> {
        self.flatten_over(self, top, onto)
    }

    /// [`LocalStore::flatten`] of a chain found through `builds` (which may hold some of it
    /// elsewhere); the new layer is written here.
    pub fn flatten_over(
        &self,
        builds: &dyn BuildResolver,
        top: &BuildId,
        onto: &BuildId,
    ) -> LayerResult<BuildMap> {
        let tpl = LayeredTemplate::open(builds, top)?;
        let lineage = &tpl.build_map().lineage;
        let Some(k) = lineage.iter().position(|b| b == onto) else {
            return Err(LayerError::InvalidDiff(format!(
                "build {onto} is not an ancestor of {top}"
            )));
        };
        // Every run a build above `onto` decided; the rest reads the same through `onto`.
        let runs: Vec<(u64, u64, DiffSource)> = tpl
            .mapping()
            .runs()
            .iter()
            .filter_map(|r| match r.kind {
                RunKind::Zero => Some((r.offset, r.len, DiffSource::Zero)),
                RunKind::Data { build, .. } if (build as usize) < k => {
                    Some((r.offset, r.len, DiffSource::Data(r.offset)))
                }
                RunKind::Data { .. } => None,
            })
            .collect();
        self.create_layer_over(
            builds,
            onto,
            &LayerDiff {
                size: tpl.size(),
                runs,
                data: &DeviceData(&tpl),
            },
        )
    }
}
