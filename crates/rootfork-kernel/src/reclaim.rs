//! Reclaim on start: cleans up after rootfork processes on this host that died while holding
//! devices.
//!
//! A device is reclaimed only when both hold: its backend identifier names *this host's*
//! rootfork (`rootfork:<this host id>:…`), and nobody holds its slot's lock file. The lock is the
//! authority on whether the owner lives — the kernel drops a `flock` when its holder dies, and
//! unlike a pid it cannot be reused by an unrelated process. As a second guard, a device whose
//! identifier names a live process running this same program is left alone even if its lock is
//! free (that owner must be using another lock directory). Devices of other software (any other
//! backend identifier, or none) are never touched. Leaked cache files named in a dead claim's
//! lock record are removed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::identity::BackendId;
use crate::netlink::{NbdControl, NlError};
use crate::pool::{now_ms, DevicePool, LockRecord, PoolError, PoolEvent, RecordState};

/// What reclaim did for one slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reclaimed {
    /// The slot.
    pub index: u32,
    /// The backend identifier of the device it disconnected, if it disconnected one.
    pub disconnected: Option<String>,
    /// The cache file it removed.
    pub cache_removed: Option<PathBuf>,
    /// What went wrong, if the slot could not be fully cleaned (it stays out of the pool until
    /// it is quiescent).
    pub error: Option<String>,
}

/// Reclaims this host's dead rootfork devices and claims; waits up to `quiesce_wait` per device
/// for the kernel's teardown.
pub fn reclaim(
    pool: &DevicePool,
    control: &dyn NbdControl,
    quiesce_wait: Duration,
) -> Result<Vec<Reclaimed>, PoolError> {
    let host = pool.config().host_id.clone();
    let mut out = Vec::new();
    for index in pool.sysfs().pool_indices()? {
        if pool.shared.local.lock().contains_key(&index) {
            continue;
        }
        let Some(mut lock) = pool.locks().try_lock(index)? else {
            continue; // a live owner
        };
        let st = match pool.sysfs().slot(index) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        let rec = lock.read();
        let ours = st
            .backend
            .as_deref()
            .and_then(BackendId::parse)
            .filter(|b| b.host == host);
        let dead_claim = rec.as_ref().filter(|r| r.state == RecordState::Claimed);
        if let Some(b) = ours.as_ref().filter(|b| same_program_alive(b.pid)) {
            // The owner lives but does not hold the lock: it uses another lock directory. Its
            // device is not ours to take.
            tracing::warn!(
                index,
                pid = b.pid,
                "nbd slot owned by a live rootfork that does not hold its lock (another lock directory?); left alone"
            );
            continue;
        }
        let leaked_device = ours.is_some() && st.check_quiescent().is_err();
        if !leaked_device && dead_claim.is_none() {
            continue;
        }
        let mut row = Reclaimed {
            index,
            disconnected: None,
            cache_removed: None,
            error: None,
        };
        if leaked_device {
            let backend = st.backend.clone();
            tracing::info!(index, backend = ?backend, "reclaiming a dead rootfork device");
            match control.disconnect(index) {
                // EINVAL: the kernel had already torn it down.
                Ok(())
                | Err(NlError::Refused {
                    errno: libc::EINVAL,
                }) => {}
                Err(e) => row.error = Some(format!("disconnect: {}", crate::netlink::chain(&e))),
            }
            match wait_quiescent(pool, index, quiesce_wait) {
                Ok(()) => row.disconnected = backend,
                Err(why) => {
                    row.error.get_or_insert(why);
                }
            }
        }
        if let Some(cache) = dead_claim.and_then(|r| r.cache.clone()) {
            match std::fs::remove_file(&cache) {
                Ok(()) => row.cache_removed = Some(cache),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    row.error
                        .get_or_insert(format!("removing {}: {e}", cache.display()));
                }
            }
        }
        if row.error.is_none() {
            let _ = lock.write(&LockRecord {
                state: RecordState::Released,
                pid: std::process::id(),
                sandbox: rec.map(|r| r.sandbox).unwrap_or_default(),
                since_ms: now_ms(),
                cache: None,
            });
        }
        pool.record_reclaimed();
        pool.emit(PoolEvent::Reclaimed {
            index,
            backend: row.disconnected.clone(),
        });
        out.push(row);
    }
    Ok(out)
}

/// Whether `pid` is a live process running the same program as this one.
fn same_program_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let comm = |p: &str| std::fs::read_to_string(format!("/proc/{p}/comm")).ok();
    match (comm(&pid.to_string()), comm("self")) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => false,
    }
}

