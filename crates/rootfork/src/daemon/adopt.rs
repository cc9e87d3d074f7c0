//! Adoption at start: a socket sandbox that was running when the previous daemon went away
//! (SIGKILL, OOM, a crash, or a SIGTERM for a restart) is served again: its overlay is reopened
//! from the cache file and block state its record names, over the same base (template, or
//! template + its last pause's diff), on the same Unix socket and export name, so a client that
//! reconnects (QEMU's NBD driver with `reconnect-delay`, a libnbd client retrying) carries on.
//!
//! An adoption that fails leaves the sandbox `FAILED`, with a message saying why and which files
//! are kept; nothing is removed at start (a delete removes them, a later start tries again).
//! Each adoption is reported in the log, as an event, in the sandbox's status message and in
//! `rootfork_adoptions_total` (result, reason).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rootfork_block::{ReopenReport, StateCopy, TemplatePath};
use rootfork_provider::{AnyProvider, BaseImage, PausedDisk};

use crate::daemon::core::Core;
use crate::daemon::disk;
use crate::daemon::model::SandboxState;
use crate::daemon::records::ServedDisk;
use crate::daemon::sandbox::Sandbox;
use crate::error::DaemonError;
use crate::events::{EventBus, EventKind};

/// Why a running sandbox was not served again.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The record names a file outside the state directory's `cache/` or `nbd/` (the record was
    /// edited or the directory moved): it is not trusted.
    #[error("its record names {0}, outside this state directory")]
    OutsideStateDir(PathBuf),
    /// The overlay's cache file is gone.
    #[error("its overlay cache {0} is missing")]
    CacheMissing(PathBuf),
    /// The overlay's block state is gone.
    #[error("its overlay block state {0} is missing")]
    StateMissing(PathBuf),
    /// The overlay could not be reopened: `reason` is the label (a damaged block state, one
    /// describing another disk, an I/O error).
    #[error("its overlay could not be reopened: {source}")]
    Reopen {
        /// The `reason` label.
        reason: &'static str,
        /// Why.
        source: DaemonError,
    },
    /// The reopened overlay could not be served.
    #[error("its disk could not be served again: {0}")]
    Serve(DaemonError),
}

impl AdoptError {
    /// The `reason` label of `rootfork_adoptions_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AdoptError::OutsideStateDir(_) => "record_invalid",
            AdoptError::CacheMissing(_) => "cache_missing",
            AdoptError::StateMissing(_) => "state_missing",
            AdoptError::Reopen { reason, .. } => reason,
            AdoptError::Serve(_) => "serve_failed",
        }
    }
}

/// Why a running sandbox of a previous run is not even tried (it comes back at its last pause,
/// or `FAILED`, as `persist.rs` says): the `reason` label of a failed adoption.
pub fn not_adoptable_reason(kind: rootfork_provider::ProviderKind, has_vm: bool) -> &'static str {
    match (kind, has_vm) {
        (rootfork_provider::ProviderKind::Kernel, _) => "kernel_provider",
        (_, true) => "vm_not_adopted",
        _ => "no_served_disk",
    }
}

/// `path` when its parent is `dir` exactly.
fn inside(path: &Path, dir: &Path) -> Result<(), AdoptError> {
    if path.parent() == Some(dir) && path.file_name().is_some() {
        Ok(())
    } else {
        Err(AdoptError::OutsideStateDir(path.to_owned()))
    }
}

/// The number in `STATE/nbd/N.sock`, if it is named so.
fn socket_number(socket: &Path) -> Option<u64> {
    socket
        .file_name()?
        .to_str()?
        .strip_suffix(".sock")?
        .parse()
        .ok()
}

/// When `e` is an overlay error (the reopen failed rather than the serving): the `reason` label.
fn reopen_reason(e: &DaemonError) -> Option<&'static str> {
    use rootfork_block::BlockError;
    use rootfork_provider::ProviderError;
    let DaemonError::Provider(first) = e else {
        return None;
    };
    let mut p: &ProviderError = first;
    loop {
        match p {
            ProviderError::AttachFailed(inner) => p = &**inner,
            ProviderError::Block(b) => {
                return Some(match b {
                    BlockError::StateMissing(_) => "state_missing",
                    BlockError::StateDamaged(_) => "state_damaged",
                    BlockError::StateMismatch { .. } => "state_mismatch",
                    _ => "reopen_failed",
                })
            }
            _ => return None,
        }
    }
}

/// What a reopen found, for the status message.
fn describe(r: &ReopenReport) -> String {
    let copy = match r.copy {
        StateCopy::Live => "the live block state (the previous daemon process ended)",
        StateCopy::Checkpoint => {
            "the last flush's checkpoint (the host restarted: writes after that flush may read old data)"
        }
    };
    format!(
        "reopened from {copy}: {} data and {} zero blocks, opened {} times before",
        r.blocks_data, r.blocks_zero, r.generation
    )
}

