//! Reconnect edge cases on the real kernel: a request in flight on the killed connection (requeued
//! after the request timeout), a spare socket offered to a healthy device (dropped), many
//! kill/reconnect cycles in a row with data checks, and close with every connection dead.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rootfork_kernel::netlink::{chain, NbdControl, ReconfigureRequest};
use rootfork_kernel::{AttachError, AttachOptions, Attachment, NbdDispatcher, NbdNetlink};
use rootfork_nbd::testing::GatedDevice;
use rootfork_nbd::ServeOptions;

use crate::common::direct::{direct, read_direct, until_dead, Aligned};
use crate::common::killable::Killable;
use crate::common::{fresh_overlay, ms, Env};

/// Opens the gate when dropped, so a failing test never leaves the device's workers parked (the
/// attachment's drop joins them).
struct OpenOnDrop(Arc<GatedDevice>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A request in flight on the connection that dies: the kernel keeps it until its request
/// timeout, then (one connection, `dead_conn_timeout` set) requeues it, and it completes on the
/// replacement. Also checks the health's in-flight count and oldest request age.
#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn request_in_flight_at_the_kill_is_requeued() {
    const LEN: usize = 64 << 10;
    const AT1: u64 = 3 << 20;
    let env = Env::new();
    let gated = Arc::new(GatedDevice::new(fresh_overlay("inflight")));
    let d = Killable::new(gated.clone());
    let timeout = Duration::from_secs(3);
    let opts = AttachOptions {
        sandbox: "inflight".into(),
        timeout,
        dead_conn_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let mut a = env.attach(&d, &opts);
    let gate = OpenOnDrop(gated.clone());
    let f = direct(&a).expect("open O_DIRECT");
    let p1 = Aligned::filled(LEN, 0x3c);
    f.write_all_at(p1.as_ref(), AT1)
        .and_then(|()| f.sync_all())
        .expect("write pattern");
    gated.close();
    let f2 = f.try_clone().expect("dup");
    let reader = std::thread::spawn(move || read_direct(&f2, LEN, AT1));
    let t = Instant::now();
    while gated.waiting() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the read never reached the device"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(300));
    let h = a.connection_health();
    println!("RECONNECT inflight: health with a read held at the device: {h:?}");
    assert!(
        h.in_flight > 0
            && h.oldest_request_age
                .is_some_and(|age| age >= Duration::from_millis(300)),
        "health does not show the held read: {h:?}"
    );
    d.kill(0).expect("kill");
    // The held read finishes on our side; its reply has no socket to go to.
    drop(gate);
    until_dead(&a, 1, Duration::from_secs(5)).expect("connection seen dead");
    let n = env
        .rt
        .block_on(a.reconnect(&d))
        .unwrap_or_else(|e| panic!("reconnect: {}", chain(&e)));
    assert_eq!(n, 1, "reconnect replaced {n}");
    let b = reader
        .join()
        .expect("reader thread")
        .expect("the read in flight at the kill failed");
    assert!(
        b.as_ref() == p1.as_ref(),
        "the read in flight at the kill returned wrong data"
    );
    println!(
        "RECONNECT inflight: the read in flight at the kill completed on the replacement (request timeout {} s: the kernel requeued it)",
        timeout.as_secs()
    );
    drop(f);
    env.close(a);
    env.finish();
}

/// The kernel fact `reconnect` relies on: a socket offered with RECONFIGURE to a device that has
/// no dead connection is accepted ("success") and dropped, so our end reads EOF at once.
#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn spare_socket_for_a_healthy_device_is_dropped() {
    let env = Env::new();
    let d = NbdDispatcher::new(fresh_overlay("spare"), ServeOptions::default());
    let opts = AttachOptions {
        sandbox: "spare".into(),
        ..Default::default()
    };
    let a = env.attach(&d, &opts);
    let nl = NbdNetlink::open(Duration::from_secs(10)).expect("nbd netlink");
    let backend = env
        .at
        .pool()
        .sysfs()
        .slot(a.index())
        .expect("sysfs slot")
        .backend;
    let (mut ours, kernels) = UnixStream::pair().expect("socketpair");
    ours.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("read timeout");
    let sent = nl.reconfigure(&ReconfigureRequest {
        index: a.index(),
        sockets: vec![std::os::fd::AsRawFd::as_raw_fd(&kernels)],
        backend_identifier: backend,
        ..Default::default()
    });
    drop(kernels);
    if let Err(e) = sent {
        panic!("RECONFIGURE with a spare socket: {}", chain(&e));
    }
    let mut b = [0u8; 1];
    match io::Read::read(&mut ours, &mut b) {
        Ok(0) => println!(
            "RECONNECT a spare socket for a healthy device: RECONFIGURE succeeded, socket dropped (EOF)"
        ),
        other => panic!("the kernel kept a spare socket: read {other:?}"),
    }
    assert_eq!(
        a.connection_health().dead,
        0,
        "health: {:?}",
        a.connection_health()
    );
    let mut buf = vec![0u8; 4096];
    a.file()
        .read_exact_at(&mut buf, 0)
        .expect("read after the spare");
    env.close(a);
    env.finish();
}

