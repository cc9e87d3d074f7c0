//! Timing runs, kept apart from the pass/fail checks: attach latency (cold, close, warm),
//! kill → reconnect cycles, and what 512-byte logical blocks cost against 4096. Each prints `LATENCY <what> n=N p50_ms=… p95_ms=… max_ms=…` lines and
//! checks only that the runs worked (every attach, bind and reconnect succeeded, the data is
//! right, no slot is left claimed), never a speed: under TCG the numbers move with host load.
//! docs/kernel.md quotes them. The guest runs these last (`timing::` filter).

use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rootfork_kernel::netlink::chain;
use rootfork_kernel::{AttachOptions, NbdDispatcher, SwitchableDevice, WarmSlot};
use rootfork_nbd::ServeOptions;

use crate::common::direct::{direct, Aligned};
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

/// One measured pass over a device: 4 KiB random `O_DIRECT` writes and reads (IOPS), 1 MiB
/// sequential `O_DIRECT` reads (MB/s), and, where the logical block allows it, 512-byte random
/// `O_DIRECT` writes (IOPS; each is a read-modify-write of a 4 KiB overlay block).
#[derive(Default, Clone, Copy)]
struct Pass {
    write4k: f64,
    read4k: f64,
    seq1m: f64,
    write512: Option<f64>,
}

/// A xorshift step (the offsets need no quality, only the same sequence for both devices).
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// `ops` operations in `secs` seconds, per second.
fn rate(ops: usize, secs: f64) -> f64 {
    ops as f64 / secs.max(1e-9)
}

/// One pass of `ops` random operations per kind (offsets from `seed`) and `seq_mib` MiB read
/// sequentially, on `f` (the device, `O_DIRECT`) of `size` bytes.
fn pass(f: &std::fs::File, size: u64, small: bool, ops: usize, seq_mib: usize, seed: u64) -> Pass {
    let blocks = size / 4096;
    let mut x = seed | 1;
    let mut p = Pass::default();
    let w = Aligned::filled(4096, seed as u8);
    let t = Instant::now();
    for _ in 0..ops {
        f.write_all_at(w.as_ref(), next(&mut x) % blocks * 4096)
            .expect("4 KiB O_DIRECT write");
    }
    p.write4k = rate(ops, t.elapsed().as_secs_f64());
    let mut r = Aligned::new(4096);
    let t = Instant::now();
    for _ in 0..ops {
        f.read_exact_at(r.as_mut(), next(&mut x) % blocks * 4096)
            .expect("4 KiB O_DIRECT read");
    }
    p.read4k = rate(ops, t.elapsed().as_secs_f64());
    let mut m = Aligned::new(1 << 20);
    let mib = (size >> 20).max(1);
    let t = Instant::now();
    for i in 0..seq_mib as u64 {
        f.read_exact_at(m.as_mut(), (i % mib) << 20)
            .expect("1 MiB O_DIRECT read");
    }
    p.seq1m = rate(seq_mib, t.elapsed().as_secs_f64());
    if small {
        let w = Aligned::filled(512, seed as u8 ^ 0x5a);
        let t = Instant::now();
        for _ in 0..ops {
            // An odd 512-byte sector of a random 4 KiB block: never a whole overlay block.
            let at = next(&mut x) % blocks * 4096 + 512 * (1 + 2 * (next(&mut x) % 4));
            f.write_all_at(w.as_ref(), at)
                .expect("512 B O_DIRECT write");
        }
        p.write512 = Some(rate(ops, t.elapsed().as_secs_f64()));
    }
    p
}

/// The median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    crate::common::pct(&mut v, 0.5)
}

/// The cost of 512-byte logical blocks: two devices over fresh overlays of the template, one
/// attached with 512-byte and one with 4096-byte logical blocks, measured in `BLOCKSIZE_REPS`
/// (default 7) interleaved rounds (the order alternates) of `BLOCKSIZE_OPS` (default 1000) 4 KiB
/// random writes and reads and `BLOCKSIZE_SEQ_MIB` (default 64) 1 MiB sequential reads each, all
/// `O_DIRECT`. Prints each round's rates and the median ratio 512/4096 per kind (1.00: no cost),
/// plus 512-byte writes on the 512 device (sub-block read-modify-writes) against its 4 KiB
/// writes. Checks only that every I/O worked.
#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn block_size_cost() {
    let reps = env_count("BLOCKSIZE_REPS", 7).max(1);
    let ops = env_count("BLOCKSIZE_OPS", 1000).max(1);
    let seq = env_count("BLOCKSIZE_SEQ_MIB", 64).max(1);
    let env = Env::new();
    let mut devs = Vec::new();
    for bs in [512u64, 4096] {
        let name = format!("bscost-{bs}");
        let d = NbdDispatcher::new(fresh_overlay(&name), ServeOptions::default());
        let opts = AttachOptions {
            sandbox: name,
            block_size: bs,
            ..Default::default()
        };
        let a = env.attach(&d, &opts);
        let f = direct(&a).expect("open O_DIRECT");
        let size = (&f).seek(SeekFrom::End(0)).expect("device size");
        devs.push((bs, d, a, f, size));
    }
    let mut rounds: Vec<[Pass; 2]> = Vec::with_capacity(reps);
    for r in 0..reps {
        let mut got = [Pass::default(); 2];
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (bs, _, _, f, size) = &devs[i];
            got[i] = pass(f, *size, *bs == 512, ops, seq, 0x9e37_79b9 + r as u64);
        }
        println!(
            "LATENCY blocksize round={r} 512: w4k={:.0}/s r4k={:.0}/s seq1m={:.1}MiB/s w512={:.0}/s; \
             4096: w4k={:.0}/s r4k={:.0}/s seq1m={:.1}MiB/s",
            got[0].write4k,
            got[0].read4k,
            got[0].seq1m,
            got[0].write512.unwrap_or(0.0),
            got[1].write4k,
            got[1].read4k,
            got[1].seq1m
        );
        rounds.push(got);
    }
    let ratio = |f: fn(&Pass) -> f64| median(rounds.iter().map(|g| f(&g[0]) / f(&g[1])).collect());
    println!(
        "LATENCY blocksize 512/4096 median ratio (n={reps}, ops={ops}, seq={seq}MiB): \
         w4k={:.2} r4k={:.2} seq1m={:.2}; on 512: w512/w4k={:.2}",
        ratio(|p| p.write4k),
        ratio(|p| p.read4k),
        ratio(|p| p.seq1m),
        median(
            rounds
                .iter()
                .map(|g| g[0].write512.unwrap_or(0.0) / g[0].write4k)
                .collect()
        )
    );
    assert!(
        rounds
            .iter()
            .flatten()
            .all(|p| p.write4k > 0.0 && p.read4k > 0.0 && p.seq1m > 0.0),
        "a rate is not positive"
    );
    for (_, d, a, f, _) in devs {
        drop(f);
        env.close(a);
        drop(d);
    }
    env.finish();
}
