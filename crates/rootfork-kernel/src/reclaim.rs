//! Reclaim: cleans up devices and claims whose owner is gone.
//!
//! The claim lock is the only authority on whether an owner lives: the kernel drops a `flock`
//! when its holder dies, in whatever pid namespace or container it ran, and unlike a pid it cannot
//! be reused by an unrelated process. A slot whose lock another process holds is never touched.
//! For a device whose lock is free, the backend identifier (`rootfork:<boot>:<instance>:…`) and
//! the claim record decide who may disconnect it:
//!
//! - its own instance (same boot and instance id), at any time: that is how a restarted daemon
//!   takes its devices back;
//! - any other rootfork instance of this boot only once the device's connections have been dead
//!   longer than its `dead_conn_timeout` (the kernel has failed its I/O by then), counted from
//!   when a reclaim first found the lock free (written into the record as `orphaned_since_ms`)
//!   and only when the record in the lock file names the device's instance (else the device was
//!   attached with another lock directory and its owner cannot be judged here);
//! - anyone with [`ReclaimOptions::force`].
//!
//! Devices of other software (any other backend identifier, or none) are never touched. A dead
//! claim's cache file is removed only if it is a regular file of this user directly inside the
//! pool's cache directory (`cache_file.rs`).
//!
//! Every eligible device is sent `DISCONNECT` first, then all of them are waited for together, so
//! many orphans cost one `quiesce_wait`, not one each.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::identity::BackendId;
use crate::netlink::{NbdControl, NlError};
use crate::pool::{now_ms, DevicePool, LockRecord, PoolError, PoolEvent, RecordState, SlotLock};
use crate::sysfs::vanishing;

/// How to reclaim.
#[derive(Debug, Clone)]
pub struct ReclaimOptions {
    /// Disconnect every rootfork device whose claim lock is free, whoever attached it and however
    /// recently its owner died (`rootfork nbd reclaim --force`).
    pub force: bool,
    /// How long to wait, in all, for the kernel's teardown of the disconnected devices.
    pub quiesce_wait: Duration,
}

impl Default for ReclaimOptions {
    fn default() -> Self {
        ReclaimOptions {
            force: false,
            quiesce_wait: Duration::from_secs(10),
        }
    }
}

/// Why an orphaned device was left connected this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Deferred {
    /// Another instance's device whose `dead_conn_timeout` has not passed since its owner was
    /// found gone.
    DeadConnTimeout {
        /// How much longer, in milliseconds.
        remaining_ms: u64,
    },
    /// Another instance's device with no matching claim record in this lock directory.
    NoRecord,
    /// A device whose identifier names another boot (it cannot be this kernel's own).
    OtherBoot,
}

/// What reclaim did for one slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reclaimed {
    /// The slot.
    pub index: u32,
    /// The backend identifier of the device it disconnected, if it disconnected one.
    pub disconnected: Option<String>,
    /// The cache file it removed.
    pub cache_removed: Option<PathBuf>,
    /// Why an orphaned device was left connected (it is not reclaimed yet).
    pub deferred: Option<Deferred>,
    /// What went wrong, if the slot could not be fully cleaned (it stays out of the pool until
    /// it is quiescent).
    pub error: Option<String>,
}

/// A slot reclaim works on: its lock (held until done), what was there and what was done.
struct Work {
    lock: SlotLock,
    rec: Option<LockRecord>,
    backend: Option<String>,
    row: Reclaimed,
}

