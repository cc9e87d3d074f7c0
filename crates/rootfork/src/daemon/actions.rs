//! The daemon's operations, one short method each: validate what is cheap to validate, hand off
//! to the module that owns the work, count a failure in the metrics. The gRPC service calls
//! these with the daemon's own types (see `spec.rs` and `model.rs`), never with wire messages.
//!
//! | operation | owner |
//! |---|---|
//! | templates: import, list, delete | `templates/` |
//! | sandboxes: create, delete | `lifecycle.rs` (disk: `disk.rs`, VM: `vm.rs`) |
//! | pause, resume | `pause.rs` (layers: `builds.rs`) |
//! | fork | `fork.rs` (shared layers: `shared.rs`) |
//! | get, list | `sandbox.rs` (the record's view) |
//! | devices | `kernel.rs` |
//! | metrics text | `stats.rs` |

use std::path::Path;

use crate::daemon::core::Core;
use crate::daemon::model::{Caller, DeviceList, SandboxInfo, TemplateInfo};
use crate::daemon::spec::SandboxSpec;
use crate::daemon::{fork, lifecycle, pause, stats, templates};
use crate::error::Result;
use crate::names;

impl Core {
    /// Templates, with how many sandboxes use each.
    pub fn list_templates(&self) -> Vec<TemplateInfo> {
        templates::list(self)
    }

    /// Imports `source` as `name` for `caller`, calling `progress(done, total)` (blocking; run
    /// it off the async threads).
    pub fn import_template_blocking(
        &self,
        name: &str,
        source: &Path,
        caller: Caller,
        progress: impl FnMut(u64, u64),
    ) -> Result<TemplateInfo> {
        self.recorded(
            "import_template",
            templates::import(self, name, source, caller, progress),
        )
    }

    /// Deletes a template no sandbox uses. `Ok(false)` when there was none.
    pub fn delete_template(&self, name: &str) -> Result<bool> {
        self.recorded("delete_template", templates::delete(self, name))
    }

    /// Creates a sandbox and waits until its disk is served (and its VM booted).
    pub async fn create_sandbox(&self, spec: SandboxSpec) -> Result<SandboxInfo> {
        let r = lifecycle::create(self, spec).await;
        self.recorded("create_sandbox", r)
    }

    /// A sandbox by id (deleted ones too, for a while).
    pub fn get_sandbox(&self, id: &str) -> Result<SandboxInfo> {
        let r = names::sandbox_id(id)
            .map_err(Into::into)
            .and_then(|()| self.find(id))
            .map(|sb| sb.info());
        self.recorded("get_sandbox", r)
    }

    /// The sandboxes the object store holds (`--store`), with their holders.
    pub async fn list_store_sandboxes(&self) -> Result<Vec<SandboxInfo>> {
        let r = crate::daemon::remote::list_in_store(self).await;
        self.recorded("list_sandboxes", r)
    }

    /// Every sandbox (deleted ones only if asked).
    pub fn list_sandboxes(&self, include_deleted: bool) -> Vec<SandboxInfo> {
        let all: Vec<_> = self.sandboxes.read().values().cloned().collect();
        all.iter()
            .filter(|s| include_deleted || s.is_live())
            .map(|s| s.info())
            .collect()
    }

    /// Pauses a running sandbox: flush, freeze, export its changes, release the device.
    pub async fn pause_sandbox(&self, id: &str) -> Result<SandboxInfo> {
        let r = pause::pause(self, id).await;
        self.recorded("pause_sandbox", r)
    }

    /// Resumes a paused sandbox on a fresh overlay over its template and paused changes.
    pub async fn resume_sandbox(&self, id: &str, wait: bool) -> Result<SandboxInfo> {
        let r = pause::resume(self, id, wait).await;
        self.recorded("resume_sandbox", r)
    }

    /// Starts `count` forks of the paused sandbox `id` (named `PREFIX-0`.. with `prefix`, by
    /// default `ID-fork`), each on its own overlay over the parent's layers and with its own VM
    /// restored from the parent's snapshot. All or nothing.
    pub async fn fork_sandbox(
        &self,
        id: &str,
        count: u32,
        prefix: Option<&str>,
    ) -> Result<Vec<SandboxInfo>> {
        let r = fork::fork(self, id, count, prefix).await;
        self.recorded("fork_sandbox", r)
    }

    /// Deletes a sandbox and everything it holds. `Ok(false)` when there was nothing to delete.
    pub async fn delete_sandbox(&self, id: &str) -> Result<bool> {
        let r = lifecycle::delete(self, id).await;
        self.recorded("delete_sandbox", r)
    }

    /// Deletes every sandbox (shutdown).
    pub async fn delete_all(&self) {
        lifecycle::delete_all(self).await
    }

    /// The kernel's `/dev/nbdN` slots (blocking: reads sysfs).
    pub fn list_devices(&self) -> DeviceList {
        self.kernel.list()
    }

    /// The Prometheus metrics text.
    pub fn render_metrics(&self) -> String {
        stats::render(self)
    }
}
