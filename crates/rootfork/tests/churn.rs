//! Churn: 200 sandboxes created and deleted on one template, 8 at a time, through the API; then
//! nothing may be left behind — file descriptors (`/proc/self/fd`), sockets among them, threads
//! (`/proc/self/task`), NBD socket files, cache files, paused files, layers of the build store,
//! kernel slots, live sandboxes.
//!
//! This file holds one test so that it owns its process's fd and thread counts.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rootfork::api::v1;

#[derive(Debug, PartialEq, Eq, Clone)]
struct Counts {
    fds: usize,
    sockets: usize,
    threads: usize,
}

fn counts() -> Counts {
    let fds: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .collect();
    let sockets = fds
        .iter()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .count();
    Counts {
        fds: fds.len(),
        sockets,
        threads: std::fs::read_dir("/proc/self/task").unwrap().count(),
    }
}

/// Creates and deletes `n` sandboxes, `par` at a time; every 10th is paused before its delete.
async fn churn(c: &rootfork::client::Clients, n: usize, par: usize, tag: &str) -> Vec<Duration> {
    let sem = Arc::new(tokio::sync::Semaphore::new(par));
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let mut c = c.clone();
        let id = format!("{tag}-{i}");
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let sb = create(&mut c, "tpl", &id).await.expect("create");
            let rtt = t.elapsed();
            assert_eq!(sb.state, v1::SandboxState::Running as i32);
            if i % 10 == 0 {
                c.sandboxes
                    .pause_sandbox(v1::PauseSandboxRequest { id: id.clone() })
                    .await
                    .expect("pause");
            }
            assert!(delete(&mut c, &id).await.expect("delete"));
            drop(permit);
            rtt
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[test]
fn churn_200_sandboxes_8_at_a_time_leaks_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Idle blocking threads go away quickly, so thread counts settle.
        .thread_keep_alive(Duration::from_millis(50))
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let d = TestDaemon::start_with(false, |c| c.health_interval = Duration::from_millis(200)).await;
        let mut c = d.client().await;
        let src = make_template(d.dir.path(), "src.img", 256);
        import(&mut c, "tpl", &src).await.unwrap();

        // Warm up (lazily created runtime threads, connection pools), then take the baseline.
        churn(&c, 16, 8, "warm").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let base = counts();

        let t = Instant::now();
        let mut rtts = churn(&c, 200, 8, "churn").await;
        let wall = t.elapsed();

        // Let the last closes' threads exit, then compare.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut now = counts();
        while (now.fds != base.fds || now.threads > base.threads) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            now = counts();
        }
        rtts.sort();
        eprintln!(
            "churn: 200 create+delete (8 at a time, every 10th paused) in {wall:?}; create round trip p50 {:?} p95 {:?}; baseline {base:?}, after {now:?}",
            rtts[rtts.len() / 2],
            rtts[rtts.len() * 95 / 100]
        );
        assert_eq!(now.fds, base.fds, "leaked file descriptors");
        assert_eq!(now.sockets, base.sockets, "leaked sockets");
        assert!(now.threads <= base.threads, "leaked threads: {} > {}", now.threads, base.threads);
        assert!(d.files("nbd").is_empty(), "NBD sockets left: {:?}", d.files("nbd"));
        assert!(d.files("cache").is_empty(), "cache files left: {:?}", d.files("cache"));
        assert!(d.files("paused").is_empty(), "paused diffs left: {:?}", d.files("paused"));
        let live = c.sandboxes.list_sandboxes(v1::ListSandboxesRequest::default()).await.unwrap().into_inner();
        assert!(live.sandboxes.is_empty(), "sandboxes left: {}", live.sandboxes.len());
        let t = c.templates.list_templates(v1::ListTemplatesRequest {}).await.unwrap().into_inner();
        assert_eq!(t.templates[0].sandboxes, 0);
        let tb = d.template_build(&t.templates[0].name);
        assert_eq!(d.builds_settle(std::slice::from_ref(&tb)).await, vec![tb], "layers left");
        let m = d.daemon.core().kernel.pool().metrics();
        assert_eq!(m.claimed, 0, "kernel slots still claimed");
        d.daemon.shutdown().await;
    });
}