/// Many kills and reconnects in a row on a 2-connection device, alternating the connection
/// killed; after each, a block written and read back; at the end all of them still there.
#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn churn_keeps_every_block() {
    let env = Env::new();
    let d = Killable::new(fresh_overlay("churn"));
    let opts = AttachOptions {
        sandbox: "churn".into(),
        connections: 2,
        ..Default::default()
    };
    let mut a = env.attach(&d, &opts);
    let f = direct(&a).expect("open O_DIRECT");
    if let Err(e) = cycles(&env, &d, &mut a, &f, 30) {
        panic!("churn: {e}");
    }
    drop(f);
    env.close(a);
    env.finish();
}

/// How long each kill → dead → reconnect cycle took.
pub struct Cycles {
    /// From the kill until `connection_health()` shows the connection dead.
    pub detect_ms: Vec<f64>,
    /// `reconnect()`.
    pub reconnect_ms: Vec<f64>,
}

/// `n` cycles on `a` (served by `d`, opened as `f`): kill a live connection (alternating when
/// there are several), wait until it is seen dead, reconnect (exactly one replaced), write a
/// 4 KiB block at 4 MiB + cycle × 4 KiB and read it back; then check every block and that no
/// connection is dead. Returns the per-cycle times.
pub fn cycles(
    env: &Env,
    d: &Killable,
    a: &mut Attachment,
    f: &File,
    n: usize,
) -> Result<Cycles, String> {
    let connections = a.connection_health().connections.max(1);
    let block_at = |c: usize| (4 << 20) + c as u64 * 4096;
    let mut out = Cycles {
        detect_ms: Vec::with_capacity(n),
        reconnect_ms: Vec::with_capacity(n),
    };
    for c in 0..n {
        let t = Instant::now();
        d.kill_live(c % connections)
            .map_err(|e| format!("cycle {c}: kill: {e}"))?;
        until_dead(a, 1, Duration::from_secs(5)).map_err(|e| format!("cycle {c}: {e}"))?;
        out.detect_ms.push(ms(t.elapsed()));
        let t0 = Instant::now();
        let r = env
            .rt
            .block_on(a.reconnect(d))
            .map_err(|e| format!("cycle {c}: reconnect: {}", chain(&e)))?;
        out.reconnect_ms.push(ms(t0.elapsed()));
        if r != 1 {
            return Err(format!("cycle {c}: reconnect replaced {r}"));
        }
        let p = Aligned::filled(4096, c as u8);
        f.write_all_at(p.as_ref(), block_at(c))
            .map_err(|e| format!("cycle {c}: write: {e}"))?;
        if read_direct(f, 4096, block_at(c))
            .map_err(|e| format!("cycle {c}: read: {e}"))?
            .as_ref()
            != p.as_ref()
        {
            return Err(format!("cycle {c}: block does not read back"));
        }
    }
    for c in 0..n {
        let p = Aligned::filled(4096, c as u8);
        let b = read_direct(f, 4096, block_at(c)).map_err(|e| e.to_string())?;
        if b.as_ref() != p.as_ref() {
            return Err(format!("block of cycle {c} lost"));
        }
    }
    let h = a.connection_health();
    if h.dead != 0 {
        return Err(format!("health at the end: {h:?}"));
    }
    Ok(out)
}

/// A device whose only connection is dead is closed anyway: DISCONNECT, quiescent, released.
#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn close_with_every_connection_dead() {
    let env = Env::new();
    let d = Killable::new(fresh_overlay("closedead"));
    let opts = AttachOptions {
        sandbox: "closedead".into(),
        dead_conn_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let a = env.attach(&d, &opts);
    let index = a.index();
    d.kill(0).expect("kill");
    until_dead(&a, 1, Duration::from_secs(5)).expect("connection seen dead");
    match env.rt.block_on(a.close()) {
        Err(AttachError::ConnectionsDead { dead: 1, .. }) => {}
        other => panic!("close of a dead device: {other:?}"),
    }
    env.assert_quiescent(index);
    env.finish();
}
