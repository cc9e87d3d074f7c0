//! Templates: the store of read-only base builds (`store.rs`) and the operations on it (import, list,
//! delete), which keep a template's sandbox count exact against concurrent creates.

mod store;

pub use store::{detect_format, ImportPolicy, TemplateMeta, TemplateStore, TEMPLATE_ALIGN};

use std::path::Path;

use crate::daemon::core::Core;
use crate::daemon::model::{Caller, TemplateInfo};
use crate::error::{DaemonError, Result};
use crate::events::{EventBus, EventKind};
use crate::names;

/// Every template, with how many sandboxes use each.
pub fn list(core: &Core) -> Vec<TemplateInfo> {
    let refs = core.template_refs();
    core.templates
        .list()
        .iter()
        .map(|m| {
            core.templates
                .info(m, refs.get(&m.name).copied().unwrap_or(0))
        })
        .collect()
}

/// Copies `source` into the store as `name` (blocking), calling `progress(done, total)`. A
/// remote caller may import only from `templates.import_dirs`; block devices only when
/// `templates.allow_block_devices` is on.
pub fn import(
    core: &Core,
    name: &str,
    source: &Path,
    caller: Caller,
    mut progress: impl FnMut(u64, u64),
) -> Result<TemplateInfo> {
    let store = &core.templates;
    let policy = ImportPolicy {
        allow_block_devices: core.config.import_block_devices,
        allowed_dirs: (caller == Caller::Remote).then_some(&core.config.tcp_import_dirs[..]),
    };
    let (mut file, size) = store.begin_import(name, source, &policy)?;
    // The new build is not collected before its record names it.
    let _pin = core.builds.pin_blocking();
    let r = detect_format(&mut file)
        .map_err(|e| DaemonError::io("reading the source", e))
        .and_then(|format| {
            let tmp = store.copy_in(name, file, size, |d| progress(d, size))?;
            store.finish_import(name, &tmp, format, &source.display().to_string())
        });
    let meta = match r {
        Ok(meta) => meta,
        Err(e) => {
            store.abort_import(name);
            return Err(e);
        }
    };
    tracing::info!(template = name, size, format = %meta.format, "imported a template");
    core.events.emit(
        EventBus::event(EventKind::Template)
            .template(name)
            .message(format!("imported from {}", source.display())),
    );
    Ok(store.info(&meta, 0))
}

/// Deletes a template no sandbox uses. `Ok(false)` when there was none.
pub fn delete(core: &Core, name: &str) -> Result<bool> {
    names::template_name(name)?;
    let mut map = core.templates.map.lock();
    if !map.contains_key(name) {
        return Ok(false);
    }
    let users = core.template_refs().get(name).copied().unwrap_or(0);
    if users > 0 {
        return Err(DaemonError::TemplateInUse {
            name: name.to_owned(),
            users,
        });
    }
    map.remove(name);
    drop(map);
    core.templates.remove_files(name);
    core.builds.collect_soon();
    tracing::info!(template = name, "deleted a template");
    core.events.emit(
        EventBus::event(EventKind::Template)
            .template(name)
            .message("deleted"),
    );
    Ok(true)
}
