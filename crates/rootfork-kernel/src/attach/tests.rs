//! Attachment lifecycle through a fake kernel (netlink + sysfs tree + device nodes in a tempdir),
//! with failures and cancellation injected at every stage.

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::io::{self, Read};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use parking_lot::Mutex;

use super::*;
use crate::netlink::{AmbiguousCause, DeviceStatus, NlError, ReconfigureRequest};
use crate::pool::{DevicePool, PoolConfig, PoolError, PoolEvent};
use crate::sysfs::fake;

/// What the fake kernel does on CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnConnect {
    Work,
    Refuse(i32),
    /// Connects, then loses the answer.
    AmbiguousConnected,
    /// Never shows the device in sysfs.
    Invisible,
    /// Shows another size.
    WrongSize,
}

/// What the fake kernel does on RECONFIGURE with sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnReconfigure {
    /// Puts each socket in place of a dead one, drops the rest (like `nbd_reconnect_socket`).
    Work,
    Refuse(i32),
    /// Has not noticed the dead sockets yet for this many requests: drops every socket and
    /// answers success (the kernel's `-ENOSPC` turned into 0).
    Lag(usize),
    /// Takes the first socket, then refuses the request with this errno (the kernel stops at
    /// the first socket it refuses and keeps the ones before it); works normally afterwards.
    TakeOneThenRefuse(i32),
}

struct FakeKernel {
    sys: PathBuf,
    on_connect: Mutex<OnConnect>,
    on_reconfigure: Mutex<OnReconfigure>,
    reconfigures: Mutex<Vec<ReconfigureRequest>>,
    /// Sockets per connected device, as given at connect.
    capacity: Mutex<BTreeMap<u32, usize>>,
    /// Connected devices with the kernel's references to their sockets.
    connected: Mutex<BTreeMap<u32, Vec<OwnedFd>>>,
    disconnects: AtomicUsize,
    /// When set, the kernel's teardown finishes only once the gate opens.
    teardown_gate: Mutex<Option<Arc<Gate>>>,
    /// Slots held open by an idle opener: CONNECT answers EBUSY.
    held_open: Mutex<Vec<u32>>,
    /// DISCONNECT fails with this errno (and leaves the device connected).
    refuse_disconnect: Mutex<Option<i32>>,
}

impl NbdControl for FakeKernel {
    fn connect(&self, req: &ConnectRequest) -> Result<u32, NlError> {
        let i = req.index.unwrap();
        let mut refs = Vec::new();
        for &fd in &req.sockets {
            // The sockets must be open while the kernel looks them up; it keeps a reference.
            // SAFETY: the fd is only borrowed for the duration of this call, in which the caller
            // keeps it open (a closed fd fails the dup and is refused like the kernel does).
            let b = unsafe { BorrowedFd::borrow_raw(fd) };
            refs.push(
                b.try_clone_to_owned()
                    .map_err(|_| NlError::Refused { errno: libc::EBADF })?,
            );
        }
        assert_eq!(req.block_size_bytes, crate::attach::BLOCK_SIZE);
        let b = req.backend_identifier.as_deref();
        assert!(crate::identity::BackendId::parse(b.unwrap()).is_some());
        if self.held_open.lock().contains(&i) {
            return Err(NlError::Refused { errno: libc::EBUSY });
        }
        match *self.on_connect.lock() {
            OnConnect::Refuse(errno) => return Err(NlError::Refused { errno }),
            OnConnect::Invisible => {}
            OnConnect::WrongSize => fake::connect(&self.sys, i, 1, req.size_bytes * 2, b),
            OnConnect::Work | OnConnect::AmbiguousConnected => {
                fake::connect(&self.sys, i, std::process::id(), req.size_bytes, b)
            }
        }
        self.capacity.lock().insert(i, refs.len());
        self.connected.lock().insert(i, refs);
        if *self.on_connect.lock() == OnConnect::AmbiguousConnected {
            return Err(NlError::Ambiguous(AmbiguousCause::Io(
                io::ErrorKind::TimedOut.into(),
            )));
        }
        Ok(i)
    }

