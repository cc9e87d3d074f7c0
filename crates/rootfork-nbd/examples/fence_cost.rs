//! What the write fence costs a kernel connection: pipelined 4 KiB writes from a fake kernel
//! over a socketpair into an in-memory device, fenced (`KernelConnection::spawn_fenced`) and
//! unfenced (`spawn_with_stats`), alternating rounds; prints the process CPU time per write
//! and the fenced/unfenced ratio measured in the same run.
//!
//! `cargo run --release -p rootfork-nbd --features test-utils --example fence_cost [WRITES] [ROUNDS]`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use rootfork_nbd::consts::CMD_WRITE;
use rootfork_nbd::fence::WriteFence;
use rootfork_nbd::kernel::KernelConnection;
use rootfork_nbd::request::{encode_header, RequestHeader};
use rootfork_nbd::stats::Stats;
use rootfork_nbd::testing::MemDevice;
use rootfork_nbd::ServeOptions;

const LEN: u64 = 4096;
const SIZE: u64 = 64 << 20;
const DEPTH: usize = 64;

/// CPU time (user + system) of the whole process so far.
fn cpu() -> Duration {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let t =
        |tv: nix::sys::time::TimeVal| Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000);
    t(u.user_time()) + t(u.system_time())
}

/// Sends `n` writes, at most `DEPTH` outstanding, and reads every reply.
fn drive(kernel: &mut UnixStream, n: usize) {
    let payload = vec![0x5au8; LEN as usize];
    let mut reply = [0u8; 16];
    let (mut sent, mut answered) = (0usize, 0usize);
    while answered < n {
        while sent < n && sent - answered < DEPTH {
            let h = RequestHeader {
                flags: 0,
                kind: CMD_WRITE,
                cookie: sent as u64,
                offset: (sent as u64 * LEN) % SIZE,
                length: LEN,
            };
            kernel.write_all(&encode_header(&h, false)).unwrap();
            kernel.write_all(&payload).unwrap();
            sent += 1;
        }
        kernel.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "write failed");
        answered += 1;
    }
}

fn round(fenced: bool, n: usize) -> Duration {
    let dev = Arc::new(MemDevice::new(SIZE, LEN as u32));
    let (ours, mut kernel) = UnixStream::pair().unwrap();
    let stats = Arc::new(Stats::default());
    let opts = ServeOptions::default();
    let conn = if fenced {
        KernelConnection::spawn_fenced(ours, dev, opts, stats, WriteFence::new())
    } else {
        KernelConnection::spawn_with_stats(ours, dev, opts, stats)
    }
    .unwrap();
    let before = cpu();
    drive(&mut kernel, n);
    let used = cpu() - before;
    drop(kernel);
    conn.wait();
    used
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(200_000, |a| a.parse().expect("WRITES"));
    let rounds: usize = args.next().map_or(5, |a| a.parse().expect("ROUNDS"));
    round(true, n / 10);
    round(false, n / 10);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        with.push(round(true, n));
        without.push(round(false, n));
    }
    with.sort();
    without.sort();
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    let (w, o) = (per(with[rounds / 2]), per(without[rounds / 2]));
    println!(
        "FENCE_COST writes={n} rounds={rounds} median_cpu_ns_per_write fenced={w:.0} unfenced={o:.0} ratio={:.3}",
        w / o
    );
}
