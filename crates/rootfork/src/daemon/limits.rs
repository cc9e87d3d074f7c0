//! Resource limits the daemon enforces before it takes on a sandbox: `limits.max_sandboxes`, and
//! file descriptors (the soft `RLIMIT_NOFILE`, raised to the hard limit at start, with headroom
//! for the sandbox being created). A create past either is refused with `RESOURCE_EXHAUSTED`
//! naming what ran out, instead of failing later in an accept, a socketpair or a cache open.
//! NBD connections are bounded per export (`limits.max_connections_per_export`) and over every
//! socket export together (`limits.max_connections`, by default a share of the open-file
//! limit), and a connection is refused while fewer than [`FD_RESERVE`] descriptors are left
//! whatever the count, so clients holding connections cannot use up the descriptors the API
//! needs.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::daemon::core::Core;

/// File descriptors kept free for the daemon itself (API and metrics connections, health
/// probes, imports).
pub const FD_RESERVE: u64 = 64;
/// File descriptors a new sandbox may need (template, cache, listener or kernel sockets, a few
/// client connections).
pub const FDS_PER_SANDBOX: u64 = 32;

/// What ran out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Exhausted {
    /// `limits.max_sandboxes` sandboxes exist.
    #[error("sandboxes: {live} exist, limits.max_sandboxes is {max}")]
    Sandboxes {
        /// Sandboxes not deleted.
        live: usize,
        /// The limit.
        max: usize,
    },
    /// The host's free space, overcommitted by `limits.disk_overcommit`, does not cover what
    /// the sandboxes (this one included) may still write.
    #[error("disk space: sandboxes may still write {committed} bytes and this one up to {needed}, against {free} bytes free in {dir} × limits.disk_overcommit {ratio}")]
    Disk {
        /// Bytes the new sandbox may write (its disk size).
        needed: u64,
        /// Bytes the existing sandboxes may still write.
        committed: u64,
        /// Bytes free where caches are written.
        free: u64,
        /// The overcommit ratio.
        ratio: f64,
        /// The cache directory.
        dir: String,
    },
    /// Too few file descriptors left for another sandbox.
    #[error("file descriptors: {open} of {limit} open (RLIMIT_NOFILE); a sandbox needs about {FDS_PER_SANDBOX} with {FD_RESERVE} kept in reserve")]
    FileDescriptors {
        /// Open now.
        open: u64,
        /// The soft limit.
        limit: u64,
    },
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the limit in force.
pub fn raise_nofile() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::info!(from = soft, to = hard, "raised the open-file limit");
                hard
            }
            Err(e) => {
                tracing::warn!(soft, hard, "cannot raise the open-file limit: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("cannot read the open-file limit: {e}");
            u64::MAX
        }
    }
}

/// The default of `limits.max_connections`: a quarter of the file descriptors left after twice
/// the reserve (a connection holds its socket and a duplicate, and a sandbox a few more), at
/// least 8.
pub fn default_connection_budget() -> usize {
    let (_, limit) = fds();
    let per_connection = 4;
    usize::try_from(limit.saturating_sub(2 * FD_RESERVE) / per_connection)
        .unwrap_or(usize::MAX)
        .max(8)
}

/// File descriptors open in this process and the soft limit.
pub fn fds() -> (u64, u64) {
    rootfork_nbd::fd_usage()
}

/// `Ok` when one more sandbox fits next to `live` existing ones (call under the sandbox map's
/// lock, so the count is exact).
pub fn admit_count(core: &Core, live: usize) -> Result<(), Exhausted> {
    let max = core.config.max_sandboxes;
    if live >= max {
        return Err(Exhausted::Sandboxes { live, max });
    }
    Ok(())
}

/// `Ok` when the file descriptors left leave room for one more sandbox.
pub fn admit_fds() -> Result<(), Exhausted> {
    let (open, limit) = fds();
    if open.saturating_add(FDS_PER_SANDBOX + FD_RESERVE) > limit {
        return Err(Exhausted::FileDescriptors { open, limit });
    }
    Ok(())
}

/// Bytes the live sandboxes may still write to this host's disk: for each, its disk size less
/// what it has written already (its overlay's data while served, its diff while paused; both
/// are already taken from the free space).
pub fn disk_committed(core: &Core) -> u64 {
    let all: Vec<_> = core
        .sandboxes
        .read()
        .values()
        .filter(|s| s.is_live())
        .cloned()
        .collect();
    let mut committed = 0u64;
    for sb in all {
        let size = sb.quota.unwrap_or(sb.disk_size).min(sb.disk_size);
        let status = sb.status();
        let written = match sb.live.try_lock() {
            Ok(live) => live
                .provider
                .as_ref()
                .and_then(crate::daemon::sandbox::overlay_stats)
                .map_or(status.paused_diff_bytes, |st| st.blocks_data * 4096),
            // Busy in an operation: count it as if it had written nothing yet.
            Err(_) => 0,
        };
        committed = committed.saturating_add(size.saturating_sub(written));
    }
    committed
}

/// Bytes free to the daemon where overlay caches are written.
pub fn disk_free(core: &Core) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(&core.dirs.cache)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// `Ok` when a sandbox that may write `needed` bytes fits: what every sandbox may still write
/// stays within the free space times `limits.disk_overcommit`.
pub fn admit_disk(core: &Core, needed: u64) -> Result<(), Exhausted> {
    let Ok(free) = disk_free(core) else {
        // No statvfs (a vanished directory): the create fails on its own soon enough.
        return Ok(());
    };
    let ratio = core.config.disk_overcommit;
    let committed = disk_committed(core);
    if committed.saturating_add(needed) as f64 > free as f64 * ratio {
        return Err(Exhausted::Disk {
            needed,
            committed,
            free,
            ratio,
            dir: core.dirs.cache.display().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_are_counted_and_the_limit_read() {
        let (open, limit) = fds();
        assert!(open >= 3, "{open}");
        assert!(limit >= open, "{limit} < {open}");
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(fds().0 > open.saturating_sub(1));
        drop(f);
    }
}
