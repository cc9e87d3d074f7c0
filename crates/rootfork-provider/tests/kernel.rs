//! Kernel provider through a fake kernel: a sysfs tree, netlink control and device nodes in a
//! tempdir. The fake kernel keeps its ends of the attachment's socketpairs and speaks the NBD
//! kernel protocol on them, so data really flows through rootfork's kernel-mode dispatcher into
//! the overlay. (The real `/dev/nbdN` path needs the `nbd` module, i.e. the kernel VM harness.)

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{make_template, never, sha256, WriteWatch};
use rootfork_block::{OverlayOptions, TemplatePath};
use rootfork_kernel::netlink::{ConnectRequest, DeviceStatus, NlError, ReconfigureRequest};
use rootfork_kernel::{AttachOptions, Attacher, DeviceNodes, DevicePool, NbdControl, PoolConfig};
use rootfork_nbd::ServeOptions;
use rootfork_provider::{
    BaseImage, KernelConfig, KernelProvider, Provider, ProviderError, ProviderKind,
};

const SLOTS: u32 = 4;

struct FakeKernel {
    sys: PathBuf,
    /// Connect succeeds but the device never shows up in sysfs.
    invisible: AtomicBool,
    sockets: Mutex<BTreeMap<u32, Vec<OwnedFd>>>,
    disconnects: AtomicUsize,
    /// RECONFIGURE is refused (`EOPNOTSUPP`) instead of taking the new sockets.
    refuse_reconfigure: AtomicBool,
    /// Sockets taken by RECONFIGURE requests.
    reconfigured: AtomicUsize,
}

impl FakeKernel {
    fn slot(&self, i: u32) -> PathBuf {
        self.sys.join(format!("block/nbd{i}"))
    }

    /// A clone of the kernel's end of the first socket of device `i`.
    fn socket(&self, i: u32) -> UnixStream {
        let fd = self.sockets.lock().unwrap()[&i][0].try_clone().unwrap();
        UnixStream::from(fd)
    }

    /// A clone of the kernel's end of the newest socket of device `i`.
    fn newest_socket(&self, i: u32) -> UnixStream {
        let fd = self.sockets.lock().unwrap()[&i]
            .last()
            .unwrap()
            .try_clone()
            .unwrap();
        UnixStream::from(fd)
    }

    /// Kills the first connection of device `i` the way a dead peer would: the kernel's end is
    /// shut down and dropped, so rootfork's dispatcher for it sees end-of-file and finishes.
    fn kill_connection(&self, i: u32) {
        let fd = self.sockets.lock().unwrap().get_mut(&i).unwrap().remove(0);
        nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            nix::sys::socket::Shutdown::Both,
        )
        .unwrap();
    }
}

impl NbdControl for FakeKernel {
    fn connect(&self, req: &ConnectRequest) -> Result<u32, NlError> {
        let i = req.index.expect("rootfork names the slot");
        let mut refs = Vec::new();
        for &fd in &req.sockets {
            // SAFETY: the caller keeps the socket open for the duration of this call; we take
            // our own reference like the kernel does.
            let b = unsafe { BorrowedFd::borrow_raw(fd) };
            refs.push(
                b.try_clone_to_owned()
                    .map_err(|_| NlError::Refused { errno: libc::EBADF })?,
            );
        }
        if !self.invisible.load(Ordering::SeqCst) {
            let d = self.slot(i);
            std::fs::write(d.join("pid"), format!("{}\n", std::process::id())).unwrap();
            std::fs::write(d.join("size"), format!("{}\n", req.size_bytes / 512)).unwrap();
            if let Some(b) = &req.backend_identifier {
                std::fs::write(d.join("backend"), format!("{b}\n")).unwrap();
            }
        }
        self.sockets.lock().unwrap().insert(i, refs);
        Ok(i)
    }