    fn disconnect(&self, index: u32) -> Result<(), NlError> {
        self.disconnects.fetch_add(1, Ordering::SeqCst);
        if let Some(errno) = *self.refuse_disconnect.lock() {
            return Err(NlError::Refused { errno });
        }
        self.capacity.lock().remove(&index);
        if self.connected.lock().remove(&index).is_none() {
            return Err(NlError::Refused {
                errno: libc::EINVAL,
            });
        }
        match self.teardown_gate.lock().clone() {
            None => fake::disconnect(&self.sys, index),
            Some(gate) => {
                let sys = self.sys.clone();
                std::thread::spawn(move || {
                    gate.wait();
                    fake::disconnect(&sys, index);
                });
            }
        }
        Ok(())
    }

    fn reconfigure(&self, req: &ReconfigureRequest) -> Result<(), NlError> {
        self.reconfigures.lock().push(req.clone());
        let mut mode = self.on_reconfigure.lock();
        match *mode {
            OnReconfigure::Refuse(errno) => return Err(NlError::Refused { errno }),
            OnReconfigure::Lag(n) if n > 0 => {
                *mode = OnReconfigure::Lag(n - 1);
                return Ok(());
            }
            OnReconfigure::Lag(_) | OnReconfigure::Work | OnReconfigure::TakeOneThenRefuse(_) => {}
        }
        let refuse_after_one = match *mode {
            OnReconfigure::TakeOneThenRefuse(errno) => {
                *mode = OnReconfigure::Work;
                Some(errno)
            }
            _ => None,
        };
        let mut connected = self.connected.lock();
        let Some(refs) = connected.get_mut(&req.index) else {
            return Err(NlError::Refused {
                errno: libc::EINVAL,
            });
        };
        let capacity = self.capacity.lock()[&req.index];
        for &fd in &req.sockets {
            if refs.len() == capacity {
                // No dead socket left: the rest are dropped, and the answer is still success.
                break;
            }
            // SAFETY: borrowed for this call only, during which the caller keeps it open.
            let b = unsafe { BorrowedFd::borrow_raw(fd) };
            refs.push(b.try_clone_to_owned().expect("open fd"));
            if let Some(errno) = refuse_after_one {
                return Err(NlError::Refused { errno });
            }
        }
        Ok(())
    }

    fn status(&self, _: Option<u32>) -> Result<Vec<DeviceStatus>, NlError> {
        Ok(vec![])
    }
}

/// A gate the fake kernel's teardown waits for.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: parking_lot::Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut o = self.open.lock();
        while !*o {
            self.cv.wait(&mut o);
        }
    }

    fn open(&self) {
        *self.open.lock() = true;
        self.cv.notify_all();
    }
}

struct FakeNodes {
    dir: PathBuf,
    flushes: AtomicUsize,
    /// `drop_cache` calls (`BLKFLSBUF` alone, no fsync).
    drop_caches: AtomicUsize,
    fail_open: Mutex<bool>,
    /// Since when the dispatchers hold a request (shared with them); a flush while one is held
    /// (or a cache drop) while one is held is counted in `flushed_while_pending`.
    pending_since: Arc<Mutex<Option<std::time::Instant>>>,
    flushed_while_pending: AtomicUsize,
}

impl DeviceNodes for FakeNodes {
    fn open(&self, index: u32) -> io::Result<File> {
        if *self.fail_open.lock() {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join(format!("nbd{index}")))
    }

