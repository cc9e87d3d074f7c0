//! Kernel-in-the-loop checks run inside the test VM (see `tests/vm/`), built statically.
//!
//! - `vmtest latency N TEMPLATE`: N cold attaches (claim → connect → ready → open) and closes of
//!   fresh overlays of TEMPLATE, then N attaches from pre-connected (warm) slots (bind + page
//!   cache flush only; each checked to read the template, not what the kernel cached before the
//!   bind); prints p50/p95 of each.
//! - `vmtest invalid TEMPLATE`: a connect the kernel must refuse (block size 8192 > PAGE_SIZE);
//!   checks the error is `Refused { EINVAL }` and the slot was released and is quiescent.
//! - `vmtest netlink TEMPLATE`: `NBD_CMD_STATUS` of all devices and of one, and
//!   `NBD_CMD_RECONFIGURE` of a connected device, against the real kernel.
//! - `vmtest reconnect TEMPLATE`: kills one kernel connection of an attached device (through a
//!   test-side dispatcher that keeps a handle on our socket ends) and checks detection
//!   (`connection_health`), I/O while it is dead, `reconnect()` with `NBD_CMD_RECONFIGURE`, the
//!   data afterwards, stats across connections and a clean close; for 1 connection with and
//!   without `dead_conn_timeout`, and for 2 connections.
//! - `vmtest claim-all`: claims every free slot, prints how many and what the quiescence check
//!   refused, releases them.
//!
//! Every check prints `PASS <name>` or `FAIL <name>: <why>` and exits non-zero on failure.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rootfork_block::{BlockDevice, Overlay, OverlayOptions, TemplateFile, TemplatePath};
use rootfork_kernel::netlink::{chain, NbdControl, ReconfigureRequest};
use rootfork_kernel::{
    AttachError, AttachOptions, Attacher, Attachment, DevicePool, Dispatch, Dispatcher, HostNodes,
    NbdDispatcher, NbdNetlink, NlError, PoolConfig, SwitchableDevice, WarmSlot,
};
use rootfork_nbd::testing::GatedDevice;
use rootfork_nbd::ServeOptions;

fn overlay(template: &Path, cache: &Path) -> Arc<dyn BlockDevice> {
    let t = TemplateFile::open(&TemplatePath::new(template)).expect("template");
    let _ = std::fs::remove_file(cache);
    Arc::new(Overlay::create(Arc::new(t), cache, OverlayOptions::default()).expect("overlay"))
}

