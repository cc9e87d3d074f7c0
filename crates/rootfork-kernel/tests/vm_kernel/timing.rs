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

/// Rates of one round: per device (0: 512, 1: 4096) 4 KiB random `O_DIRECT` writes and reads
/// (IOPS) and 1 MiB sequential `O_DIRECT` reads (MiB/s); on the 512 device, 512-byte random
/// writes (each a read-modify-write of a 4 KiB overlay block) and 4 KiB writes measured
/// interleaved with them.
#[derive(Default, Clone, Copy)]
struct Round {
    write4k: [f64; 2],
    read4k: [f64; 2],
    seq1m: [f64; 2],
    write512: f64,
    write4k_beside_512: f64,
}

/// A xorshift step (the offsets need no quality, only the same sequence on both devices).
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// `batches` batches of `a` and of `b`, alternating which goes first; the seconds each took.
/// Interleaving in small batches puts both under the same host load (TCG shares the host).
fn interleaved(batches: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let (mut ta, mut tb) = (0.0, 0.0);
    for i in 0..batches {
        let time = |f: &mut dyn FnMut(), t: &mut f64| {
            let t0 = Instant::now();
            f();
            *t += t0.elapsed().as_secs_f64();
        };
        if i % 2 == 0 {
            time(&mut a, &mut ta);
            time(&mut b, &mut tb);
        } else {
            time(&mut b, &mut tb);
            time(&mut a, &mut ta);
        }
    }
    (ta.max(1e-9), tb.max(1e-9))
}

/// Operations per batch of [`interleaved`] random I/O.
const BATCH: usize = 25;
/// MiB per batch of [`interleaved`] sequential reads.
const SEQ_BATCH: usize = 4;

/// A batch of `BATCH` random `len`-byte `O_DIRECT` writes of `buf` on `f` (`blocks` 4 KiB
/// blocks), at the start of a random 4 KiB block or, for 512 bytes, at an odd sector inside one
/// (never a whole overlay block).
fn random_writes(f: &std::fs::File, blocks: u64, buf: &Aligned, x: &mut u64) {
    for _ in 0..BATCH {
        let mut at = next(x) % blocks * 4096;
        if buf.as_ref().len() < 4096 {
            at += 512 * (1 + 2 * (next(x) % 4));
        }
        f.write_all_at(buf.as_ref(), at).expect("O_DIRECT write");
    }
}

/// A batch of `BATCH` random 4 KiB `O_DIRECT` reads on `f`.
fn random_reads(f: &std::fs::File, blocks: u64, buf: &mut Aligned, x: &mut u64) {
    for _ in 0..BATCH {
        f.read_exact_at(buf.as_mut(), next(x) % blocks * 4096)
            .expect("4 KiB O_DIRECT read");
    }
}

/// A batch of `SEQ_BATCH` sequential 1 MiB `O_DIRECT` reads on `f` (`mib` MiB), from `*pos` on
/// (wrapping).
fn seq_reads(f: &std::fs::File, mib: u64, buf: &mut Aligned, pos: &mut u64) {
    for _ in 0..SEQ_BATCH {
        f.read_exact_at(buf.as_mut(), (*pos % mib) << 20)
            .expect("1 MiB O_DIRECT read");
        *pos += 1;
    }
}

/// One round: `batches` batches of each kind, interleaved between the devices `f` (512 first,
/// then 4096) of `size` bytes, offsets from `seed` (the same sequence on both).
fn round(
    f: [&std::fs::File; 2],
    size: u64,
    batches: usize,
    seq_batches: usize,
    seed: u64,
) -> Round {
    let blocks = size / 4096;
    let mib = (size >> 20).max(1);
    let rate = |n: usize, secs: f64| n as f64 / secs;
    let mut r = Round::default();
    let w4k = Aligned::filled(4096, seed as u8);
    let w512 = Aligned::filled(512, seed as u8 ^ 0x5a);
    let (mut x0, mut x1) = (seed | 1, seed | 1);
    let (t0, t1) = interleaved(
        batches,
        || random_writes(f[0], blocks, &w4k, &mut x0),
        || random_writes(f[1], blocks, &w4k, &mut x1),
    );
    r.write4k = [rate(batches * BATCH, t0), rate(batches * BATCH, t1)];
    let (mut b0, mut b1) = (Aligned::new(4096), Aligned::new(4096));
    let (t0, t1) = interleaved(
        batches,
        || random_reads(f[0], blocks, &mut b0, &mut x0),
        || random_reads(f[1], blocks, &mut b1, &mut x1),
    );
    r.read4k = [rate(batches * BATCH, t0), rate(batches * BATCH, t1)];
    let (mut m0, mut m1) = (Aligned::new(1 << 20), Aligned::new(1 << 20));
    let (mut p0, mut p1) = (0u64, 0u64);
    let (t0, t1) = interleaved(
        seq_batches,
        || seq_reads(f[0], mib, &mut m0, &mut p0),
        || seq_reads(f[1], mib, &mut m1, &mut p1),
    );
    r.seq1m = [
        rate(seq_batches * SEQ_BATCH, t0),
        rate(seq_batches * SEQ_BATCH, t1),
    ];
    let mut x2 = x0 ^ 0xabcd;
    let (t512, t4k) = interleaved(
        batches,
        || random_writes(f[0], blocks, &w512, &mut x0),
        || random_writes(f[0], blocks, &w4k, &mut x2),
    );
    r.write512 = rate(batches * BATCH, t512);
    r.write4k_beside_512 = rate(batches * BATCH, t4k);
    r
}