/// Serves `sb`'s disk again (its lifecycle lock is free: it is not published yet). `paused` is
/// its last pause's diff, which its overlay lies over.
async fn serve_again(
    core: &Core,
    sb: &Sandbox,
    served: &ServedDisk,
    paused: Option<PausedDisk>,
) -> Result<AnyProvider, AdoptError> {
    inside(&served.cache, &core.dirs.cache)?;
    inside(&served.socket, &core.dirs.nbd)?;
    if let Some(n) = socket_number(&served.socket) {
        // New sandboxes must not be handed this socket's name.
        core.skip_seq_past(n);
    }
    let [cache, state] = disk::overlay_files(&served.cache);
    if !cache.exists() {
        return Err(AdoptError::CacheMissing(cache));
    }
    if !state.exists() {
        return Err(AdoptError::StateMissing(state));
    }
    let template = TemplatePath::new(core.templates.image_path(&sb.template));
    let base = match paused {
        Some(paused) => BaseImage::Resumed { template, paused },
        None => BaseImage::Template(template),
    };
    let provider = disk::adopted_provider(core, sb, base, served);
    disk::bring_up(core, sb, provider)
        .await
        .map_err(|e| match reopen_reason(&e) {
            Some(reason) => AdoptError::Reopen { reason, source: e },
            None => AdoptError::Serve(e),
        })
}

/// Adopts `sb`, a running socket sandbox of a previous run, and reports the outcome. Returns
/// whether it is served again.
pub async fn adopt(
    core: &Core,
    sb: &Arc<Sandbox>,
    served: &ServedDisk,
    paused: Option<PausedDisk>,
) -> bool {
    let mut live = sb
        .live
        .try_lock()
        .expect("nobody else holds the lock of a sandbox not yet published");
    match serve_again(core, sb, served, paused).await {
        Ok(provider) => {
            let found = match &provider {
                AnyProvider::Socket(p) => p.reopen_report().map(|r| describe(&r)),
                _ => None,
            };
            live.provider = Some(provider);
            drop(live);
            let message = format!(
                "adopted after a daemon restart: its disk is served again at the same NBD URI{}",
                found.map(|f| format!(" ({f})")).unwrap_or_default()
            );
            tracing::info!(sandbox = %sb.id, socket = %served.socket.display(), "{message}");
            core.metrics.adoption(None);
            core.set_state(sb, SandboxState::Running, Some(message));
            true
        }
        Err(e) => {
            // Nothing is removed at start: a delete removes the files, a later start tries again.
            live.files.extend(disk::overlay_files(&served.cache));
            drop(live);
            let message = format!(
                "the daemon restarted while this sandbox ran and {e}; its files are kept ({}); delete it to remove them",
                served.cache.display()
            );
            tracing::warn!(sandbox = %sb.id, reason = e.reason(), "not adopted: {message}");
            core.metrics.adoption(Some(e.reason()));
            core.events.emit(
                EventBus::event(EventKind::Error)
                    .sandbox(&sb.id)
                    .message(format!("adoption failed: {e}")),
            );
            sb.update(|s| s.clear_device());
            core.set_state(sb, SandboxState::Failed, Some(message));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_directly_in_their_directory_are_trusted() {
        let dir = Path::new("/s/cache");
        assert!(inside(Path::new("/s/cache/a.1.cache"), dir).is_ok());
        for bad in ["/s/cache/x/../../etc/passwd", "/etc/passwd", "/s/cache"] {
            assert!(
                matches!(
                    inside(Path::new(bad), dir),
                    Err(AdoptError::OutsideStateDir(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn reopen_failures_are_told_apart_from_serving_failures() {
        use rootfork_block::BlockError;
        use rootfork_provider::ProviderError;
        let attach = |e: ProviderError| DaemonError::from(ProviderError::AttachFailed(Arc::new(e)));
        let cases = [
            (BlockError::StateMissing("/s".into()), "state_missing"),
            (BlockError::StateDamaged("bad magic"), "state_damaged"),
            (
                BlockError::StateMismatch {
                    field: rootfork_block::StateField::BlockSize,
                    in_file: 512,
                    requested: 4096,
                },
                "state_mismatch",
            ),
            (BlockError::Shutdown, "reopen_failed"),
        ];
        for (b, reason) in cases {
            assert_eq!(
                reopen_reason(&attach(ProviderError::Block(b))),
                Some(reason)
            );
        }
        assert_eq!(
            reopen_reason(&attach(ProviderError::Exists("/s/nbd/1.sock".into()))),
            None
        );
    }

    #[test]
    fn socket_numbers_are_read_from_the_names_the_daemon_gives() {
        assert_eq!(socket_number(Path::new("/s/nbd/17.sock")), Some(17));
        assert_eq!(socket_number(Path::new("/s/nbd/x.sock")), None);
        assert_eq!(socket_number(Path::new("/s/nbd/17")), None);
    }
}
