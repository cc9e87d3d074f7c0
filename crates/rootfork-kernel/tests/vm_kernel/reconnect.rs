//! A killed kernel connection of an attached device, for 1 connection with and without
//! `dead_conn_timeout` (and with one that expires) and for 2 connections: detection
//! (`connection_health`), I/O while it is dead, `reconnect()` with `NBD_CMD_RECONFIGURE`, the data
//! afterwards, stats across connections and a clean close.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use rootfork_kernel::netlink::chain;
use rootfork_kernel::AttachOptions;

use crate::common::direct::{direct, read_direct, until_dead, Aligned};
use crate::common::killable::Killable;
use crate::common::{fresh_overlay, ms, Env};

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

#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn one_connection_with_dead_conn_timeout_io_waits() {
    run(
        "rc-1-dct",
        1,
        Some(Duration::from_secs(30)),
        WhileDead::Waits,
    );
}

#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn one_connection_dead_conn_timeout_expires_with_eio() {
    run(
        "rc-1-dct-expires",
        1,
        Some(Duration::from_secs(2)),
        WhileDead::Expires,
    );
}

#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn two_connections_io_falls_back() {
    run("rc-2", 2, None, WhileDead::FallsBack);
}

#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn one_connection_without_dead_conn_timeout_io_fails() {
    run("rc-1", 1, None, WhileDead::Fails);
}

fn run(name: &str, connections: usize, dead_conn_timeout: Option<Duration>, expect: WhileDead) {
    let env = Env::new();
    if let Err(e) = case(&env, name, connections, dead_conn_timeout, expect) {
        panic!("reconnect-{name}: {e}");
    }
    env.finish();
}

fn case(
    env: &Env,
    name: &str,
    connections: usize,
    dead_conn_timeout: Option<Duration>,
    expect: WhileDead,
) -> Result<(), String> {
    const LEN: usize = 64 << 10;
    const AT1: u64 = 1 << 20;
    const AT2: u64 = 2 << 20;
    let d = Killable::new(fresh_overlay(name));
    let opts = AttachOptions {
        sandbox: name.into(),
        connections,
        dead_conn_timeout,
        ..Default::default()
    };
    let mut a = env.attach(&d, &opts);
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
    until_dead(&a, 1, Duration::from_secs(5))?;
    println!(
        "RECONNECT {name}: connection 0 seen dead; health {:?}",
        a.connection_health()
    );

    // I/O while it is dead: a direct read of the pattern on another thread.
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    let mut reader = Some(std::thread::spawn(move || {
        let t = Instant::now();
        let r = read_direct(&f2, LEN, AT1);
        (r, t.elapsed())
    }));
    std::thread::sleep(Duration::from_millis(1000));
    let blocked = !reader.as_ref().is_some_and(|r| r.is_finished());
    let mut early = None;
    if !blocked {
        let (r, _) = reader.take().expect("reader").join().expect("reader");
        println!(
            "RECONNECT {name}: I/O while dead finished: {}",
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
            let (r, t) = reader.take().expect("reader").join().expect("reader");
            match r {
                // The wait is reported: it is the kernel's dead_conn_timeout at work.
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
    let n = env
        .rt
        .block_on(a.reconnect(&d))
        .map_err(|e| format!("reconnect: {}", chain(&e)))?;
    if n != 1 {
        return Err(format!("reconnect replaced {n}, expected 1"));
    }
    if let Some(reader) = reader.take() {
        let (r, _) = reader.join().expect("reader");
        let b = r.map_err(|e| format!("the waiting read failed after the reconnect: {e}"))?;
        if b.as_ref() != p1.as_ref() {
            return Err("the waiting read returned wrong data".into());
        }
        println!("RECONNECT {name}: the waiting read completed after the reconnect");
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
    env.close(a);
    Ok(())
}
