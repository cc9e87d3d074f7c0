//! Measurements (printed, not asserted): create-to-ready latency over 200 sequential creates with
//! the socket provider, and the daemon's memory per idle sandbox (RSS delta over those 200 live
//! sandboxes / 200); then, in the same run, a peer: one `nbdkit --filter=cow file` process per
//! sandbox on the same template (spawn → socket accepting, and RSS per process). Run with `cargo test -p rootfork --release --test measure -- --ignored
//! --nocapture`; docs/daemon.md has the numbers.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn pct(v: &[Duration], p: usize) -> Duration {
    v[(v.len() * p / 100).min(v.len() - 1)]
}

#[test]
#[ignore = "a measurement; run explicitly (see the module docs)"]
fn create_to_ready_and_memory_per_idle_sandbox() {
    const N: usize = 200;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let d = TestDaemon::start_with(false, |c| c.health_interval = Duration::from_secs(3600)).await;
        let mut c = d.client().await;
        let src = make_template(d.dir.path(), "src.img", 64 * 256); // 64 MiB
        import(&mut c, "tpl", &src).await.unwrap();
        // Warm up once.
        create(&mut c, "tpl", "warm").await.unwrap();
        delete(&mut c, "warm").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (rss0, thr0) = (rss_kib(), threads());
        let mut server = Vec::new();
        let mut client = Vec::new();
        for i in 0..N {
            let t = Instant::now();
            let sb = create(&mut c, "tpl", &format!("m{i}")).await.unwrap();
            client.push(t.elapsed());
            server.push(Duration::from_micros(sb.create_to_ready_us));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss1, thr1) = (rss_kib(), threads());
        server.sort();
        client.sort();
        println!("create-to-ready over {N} creates (socket provider): daemon-side p50 {:?} p95 {:?} max {:?}; API round trip p50 {:?} p95 {:?}",
            pct(&server, 50), pct(&server, 95), server[N - 1], pct(&client, 50), pct(&client, 95));
        println!("idle sandboxes: RSS {} KiB -> {} KiB: {:.1} KiB per sandbox; threads {thr0} -> {thr1}: {:.2} per sandbox",
            rss0, rss1, (rss1 - rss0) as f64 / N as f64, (thr1 - thr0) as f64 / N as f64);
        let t = Instant::now();
        for i in 0..N {
            delete(&mut c, &format!("m{i}")).await.unwrap();
        }
        println!("delete: {:?} per sandbox", t.elapsed() / N as u32);
        d.daemon.shutdown().await;

        // The peer, same template file, same machine, same run.
        let peer = nbdkit_peer(&src, d.dir.path(), 50);
        let ours = pct(&client, 50);
        println!(
            "peer nbdkit --filter=cow x{}: spawn-to-accepting p50 {:?} p95 {:?}; RSS {:.0} KiB per process. Ratios: create-to-ready (API round trip p50) {:.1}x faster, memory per idle sandbox {:.0}x smaller",
            peer.0.len(), pct(&peer.0, 50), pct(&peer.0, 95), peer.1,
            pct(&peer.0, 50).as_secs_f64() / ours.as_secs_f64(),
            peer.1 / ((rss1 - rss0) as f64 / N as f64)
        );
    });
}

/// Starts `n` nbdkit cow servers one after another; returns their start latencies (sorted) and
/// their mean RSS in KiB, then stops them.
fn nbdkit_peer(
    template: &std::path::Path,
    dir: &std::path::Path,
    n: usize,
) -> (Vec<Duration>, f64) {
    let mut lat = Vec::new();
    let mut procs = Vec::new();
    for i in 0..n {
        let sock = dir.join(format!("peer{i}.sock"));
        let t = Instant::now();
        let child = std::process::Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["--filter=cow", "file"])
            .arg(template)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nbdkit (scripts/install-deps installs it)");
        loop {
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) {
                use std::io::Read;
                let mut magic = [0u8; 8];
                if s.read_exact(&mut magic).is_ok() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        lat.push(t.elapsed());
        procs.push(child);
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss: u64 = procs
        .iter()
        .map(|p| {
            std::fs::read_to_string(format!("/proc/{}/status", p.id()))
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap()
        })
        .sum();
    for mut p in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    lat.sort();
    (lat, rss as f64 / n as f64)
}
