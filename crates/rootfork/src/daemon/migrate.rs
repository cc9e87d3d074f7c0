//! Migration of the sandbox records of daemons before the build store (state format 3 and
//! older): a paused sandbox's disk was a diff file in `paused/` relative to its template image,
//! named by the record's `paused`. At start each such diff becomes a layer over its template's
//! base build (which the template store migrated first), the record is rewritten to name the
//! layer, and the diff file, named by no record any more, goes with the orphans. Forks that
//! share one diff share one layer.
//!
//! Crash-safe in any order: a crash before a record is rewritten leaves it naming its diff (the
//! next start migrates it again; the layer written the first time is unused and collected); a
//! record that cannot be rewritten keeps its diff and is not restored (the log says why).

use std::collections::BTreeMap;
use std::path::PathBuf;

use rootfork_block::layered::BuildId;

use crate::daemon::core::Core;
use crate::daemon::records::SandboxRecord;

/// Turns every record's paused diff into a layer (records without one are left as they are).
pub fn diffs_to_layers(core: &Core, records: &mut [SandboxRecord]) {
    let mut done: BTreeMap<PathBuf, BuildId> = BTreeMap::new();
    for rec in records.iter_mut() {
        let Some(diff) = rec.paused.clone() else {
            continue;
        };
        let layer = match done.get(&diff.data) {
            Some(id) => *id,
            None => {
                let Some(base) = core.templates.build(&rec.template) else {
                    tracing::warn!(sandbox = %rec.id, template = %rec.template, "cannot migrate a paused diff: its template is missing");
                    continue;
                };
                let paused = diff.to_paused();
                match core.builds.store().create_layer_from_export_over(
                    core.builds.resolver(),
                    &base,
                    &paused.map,
                    &paused.data,
                ) {
                    Ok(map) => {
                        done.insert(diff.data.clone(), map.header.id);
                        map.header.id
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %rec.id, diff = %diff.data.display(), "cannot migrate a paused diff to a layer: {e}");
                        continue;
                    }
                }
            }
        };
        let mut migrated = rec.clone();
        migrated.paused = None;
        migrated.layer = Some(layer.to_string());
        match core.records.write(&migrated) {
            Ok(()) => {
                tracing::info!(sandbox = %rec.id, build = %layer, "migrated a paused diff to a layer");
                *rec = migrated;
            }
            Err(e) => {
                tracing::warn!(sandbox = %rec.id, "cannot rewrite the record of a migrated diff: {e}")
            }
        }
    }
}
