//! A VM's memory and device state written to a file and read back: QEMU's migration stream over
//! a descriptor handed to it through QMP (`getfd`, then `migrate fd:NAME` on the source, and
//! `migrate-incoming fd:NAME` on a destination started with `-incoming defer`).
//!
//! QEMU 7.2 (Debian 12) has neither `file:` migration URIs nor the `mapped-ram` capability (both
//! QEMU 9+); a stream written to a regular file through `fd:` works on every QEMU since 2.x and
//! needs no shell (`exec:`). The daemon opens the file itself, so QEMU never resolves a path.

use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::error::QemuError;
use super::qmp::Qmp;

/// The name the state file's descriptor gets in QEMU's monitor.
const FD_NAME: &str = "rootfork-state";

/// How often a migration's status is polled.
const POLL: Duration = Duration::from_millis(10);

/// No bandwidth limit for a stream into a local file (QEMU's default is 32 MiB/s, tuned for
/// live migration over a network).
const UNLIMITED_BYTES_PER_SECOND: u64 = 1 << 40;

/// Stops the guest (`stop`) and writes its state into `file` (at its current offset). On
/// success the source QEMU is in `postmigrate`: its guest does not run and its disks are
/// flushed and released, until a `cont` takes them back. On failure the guest is left stopped;
/// the caller decides whether to `cont`.
pub(crate) fn save(qmp: &mut Qmp, file: &File, timeout: Duration) -> Result<(), QemuError> {
    qmp.set_timeout(timeout)?;
    qmp.execute("stop", None)?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": UNLIMITED_BYTES_PER_SECOND })),
    )?;
    qmp.execute_with_fd("getfd", Some(json!({ "fdname": FD_NAME })), file.as_fd())?;
    if let Err(e) = qmp.execute("migrate", Some(json!({ "uri": format!("fd:{FD_NAME}") }))) {
        let _ = qmp.execute("closefd", Some(json!({ "fdname": FD_NAME })));
        return Err(e);
    }
    wait_for_migration(qmp, timeout)
}

/// Feeds `file` to a QEMU started with `-incoming defer` and waits until the state is loaded.
/// The guest stays paused (the process was started with `-S`).
pub(crate) fn load(qmp: &mut Qmp, file: &File, timeout: Duration) -> Result<(), QemuError> {
    qmp.set_timeout(timeout)?;
    qmp.execute_with_fd("getfd", Some(json!({ "fdname": FD_NAME })), file.as_fd())?;
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": format!("fd:{FD_NAME}") })),
    )?;
    wait_for_migration(qmp, timeout)
}

/// Polls `query-migrate` until the migration completed, failed or `timeout` passed (then it is
/// cancelled).
fn wait_for_migration(qmp: &mut Qmp, timeout: Duration) -> Result<(), QemuError> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = qmp.execute("query-migrate", None)?;
        match migration_status(&info) {
            MigrationStatus::Completed => return Ok(()),
            MigrationStatus::Failed(why) => return Err(QemuError::Migration(why)),
            MigrationStatus::Going => {}
        }
        if Instant::now() >= deadline {
            let _ = qmp.execute("migrate_cancel", None);
            return Err(QemuError::Migration(format!(
                "not finished within {timeout:?}"
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// What `query-migrate` says.
#[derive(Debug, PartialEq, Eq)]
enum MigrationStatus {
    /// Not started yet (no status), or under way.
    Going,
    /// Done.
    Completed,
    /// Failed or cancelled, with QEMU's reason.
    Failed(String),
}

fn migration_status(info: &Value) -> MigrationStatus {
    match info.get("status").and_then(Value::as_str) {
        Some("completed") => MigrationStatus::Completed,
        Some(s @ ("failed" | "cancelled" | "cancelling")) => {
            let desc = info
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            MigrationStatus::Failed(format!("{s}: {desc}"))
        }
        _ => MigrationStatus::Going,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_read_from_query_migrate() {
        assert_eq!(migration_status(&json!({})), MigrationStatus::Going);
        assert_eq!(
            migration_status(&json!({ "status": "active" })),
            MigrationStatus::Going
        );
        assert_eq!(
            migration_status(&json!({ "status": "completed", "ram": {} })),
            MigrationStatus::Completed
        );
        assert_eq!(
            migration_status(&json!({ "status": "failed", "error-desc": "disk full" })),
            MigrationStatus::Failed("failed: disk full".into())
        );
        assert_eq!(
            migration_status(&json!({ "status": "cancelled" })),
            MigrationStatus::Failed("cancelled: no reason given".into())
        );
    }
}