/// The median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    crate::common::pct(&mut v, 0.5)
}

/// The cost of 512-byte logical blocks: two devices over fresh overlays of the template, one
/// attached with 512-byte and one with 4096-byte logical blocks, measured in `BLOCKSIZE_REPS`
/// (default 7) rounds of `BLOCKSIZE_OPS` (default 1000) 4 KiB random writes and reads and
/// `BLOCKSIZE_SEQ_MIB` (default 64) 1 MiB sequential reads per device, all `O_DIRECT`, the two
/// devices interleaved in batches of 25 operations (4 MiB), alternating which goes first, so host
/// load swings hit both alike. Prints each round's rates and the median (min-max) ratio 512/4096
/// per kind (1.00: no cost), plus 512-byte writes on the 512 device (sub-block
/// read-modify-writes) against 4 KiB writes interleaved with them. Checks only that every I/O
/// worked.
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
    let batches = ops.div_ceil(BATCH);
    let seq_batches = seq.div_ceil(SEQ_BATCH);
    let size = devs[0].4;
    assert_eq!(size, devs[1].4, "the two devices differ in size");
    let mut rounds: Vec<Round> = Vec::with_capacity(reps);
    for r in 0..reps {
        let got = round(
            [&devs[0].3, &devs[1].3],
            size,
            batches,
            seq_batches,
            0x9e37_79b9 + r as u64,
        );
        println!(
            "LATENCY blocksize round={r} w4k={:.0}/{:.0} r4k={:.0}/{:.0} seq1m={:.1}/{:.1}MiB/s \
             (512/4096); on 512: w512={:.0}/s beside w4k={:.0}/s",
            got.write4k[0],
            got.write4k[1],
            got.read4k[0],
            got.read4k[1],
            got.seq1m[0],
            got.seq1m[1],
            got.write512,
            got.write4k_beside_512
        );
        rounds.push(got);
    }
    let ratio = |f: fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        let m = median(v.clone());
        v.sort_by(f64::total_cmp);
        format!("{m:.2} ({:.2}-{:.2})", v[0], v[v.len() - 1])
    };
    println!(
        "LATENCY blocksize 512/4096 median ratio (min-max) over {reps} rounds of {} ops, {} MiB: \
         w4k={} r4k={} seq1m={}; on 512: w512/w4k={}",
        batches * BATCH,
        seq_batches * SEQ_BATCH,
        ratio(|g| g.write4k[0] / g.write4k[1]),
        ratio(|g| g.read4k[0] / g.read4k[1]),
        ratio(|g| g.seq1m[0] / g.seq1m[1]),
        ratio(|g| g.write512 / g.write4k_beside_512),
    );
    // What each device's server saw: the requests the kernel made of the same I/O, and the
    // server's own time per request (so a difference is placed in the kernel or in the server).
    for (bs, d, _, _, _) in &devs {
        let s = d.stats();
        let line = |op: rootfork_nbd::Op| {
            let o = s.op(op);
            let n = o.count.max(1);
            format!(
                "{}={} avg_kib={:.1} server_mean_us={:.0}",
                op.name(),
                o.count,
                o.bytes as f64 / n as f64 / 1024.0,
                o.latency_total.as_secs_f64() * 1e6 / n as f64
            )
        };
        println!(
            "LATENCY blocksize requests bs={bs}: {} {}",
            line(rootfork_nbd::Op::Read),
            line(rootfork_nbd::Op::Write)
        );
    }
    assert!(
        rounds.iter().all(|g| g
            .write4k
            .iter()
            .chain(&g.read4k)
            .chain(&g.seq1m)
            .all(|v| v.is_finite() && *v > 0.0)),
        "a rate is not positive"
    );
    for (_, d, a, f, _) in devs {
        drop(f);
        env.close(a);
        drop(d);
    }
    env.finish();
}