fn wait_quiescent(pool: &DevicePool, index: u32, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        match pool.sysfs().slot(index) {
            Ok(s) => match s.check_quiescent() {
                Ok(()) => return Ok(()),
                Err(why) if Instant::now() >= deadline => {
                    return Err(format!(
                        "not quiescent after {} ms: {why}",
                        limit.as_millis()
                    ))
                }
                Err(_) => {}
            },
            Err(e) => return Err(format!("sysfs: {e}")),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fs;

    use parking_lot::Mutex;

    use super::*;
    use crate::netlink::{ConnectRequest, DeviceStatus, ReconfigureRequest};
    use crate::pool::PoolConfig;
    use crate::sysfs::fake;

    struct Kernel {
        sys: PathBuf,
        disconnected: Mutex<BTreeSet<u32>>,
    }

    impl NbdControl for Kernel {
        fn connect(&self, _: &ConnectRequest) -> Result<u32, NlError> {
            unreachable!("reclaim never connects")
        }
        fn disconnect(&self, index: u32) -> Result<(), NlError> {
            self.disconnected.lock().insert(index);
            fake::disconnect(&self.sys, index);
            Ok(())
        }
        fn reconfigure(&self, _: &ReconfigureRequest) -> Result<(), NlError> {
            unreachable!()
        }
        fn status(&self, _: Option<u32>) -> Result<Vec<DeviceStatus>, NlError> {
            Ok(vec![])
        }
    }

    #[test]
    fn reclaims_only_this_hosts_dead_devices() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        fake::tree(&sys, 6);
        let pool = DevicePool::new(PoolConfig {
            sysfs_root: sys.clone(),
            lock_dir: dir.path().join("locks"),
            cooldown: Duration::ZERO,
            host_id: "me".into(),
        });
        // 0: ours, owner dead (nobody holds the lock), with a leaked cache.
        let cache = dir.path().join("dead.cache");
        fs::write(&cache, b"x").unwrap();
        {
            let mut l = pool.locks().try_lock(0).unwrap().unwrap();
            l.write(&LockRecord {
                state: RecordState::Claimed,
                pid: 999_999,
                sandbox: "dead".into(),
                since_ms: 1,
                cache: Some(cache.clone()),
            })
            .unwrap();
        }
        fake::connect(&sys, 0, 999_999, 4096, Some("rootfork:me:999999:dead"));
        // 1: ours, owner alive (another process holds the lock: a separate file description).
        let _live = pool.locks().try_lock(1).unwrap().unwrap();
        fake::connect(&sys, 1, 1, 4096, Some("rootfork:me:1:live"));
        // 5: ours, lock free, but the owner (this very program) is alive: another lock dir.
        let me = format!("rootfork:me:{}:other-lock-dir", std::process::id());
        fake::connect(&sys, 5, std::process::id(), 4096, Some(&me));
        // 2: another host's rootfork. 3: another program. 4: no backend identifier.
        fake::connect(&sys, 2, 5, 4096, Some("rootfork:other:5:x"));
        fake::connect(&sys, 3, 6, 4096, Some("qemu-nbd"));
        fake::connect(&sys, 4, 7, 4096, None);
        let kernel = Kernel {
            sys: sys.clone(),
            disconnected: Mutex::new(BTreeSet::new()),
        };
        let events = pool.events();
        let done = reclaim(&pool, &kernel, Duration::from_millis(100)).unwrap();
        assert_eq!(
            done,
            vec![Reclaimed {
                index: 0,
                disconnected: Some("rootfork:me:999999:dead".into()),
                cache_removed: Some(cache.clone()),
                error: None,
            }]
        );
        assert_eq!(*kernel.disconnected.lock(), BTreeSet::from([0]));
        assert!(!cache.exists());
        assert_eq!(
            events.try_iter().collect::<Vec<_>>(),
            vec![PoolEvent::Reclaimed {
                index: 0,
                backend: Some("rootfork:me:999999:dead".into())
            }]
        );
        assert_eq!(pool.metrics().reclaimed_total, 1);
        // A second run finds nothing.
        assert!(reclaim(&pool, &kernel, Duration::from_millis(100))
            .unwrap()
            .is_empty());
        // Slot 0 is usable again; the others stay out.
        assert_eq!(pool.claim("new").unwrap().index(), 0);
    }

    #[test]
    fn a_device_that_stays_busy_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        fake::tree(&sys, 1);
        let pool = DevicePool::new(PoolConfig {
            sysfs_root: sys.clone(),
            lock_dir: dir.path().join("locks"),
            cooldown: Duration::ZERO,
            host_id: "me".into(),
        });
        fake::connect(&sys, 0, 9, 4096, Some("rootfork:me:9:s"));
        fs::create_dir(sys.join("block/nbd0/holders/dm-1")).unwrap();
        let kernel = Kernel {
            sys: sys.clone(),
            disconnected: Mutex::new(BTreeSet::new()),
        };
        let done = reclaim(&pool, &kernel, Duration::from_millis(20)).unwrap();
        assert_eq!(done.len(), 1);
        assert!(
            done[0].error.as_deref().unwrap().contains("holders"),
            "{done:?}"
        );
        assert!(pool.claim("x").is_err());
    }
}