/// Reclaims devices and claims whose owner is gone, by the rule in the module docs.
pub fn reclaim(
    pool: &DevicePool,
    control: &dyn NbdControl,
    opts: &ReclaimOptions,
) -> Result<Vec<Reclaimed>, PoolError> {
    let me = pool.config().identity.clone();
    let mut out = Vec::new();
    let mut work = Vec::new();
    for index in pool.sysfs().pool_indices()? {
        let probe = pool.shared.probe.lock();
        if pool.shared.local.lock().contains_key(&index) {
            continue;
        }
        let Some(mut lock) = pool.locks().try_lock(index)? else {
            continue; // a live owner
        };
        let st = match pool.sysfs().slot(index) {
            Ok(s) => s,
            // Gone, or torn down while we read it: nothing to reclaim now.
            Err(e) if vanishing(&e) => continue,
            Err(e) => return Err(e.into()),
        };
        let rec = lock.read();
        let dead_claim = rec.as_ref().filter(|r| r.state == RecordState::Claimed);
        let rootfork = st.backend.as_deref().and_then(BackendId::parse);
        let leaked_device = rootfork.is_some() && st.check_quiescent().is_err();
        if !leaked_device && dead_claim.is_none() {
            continue;
        }
        let mut row = Reclaimed {
            index,
            disconnected: None,
            cache_removed: None,
            deferred: None,
            error: None,
        };
        if let Some(b) = rootfork.as_ref().filter(|_| leaked_device) {
            let deferred = if opts.force || me.owns(b) {
                None
            } else if b.boot != me.boot {
                Some(Deferred::OtherBoot)
            } else {
                match dead_claim.filter(|r| r.instance.as_deref() == Some(b.instance.as_str())) {
                    None => Some(Deferred::NoRecord),
                    Some(r) => {
                        let now = now_ms();
                        let since = r.orphaned_since_ms.unwrap_or(now);
                        let waited = now.saturating_sub(since);
                        let timeout = r.dead_conn_timeout_ms.unwrap_or(0);
                        if r.orphaned_since_ms.is_none() && timeout > 0 {
                            let marked = LockRecord {
                                orphaned_since_ms: Some(now),
                                ..r.clone()
                            };
                            if let Err(e) = lock.write(&marked) {
                                tracing::warn!(
                                    index,
                                    "cannot record when the owner was found gone: {e}"
                                );
                            }
                        }
                        (waited < timeout).then(|| Deferred::DeadConnTimeout {
                            remaining_ms: timeout - waited,
                        })
                    }
                }
            };
            if let Some(d) = deferred {
                tracing::info!(index, backend = ?st.backend, deferred = ?d, "orphaned nbd device left connected for now");
                row.deferred = Some(d);
                out.push(row);
                continue;
            }
            tracing::info!(index, backend = ?st.backend, "reclaiming a rootfork device whose owner is gone");
            // The slot's lock is held by `lock` from here on: other probes may go on.
            drop(probe);
            match control.disconnect(index) {
                // EINVAL: the kernel had already torn it down.
                Ok(())
                | Err(NlError::Refused {
                    errno: libc::EINVAL,
                }) => {}
                Err(e) => row.error = Some(format!("disconnect: {}", crate::netlink::chain(&e))),
            }
        }
        work.push(Work {
            lock,
            rec,
            backend: st.backend.filter(|_| leaked_device),
            row,
        });
    }

    // The kernel tears the disconnected devices down concurrently; wait for all of them at once.
    let deadline = Instant::now() + opts.quiesce_wait;
    let mut pending: Vec<usize> = (0..work.len())
        .filter(|&i| work[i].backend.is_some())
        .collect();
    let mut pause = Duration::from_millis(1);
    loop {
        pending.retain(|&i| {
            let w = &mut work[i];
            match pool.sysfs().slot(w.row.index) {
                Ok(s) => match s.check_quiescent() {
                    Ok(()) => {
                        w.row.disconnected = w.backend.clone();
                        false
                    }
                    Err(why) if Instant::now() >= deadline => {
                        w.row.error.get_or_insert(format!(
                            "not quiescent after {} ms: {why}",
                            opts.quiesce_wait.as_millis()
                        ));
                        false
                    }
                    Err(_) => true,
                },
                Err(e) if vanishing(&e) && Instant::now() < deadline => true,
                Err(e) => {
                    w.row.error.get_or_insert(format!("sysfs: {e}"));
                    false
                }
            }
        });
        if pending.is_empty() {
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }

    for mut w in work {
        let index = w.row.index;
        let dead_cache = w
            .rec
            .as_ref()
            .filter(|r| r.state == RecordState::Claimed)
            .and_then(|r| r.cache.clone());
        if let Some(cache) = dead_cache {
            match pool.remove_dead_cache(&cache) {
                Ok(true) => w.row.cache_removed = Some(cache),
                Ok(false) => {}
                Err(e) => tracing::warn!(index, "not removing a dead claim's cache file: {e}"),
            }
        }
        if w.row.error.is_none() {
            let sandbox = w.rec.map(|r| r.sandbox).unwrap_or_default();
            let _ = w
                .lock
                .write(&LockRecord::now(RecordState::Released, &sandbox));
        }
        pool.record_reclaimed();
        pool.emit(PoolEvent::Reclaimed {
            index,
            backend: w.row.disconnected.clone(),
        });
        out.push(w.row);
    }
    out.sort_by_key(|r| r.index);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fs;

    use parking_lot::Mutex;

    use super::*;
    use crate::identity::Identity;
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

    fn pool(dir: &std::path::Path, slots: u32) -> DevicePool {
        let sys = dir.join("sys");
        fake::tree(&sys, slots);
        let cache_dir = dir.join("cache");
        fs::create_dir_all(&cache_dir).unwrap();
        DevicePool::new(PoolConfig {
            sysfs_root: sys,
            lock_dir: dir.join("locks"),
            cooldown: Duration::ZERO,
            identity: Identity::new("boot1", "me").unwrap(),
            cache_dir: Some(cache_dir),
        })
    }

    /// Leaves a dead claim on `index`: a record written by instance `instance`, lock free.
    fn dead_claim(pool: &DevicePool, index: u32, instance: &str, f: impl FnOnce(&mut LockRecord)) {
        let mut l = pool.locks().try_lock(index).unwrap().unwrap();
        let mut rec = LockRecord {
            instance: Some(instance.into()),
            pid: 1, // every container's first process: means nothing
            ..LockRecord::now(RecordState::Claimed, "sb")
        };
        f(&mut rec);
        l.write(&rec).unwrap();
    }

    fn kernel(dir: &std::path::Path) -> Kernel {
        Kernel {
            sys: dir.join("sys"),
            disconnected: Mutex::new(BTreeSet::new()),
        }
    }

    const FAST: ReclaimOptions = ReclaimOptions {
        force: false,
        quiesce_wait: Duration::from_millis(100),
    };

    /// Claims of this process walk the slots beside a reclaim (the daemon's background start-up
    /// reclaim beside its first creates): a claim's passing lock on a dead device's slot was
    /// taken for a live owner's and the device left connected.
    #[test]
    fn a_reclaim_beside_claims_of_the_same_process_takes_every_dead_device() {
        use std::sync::atomic::{AtomicBool, Ordering};
        for round in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let sys = dir.path().join("sys");
            let pool = pool(dir.path(), 8);
            for i in 0..4 {
                dead_claim(&pool, i, "me", |_| {});
                let backend = format!("rootfork:boot1:me:d{i}");
                fake::connect(&sys, i, 1, 4096, Some(backend.as_str()));
            }
            let kernel = kernel(dir.path());
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        while !stop.load(Ordering::Relaxed) {
                            drop(pool.claim("beside"));
                        }
                    });
                }
                reclaim(&pool, &kernel, &FAST).unwrap();
                stop.store(true, Ordering::Relaxed);
            });
            assert_eq!(
                *kernel.disconnected.lock(),
                BTreeSet::from([0, 1, 2, 3]),
                "round {round}: a dead device was left connected"
            );
        }
    }

    #[test]
    fn own_orphans_and_other_instances_dead_ones_are_reclaimed_live_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let pool = pool(dir.path(), 8);
        let cache = dir.path().join("cache/dead.cache");
        fs::write(&cache, b"x").unwrap();
        // 0: this instance's, owner gone, with a leaked cache.
        dead_claim(&pool, 0, "me", |r| r.cache = Some(cache.clone()));
        fake::connect(&sys, 0, 1, 4096, Some("rootfork:boot1:me:dead"));
        // 1: held by a live owner (another open file description, as another process has), in
        // whatever pid namespace: never touched, even though it names this instance.
        let _live = pool.locks().try_lock(1).unwrap().unwrap();
        fake::connect(&sys, 1, 1, 4096, Some("rootfork:boot1:me:live"));
        // 2: another instance's, owner gone, no dead_conn_timeout: its I/O already failed.
        dead_claim(&pool, 2, "other", |_| {});
        fake::connect(&sys, 2, 1, 4096, Some("rootfork:boot1:other:x"));
        // 3: another program. 4: no backend identifier.
        fake::connect(&sys, 3, 6, 4096, Some("qemu-nbd"));
        fake::connect(&sys, 4, 7, 4096, None);
        // 5: another instance's with no record here (another lock directory).
        fake::connect(&sys, 5, 1, 4096, Some("rootfork:boot1:elsewhere:x"));
        // 6: another instance's whose dead_conn_timeout (60 s) has not passed.
        dead_claim(&pool, 6, "slow", |r| r.dead_conn_timeout_ms = Some(60_000));
        fake::connect(&sys, 6, 1, 4096, Some("rootfork:boot1:slow:x"));
        // 7: another instance's whose owner was found gone 61 s ago, timeout 60 s.
        dead_claim(&pool, 7, "late", |r| {
            r.dead_conn_timeout_ms = Some(60_000);
            r.orphaned_since_ms = Some(now_ms() - 61_000);
        });
        fake::connect(&sys, 7, 1, 4096, Some("rootfork:boot1:late:x"));
        let kernel = kernel(dir.path());
        let events = pool.events();
        let done = reclaim(&pool, &kernel, &FAST).unwrap();
        let by_index = |i: u32| done.iter().find(|r| r.index == i).cloned();
        assert_eq!(
            by_index(0).unwrap(),
            Reclaimed {
                index: 0,
                disconnected: Some("rootfork:boot1:me:dead".into()),
                cache_removed: Some(cache.clone()),
                deferred: None,
                error: None,
            }
        );
        assert!(!cache.exists());
        assert_eq!(
            by_index(2).unwrap().disconnected.as_deref(),
            Some("rootfork:boot1:other:x")
        );
        assert_eq!(by_index(5).unwrap().deferred, Some(Deferred::NoRecord));
        assert!(matches!(
            by_index(6).unwrap().deferred,
            Some(Deferred::DeadConnTimeout { remaining_ms }) if remaining_ms > 59_000
        ));
        assert!(by_index(7).unwrap().disconnected.is_some());
        for i in [1, 3, 4] {
            assert_eq!(by_index(i), None, "{done:?}");
        }
        assert_eq!(*kernel.disconnected.lock(), BTreeSet::from([0, 2, 7]));
        let reclaimed: Vec<_> = events.try_iter().collect();
        assert_eq!(reclaimed.len(), 3, "{reclaimed:?}");
        assert_eq!(pool.metrics().reclaimed_total, 3);
        // The slow one's record now says when its owner was found gone; the clock keeps running
        // from there (a second run does not restart it).
        let since = pool.locks().read(6).unwrap().orphaned_since_ms.unwrap();
        let again = reclaim(&pool, &kernel, &FAST).unwrap();
        assert_eq!(pool.locks().read(6).unwrap().orphaned_since_ms, Some(since));
        assert!(again.iter().all(|r| r.disconnected.is_none()), "{again:?}");
        // --force takes the deferred ones, still never the live one or other programs'.
        let forced = reclaim(
            &pool,
            &kernel,
            &ReclaimOptions {
                force: true,
                ..FAST
            },
        )
        .unwrap();
        assert_eq!(
            forced.iter().filter(|r| r.disconnected.is_some()).count(),
            2,
            "{forced:?}"
        );
        assert_eq!(*kernel.disconnected.lock(), BTreeSet::from([0, 2, 5, 6, 7]));
        // Reclaimed slots are usable again.
        assert!(pool.claim("new").is_ok());
    }

    #[test]
    fn another_boots_device_is_left_alone_and_foreign_cache_paths_kept() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let pool = pool(dir.path(), 2);
        fake::connect(&sys, 0, 1, 4096, Some("rootfork:boot0:me:x"));
        // A dead claim (no device) whose record names a file outside the cache directory.
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        dead_claim(&pool, 1, "me", |r| r.cache = Some(victim.clone()));
        let kernel = kernel(dir.path());
        let done = reclaim(&pool, &kernel, &FAST).unwrap();
        assert_eq!(done[0].deferred, Some(Deferred::OtherBoot));
        assert_eq!(done[1].cache_removed, None);
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(kernel.disconnected.lock().is_empty());
    }

    #[test]
    fn a_device_that_stays_busy_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let pool = pool(dir.path(), 1);
        fake::connect(&sys, 0, 9, 4096, Some("rootfork:boot1:me:s"));
        fs::create_dir(sys.join("block/nbd0/holders/dm-1")).unwrap();
        let kernel = kernel(dir.path());
        let done = reclaim(
            &pool,
            &kernel,
            &ReclaimOptions {
                quiesce_wait: Duration::from_millis(20),
                ..FAST
            },
        )
        .unwrap();
        assert_eq!(done.len(), 1);
        assert!(
            done[0].error.as_deref().unwrap().contains("holders"),
            "{done:?}"
        );
        assert!(pool.claim("x").is_err());
    }

    #[test]
    fn many_orphans_are_waited_for_together() {
        // A kernel whose teardowns finish only once every orphan was sent DISCONNECT: a reclaim
        // that waited for each device before disconnecting the next would never see one finish.
        struct BatchKernel {
            sys: PathBuf,
            sent: Mutex<u32>,
        }
        impl NbdControl for BatchKernel {
            fn connect(&self, _: &ConnectRequest) -> Result<u32, NlError> {
                unreachable!()
            }
            fn disconnect(&self, _: u32) -> Result<(), NlError> {
                let mut sent = self.sent.lock();
                *sent += 1;
                if *sent == 10 {
                    (0..10).for_each(|i| fake::disconnect(&self.sys, i));
                }
                Ok(())
            }
            fn reconfigure(&self, _: &ReconfigureRequest) -> Result<(), NlError> {
                unreachable!()
            }
            fn status(&self, _: Option<u32>) -> Result<Vec<DeviceStatus>, NlError> {
                Ok(vec![])
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let pool = pool(dir.path(), 10);
        for i in 0..10 {
            fake::connect(&sys, i, 1, 4096, Some(&format!("rootfork:boot1:me:s{i}")));
        }
        let kernel = BatchKernel {
            sys,
            sent: Mutex::new(0),
        };
        let opts = ReclaimOptions {
            force: false,
            quiesce_wait: Duration::from_secs(5),
        };
        let done = reclaim(&pool, &kernel, &opts).unwrap();
        assert_eq!(
            done.iter().filter(|r| r.disconnected.is_some()).count(),
            10,
            "{done:?}"
        );
    }
}
