//! Pool tests on a fake sysfs tree in a tempdir.

use std::fs;
use std::time::Duration;

use super::*;
use crate::pool::own::OwnDevice;
use crate::sysfs::fake;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(n: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fake::tree(&dir.path().join("sys"), n);
        Env { dir }
    }

    fn sys(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    fn cache_dir(&self) -> PathBuf {
        let d = self.dir.path().join("cache");
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn pool(&self, cooldown: Duration) -> DevicePool {
        DevicePool::new(PoolConfig {
            sysfs_root: self.sys(),
            lock_dir: self.dir.path().join("locks"),
            cooldown,
            identity: crate::identity::Identity::new("boot", "testhost").unwrap(),
            cache_dir: Some(self.cache_dir()),
        })
    }
}

#[test]
fn claims_rotate_and_drop_releases() {
    let env = Env::new(4);
    let pool = env.pool(Duration::ZERO);
    let events = pool.events();
    let a = pool.claim("a").unwrap();
    let b = pool.claim("b").unwrap();
    assert_ne!(a.index(), b.index());
    assert_eq!(a.device_path(), crate::identity::device_path(a.index()));
    let (ia, ib) = (a.index(), b.index());
    drop(a);
    b.release();
    // The next claim starts after the last one taken, not at the lowest free index.
    let c = pool.claim("c").unwrap();
    assert_eq!(c.index(), (ib + 1) % 4);
    let evs: Vec<_> = events.try_iter().collect();
    assert_eq!(
        evs[..4],
        [
            PoolEvent::Claimed {
                index: ia,
                sandbox: "a".into()
            },
            PoolEvent::Claimed {
                index: ib,
                sandbox: "b".into()
            },
            PoolEvent::Released { index: ia },
            PoolEvent::Released { index: ib },
        ]
    );
    let m = pool.metrics();
    assert_eq!((m.claimed, m.claims_total, m.releases_total), (1, 3, 2));
    assert_eq!(m.ready, 3);
}

#[test]
fn two_daemons_never_share_a_slot() {
    let env = Env::new(3);
    let one = env.pool(Duration::ZERO);
    let two = env.pool(Duration::ZERO);
    let mut held = Vec::new();
    for i in 0..3 {
        let p = if i % 2 == 0 { &one } else { &two };
        held.push(p.claim("x").unwrap());
    }
    let mut idx: Vec<_> = held.iter().map(|l| l.index()).collect();
    idx.sort_unstable();
    assert_eq!(idx, vec![0, 1, 2]);
    match two.claim("y") {
        Err(PoolError::Exhausted {
            total: 3, busy: 3, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // The other daemon's claims are visible in its listing.
    let list = two.list().unwrap();
    assert!(list.iter().all(|s| s.state == SlotState::Claimed));
    assert!(list.iter().all(|s| s.sandbox.as_deref() == Some("x")));
}

#[test]
fn every_quiescence_rule_keeps_a_slot_out() {
    let env = Env::new(5);
    let sys = env.sys();
    let pool = env.pool(Duration::ZERO);
    fake::connect(&sys, 0, 77, 4096, Some("other-tool"));
    fs::write(sys.join("block/nbd1/size"), "8\n").unwrap();
    fs::write(sys.join("block/nbd2/inflight"), "1 0\n").unwrap();
    fs::create_dir(sys.join("block/nbd3/holders/dm-3")).unwrap();
    let l = pool.claim("s").unwrap();
    assert_eq!(l.index(), 4);
    match pool.claim("t") {
        Err(PoolError::Exhausted {
            not_quiescent: 4,
            busy: 1,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let m = pool.metrics();
    assert_eq!(
        m.not_quiescent_skips,
        QuiescenceSkips {
            pid: 2,
            size: 2,
            inflight: 2,
            holders: 2
        }
    );
    let states: Vec<_> = pool.list().unwrap().iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        vec![
            SlotState::Busy,
            SlotState::Busy,
            SlotState::Busy,
            SlotState::Busy,
            SlotState::Claimed
        ]
    );
}

#[test]
fn a_released_slot_cools_down_but_comes_last_not_never() {
    let env = Env::new(2);
    let pool = env.pool(Duration::from_secs(60));
    let a = pool.claim("a").unwrap();
    let ia = a.index();
    a.release();
    assert_eq!(pool.list().unwrap()[ia as usize].state, SlotState::Cooling);
    // The cooldown is host-wide: another process (rotation starting at slot 0) sees it through
    // the lock file and prefers the other slot.
    let other = env.pool(Duration::from_secs(60));
    assert_eq!(other.list().unwrap()[ia as usize].state, SlotState::Cooling);
    let b = other.claim("b").unwrap();
    assert_ne!(b.index(), ia);
    // With nothing else free, the cooling slot is still handed out: it is quiescent.
    let c = other.claim("c").unwrap();
    assert_eq!(c.index(), ia);
    assert!(other.metrics().cooling_skips >= 1);
    drop((b, c));
    // But a cooling slot that is not quiescent never is.
    fake::connect(&env.sys(), 0, 9, 4096, Some("other-tool"));
    fake::connect(&env.sys(), 1, 9, 4096, Some("other-tool"));
    match other.claim("d") {
        Err(PoolError::Exhausted {
            not_quiescent: 2, ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn listing_shows_connected_and_orphaned_devices() {
    let env = Env::new(3);
    let sys = env.sys();
    let pool = env.pool(Duration::ZERO);
    let l = pool.claim("mine").unwrap();
    fake::connect(
        &sys,
        l.index(),
        std::process::id(),
        8192,
        Some("rootfork:boot:testhost:mine"),
    );
    l.set_connected(true);
    // A device of another rootfork instance of this boot whose owner is gone (nobody holds the
    // lock).
    fake::connect(&sys, 1, 1, 8192, Some("rootfork:boot:gone:dead"));
    // A device naming another boot: not ours to judge.
    fake::connect(&sys, 2, 5, 8192, Some("rootfork:elsewhere:x:x"));
    let list = pool.list().unwrap();
    assert_eq!(list[0].state, SlotState::Connected);
    assert_eq!(list[0].sandbox.as_deref(), Some("mine"));
    assert_eq!(list[1].state, SlotState::Orphaned);
    assert_eq!(list[1].backend.as_deref(), Some("rootfork:boot:gone:dead"));
    assert_eq!(list[2].state, SlotState::Busy);
}

#[test]
fn a_dead_claims_cache_file_is_removed_on_the_next_claim() {
    let env = Env::new(1);
    let pool = env.pool(Duration::ZERO);
    let cache = env.cache_dir().join("sb.cache");
    fs::write(&cache, b"x").unwrap();
    let mut l = pool.claim("sb").unwrap();
    l.set_cache_path(&cache).unwrap();
    // Simulate a crash: the lock goes (the process died) but no release record is written.
    let lock = l.lock.take();
    drop(lock);
    std::mem::forget(l);
    let other = env.pool(Duration::ZERO);
    let ev = other.events();
    let l2 = other.claim("next").unwrap();
    assert_eq!(l2.index(), 0);
    assert!(!cache.exists());
    assert_eq!(
        ev.try_iter().next(),
        Some(PoolEvent::Reclaimed {
            index: 0,
            backend: None
        })
    );
}

#[test]
fn no_module_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let pool = DevicePool::new(PoolConfig {
        sysfs_root: dir.path().into(),
        lock_dir: dir.path().join("l"),
        cooldown: Duration::ZERO,
        identity: crate::identity::Identity::new("boot", "h").unwrap(),
        cache_dir: None,
    });
    let err = pool.claim("x").unwrap_err();
    assert!(matches!(err, PoolError::ModuleNotLoaded(_)));
    assert_eq!(err.errno(), libc::ENODEV);
}

#[test]
fn own_devices_name_this_instances_devices_and_their_sandboxes() {
    let env = Env::new(4);
    let sys = env.sys();
    let pool = env.pool(Duration::ZERO);
    let held = pool.claim("held").unwrap();
    fake::connect(
        &sys,
        held.index(),
        1,
        8192,
        Some("rootfork:boot:testhost:held"),
    );
    let i = held.index();
    let (a, b, c) = ((i + 1) % 4, (i + 2) % 4, (i + 3) % 4);
    // This instance's device from before a restart: nobody holds its claim.
    fake::connect(&sys, a, 1, 8192, Some("rootfork:boot:testhost:sb:1"));
    // Another instance's, and another boot's with this instance id.
    fake::connect(&sys, b, 1, 8192, Some("rootfork:boot:other:x"));
    fake::connect(&sys, c, 1, 8192, Some("rootfork:oldboot:testhost:x"));
    let mut own = pool.own_devices().unwrap();
    own.sort_by_key(|d| d.index);
    let mut want = vec![
        OwnDevice {
            index: i,
            sandbox: "held".into(),
            backend: "rootfork:boot:testhost:held".into(),
            orphaned: false,
        },
        OwnDevice {
            index: a,
            sandbox: "sb:1".into(),
            backend: "rootfork:boot:testhost:sb:1".into(),
            orphaned: true,
        },
    ];
    want.sort_by_key(|d| d.index);
    assert_eq!(own, want);
}

#[test]
fn a_retained_claim_stays_claimed_until_the_pool_goes() {
    let env = Env::new(1);
    let pool = env.pool(Duration::ZERO);
    pool.claim("kept").unwrap().retain();
    let other = env.pool(Duration::ZERO);
    assert!(matches!(
        other.claim("x"),
        Err(PoolError::Exhausted { busy: 1, .. })
    ));
    assert_eq!(other.list().unwrap()[0].state, SlotState::Claimed);
    drop(pool);
    assert!(other.claim("x").is_ok());
}

#[test]
fn a_slot_torn_down_while_read_does_not_abort_the_claim_or_the_listing() {
    let env = Env::new(2);
    let pool = env.pool(Duration::ZERO);
    // Slot 0's `size` is gone while its directory is still there, as in the middle of a teardown
    // (the kernel answers ENODEV there; both are `sysfs::vanishing`).
    fs::remove_file(env.sys().join("block/nbd0/size")).unwrap();
    let l = pool.claim("x").unwrap();
    assert_eq!(l.index(), 1);
    let list = pool.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].index, 1);
    assert!(crate::sysfs::vanishing(&std::io::Error::from_raw_os_error(
        libc::ENODEV
    )));
    assert!(!crate::sysfs::vanishing(
        &std::io::Error::from_raw_os_error(libc::EIO)
    ));
}
