//! The daemon under file-descriptor pressure, as an operator would meet it: `rootfork serve`
//! started with `ulimit -n 256`, 300 connections held on one sandbox's NBD socket. The API keeps
//! answering (the connection limits keep descriptors for it), the sandbox is running again once
//! the connections close, and it can still be paused and resumed with its data.

mod common;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rootfork::api::v1;
use rootfork::client::{self, ApiTarget, Clients};

async fn get_within_5s(c: &mut Clients, id: &str) -> v1::Sandbox {
    tokio::time::timeout(
        Duration::from_secs(5),
        c.sandboxes
            .get_sandbox(v1::GetSandboxRequest { id: id.into() }),
    )
    .await
    .expect("the API answers within 5 s")
    .unwrap()
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_connections_under_ulimit_256_leave_the_daemon_usable() {
    let dir = tempfile::Builder::new()
        .prefix("rff")
        .tempdir_in("/tmp")
        .unwrap();
    let state = dir.path().join("s");
    let api = state.join("api.sock");
    let bin = env!("CARGO_BIN_EXE_rootfork");
    let cmd = format!(
        "ulimit -n 256 && exec {bin} serve --state-dir {} --no-demo --health-interval 0.5 --nbd-lock-dir {}",
        state.display(),
        dir.path().join("locks").display()
    );
    let _serve = ServeProcess(
        Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let mut c = connect_when_up(&api).await;
    let src = make_template(dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create(&mut c, "tpl", "busy").await.unwrap();
    nbd_write(&sb.nbd_uri, 4096 * 4, 4096, 0x5c);
    let sock = PathBuf::from(sb.nbd_uri.split_once("socket=").unwrap().1);
    // 300 connections held (the ones past the limits are closed by the daemon at once).
    let held: Vec<UnixStream> = (0..300)
        .map(|i| UnixStream::connect(&sock).unwrap_or_else(|e| panic!("connect {i}: {e}")))
        .collect();
    // The API answers new clients while they are held, and a second sandbox can still be made
    // and used.
    for _ in 0..5 {
        let mut fresh = tokio::time::timeout(
            Duration::from_secs(5),
            client::connect(&ApiTarget::Unix(api.clone())),
        )
        .await
        .expect("a new API client connects within 5 s")
        .unwrap();
        // Held connections are not a failure of the sandbox: the health probe is refused at
        // the limit like any connection, which shows the export alive (was: FAILED after two
        // health rounds).
        let got = get_within_5s(&mut fresh, "busy").await;
        assert_eq!(got.state, v1::SandboxState::Running as i32, "{got:?}");
        assert_eq!(got.health, v1::HealthState::Healthy as i32, "{got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let other = create(&mut c, "tpl", "other").await.unwrap();
    assert_eq!(&nbd_read(&other.nbd_uri, 4096 * 3, 12), b"tpl block 3\n");
    assert!(delete(&mut c, "other").await.unwrap());
    drop(held);
    // Once they are closed the sandbox is running and healthy again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = get_within_5s(&mut c, "busy").await;
        if got.state == v1::SandboxState::Running as i32
            && got.health == v1::HealthState::Healthy as i32
        {
            break;
        }
        assert!(Instant::now() < deadline, "not running again: {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(nbd_read(&sb.nbd_uri, 4096 * 4, 4096), vec![0x5c; 4096]);
    let paused = pause(&mut c, "busy").await.unwrap();
    assert_eq!(paused.state, v1::SandboxState::Paused as i32);
    let resumed = resume(&mut c, "busy").await.unwrap();
    assert_eq!(nbd_read(&resumed.nbd_uri, 4096 * 4, 4096), vec![0x5c; 4096]);
    assert_eq!(&nbd_read(&resumed.nbd_uri, 4096 * 2, 12), b"tpl block 2\n");
    assert!(delete(&mut c, "busy").await.unwrap());
}

/// A connection budget set larger than the open-file limit allows (`limits.max_connections =
/// 1000` under `ulimit -n 256`): the daemon still refuses connections while fewer than 64
/// descriptors are free, so the API keeps answering and a sandbox can still be made. Without
/// that floor the held connections took every descriptor and the API's accept failed with
/// EMFILE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_larger_than_the_fd_limit_still_leaves_the_api_its_descriptors() {
    let dir = tempfile::Builder::new()
        .prefix("rff")
        .tempdir_in("/tmp")
        .unwrap();
    let state = dir.path().join("s");
    let api = state.join("api.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[limits]\nmax_connections = 1000\nmax_connections_per_export = 1000\n",
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let bin = env!("CARGO_BIN_EXE_rootfork");
    let cmd = format!(
        "ulimit -n 256 && exec {bin} serve --config {} --state-dir {} --no-demo --health-interval 0.5 --nbd-lock-dir {} 2>{}",
        config.display(),
        state.display(),
        dir.path().join("locks").display(),
        log.display()
    );
    let _serve = ServeProcess(
        Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let mut c = connect_when_up(&api).await;
    let src = make_template(dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create(&mut c, "tpl", "busy").await.unwrap();
    let sock = PathBuf::from(sb.nbd_uri.split_once("socket=").unwrap().1);
    // Each accepted connection costs the daemon two descriptors: 300 would need 600.
    let held: Vec<UnixStream> = (0..300)
        .map(|i| UnixStream::connect(&sock).unwrap_or_else(|e| panic!("connect {i}: {e}")))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..3 {
        let mut fresh = tokio::time::timeout(
            Duration::from_secs(5),
            client::connect(&ApiTarget::Unix(api.clone())),
        )
        .await
        .expect("a new API client connects within 5 s")
        .unwrap();
        let got = get_within_5s(&mut fresh, "busy").await;
        assert_eq!(got.state, v1::SandboxState::Running as i32, "{got:?}");
    }
    // A create needs more free descriptors than a connection: it is refused, clearly.
    let refused = create(&mut c, "tpl", "other").await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("file descriptors"),
        "{refused:?}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("the file descriptors kept free"),
        "no refusal for descriptors logged:\n{logged}"
    );
    assert!(!logged.contains("Too many open files"), "{logged}");
    // Once the connections close, creates work again and the first sandbox serves its data.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let other = loop {
        match create(&mut c, "tpl", "other").await {
            Ok(sb) => break sb,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("still refused after the connections closed: {e:?}"),
        }
    };
    assert_eq!(&nbd_read(&other.nbd_uri, 4096 * 3, 12), b"tpl block 3\n");
    assert_eq!(&nbd_read(&sb.nbd_uri, 4096 * 2, 12), b"tpl block 2\n");
    assert!(delete(&mut c, "other").await.unwrap());
    assert!(delete(&mut c, "busy").await.unwrap());
}