    fn flush(&self, file: &File) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        if self.pending_since.lock().is_some() {
            self.flushed_while_pending.fetch_add(1, Ordering::SeqCst);
        }
        file.sync_all()
    }

    fn drop_cache(&self, _file: &File) -> io::Result<()> {
        self.drop_caches.fetch_add(1, Ordering::SeqCst);
        if self.pending_since.lock().is_some() {
            self.flushed_while_pending.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Serves by reading until EOF; counts live connections.
struct FakeDispatcher {
    live: Arc<AtomicUsize>,
    fail_spawn_after: Mutex<Option<usize>>,
    pending_since: Arc<Mutex<Option<std::time::Instant>>>,
}

struct FakeDispatch {
    stream: UnixStream,
    thread: std::thread::JoinHandle<()>,
    pending_since: Arc<Mutex<Option<std::time::Instant>>>,
}

impl Dispatcher for FakeDispatcher {
    fn size(&self) -> u64 {
        1 << 20
    }

    fn server_flags(&self) -> u64 {
        1
    }

    fn spawn(&self, stream: UnixStream) -> io::Result<Box<dyn Dispatch>> {
        if let Some(n) = self.fail_spawn_after.lock().as_mut() {
            if *n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            *n -= 1;
        }
        let mut reader = stream.try_clone()?;
        let live = self.live.clone();
        live.fetch_add(1, Ordering::SeqCst);
        let thread = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            while matches!(reader.read(&mut b), Ok(n) if n > 0) {}
            live.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(Box::new(FakeDispatch {
            stream,
            thread,
            pending_since: self.pending_since.clone(),
        }))
    }
}

impl Dispatch for FakeDispatch {
    fn drain(&self) {}
    fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
    fn in_flight(&self) -> usize {
        0
    }
    fn oldest_request_age(&self) -> Option<Duration> {
        self.pending_since.lock().map(|t| t.elapsed())
    }
    fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
    fn wait(self: Box<Self>) {
        self.thread.join().unwrap();
    }
}

struct Env {
    _dir: tempfile::TempDir,
    sys: PathBuf,
    kernel: Arc<FakeKernel>,
    nodes: Arc<FakeNodes>,
    dispatcher: FakeDispatcher,
    attacher: Attacher,
}

impl Env {
    fn new(slots: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        fake::tree(&sys, slots);
        std::fs::create_dir(dir.path().join("dev")).unwrap();
        let pool = DevicePool::new(PoolConfig {
            sysfs_root: sys.clone(),
            lock_dir: dir.path().join("locks"),
            cooldown: Duration::ZERO,
            identity: crate::identity::Identity::new("boot", "h").unwrap(),
            cache_dir: None,
        });
        let kernel = Arc::new(FakeKernel {
            sys: sys.clone(),
            on_connect: Mutex::new(OnConnect::Work),
            on_reconfigure: Mutex::new(OnReconfigure::Work),
            reconfigures: Mutex::new(Vec::new()),
            capacity: Mutex::new(BTreeMap::new()),
            connected: Mutex::new(BTreeMap::new()),
            disconnects: AtomicUsize::new(0),
            teardown_gate: Mutex::new(None),
            held_open: Mutex::new(Vec::new()),
            refuse_disconnect: Mutex::new(None),
        });
        let pending_since = Arc::new(Mutex::new(None));
        let nodes = Arc::new(FakeNodes {
            dir: dir.path().join("dev"),
            flushes: AtomicUsize::new(0),
            drop_caches: AtomicUsize::new(0),
            fail_open: Mutex::new(false),
            pending_since: pending_since.clone(),
            flushed_while_pending: AtomicUsize::new(0),
        });
        let attacher = Attacher::new(pool, kernel.clone(), nodes.clone());
        Env {
            _dir: dir,
            sys,
            kernel,
            nodes,
            dispatcher: FakeDispatcher {
                live: Arc::new(AtomicUsize::new(0)),
                fail_spawn_after: Mutex::new(None),
                pending_since,
            },
            attacher,
        }
    }

    fn opts(&self, connections: usize) -> AttachOptions {
        AttachOptions {
            sandbox: "sb".into(),
            connections,
            connect_wait: Duration::from_millis(100),
            drain_wait: Duration::from_millis(500),
            quiesce_wait: Duration::from_millis(200),
            ..Default::default()
        }
    }

    /// Attaches the test dispatcher with `connections` sockets (must succeed).
    async fn attach(&self, connections: usize) -> Attachment {
        self.attacher
            .attach(&self.dispatcher, &self.opts(connections))
            .await
            .unwrap()
    }

    /// Nothing is left: no connected device, no live dispatcher, no claim, every slot quiescent.
    fn assert_clean(&self) {
        assert!(
            self.kernel.connected.lock().is_empty(),
            "device left connected"
        );
        assert_eq!(
            self.dispatcher.live.load(Ordering::SeqCst),
            0,
            "dispatcher left running"
        );
        let pool = self.attacher.pool();
        assert_eq!(pool.metrics().claimed, 0, "claim left held");
        let s = crate::sysfs::Sysfs::new(&self.sys);
        for i in s.pool_indices().unwrap() {
            s.slot(i).unwrap().check_quiescent().unwrap();
        }
        // And every slot can be claimed again.
        let held: Vec<_> = (0..s.pool_indices().unwrap().len())
            .map(|_| pool.claim("again").unwrap())
            .collect();
        drop(held);
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

#[test]
fn attach_flush_close_and_reuse() {
    let env = Env::new(2);
    let events = env.attacher.pool().events();
    rt().block_on(async {
        for round in 0..3 {
            let a = env.attach(2).await;
            assert_eq!(a.size(), 1 << 20);
            assert_eq!(a.device_path(), crate::identity::device_path(a.index()));
            assert_eq!(env.dispatcher.live.load(Ordering::SeqCst), 2);
            let st = env.attacher.pool().list().unwrap();
            assert_eq!(
                st[a.index() as usize].state,
                crate::pool::SlotState::Connected,
                "round {round}"
            );
            a.flush().unwrap();
            a.close().await.unwrap();
            env.assert_clean();
        }
    });
    assert_eq!(env.nodes.flushes.load(Ordering::SeqCst), 6);
    let evs: Vec<_> = events.try_iter().collect();
    assert!(matches!(evs[0], PoolEvent::Claimed { .. }));
    assert!(matches!(evs[1], PoolEvent::Connected { .. }));
    assert!(matches!(evs[2], PoolEvent::Disconnected { .. }));
    assert!(matches!(evs[3], PoolEvent::Released { .. }));
    assert_eq!(env.attacher.pool().metrics().connect_latency.count, 3);
}

#[test]
fn close_waits_for_the_kernels_teardown() {
    let env = Env::new(1);
    let gate = Arc::new(Gate::default());
    *env.kernel.teardown_gate.lock() = Some(gate.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap();
    let a = rt
        .block_on(env.attacher.attach(&env.dispatcher, &env.opts(1)))
        .unwrap();
    let opts_wait = env.opts(1).quiesce_wait;
    assert!(opts_wait >= Duration::from_millis(200));
    let close = rt.spawn(a.close());
    std::thread::sleep(Duration::from_millis(50));
    // DISCONNECT returned but the teardown has not finished: close is still waiting.
    assert!(!close.is_finished());
    gate.open();
    rt.block_on(close).unwrap().unwrap();
    let m = env.attacher.pool().metrics();
    assert_eq!(m.teardown_pending.pid, 1);
    env.assert_clean();
}

#[test]
fn a_slot_still_tearing_down_is_not_reused() {
    let env = Env::new(1);
    let gate = Arc::new(Gate::default());
    *env.kernel.teardown_gate.lock() = Some(gate.clone());
    rt().block_on(async {
        let a = env.attach(1).await;
        // Dropping does not wait for the teardown: the slot's claim is released at once...
        drop(a);
        // ...but the pool will not hand the slot out while sysfs still shows it in use.
        match env.attacher.pool().claim("next") {
            Err(crate::pool::PoolError::Exhausted {
                not_quiescent: 1, ..
            }) => {}
            other => panic!("{other:?}"),
        }
        gate.open();
        let s = env.attacher.pool().sysfs().clone();
        assert!(wait::until(Duration::from_secs(10), || s
            .slot(0)
            .unwrap()
            .check_quiescent()
            .ok())
        .await
        .is_some());
    });
    env.assert_clean();
}

#[test]
fn dropping_an_attachment_disconnects_and_releases() {
    let env = Env::new(1);
    rt().block_on(async {
        let a = env.attach(1).await;
        drop(a);
    });
    env.assert_clean();
}

#[test]
fn refused_connect_is_classified_and_releases_the_slot() {
    let env = Env::new(1);
    *env.kernel.on_connect.lock() = OnConnect::Refuse(libc::EINVAL);
    let err = rt()
        .block_on(env.attacher.attach(&env.dispatcher, &env.opts(1)))
        .unwrap_err();
    match &err {
        AttachError::Connect {
            source: NlError::Refused { errno },
            ..
        } => assert_eq!(*errno, libc::EINVAL),
        other => panic!("{other:?}"),
    }
    // Refused: nothing to undo, so no disconnect was sent.
    assert_eq!(env.kernel.disconnects.load(Ordering::SeqCst), 0);
    assert_eq!(
        env.attacher.pool().metrics().failures_by_errno[&libc::EINVAL],
        1
    );
    env.assert_clean();
}

#[test]
fn ebusy_from_connect_moves_on_to_the_next_slot() {
    let env = Env::new(4);
    // Every slot but slot 2 is held open by an idle opener sysfs cannot show.
    *env.kernel.held_open.lock() = vec![0, 1, 3];
    let rt = rt();
    let a = rt.block_on(env.attach(1));
    assert_eq!(a.index(), 2);
    // The skipped slots' claims were let go once the attach succeeded.
    assert_eq!(env.attacher.pool().metrics().claimed, 1);
    rt.block_on(a.close()).unwrap();
    // With every slot held open, the attach fails with the pool's "exhausted", having tried each.
    *env.kernel.held_open.lock() = vec![0, 1, 2, 3];
    let err = rt.block_on(env.attacher.attach(&env.dispatcher, &env.opts(1)));
    assert!(
        matches!(
            err,
            Err(AttachError::Pool(PoolError::Exhausted { busy: 4, .. }))
        ),
        "{err:?}"
    );
    env.kernel.held_open.lock().clear();
    env.assert_clean();
}

#[test]
fn a_failed_disconnect_keeps_the_claim() {
    let env = Env::new(1);
    let rt = rt();
    let a = rt.block_on(env.attach(1));
    *env.kernel.refuse_disconnect.lock() = Some(libc::EPERM);
    let err = rt.block_on(a.close());
    assert!(
        matches!(err, Err(AttachError::Disconnect { .. })),
        "{err:?}"
    );
    // The device is still connected and its claim still held: no other process may take it,
    // and reclaim by anyone else sees a live owner.
    let other = DevicePool::new(env.attacher.pool().config().clone());
    assert!(other.locks().try_lock(0).unwrap().is_none());
    assert!(other.claim("x").is_err());
}

#[test]
fn ambiguous_connect_is_undone() {
    let env = Env::new(1);
    *env.kernel.on_connect.lock() = OnConnect::AmbiguousConnected;
    let err = rt()
        .block_on(env.attacher.attach(&env.dispatcher, &env.opts(1)))
        .unwrap_err();
    assert!(matches!(
        err,
        AttachError::Connect {
            source: NlError::Ambiguous(_),
            ..
        }
    ));
    assert_eq!(env.kernel.disconnects.load(Ordering::SeqCst), 1);
    env.assert_clean();
}

#[test]
fn every_later_failure_is_undone() {
    for (what, setup) in [
        (
            "invisible",
            &(|e: &Env| *e.kernel.on_connect.lock() = OnConnect::Invisible) as &dyn Fn(&Env),
        ),
        ("wrong size", &|e: &Env| {
            *e.kernel.on_connect.lock() = OnConnect::WrongSize
        }),
        ("open fails", &|e: &Env| *e.nodes.fail_open.lock() = true),
        ("second dispatcher fails", &|e: &Env| {
            *e.dispatcher.fail_spawn_after.lock() = Some(1)
        }),
    ] {
        let env = Env::new(1);
        setup(&env);
        let err = rt()
            .block_on(env.attacher.attach(&env.dispatcher, &env.opts(2)))
            .unwrap_err();
        match (what, &err) {
            ("invisible", AttachError::ConnectTimeout { .. })
            | ("wrong size", AttachError::SizeMismatch { .. })
            | ("open fails", AttachError::Open { .. })
            | ("second dispatcher fails", AttachError::Dispatch(_)) => {}
            _ => panic!("{what}: {err:?}"),
        }
        env.assert_clean();
    }
}

#[test]
fn bad_options_fail_before_claiming() {
    let env = Env::new(1);
    let err = rt()
        .block_on(env.attacher.attach(&env.dispatcher, &env.opts(0)))
        .unwrap_err();
    assert!(matches!(err, AttachError::Invalid(_)));
    assert_eq!(env.attacher.pool().metrics().claims_total, 0);
}

/// Polls `fut` `n` times (or until it finishes) and drops it.
async fn poll_n_then_drop<F: Future>(fut: F, n: usize) -> bool {
    let mut fut = pin!(fut);
    for _ in 0..n {
        let done = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_ready())).await;
        if done {
            return true;
        }
        tokio::task::yield_now().await;
    }
    false
}

#[test]
fn cancelling_attach_at_every_stage_leaves_nothing() {
    let mut finished_at = None;
    for n in 0..64 {
        let env = Env::new(2);
        let done = rt().block_on(async {
            poll_n_then_drop(env.attacher.attach(&env.dispatcher, &env.opts(2)), n).await
        });
        // A finished attach returned an Attachment, which the drop above also tore down.
        env.assert_clean();
        if done {
            finished_at = Some(n);
            break;
        }
    }
    // The attach has at least five cancellation points before it completes.
    assert!(finished_at.is_some_and(|n| n >= 5), "{finished_at:?}");
}

#[test]
fn cancelling_close_at_every_stage_leaves_nothing() {
    let mut finished_at = None;
    for n in 0..64 {
        let env = Env::new(1);
        let done = rt().block_on(async {
            let a = env.attach(1).await;
            poll_n_then_drop(a.close(), n).await
        });
        env.assert_clean();
        if done {
            finished_at = Some(n);
            break;
        }
    }
    assert!(finished_at.is_some_and(|n| n >= 1), "{finished_at:?}");
}

mod warm {
    use super::*;
    use rootfork_block::BlockDevice;
    use rootfork_nbd::testing::MemDevice;

    #[test]
    fn an_unbound_switchable_device_reads_zeroes_and_refuses_writes() {
        let s = SwitchableDevice::new(1 << 20, 4096);
        let mut b = [7u8; 4096];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0u8; 4096]);
        assert!(s.write_at(&b, 0).is_err());
        assert!(s.read_at(&mut b, 1 << 20).is_err());
        assert_eq!(
            s.bind(Arc::new(MemDevice::new(2 << 20, 4096))),
            Err(BindError::SizeMismatch {
                expected: 1 << 20,
                got: 2 << 20
            })
        );
        let m = Arc::new(MemDevice::new(1 << 20, 4096));
        m.write_at(&[5u8; 4096], 4096).unwrap();
        s.bind(m.clone()).unwrap();
        assert_eq!(s.bind(m), Err(BindError::AlreadyBound));
        s.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [5u8; 4096]);
        s.write_at(&[6u8; 4096], 0).unwrap();
    }

    #[test]
    fn a_warm_slot_binds_without_a_kernel_round_trip() {
        let env = Env::new(2);
        rt().block_on(async {
            let sw = Arc::new(SwitchableDevice::new(1 << 20, 4096));
            // The fake dispatcher's size is 1 MiB, as the switchable device's.
            let a = env.attach(1).await;
            let warm = WarmSlot::new(a, sw);
            let disconnects = env.kernel.disconnects.load(Ordering::SeqCst);
            assert_eq!(
                warm.fits(&MemDevice::new(4096, 4096)),
                Err(BindError::SizeMismatch {
                    expected: 1 << 20,
                    got: 4096
                })
            );
            let flushes = env.nodes.flushes.load(Ordering::SeqCst);
            let drops = env.nodes.drop_caches.load(Ordering::SeqCst);
            let a = warm
                .bind(Arc::new(MemDevice::new(1 << 20, 4096)), "late")
                .unwrap();
            // The bind dropped the page cache (no fsync: the unbound device took no write) and
            // talked to no one else.
            assert_eq!(env.nodes.drop_caches.load(Ordering::SeqCst), drops + 1);
            assert_eq!(env.nodes.flushes.load(Ordering::SeqCst), flushes);
            assert_eq!(env.kernel.disconnects.load(Ordering::SeqCst), disconnects);
            let st = env.attacher.pool().list().unwrap();
            assert_eq!(st[a.index() as usize].sandbox.as_deref(), Some("late"));
            a.close().await.unwrap();
        });
        env.assert_clean();
    }

    #[test]
    fn a_warm_bind_waits_for_reads_sent_before_it() {
        let env = Env::new(1);
        rt().block_on(async {
            let sw = Arc::new(SwitchableDevice::new(1 << 20, 4096));
            let warm = WarmSlot::new(env.attach(1).await, sw);
            // A read from before the bind is still being answered (with zeroes) when bind
            // starts; it is answered a moment later, from another thread.
            *env.dispatcher.pending_since.lock() = Some(std::time::Instant::now());
            let pending = env.dispatcher.pending_since.clone();
            let answer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                *pending.lock() = None;
            });
            let a = warm
                .bind(Arc::new(MemDevice::new(1 << 20, 4096)), "s")
                .unwrap();
            answer.join().unwrap();
            // The page cache was dropped only after that read was answered.
            assert_eq!(env.nodes.flushed_while_pending.load(Ordering::SeqCst), 0);
            assert!(env.nodes.drop_caches.load(Ordering::SeqCst) >= 1);
            a.close().await.unwrap();
        });
        env.assert_clean();
    }
}

/// A daemon spawns attaches and closes on a multi-threaded runtime: both futures must be `Send`.
#[test]
fn attach_and_close_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let env = Env::new(1);
    let opts = env.opts(1);
    let f = env.attacher.attach(&env.dispatcher, &opts);
    assert_send(&f);
    let a = rt().block_on(f).unwrap();
    let c = a.close();
    assert_send(&c);
    rt().block_on(c).unwrap();
}

#[path = "tests_reconnect.rs"]
mod reconnect;

#[path = "tests_adopt.rs"]
mod adopt;