fn attacher() -> Attacher {
    let pool = DevicePool::new(PoolConfig::default());
    let control = Arc::new(NbdNetlink::open(Duration::from_secs(10)).expect("nbd netlink"));
    Attacher::new(pool, control, Arc::new(HostNodes))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn latency(n: usize, template: &Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let at = attacher();
    let (mut attach, mut close) = (Vec::new(), Vec::new());
    for i in 0..n {
        let d = NbdDispatcher::new(
            overlay(template, Path::new("/tmp/lat.cache")),
            ServeOptions::default(),
        );
        let opts = AttachOptions {
            sandbox: format!("lat-{i}"),
            ..Default::default()
        };
        let t0 = Instant::now();
        let a = rt
            .block_on(at.attach(&d, &opts))
            .map_err(|e| format!("attach {i}: {}", chain(&e)))?;
        attach.push(t0.elapsed().as_secs_f64() * 1e3);
        let t1 = Instant::now();
        rt.block_on(a.close())
            .map_err(|e| format!("close {i}: {}", chain(&e)))?;
        close.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "LATENCY cold_attach n={n} p50_ms={:.2} p95_ms={:.2} max_ms={:.2}",
        pct(&mut attach, 0.5),
        pct(&mut attach, 0.95),
        pct(&mut attach, 1.0)
    );
    println!(
        "LATENCY close n={n} p50_ms={:.2} p95_ms={:.2} max_ms={:.2}",
        pct(&mut close, 0.5),
        pct(&mut close, 0.95),
        pct(&mut close, 1.0)
    );
    let mut warm = Vec::new();
    let head = std::fs::read(template).map_err(|e| e.to_string())?;
    for i in 0..n {
        let size = head.len() as u64;
        let sw = Arc::new(SwitchableDevice::new(size, 4096));
        let d = NbdDispatcher::new(sw.clone(), ServeOptions::default());
        let opts = AttachOptions {
            sandbox: "warm".into(),
            ..Default::default()
        };
        let a = rt
            .block_on(at.attach(&d, &opts))
            .map_err(|e| format!("pre-connect {i}: {}", chain(&e)))?;
        let slot = WarmSlot::new(a, sw);
        let dev = overlay(template, Path::new("/tmp/warm.cache"));
        slot.fits(&*dev).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let a = slot
            .bind(dev, &format!("warm-{i}"))
            .map_err(|e| format!("bind {i}: {}", chain(&e)))?;
        warm.push(t0.elapsed().as_secs_f64() * 1e3);
        let mut b = vec![0u8; 65536];
        a.file()
            .read_exact_at(&mut b, 0)
            .map_err(|e| format!("read {i}: {}", chain(&e)))?;
        if b[..] != head[..65536] {
            return Err(format!("warm slot {i} served stale (pre-bind) data"));
        }
        rt.block_on(a.close())
            .map_err(|e| format!("close warm {i}: {}", chain(&e)))?;
    }
    println!(
        "LATENCY warm_attach n={n} p50_ms={:.3} p95_ms={:.3} max_ms={:.3}",
        pct(&mut warm, 0.5),
        pct(&mut warm, 0.95),
        pct(&mut warm, 1.0)
    );
    let m = at.pool().metrics();
    println!("METRICS {}", serde_json::to_string(&m).unwrap_or_default());
    if m.claimed != 0 {
        return Err(format!("{} slots still claimed", m.claimed));
    }
    Ok(())
}

fn invalid(template: &Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let at = attacher();
    let d = NbdDispatcher::new(
        overlay(template, Path::new("/tmp/invalid.cache")),
        ServeOptions::default(),
    );
    let opts = AttachOptions {
        sandbox: "invalid".into(),
        block_size: 8192,
        ..Default::default()
    };
    match rt.block_on(at.attach(&d, &opts)) {
        Ok(a) => Err(format!(
            "the kernel accepted block size 8192 on {:?}",
            a.device_path()
        )),
        Err(AttachError::Connect {
            index,
            source: NlError::Refused { errno },
        }) if errno == libc::EINVAL => {
            println!("invalid connect on nbd{index} refused: errno {errno} (EINVAL)");
            let m = at.pool().metrics();
            if m.claimed != 0 {
                return Err("the slot is still claimed".into());
            }
            if m.failures_by_errno.get(&libc::EINVAL) != Some(&1) {
                return Err(format!("failure not counted: {:?}", m.failures_by_errno));
            }
            let st = at.pool().sysfs().slot(index).map_err(|e| e.to_string())?;
            st.check_quiescent()
                .map_err(|w| format!("nbd{index} not quiescent: {w}"))?;
            // And the same slot can be claimed again.
            drop(
                at.pool()
                    .claim("after-invalid")
                    .map_err(|e| e.to_string())?,
            );
            Ok(())
        }
        Err(e) => Err(format!("unexpected error: {e:?}")),
    }
}

fn netlink(template: &Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let nl = NbdNetlink::open(Duration::from_secs(10)).map_err(|e| chain(&e))?;
    let before = nl.status(None).map_err(|e| chain(&e))?;
    if before.len() < 16 || before.iter().any(|d| d.connected) {
        return Err(format!("STATUS before: {before:?}"));
    }
    let at = attacher();
    let d = NbdDispatcher::new(
        overlay(template, Path::new("/tmp/netlink.cache")),
        ServeOptions::default(),
    );
    let opts = AttachOptions {
        sandbox: "netlink".into(),
        ..Default::default()
    };
    let a = rt.block_on(at.attach(&d, &opts)).map_err(|e| chain(&e))?;
    let one = nl.status(Some(a.index())).map_err(|e| chain(&e))?;
    let all = nl.status(None).map_err(|e| chain(&e))?;
    let connected: Vec<u32> = all
        .iter()
        .filter(|d| d.connected)
        .map(|d| d.index)
        .collect();
    println!("STATUS nbd{}: {one:?}; connected: {connected:?}", a.index());
    if one.len() != 1 || !one[0].connected || connected != vec![a.index()] {
        return Err("STATUS does not show exactly the attached device connected".into());
    }
    let backend = at
        .pool()
        .sysfs()
        .slot(a.index())
        .map_err(|e| e.to_string())?
        .backend;
    nl.reconfigure(&ReconfigureRequest {
        index: a.index(),
        timeout_secs: Some(60),
        backend_identifier: backend,
        ..Default::default()
    })
    .map_err(|e| format!("RECONFIGURE: {}", chain(&e)))?;
    let idx = a.index();
    rt.block_on(a.close()).map_err(|e| chain(&e))?;
    let after = nl.status(Some(idx)).map_err(|e| chain(&e))?;
    if after.iter().any(|d| d.connected) {
        return Err(format!("STATUS after close: {after:?}"));
    }
    // Disconnecting a device that is not connected is refused with a classified errno.
    match nl.disconnect(idx) {
        Err(NlError::Refused { errno }) => {
            println!("DISCONNECT of an idle device refused: errno {errno}")
        }
        Ok(()) => println!("DISCONNECT of an idle device accepted"),
        Err(e) => return Err(format!("DISCONNECT idle: {}", chain(&e))),
    }
    Ok(())
}

/// The real dispatcher, plus a handle on our end of every socket it serves so the test can kill a
/// connection from outside (`shutdown(SHUT_RDWR)`, as an I/O error ends it) without test-only API
/// in the production types.
struct Killable {
    inner: NbdDispatcher,
    ends: Mutex<Vec<UnixStream>>,
}

impl Killable {
    fn kill(&self, k: usize) -> io::Result<()> {
        self.ends.lock().unwrap()[k].shutdown(std::net::Shutdown::Both)
    }

    /// Kills the `k`-th (oldest first) of the connections still open; forgets the closed ones.
    fn kill_live(&self, k: usize) -> io::Result<()> {
        let mut ends = self.ends.lock().unwrap();
        ends.retain(|e| !hung_up(e));
        let e = ends.get(k).ok_or(io::ErrorKind::NotFound)?;
        e.shutdown(std::net::Shutdown::Both)
    }
}

/// Whether `s` or its peer is shut down (`POLLHUP`).
fn hung_up(s: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::empty())];
    poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

