//! Pause and resume: an overlay's exported diff becomes a new layer over its template.
//!
//! Pausing a sandbox freezes its overlay (no mutation can start), flushes it (writeback errors
//! surface before anything is exported), exports its data and zero runs in ascending offset order
//! and writes them as a layer over the template the overlay sat on. Resuming opens that layer as
//! a [`LayeredTemplate`](super::LayeredTemplate) and puts a fresh overlay on top.

use std::path::Path;

use super::error::{LayerError, LayerResult};
use super::format::BuildMap;
use super::id::BuildId;
use super::local::{LayerDiff, LocalStore};
use super::mapping::DiffSource;
use super::source::FileData;
use super::template::BuildResolver;
use crate::device::BlockDevice;
use crate::diff::{DiffKind, DiffMap};
use crate::overlay::Overlay;

/// The runs of an exported diff in the layer writer's terms.
fn diff_runs(diff: &DiffMap) -> Vec<(u64, u64, DiffSource)> {
    diff.runs
        .iter()
        .map(|r| {
            let src = match r.kind {
                DiffKind::Data { data_offset } => DiffSource::Data(data_offset),
                DiffKind::Zero => DiffSource::Zero,
            };
            (r.offset, r.len, src)
        })
        .collect()
}

impl LocalStore {
    /// Writes an overlay export (`diff` and its packed data file `data`) as a layer over
    /// `parent`.
    pub fn create_layer_from_export(
        &self,
        parent: &BuildId,
        diff: &DiffMap,
        data: &Path,
    ) -> LayerResult<BuildMap> {
        self.create_layer_from_export_over(self, parent, diff, data)
    }

    /// [`LocalStore::create_layer_from_export`] over a parent found through `builds`.
    pub fn create_layer_from_export_over(
        &self,
        builds: &dyn BuildResolver,
        parent: &BuildId,
        diff: &DiffMap,
        data: &Path,
    ) -> LayerResult<BuildMap> {
        let data = FileData::open(data)
            .map_err(|e| LayerError::io(format!("opening diff data {}", data.display()), e))?;
        self.create_layer_over(
            builds,
            parent,
            &LayerDiff {
                size: diff.size,
                runs: diff_runs(diff),
                data: &data,
            },
        )
    }

    /// Pauses `overlay`, which sits on the template whose top build is `parent`: freezes it,
    /// flushes it, exports its diff into a scratch file in the store and writes the layer.
    /// The overlay stays frozen (the caller drops it once the sandbox is gone).
    pub fn pause_overlay(&self, parent: &BuildId, overlay: &Overlay) -> LayerResult<BuildMap> {
        overlay.freeze();
        overlay
            .flush()
            .map_err(|e| LayerError::io("flushing the overlay before export", to_io(e)))?;
        std::fs::create_dir_all(self.root())
            .map_err(|e| LayerError::io("creating the store directory", e))?;
        let scratch = self.root().join(format!(".export-{}", BuildId::random()));
        let diff = overlay
            .export_diff(&scratch)
            .map_err(|e| LayerError::io("exporting the overlay diff", to_io(e)));
        let result = diff.and_then(|d| self.create_layer_from_export(parent, &d, &scratch));
        let _ = std::fs::remove_file(&scratch);
        result
    }
}

fn to_io(e: crate::error::BlockError) -> std::io::Error {
    match e {
        crate::error::BlockError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::layered::BuildOptions;
    use crate::overlay::OverlayOptions;

    const SIZE: u64 = 96 * 4096 + 1024;

    #[derive(Debug, Clone)]
    enum Op {
        Write { offset: u64, len: u64, byte: u8 },
        Zero { offset: u64, len: u64, punch: bool },
        Trim { offset: u64, len: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(40_000)));
        prop_oneof![
            4 => (range.clone(), any::<u8>()).prop_map(|((offset, len), byte)| Op::Write { offset, len, byte }),
            1 => (range.clone(), any::<bool>()).prop_map(|((offset, len), punch)| Op::Zero { offset, len, punch }),
            1 => range.prop_map(|(offset, len)| Op::Trim { offset, len }),
        ]
    }

    fn check(dev: &dyn BlockDevice, model: &[u8]) -> Result<(), TestCaseError> {
        let mut all = vec![0u8; model.len()];
        dev.read_at(&mut all, 0)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(all == model, "device differs from model");
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// Pause/resume chains of 5..8 generations read back exactly like a byte model: through
        /// the overlay before each pause, and through the layered template after it.
        #[test]
        fn pause_resume_chain_matches_model(
            generations in proptest::collection::vec(
                (proptest::collection::vec(op(), 1..12), prop_oneof![Just(4096u32), Just(16384u32)]),
                5..8,
            ),
            seed in any::<u8>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut model: Vec<u8> = (0..SIZE).map(|i| if (i / 4096) % 4 == 0 { 0 } else { (i as u8).wrapping_mul(31) ^ seed }).collect();
            let image = dir.path().join("image");
            std::fs::write(&image, &model).unwrap();
            let store = LocalStore::new(dir.path().join("store"));
            let opts = BuildOptions { block_size: 4096, chunk_size: 8192 };
            let mut top = store.import_image(&image, opts).unwrap().header.id;
            for (gen, (ops, overlay_bs)) in generations.into_iter().enumerate() {
                let tpl: Arc<dyn BlockDevice> = Arc::new(store.open(&top).unwrap());
                check(tpl.as_ref(), &model)?;
                let cache = dir.path().join(format!("cache-{gen}"));
                let ov = Overlay::create(tpl, &cache, OverlayOptions { block_size: overlay_bs, ..Default::default() }).unwrap();
                for op in ops {
                    match op {
                        Op::Write { offset, len, byte } => {
                            let buf: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                            ov.write_at(&buf, offset).unwrap();
                            model[offset as usize..(offset + len) as usize].copy_from_slice(&buf);
                        }
                        Op::Zero { offset, len, punch } => {
                            ov.write_zeroes(offset, len, punch).unwrap();
                            model[offset as usize..(offset + len) as usize].fill(0);
                        }
                        Op::Trim { offset, len } => {
                            ov.trim(offset, len).unwrap();
                            model[offset as usize..(offset + len) as usize].fill(0);
                        }
                    }
                }
                check(&ov, &model)?;
                let layer = store.pause_overlay(&top, &ov).unwrap();
                prop_assert_eq!(layer.header.generation, gen as u64 + 1);
                prop_assert_eq!(layer.header.parent, Some(top));
                top = layer.header.id;
            }
            check(&store.open(&top).unwrap(), &model)?;
        }
    }
}
