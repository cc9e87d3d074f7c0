//! Measurements (printed, not asserted): create-to-ready latency over 200 sequential creates with
//! the socket provider, and the daemon's memory per idle sandbox (RSS delta over those 200 live
//! sandboxes / 200). Run with `cargo test -p rootfork --release --test measure -- --ignored
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
    });
}
