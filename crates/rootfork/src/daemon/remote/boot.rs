//! Fast cold starts from the object store: a template's boot trace (which chunks its first
//! boot read, in order; `rootfork_store::BootTrace`, stored beside its base build).
//!
//! A sandbox whose template's base build this host does not hold (it came from the store with a
//! sandbox taken over from another host) reads that build lazily through the chunk cache. At its
//! create, the template's boot trace is fetched: when there is one, its chunks are prefetched in
//! parallel in the background while the VM starts reading (sharing each fetch with the VM's own
//! reads); when there is none, this sandbox's reads of the store's builds are recorded
//! ([`Builds::base_recording`](crate::daemon::builds::Builds::base_recording)) and, when it is
//! first paused or deleted (its boot is over by then), published as the template's trace, so the
//! next host's cold start prefetches them. A sandbox taken over from the store prefetches its
//! template's trace too. A missing or damaged trace only costs the prefetch.

use rootfork_block::layered::BuildId;
use rootfork_provider::BaseImage;
use rootfork_store::AccessLog;

use crate::daemon::core::Core;

/// A boot being recorded: the template's base build and the reads so far.
#[derive(Debug, Clone)]
pub struct BootRecording {
    /// The template's base build, whose trace it becomes.
    pub template: BuildId,
    /// The reads.
    pub log: AccessLog,
}

/// What a new sandbox over template base build `template` is stacked on: with the build in the
/// object store only, its boot trace is prefetched, or, without one, the reads are recorded.
pub async fn base_for_create(core: &Core, template: BuildId) -> (BaseImage, Option<BootRecording>) {
    if core.remote.is_none() || core.builds.exists(&template) || prefetch(core, template).await {
        return (core.builds.base(template), None);
    }
    let (base, log) = core.builds.base_recording(template);
    tracing::info!(build = %template, "no boot trace in the object store: recording this sandbox's reads");
    (base, Some(BootRecording { template, log }))
}

/// Starts a background prefetch of template base build `template`'s boot trace; `false` when
/// the store has none (or it cannot be read).
pub async fn prefetch(core: &Core, template: BuildId) -> bool {
    let Some(remote) = &core.remote else {
        return false;
    };
    let store = remote.store.clone();
    let trace = tokio::task::spawn_blocking(move || store.boot_trace(&template)).await;
    match trace {
        Ok(Ok(trace)) => {
            tracing::info!(build = %template, chunks = trace.chunks.len(), bytes = trace.bytes(), "prefetching the template's boot trace");
            // Dropping the handle lets it finish in the background.
            drop(remote.store.prefetch(&trace));
            true
        }
        Ok(Err(e)) => {
            tracing::debug!(build = %template, "no usable boot trace: {e}");
            false
        }
        Err(e) => {
            tracing::warn!(build = %template, "reading the boot trace: {e}");
            false
        }
    }
}

/// Publishes a recorded boot as its template's trace (unless it read nothing from the store).
pub async fn publish(core: &Core, rec: Option<BootRecording>) {
    let (Some(remote), Some(rec)) = (&core.remote, rec) else {
        return;
    };
    let trace = rec.log.trace();
    if trace.chunks.is_empty() {
        return;
    }
    let (store, template) = (remote.store.clone(), rec.template);
    let (chunks, bytes) = (trace.chunks.len(), trace.bytes());
    match tokio::task::spawn_blocking(move || store.put_boot_trace(&template, &trace)).await {
        Ok(Ok(())) => {
            tracing::info!(build = %template, chunks, bytes, "published the template's boot trace")
        }
        Ok(Err(e)) => tracing::warn!(build = %template, "publishing the boot trace: {e}"),
        Err(e) => tracing::warn!(build = %template, "publishing the boot trace: {e}"),
    }
}