impl Dispatcher for Killable {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn server_flags(&self) -> u64 {
        self.inner.server_flags()
    }

    fn spawn(&self, stream: UnixStream) -> io::Result<Box<dyn Dispatch>> {
        self.ends.lock().unwrap().push(stream.try_clone()?);
        self.inner.spawn(stream)
    }
}

/// A 4096-aligned buffer of `len` bytes (O_DIRECT) carved out of a larger allocation.
struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let buf = vec![0u8; len + 4096];
        let off = buf.as_ptr().align_offset(4096);
        Aligned { buf, off, len }
    }

    fn filled(len: usize, seed: u8) -> Self {
        let mut a = Aligned::new(len);
        for (i, b) in a.as_mut().iter_mut().enumerate() {
            *b = seed ^ (i as u8).wrapping_mul(31) ^ ((i >> 12) as u8);
        }
        a
    }

    fn as_ref(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

fn direct(a: &Attachment) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(a.device_path())
}

fn read_direct(f: &File, len: usize, at: u64) -> io::Result<Aligned> {
    let mut b = Aligned::new(len);
    f.read_exact_at(b.as_mut(), at)?;
    Ok(b)
}

/// Waits (bounded) until `a` shows `dead` dead connections; returns how long it took.
fn until_dead(a: &Attachment, dead: usize, limit: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    while a.connection_health().dead != dead {
        if t.elapsed() > limit {
            return Err(format!("health: {:?}", a.connection_health()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(t.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// How I/O behaves while the killed connection is dead.
#[derive(Debug, Clone, Copy, PartialEq)]
enum WhileDead {
    /// `dead_conn_timeout` set, one connection: I/O waits for the reconnect.
    Waits,
    /// Two connections: the kernel sends to the live one.
    FallsBack,
    /// One connection, no `dead_conn_timeout`: I/O fails.
    Fails,
    /// `dead_conn_timeout` set but no reconnect within it: I/O waits, then fails.
    Expires,
}

fn reconnect_case(
    rt: &tokio::runtime::Runtime,
    at: &Attacher,
    template: &Path,
    name: &str,
    connections: usize,
    dead_conn_timeout: Option<Duration>,
    expect: WhileDead,
) -> Result<(), String> {
    const LEN: usize = 64 << 10;
    const AT1: u64 = 1 << 20;
    const AT2: u64 = 2 << 20;
    let d = Killable {
        inner: NbdDispatcher::new(
            overlay(template, &Path::new("/tmp").join(format!("{name}.cache"))),
            ServeOptions::default(),
        ),
        ends: Mutex::new(Vec::new()),
    };
    let opts = AttachOptions {
        sandbox: name.into(),
        connections,
        dead_conn_timeout,
        ..Default::default()
    };
    let mut a = rt
        .block_on(at.attach(&d, &opts))
        .map_err(|e| format!("attach: {}", chain(&e)))?;
    let index = a.index();
    let f = direct(&a).map_err(|e| format!("open O_DIRECT: {e}"))?;
    let p1 = Aligned::filled(LEN, 0x5a);
    f.write_all_at(p1.as_ref(), AT1)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("write pattern: {e}"))?;
    if read_direct(&f, LEN, AT1)
        .map_err(|e| e.to_string())?
        .as_ref()
        != p1.as_ref()
    {
        return Err("pattern does not read back before the kill".into());
    }
    let h = a.connection_health();
    if h.connections != connections || h.dead != 0 {
        return Err(format!("health before the kill: {h:?}"));
    }
    let before = d.inner.stats().total_requests();

    // Kill connection 0 and wait until the attachment sees it dead.
    d.kill(0).map_err(|e| format!("kill: {e}"))?;
    let detect = until_dead(&a, 1, Duration::from_secs(5))?;
    println!(
        "RECONNECT {name}: connection 0 seen dead after {:.2} ms; health {:?}",
        ms(detect),
        a.connection_health()
    );

    // I/O while it is dead: a direct read of the pattern on another thread.
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    let mut reader = Some(std::thread::spawn(move || {
        let t = Instant::now();
        let r = read_direct(&f2, LEN, AT1);
        (r, t.elapsed())
    }));
    let waited = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let blocked = !reader.as_ref().is_some_and(|r| r.is_finished());
    let mut early = None;
    if !blocked {
        let (r, t) = reader.take().unwrap().join().unwrap();
        println!(
            "RECONNECT {name}: I/O while dead finished in {:.2} ms: {}",
            ms(t),
            match &r {
                Ok(b) if b.as_ref() == p1.as_ref() => "ok, pattern".to_string(),
                Ok(_) => "ok, WRONG DATA".to_string(),
                Err(e) => format!("error {e}"),
            }
        );
        early = Some(r);
    }
    match (expect, blocked, &early) {
        (WhileDead::Waits, true, _) => {
            println!("RECONNECT {name}: I/O while dead is waiting (dead_conn_timeout)")
        }
        (WhileDead::Expires, true, _) => {
            let (r, t) = reader.take().unwrap().join().unwrap();
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EIO) => println!(
                    "RECONNECT {name}: I/O while dead waited {:.0} ms, then failed with EIO (dead_conn_timeout {:?})",
                    ms(t),
                    dead_conn_timeout.unwrap_or_default()
                ),
                other => {
                    return Err(format!(
                        "I/O after dead_conn_timeout: expected EIO, got {:?}",
                        other.map(|_| ())
                    ))
                }
            }
        }
        (WhileDead::FallsBack, false, Some(Ok(b))) if b.as_ref() == p1.as_ref() => {}
        (WhileDead::Fails, false, Some(Err(e))) if e.raw_os_error() == Some(libc::EIO) => {}
        _ => {
            return Err(format!(
                "I/O while dead: expected {expect:?}, blocked={blocked} result={:?}",
                early.as_ref().map(|r| r.as_ref().map(|_| ()))
            ))
        }
    }

    // Reconnect.
    let t0 = Instant::now();
    let n = rt
        .block_on(a.reconnect(&d))
        .map_err(|e| format!("reconnect: {}", chain(&e)))?;
    let took = t0.elapsed();
    println!(
        "LATENCY reconnect {name} connections={connections} replaced={n} ms={:.2}",
        ms(took)
    );
    if n != 1 {
        return Err(format!("reconnect replaced {n}, expected 1"));
    }
    if let Some(reader) = reader.take() {
        let (r, _) = reader.join().unwrap();
        let b = r.map_err(|e| format!("the waiting read failed after the reconnect: {e}"))?;
        if b.as_ref() != p1.as_ref() {
            return Err("the waiting read returned wrong data".into());
        }
        println!(
            "RECONNECT {name}: the waiting read completed {:.2} ms after the reconnect began ({:.0} ms after it was issued)",
            ms(t0.elapsed()),
            ms(waited.elapsed())
        );
    }
    let h = a.connection_health();
    if h.dead != 0 || h.connections != connections {
        return Err(format!("health after reconnect: {h:?}"));
    }
    // A new connection that the kernel did not take would end at once: check it still runs.
    std::thread::sleep(Duration::from_millis(200));
    if a.connection_health().dead != 0 {
        return Err(format!(
            "a replacement died: {:?} (the kernel dropped the socket?)",
            a.connection_health()
        ));
    }

    // Data: the pattern and a new write read back after the page cache is dropped.
    let p2 = Aligned::filled(LEN, 0xa5);
    f.write_all_at(p2.as_ref(), AT2)
        .map_err(|e| format!("write after reconnect: {e}"))?;
    a.flush()
        .map_err(|e| format!("flush after reconnect: {}", chain(&e)))?;
    let mut b = vec![0u8; LEN];
    for (at, p) in [(AT1, &p1), (AT2, &p2)] {
        a.file()
            .read_exact_at(&mut b, at)
            .map_err(|e| format!("read back at {at}: {e}"))?;
        if b[..] != *p.as_ref() {
            return Err(format!("data at {at} differs after the reconnect"));
        }
    }
    // Stats: the device's counters kept the dead connection's requests and added the new one's.
    let s = d.inner.stats();
    println!(
        "RECONNECT {name}: requests before kill {before}, total {}; reads {} writes {} flushes {}",
        s.total_requests(),
        s.op(rootfork_nbd::Op::Read).count,
        s.op(rootfork_nbd::Op::Write).count,
        s.op(rootfork_nbd::Op::Flush).count
    );
    if before == 0 || s.total_requests() < before + 3 {
        return Err(format!(
            "stats: {before} before, {} after",
            s.total_requests()
        ));
    }
    drop(f);
    rt.block_on(a.close())
        .map_err(|e| format!("close: {}", chain(&e)))?;
    at.pool()
        .sysfs()
        .slot(index)
        .map_err(|e| e.to_string())?
        .check_quiescent()
        .map_err(|w| format!("nbd{index} not quiescent after close: {w}"))?;
    Ok(())
}

/// A request in flight on the connection that dies: the kernel keeps it until its request
/// timeout, then (one connection, `dead_conn_timeout` set) requeues it, and it completes on the
/// replacement. Also checks the health's in-flight count and oldest request age.
fn inflight_case(
    rt: &tokio::runtime::Runtime,
    at: &Attacher,
    template: &Path,
) -> Result<(), String> {
    const LEN: usize = 64 << 10;
    const AT1: u64 = 3 << 20;
    let gated = Arc::new(GatedDevice::new(overlay(
        template,
        Path::new("/tmp/inflight.cache"),
    )));
    let d = Killable {
        inner: NbdDispatcher::new(gated.clone(), ServeOptions::default()),
        ends: Mutex::new(Vec::new()),
    };
    let timeout = Duration::from_secs(3);
    let opts = AttachOptions {
        sandbox: "inflight".into(),
        timeout,
        dead_conn_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let mut a = rt
        .block_on(at.attach(&d, &opts))
        .map_err(|e| format!("attach: {}", chain(&e)))?;
    let f = direct(&a).map_err(|e| format!("open O_DIRECT: {e}"))?;
    let p1 = Aligned::filled(LEN, 0x3c);
    f.write_all_at(p1.as_ref(), AT1)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("write pattern: {e}"))?;
    gated.close();
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    let issued = Instant::now();
    let reader = std::thread::spawn(move || read_direct(&f2, LEN, AT1));
    let t = Instant::now();
    while gated.waiting() == 0 {
        if t.elapsed() > Duration::from_secs(5) {
            gated.open();
            return Err("the read never reached the device".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(300));
    let h = a.connection_health();
    println!("RECONNECT inflight: health with a read held at the device: {h:?}");
    if h.in_flight == 0
        || h.oldest_request_age
            .is_none_or(|age| age < Duration::from_millis(300))
    {
        gated.open();
        return Err(format!("health does not show the held read: {h:?}"));
    }
    d.kill(0).map_err(|e| format!("kill: {e}"))?;
    // The held read finishes on our side; its reply has no socket to go to.
    gated.open();
    until_dead(&a, 1, Duration::from_secs(5))?;
    let t0 = Instant::now();
    let n = rt
        .block_on(a.reconnect(&d))
        .map_err(|e| format!("reconnect: {}", chain(&e)))?;
    if n != 1 {
        return Err(format!("reconnect replaced {n}"));
    }
    let reconnect_took = ms(t0.elapsed());
    let reconnected_after = ms(issued.elapsed());
    let r = reader.join().unwrap();
    let done = issued.elapsed();
    let b = r.map_err(|e| format!("the read in flight at the kill failed: {e}"))?;
    if b.as_ref() != p1.as_ref() {
        return Err("the read in flight at the kill returned wrong data".into());
    }
    println!(
        "RECONNECT inflight: read issued at 0 ms, connection killed, reconnect done at {reconnected_after:.0} ms (took {reconnect_took:.2} ms), read completed at {:.0} ms (request timeout {} s: the kernel requeued it)",
        ms(done),
        timeout.as_secs()
    );
    drop(f);
    rt.block_on(a.close())
        .map_err(|e| format!("close: {}", chain(&e)))
}

/// The kernel fact `reconnect` relies on: a socket offered with RECONFIGURE to a device that has
/// no dead connection is accepted ("success") and dropped, so our end reads EOF at once.
fn spare_dropped(
    rt: &tokio::runtime::Runtime,
    at: &Attacher,
    template: &Path,
) -> Result<(), String> {
    let d = NbdDispatcher::new(
        overlay(template, Path::new("/tmp/spare.cache")),
        ServeOptions::default(),
    );
    let opts = AttachOptions {
        sandbox: "spare".into(),
        ..Default::default()
    };
    let a = rt
        .block_on(at.attach(&d, &opts))
        .map_err(|e| format!("attach: {}", chain(&e)))?;
    let nl = NbdNetlink::open(Duration::from_secs(10)).map_err(|e| chain(&e))?;
    let backend = at
        .pool()
        .sysfs()
        .slot(a.index())
        .map_err(|e| e.to_string())?
        .backend;
    let (mut ours, kernels) = UnixStream::pair().map_err(|e| e.to_string())?;
    ours.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let sent = nl.reconfigure(&ReconfigureRequest {
        index: a.index(),
        sockets: vec![std::os::fd::AsRawFd::as_raw_fd(&kernels)],
        backend_identifier: backend,
        ..Default::default()
    });
    drop(kernels);
    sent.map_err(|e| format!("RECONFIGURE with a spare socket: {}", chain(&e)))?;
    let t = Instant::now();
    let mut b = [0u8; 1];
    match io::Read::read(&mut ours, &mut b) {
        Ok(0) => println!(
            "RECONNECT a spare socket for a healthy device: RECONFIGURE succeeded, socket dropped (EOF after {:.2} ms)",
            ms(t.elapsed())
        ),
        other => return Err(format!("the kernel kept a spare socket: read {other:?}")),
    }
    if a.connection_health().dead != 0 {
        return Err(format!("health: {:?}", a.connection_health()));
    }
    let mut buf = vec![0u8; 4096];
    a.file()
        .read_exact_at(&mut buf, 0)
        .map_err(|e| format!("read after the spare: {e}"))?;
    rt.block_on(a.close())
        .map_err(|e| format!("close: {}", chain(&e)))
}

/// Many kills and reconnects in a row on a 2-connection device, alternating the connection
/// killed; after each, a block written and read back; at the end all of them still there.
/// Prints reconnect latency percentiles.
fn churn(
    rt: &tokio::runtime::Runtime,
    at: &Attacher,
    template: &Path,
    cycles: usize,
) -> Result<(), String> {
    let d = Killable {
        inner: NbdDispatcher::new(
            overlay(template, Path::new("/tmp/churn.cache")),
            ServeOptions::default(),
        ),
        ends: Mutex::new(Vec::new()),
    };
    let opts = AttachOptions {
        sandbox: "churn".into(),
        connections: 2,
        ..Default::default()
    };
    let mut a = rt
        .block_on(at.attach(&d, &opts))
        .map_err(|e| format!("attach: {}", chain(&e)))?;
    let index = a.index();
    let f = direct(&a).map_err(|e| format!("open O_DIRECT: {e}"))?;
    let mut took = Vec::with_capacity(cycles);
    let mut detect = Vec::with_capacity(cycles);
    for c in 0..cycles {
        d.kill_live(c % 2)
            .map_err(|e| format!("cycle {c}: kill: {e}"))?;
        detect.push(ms(
            until_dead(&a, 1, Duration::from_secs(5)).map_err(|e| format!("cycle {c}: {e}"))?
        ));
        let t0 = Instant::now();
        let n = rt
            .block_on(a.reconnect(&d))
            .map_err(|e| format!("cycle {c}: reconnect: {}", chain(&e)))?;
        took.push(ms(t0.elapsed()));
        if n != 1 {
            return Err(format!("cycle {c}: reconnect replaced {n}"));
        }
        let p = Aligned::filled(4096, c as u8);
        let at_ = (4 << 20) + c as u64 * 4096;
        f.write_all_at(p.as_ref(), at_)
            .map_err(|e| format!("cycle {c}: write: {e}"))?;
        if read_direct(&f, 4096, at_)
            .map_err(|e| format!("cycle {c}: read: {e}"))?
            .as_ref()
            != p.as_ref()
        {
            return Err(format!("cycle {c}: block does not read back"));
        }
    }
    for c in 0..cycles {
        let p = Aligned::filled(4096, c as u8);
        let b = read_direct(&f, 4096, (4 << 20) + c as u64 * 4096).map_err(|e| e.to_string())?;
        if b.as_ref() != p.as_ref() {
            return Err(format!("block of cycle {c} lost"));
        }
    }
    let h = a.connection_health();
    if h.dead != 0 {
        return Err(format!("health at the end: {h:?}"));
    }
    println!(
        "LATENCY reconnect_churn n={cycles} p50_ms={:.2} p95_ms={:.2} max_ms={:.2}; detection p50_ms={:.2} p95_ms={:.2}; requests {}",
        pct(&mut took, 0.5),
        pct(&mut took, 0.95),
        pct(&mut took, 1.0),
        pct(&mut detect, 0.5),
        pct(&mut detect, 0.95),
        d.inner.stats().total_requests()
    );
    drop(f);
    rt.block_on(a.close())
        .map_err(|e| format!("close: {}", chain(&e)))?;
    at.pool()
        .sysfs()
        .slot(index)
        .map_err(|e| e.to_string())?
        .check_quiescent()
        .map_err(|w| format!("nbd{index} not quiescent: {w}"))
}

/// A device whose only connection is dead is closed anyway: DISCONNECT, quiescent, released.
fn close_dead(rt: &tokio::runtime::Runtime, at: &Attacher, template: &Path) -> Result<(), String> {
    let d = Killable {
        inner: NbdDispatcher::new(
            overlay(template, Path::new("/tmp/closedead.cache")),
            ServeOptions::default(),
        ),
        ends: Mutex::new(Vec::new()),
    };
    let opts = AttachOptions {
        sandbox: "closedead".into(),
        dead_conn_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let a = rt
        .block_on(at.attach(&d, &opts))
        .map_err(|e| format!("attach: {}", chain(&e)))?;
    let index = a.index();
    d.kill(0).map_err(|e| e.to_string())?;
    until_dead(&a, 1, Duration::from_secs(5))?;
    let t = Instant::now();
    match rt.block_on(a.close()) {
        Err(AttachError::ConnectionsDead { dead: 1, .. }) => {}
        other => return Err(format!("close of a dead device: {other:?}")),
    }
    println!(
        "RECONNECT close with every connection dead: {:.2} ms",
        ms(t.elapsed())
    );
    at.pool()
        .sysfs()
        .slot(index)
        .map_err(|e| e.to_string())?
        .check_quiescent()
        .map_err(|w| format!("nbd{index} not quiescent: {w}"))?;
    Ok(())
}

fn reconnect(template: &Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let at = attacher();
    let mut failed = Vec::new();
    let cases: [(&str, usize, Option<Duration>, WhileDead); 4] = [
        (
            "rc-1-dct",
            1,
            Some(Duration::from_secs(30)),
            WhileDead::Waits,
        ),
        (
            "rc-1-dct-expires",
            1,
            Some(Duration::from_secs(2)),
            WhileDead::Expires,
        ),
        ("rc-2", 2, None, WhileDead::FallsBack),
        ("rc-1", 1, None, WhileDead::Fails),
    ];
    for (name, c, dct, expect) in cases {
        match reconnect_case(&rt, &at, template, name, c, dct, expect) {
            Ok(()) => println!("PASS reconnect-{name}"),
            Err(e) => {
                println!("FAIL reconnect-{name}: {e}");
                failed.push(name);
            }
        }
    }
    match inflight_case(&rt, &at, template) {
        Ok(()) => println!("PASS reconnect-inflight"),
        Err(e) => {
            println!("FAIL reconnect-inflight: {e}");
            failed.push("inflight");
        }
    }
    match spare_dropped(&rt, &at, template) {
        Ok(()) => println!("PASS reconnect-spare-dropped"),
        Err(e) => {
            println!("FAIL reconnect-spare-dropped: {e}");
            failed.push("spare-dropped");
        }
    }
    match churn(&rt, &at, template, 30) {
        Ok(()) => println!("PASS reconnect-churn"),
        Err(e) => {
            println!("FAIL reconnect-churn: {e}");
            failed.push("churn");
        }
    }
    match close_dead(&rt, &at, template) {
        Ok(()) => println!("PASS reconnect-close-dead"),
        Err(e) => {
            println!("FAIL reconnect-close-dead: {e}");
            failed.push("close-dead");
        }
    }
    let m = at.pool().metrics();
    if m.claimed != 0 {
        return Err(format!("{} slots still claimed", m.claimed));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("failed: {failed:?}"))
    }
}

fn claim_all() -> Result<(), String> {
    let pool = DevicePool::new(PoolConfig::default());
    let mut held = Vec::new();
    while let Ok(l) = pool.claim("claim-all") {
        held.push(l);
    }
    let m = pool.metrics();
    println!(
        "CLAIM_ALL claimed={} not_quiescent={}",
        held.len(),
        serde_json::to_string(&m.not_quiescent_skips).unwrap_or_default()
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (name, r) = match args.get(1).map(String::as_str) {
        Some("latency") if args.len() == 4 => (
            "latency",
            latency(args[2].parse().expect("N"), Path::new(&args[3])),
        ),
        Some("invalid") if args.len() == 3 => ("invalid", invalid(Path::new(&args[2]))),
        Some("claim-all") => ("claim-all", claim_all()),
        Some("netlink") if args.len() == 3 => ("netlink", netlink(Path::new(&args[2]))),
        Some("reconnect") if args.len() == 3 => ("reconnect", reconnect(Path::new(&args[2]))),
        _ => {
            eprintln!(
                "usage: vmtest latency N TEMPLATE | invalid TEMPLATE | netlink TEMPLATE | reconnect TEMPLATE | claim-all"
            );
            std::process::exit(2);
        }
    };
    match r {
        Ok(()) => println!("PASS {name}"),
        Err(e) => {
            println!("FAIL {name}: {e}");
            std::process::exit(1);
        }
    }
}
