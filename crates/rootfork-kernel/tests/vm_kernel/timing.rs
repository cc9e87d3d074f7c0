//! Timing runs, kept apart from the pass/fail checks: attach latency (cold, close, warm) and
//! kill → reconnect cycles. Each prints `LATENCY <what> n=N p50_ms=… p95_ms=… max_ms=…` lines and
//! checks only that the runs worked (every attach, bind and reconnect succeeded, the data is
//! right, no slot is left claimed), never a speed: under TCG the numbers move with host load.
//! docs/kernel.md quotes them. The guest runs these last (`timing::` filter).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rootfork_kernel::netlink::chain;
use rootfork_kernel::{AttachOptions, NbdDispatcher, SwitchableDevice, WarmSlot};
use rootfork_nbd::ServeOptions;

use crate::common::direct::direct;
use crate::common::killable::Killable;
use crate::common::{env_count, fresh_overlay, ms, overlay, percentiles, template, Env};
use crate::reconnect_edges::cycles;

/// `LATENCY_N` cold attaches (claim → sockets → dispatcher → CONNECT → ready → open) and closes of
/// fresh overlays, then `LATENCY_N` attaches from pre-connected (warm) slots: bind + page-cache
/// flush, each checked to read the template rather than what the kernel cached before the bind.
#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn attach_cold_close_warm() {
    let n = env_count("LATENCY_N", 100);
    assert!(n > 0, "LATENCY_N=0");
    let env = Env::new();
    let (mut attach, mut close) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let d = NbdDispatcher::new(fresh_overlay("lat"), ServeOptions::default());
        let opts = AttachOptions {
            sandbox: format!("lat-{i}"),
            ..Default::default()
        };
        let t0 = Instant::now();
        let a = env.attach(&d, &opts);
        attach.push(ms(t0.elapsed()));
        let t1 = Instant::now();
        env.rt
            .block_on(a.close())
            .unwrap_or_else(|e| panic!("close {i}: {}", chain(&e)));
        close.push(ms(t1.elapsed()));
    }
    let head = std::fs::read(template()).expect("read the template");
    let mut warm = Vec::with_capacity(n);
    for i in 0..n {
        let sw = Arc::new(SwitchableDevice::new(head.len() as u64, 4096));
        let d = NbdDispatcher::new(sw.clone(), ServeOptions::default());
        let opts = AttachOptions {
            sandbox: "warm".into(),
            ..Default::default()
        };
        let slot = WarmSlot::new(env.attach(&d, &opts), sw);
        let dev = overlay(&template(), Path::new("/tmp/warm.cache"));
        slot.fits(&*dev).expect("the overlay fits the warm slot");
        let t0 = Instant::now();
        let a = slot
            .bind(dev, &format!("warm-{i}"))
            .unwrap_or_else(|e| panic!("bind {i}: {}", chain(&e)));
        warm.push(ms(t0.elapsed()));
        let mut b = vec![0u8; 65536];
        a.file()
            .read_exact_at(&mut b, 0)
            .unwrap_or_else(|e| panic!("read {i}: {}", chain(&e)));
        assert!(
            b[..] == head[..65536],
            "warm slot {i} served stale (pre-bind) data"
        );
        env.rt
            .block_on(a.close())
            .unwrap_or_else(|e| panic!("close warm {i}: {}", chain(&e)));
    }
    let (cold_p50, warm_p50) = (
        crate::common::pct(&mut attach, 0.5),
        crate::common::pct(&mut warm, 0.5),
    );
    println!("LATENCY cold_attach n={n} {}", percentiles(&mut attach, 2));
    println!("LATENCY close n={n} {}", percentiles(&mut close, 2));
    println!("LATENCY warm_attach n={n} {}", percentiles(&mut warm, 3));
    println!("LATENCY warm/cold p50 ratio {:.2}", warm_p50 / cold_p50);
    let m = env.at.pool().metrics();
    println!("METRICS {}", serde_json::to_string(&m).unwrap_or_default());
    assert!(
        attach
            .iter()
            .chain(&close)
            .chain(&warm)
            .all(|t| t.is_finite() && *t >= 0.0),
        "a time is not a duration"
    );
    env.finish();
}

/// `RECONNECT_N` kill → detect → reconnect cycles (each followed by a 4 KiB write and read-back)
/// on a 1-connection device with `dead_conn_timeout` 30 s (the daemon's default) and on a
/// 2-connection device (alternating the connection killed).
#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn reconnect_cycles() {
    let n = env_count("RECONNECT_N", 30);
    assert!(n > 0, "RECONNECT_N=0");
    let env = Env::new();
    for connections in [1, 2] {
        let name = format!("timing-rc-{connections}");
        let d = Killable::new(fresh_overlay(&name));
        let opts = AttachOptions {
            sandbox: name,
            connections,
            dead_conn_timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        let mut a = env.attach(&d, &opts);
        let f = direct(&a).expect("open O_DIRECT");
        let mut c = cycles(&env, &d, &mut a, &f, n)
            .unwrap_or_else(|e| panic!("{connections} connection(s): {e}"));
        println!(
            "LATENCY reconnect connections={connections} n={n} {}; detection {}; requests {}",
            percentiles(&mut c.reconnect_ms, 2),
            percentiles(&mut c.detect_ms, 2),
            d.inner.stats().total_requests()
        );
        drop(f);
        env.close(a);
    }
    env.finish();
}