    fn disconnect(&self, i: u32) -> Result<(), NlError> {
        self.disconnects.fetch_add(1, Ordering::SeqCst);
        let refs = self.sockets.lock().unwrap().remove(&i);
        let Some(refs) = refs else {
            return Err(NlError::Refused {
                errno: libc::EINVAL,
            });
        };
        for r in &refs {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(r),
                nix::sys::socket::Shutdown::Both,
            );
        }
        let d = self.slot(i);
        let _ = std::fs::remove_file(d.join("pid"));
        let _ = std::fs::remove_file(d.join("backend"));
        std::fs::write(d.join("size"), "0\n").unwrap();
        Ok(())
    }

    fn reconfigure(&self, req: &ReconfigureRequest) -> Result<(), NlError> {
        if self.refuse_reconfigure.load(Ordering::SeqCst) {
            return Err(NlError::Refused {
                errno: libc::EOPNOTSUPP,
            });
        }
        let mut all = self.sockets.lock().unwrap();
        let Some(refs) = all.get_mut(&req.index) else {
            return Err(NlError::Refused {
                errno: libc::EINVAL,
            });
        };
        for &fd in &req.sockets {
            // SAFETY: as in `connect`: the caller keeps the socket open during this call.
            let b = unsafe { BorrowedFd::borrow_raw(fd) };
            refs.push(b.try_clone_to_owned().unwrap());
            self.reconfigured.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn status(&self, _: Option<u32>) -> Result<Vec<DeviceStatus>, NlError> {
        Ok(vec![])
    }
}

struct FakeNodes {
    dir: PathBuf,
    flushes: AtomicUsize,
}

impl DeviceNodes for FakeNodes {
    fn open(&self, i: u32) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join(format!("nbd{i}")))
    }

    fn flush(&self, f: &std::fs::File) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        f.sync_all()
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    template: PathBuf,
    kernel: Arc<FakeKernel>,
    nodes: Arc<FakeNodes>,
    pool: DevicePool,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let sys = root.join("sys");
    std::fs::create_dir_all(sys.join("module/nbd/parameters")).unwrap();
    std::fs::write(
        sys.join("module/nbd/parameters/nbds_max"),
        format!("{SLOTS}\n"),
    )
    .unwrap();
    for i in 0..SLOTS {
        let d = sys.join(format!("block/nbd{i}"));
        std::fs::create_dir_all(d.join("holders")).unwrap();
        std::fs::write(d.join("size"), "0\n").unwrap();
        std::fs::write(d.join("inflight"), "       0        0\n").unwrap();
    }
    std::fs::create_dir_all(root.join("nodes")).unwrap();
    let template = make_template(&root, 4);
    let kernel = Arc::new(FakeKernel {
        sys: sys.clone(),
        invisible: AtomicBool::new(false),
        sockets: Mutex::new(BTreeMap::new()),
        disconnects: AtomicUsize::new(0),
        refuse_reconfigure: AtomicBool::new(false),
        reconfigured: AtomicUsize::new(0),
    });
    let nodes = Arc::new(FakeNodes {
        dir: root.join("nodes"),
        flushes: AtomicUsize::new(0),
    });
    let pool = DevicePool::new(PoolConfig {
        sysfs_root: sys,
        lock_dir: root.join("locks"),
        cooldown: Duration::ZERO,
        identity: rootfork_kernel::identity::Identity::new("boot", "provider-test").unwrap(),
        cache_dir: None,
    });
    Rig {
        _dir: dir,
        root,
        template,
        kernel,
        nodes,
        pool,
    }
}

impl Rig {
    fn provider(&self, base: BaseImage, name: &str, connect_wait: Duration) -> KernelProvider {
        let attacher = Attacher::new(self.pool.clone(), self.kernel.clone(), self.nodes.clone());
        let cfg = KernelConfig {
            base,
            cache: self.root.join(format!("{name}.cache")),
            overlay: OverlayOptions::default(),
            attach: AttachOptions {
                sandbox: name.into(),
                connect_wait,
                drain_wait: Duration::from_secs(2),
                quiesce_wait: Duration::from_secs(2),
                ..AttachOptions::default()
            },
            serve: ServeOptions::default(),
        };
        let nodes = self.root.join("nodes");
        KernelProvider::new(cfg, attacher)
            .with_node_path(Arc::new(move |i| nodes.join(format!("nbd{i}"))))
    }

