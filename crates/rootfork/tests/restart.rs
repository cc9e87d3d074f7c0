//! Sandboxes across a daemon restart: a stop (SIGTERM, `Daemon::shutdown`) pauses the running
//! sandboxes and keeps every one; a SIGKILL keeps the paused ones, and brings a running one back
//! at its last pause (or `FAILED` when it never paused), saying so. The state directory's format
//! is versioned: a newer one is refused. Diffs no record names are removed at start.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use rootfork::api::v1;
use rootfork::config::Config;
use rootfork::daemon::Daemon;

async fn start(state: &Path, locks: &Path) -> Daemon {
    let mut config = Config::with_state_dir(state).unwrap();
    config.demo_template = false;
    config.nbd_lock_dir = locks.to_owned();
    config.health_interval = Duration::from_secs(3600);
    Daemon::start(config).await.unwrap()
}

fn state_of(s: &v1::Sandbox) -> v1::SandboxState {
    v1::SandboxState::try_from(s.state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_pauses_and_keeps_every_sandbox() {
    let dir = tempfile::Builder::new()
        .prefix("rfr")
        .tempdir_in("/tmp")
        .unwrap();
    let (state, locks) = (dir.path().join("s"), dir.path().join("locks"));
    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    let src = make_template(dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let run = create(&mut c, "tpl", "run").await.unwrap();
    nbd_write(&run.nbd_uri, 4096, 4096, 0x11);
    let held = create(&mut c, "tpl", "held").await.unwrap();
    nbd_write(&held.nbd_uri, 8192, 4096, 0x22);
    pause(&mut c, "held").await.unwrap();
    d.shutdown().await;

    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    for id in ["run", "held"] {
        assert_eq!(
            state_of(&get(&mut c, id).await),
            v1::SandboxState::Paused,
            "{id}"
        );
    }
    let run = resume(&mut c, "run").await.unwrap();
    assert_eq!(nbd_read(&run.nbd_uri, 4096, 4096), vec![0x11; 4096]);
    let held = resume(&mut c, "held").await.unwrap();
    assert_eq!(nbd_read(&held.nbd_uri, 8192, 4096), vec![0x22; 4096]);
    assert_eq!(&nbd_read(&held.nbd_uri, 4096 * 3, 12), b"tpl block 3\n");
    // Deleted sandboxes stay deleted, and their files go.
    assert!(delete(&mut c, "held").await.unwrap());
    d.shutdown().await;
    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    let ids: Vec<String> = c
        .sandboxes
        .list_sandboxes(v1::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, ["run"]);
    assert_eq!(std::fs::read_dir(state.join("paused")).unwrap().count(), 1);
    d.shutdown().await;
}

/// `rootfork serve` on `state`, as a process.
fn spawn_serve(state: &Path, locks: &Path) -> ServeProcess {
    ServeProcess(
        Command::new(env!("CARGO_BIN_EXE_rootfork"))
            .args(["serve", "--no-demo", "--health-interval", "10"])
            .arg("--state-dir")
            .arg(state)
            .arg("--nbd-lock-dir")
            .arg(locks)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_paused_sandboxes_resume_and_running_ones_say_what_was_lost() {
    let dir = tempfile::Builder::new()
        .prefix("rfk")
        .tempdir_in("/tmp")
        .unwrap();
    let (state, locks) = (dir.path().join("s"), dir.path().join("locks"));
    let api: PathBuf = state.join("api.sock");
    let serve = spawn_serve(&state, &locks);
    let mut c = connect_when_up(&api).await;
    let src = make_template(dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    // held: paused. again: paused, resumed, written after. fresh: never paused.
    let held = create(&mut c, "tpl", "held").await.unwrap();
    nbd_write(&held.nbd_uri, 0, 4096, 0x31);
    pause(&mut c, "held").await.unwrap();
    let again = create(&mut c, "tpl", "again").await.unwrap();
    nbd_write(&again.nbd_uri, 0, 4096, 0x41);
    pause(&mut c, "again").await.unwrap();
    let again = resume(&mut c, "again").await.unwrap();
    nbd_write(&again.nbd_uri, 4096, 4096, 0x42);
    let fresh = create(&mut c, "tpl", "fresh").await.unwrap();
    nbd_write(&fresh.nbd_uri, 0, 4096, 0x51);
    serve.kill9();
    // An orphan diff (a pause interrupted before its record) is removed at the next start.
    let orphan = state.join("paused").join("gone.7.diff");
    std::fs::write(&orphan, b"x").unwrap();

    let _serve = spawn_serve(&state, &locks);
    let mut c = connect_when_up(&api).await;
    assert_eq!(
        state_of(&get(&mut c, "held").await),
        v1::SandboxState::Paused
    );
    let held = resume(&mut c, "held").await.unwrap();
    assert_eq!(nbd_read(&held.nbd_uri, 0, 4096), vec![0x31; 4096]);
    let again = get(&mut c, "again").await;
    assert_eq!(state_of(&again), v1::SandboxState::Paused);
    assert!(
        again.message.contains("writes after that pause were lost"),
        "{}",
        again.message
    );
    let again = resume(&mut c, "again").await.unwrap();
    assert_eq!(nbd_read(&again.nbd_uri, 0, 4096), vec![0x41; 4096]);
    assert_eq!(&nbd_read(&again.nbd_uri, 4096, 12), b"tpl block 1\n");
    let fresh = get(&mut c, "fresh").await;
    assert_eq!(state_of(&fresh), v1::SandboxState::Failed);
    assert!(fresh.message.contains("never paused"), "{}", fresh.message);
    assert!(delete(&mut c, "fresh").await.unwrap());
    assert!(!orphan.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_state_directory_is_refused() {
    let dir = tempfile::Builder::new()
        .prefix("rfv")
        .tempdir_in("/tmp")
        .unwrap();
    let state = dir.path().join("s");
    let d = start(&state, &dir.path().join("locks")).await;
    d.shutdown().await;
    assert_eq!(
        std::fs::read_to_string(state.join("format")).unwrap(),
        "rootfork-state 1\n"
    );
    std::fs::write(state.join("format"), "rootfork-state 99\n").unwrap();
    let mut config = Config::with_state_dir(&state).unwrap();
    config.demo_template = false;
    let e = Daemon::start(config).await.unwrap_err();
    assert!(e.to_string().contains("format 99"), "{e}");
}