    fn base(&self) -> BaseImage {
        BaseImage::Template(TemplatePath::new(&self.template))
    }
}

/// One request in the kernel's NBD dialect (simple replies); returns (error, read payload).
fn nbd_request(
    s: &mut UnixStream,
    cmd: u16,
    cookie: u64,
    offset: u64,
    data: &[u8],
    read_len: u32,
) -> (u32, Vec<u8>) {
    let len = if cmd == 1 {
        data.len() as u32
    } else {
        read_len
    };
    let mut req = Vec::with_capacity(28 + data.len());
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&cmd.to_be_bytes());
    req.extend_from_slice(&cookie.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    req.extend_from_slice(data);
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[0..4].try_into().unwrap()),
        0x6744_6698,
        "reply magic"
    );
    assert_eq!(
        u64::from_be_bytes(reply[8..16].try_into().unwrap()),
        cookie,
        "reply cookie"
    );
    let err = u32::from_be_bytes(reply[4..8].try_into().unwrap());
    let mut payload = vec![
        0u8;
        if cmd == 0 && err == 0 {
            read_len as usize
        } else {
            0
        }
    ];
    s.read_exact(&mut payload).unwrap();
    (err, payload)
}

fn slot_is_quiescent(sys: &Path, i: u32) -> bool {
    let d = sys.join(format!("block/nbd{i}"));
    !d.join("pid").exists() && std::fs::read_to_string(d.join("size")).unwrap().trim() == "0"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_serve_pause_resume_and_release_through_a_fake_kernel() {
    let r = rig();
    let before = sha256(&r.template);
    let watch = WriteWatch::new(&r.template);
    let mut p = r.provider(r.base(), "k1", Duration::from_secs(10));
    assert_eq!(p.kind(), ProviderKind::Kernel);
    p.start().unwrap();
    let dev = p.path(Duration::from_secs(30), never()).await.unwrap();
    let index = p.index().unwrap();
    assert_eq!(dev.path(), r.root.join(format!("nodes/nbd{index}")));

    // The "kernel" writes through rootfork's dispatcher into the overlay.
    let mut k = r.kernel.socket(index);
    let block = [0x5Au8; 4096];
    let (err, _) = tokio::task::spawn_blocking({
        let mut k = k.try_clone().unwrap();
        move || nbd_request(&mut k, 1, 7, 4096 * 3, &block, 0)
    })
    .await
    .unwrap();
    assert_eq!(err, 0);

    let flushes = r.nodes.flushes.load(Ordering::SeqCst);
    let data = r.root.join("k1.diff");
    let paused = p.export_diff(&data).await.unwrap();
    assert!(
        r.nodes.flushes.load(Ordering::SeqCst) > flushes,
        "device not flushed before export"
    );
    assert!(paused
        .map
        .runs
        .iter()
        .any(|run| run.offset <= 4096 * 3 && run.end() >= 4096 * 4));
    // Frozen: a later write is refused on the wire, not dropped.
    let (err, _) = tokio::task::spawn_blocking(move || nbd_request(&mut k, 1, 8, 0, b"late", 0))
        .await
        .unwrap();
    assert_ne!(err, 0, "write after export_diff was accepted");

    p.close().await.unwrap();
    p.close().await.unwrap();
    assert_eq!(r.kernel.disconnects.load(Ordering::SeqCst), 1);
    assert!(slot_is_quiescent(&r.kernel.sys, index));
    assert!(!r.root.join("k1.cache").exists(), "cache left behind");
    assert!(matches!(
        p.path(Duration::from_secs(1), never()).await,
        Err(ProviderError::Closed)
    ));

    // Resume on a new overlay over template + diff; read the block back through the "kernel".
    let base = BaseImage::Resumed {
        template: TemplatePath::new(&r.template),
        paused,
    };
    let mut q = r.provider(base, "k1-resumed", Duration::from_secs(10));
    q.start().unwrap();
    q.path(Duration::from_secs(30), never()).await.unwrap();
    let mut k = r.kernel.socket(q.index().unwrap());
    let (err, got) =
        tokio::task::spawn_blocking(move || nbd_request(&mut k, 0, 9, 4096 * 3, &[], 4096))
            .await
            .unwrap();
    assert_eq!(err, 0);
    assert_eq!(got, block, "the resumed device lost the paused write");
    q.close().await.unwrap();
    assert_eq!(sha256(&r.template), before);
    assert_eq!(
        watch.events().0,
        0,
        "the template was opened writable or modified"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_without_close_disconnects_and_releases() {
    let r = rig();
    let mut p = r.provider(r.base(), "dropped", Duration::from_secs(10));
    p.start().unwrap();
    p.path(Duration::from_secs(30), never()).await.unwrap();
    let index = p.index().unwrap();
    drop(p);
    assert_eq!(r.kernel.disconnects.load(Ordering::SeqCst), 1);
    assert!(slot_is_quiescent(&r.kernel.sys, index));
    assert!(!r.root.join("dropped.cache").exists());
    // The slot can be claimed again.
    let lease = r.pool.claim("again").unwrap();
    drop(lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_appears_times_out_and_close_unwinds_the_attach() {
    let r = rig();
    r.kernel.invisible.store(true, Ordering::SeqCst);
    let mut p = r.provider(r.base(), "slow", Duration::from_secs(60));
    p.start().unwrap();
    let res = p.path(Duration::from_millis(200), never()).await;
    assert!(matches!(res, Err(ProviderError::Timeout(_))), "{res:?}");
    let res = p
        .path(
            Duration::from_secs(60),
            tokio::time::sleep(Duration::from_millis(50)),
        )
        .await;
    assert!(matches!(res, Err(ProviderError::Cancelled)), "{res:?}");
    let t = Instant::now();
    p.close().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "close waited for the attach's own timeout"
    );
    // The abandoned attach had connected: its guard disconnected the device.
    assert_eq!(r.kernel.disconnects.load(Ordering::SeqCst), 1);
    assert!(r.kernel.sockets.lock().unwrap().is_empty());
    assert!(!r.root.join("slow.cache").exists());
}

/// Waits (bounded) until the provider reports `dead` dead connections.
async fn wait_dead(p: &KernelProvider, dead: usize) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let h = p.connection_health().expect("attached");
        if h.dead == dead {
            return;
        }
        assert!(
            Instant::now() < until,
            "dead connections: {h:?}, want {dead}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_connection_is_reconnected_and_counters_survive() {
    let r = rig();
    let mut p = r.provider(r.base(), "rc", Duration::from_secs(2));
    assert!(p.nbd_stats().is_none(), "counters before attach");
    p.start().unwrap();
    p.path(Duration::from_secs(30), never()).await.unwrap();
    let index = p.index().unwrap();
    let h = p.connection_health().unwrap();
    assert_eq!((h.connections, h.dead, h.in_flight), (1, 0, 0));
    assert_eq!(p.oldest_request_age(), None);
    // Nothing dead: nothing to do.
    assert_eq!(p.reconnect().await.unwrap(), 0);
    assert_eq!(r.kernel.reconfigured.load(Ordering::SeqCst), 0);

    let block = [0xA5u8; 4096];
    let mut k = r.kernel.socket(index);
    let (err, _) = tokio::task::spawn_blocking(move || nbd_request(&mut k, 1, 1, 8192, &block, 0))
        .await
        .unwrap();
    assert_eq!(err, 0);
    let st = p.nbd_stats().unwrap();
    assert_eq!(st.op(rootfork_nbd::Op::Write).count, 1);

    r.kernel.kill_connection(index);
    wait_dead(&p, 1).await;
    assert_eq!(p.reconnect().await.unwrap(), 1);
    assert_eq!(r.kernel.reconfigured.load(Ordering::SeqCst), 1);
    assert_eq!(p.connection_health().unwrap().dead, 0);
    // The replacement connection serves the same overlay: the earlier write reads back.
    let mut k = r.kernel.socket(index);
    let (err, got) =
        tokio::task::spawn_blocking(move || nbd_request(&mut k, 0, 2, 8192, &[], 4096))
            .await
            .unwrap();
    assert_eq!(err, 0);
    assert_eq!(got, block);
    // One set of counters across the old and the new connection.
    let st = p.nbd_stats().unwrap();
    assert_eq!(st.op(rootfork_nbd::Op::Write).count, 1);
    assert_eq!(st.op(rootfork_nbd::Op::Read).count, 1);

    p.close().await.unwrap();
    assert!(slot_is_quiescent(&r.kernel.sys, index));
    assert!(p.connection_health().is_none());
    // Final counts after close.
    let st = p.nbd_stats().expect("final counters after close");
    assert_eq!(st.op(rootfork_nbd::Op::Read).count, 1);
    assert!(matches!(p.reconnect().await, Err(ProviderError::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reconnect_is_an_error_and_the_device_still_closes() {
    let r = rig();
    r.kernel.refuse_reconfigure.store(true, Ordering::SeqCst);
    let mut p = r.provider(r.base(), "rf", Duration::from_secs(2));
    p.start().unwrap();
    p.path(Duration::from_secs(30), never()).await.unwrap();
    let index = p.index().unwrap();
    r.kernel.kill_connection(index);
    wait_dead(&p, 1).await;
    let e = p.reconnect().await.unwrap_err();
    assert!(
        matches!(
            &e,
            ProviderError::Kernel(rootfork_kernel::AttachError::Reconfigure { .. })
        ),
        "{e:?}"
    );
    // Still attached, still dead; the attachment went back in place.
    assert_eq!(p.index(), Some(index));
    assert_eq!(p.connection_health().unwrap().dead, 1);
    // Every connection dead: close skips the flush and says so, but releases the device.
    let e = p.close().await.unwrap_err();
    assert!(
        matches!(
            &e,
            ProviderError::Kernel(rootfork_kernel::AttachError::ConnectionsDead { .. })
        ),
        "{e:?}"
    );
    assert!(slot_is_quiescent(&r.kernel.sys, index));
    assert!(!r.root.join("rf.cache").exists(), "cache left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_kills_a_connection_only_when_enabled() {
    let r = rig();
    let mut off = r.provider(r.base(), "off", Duration::from_secs(2));
    off.start().unwrap();
    off.path(Duration::from_secs(30), never()).await.unwrap();
    assert!(matches!(
        off.inject_connection_failure(),
        Err(ProviderError::Unsupported { .. })
    ));
    assert_eq!(off.connection_health().unwrap().dead, 0);
    off.close().await.unwrap();

    let mut p = r
        .provider(r.base(), "inj", Duration::from_secs(2))
        .with_fault_injection();
    assert!(
        !p.inject_connection_failure().unwrap(),
        "nothing attached yet"
    );
    p.start().unwrap();
    p.path(Duration::from_secs(30), never()).await.unwrap();
    let index = p.index().unwrap();
    assert!(p.inject_connection_failure().unwrap());
    wait_dead(&p, 1).await;
    // No live connection left to kill.
    assert!(!p.inject_connection_failure().unwrap());
    assert_eq!(p.reconnect().await.unwrap(), 1);
    assert_eq!(p.connection_health().unwrap().dead, 0);
    // The replacement is served, and is itself a target again.
    let mut k = r.kernel.newest_socket(index);
    let (err, _) = tokio::task::spawn_blocking(move || nbd_request(&mut k, 0, 1, 0, &[], 4096))
        .await
        .unwrap();
    assert_eq!(err, 0);
    assert!(p.inject_connection_failure().unwrap());
    wait_dead(&p, 1).await;
    assert_eq!(p.reconnect().await.unwrap(), 1);
    p.close().await.unwrap();
    assert!(slot_is_quiescent(&r.kernel.sys, index));
}
