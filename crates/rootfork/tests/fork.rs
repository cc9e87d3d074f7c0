//! `ForkSandbox` on the socket provider, without VMs (an in-process daemon): forks of a paused
//! sandbox read its paused changes and see only their own writes; the parent's layer is shared
//! (no build written for a fork) and collected after its last user, whoever is deleted first,
//! also across a restart (the users are known from the records); a fork that fails half-way deletes the forks it made and
//! leaves the parent as it was; bad requests get precise statuses.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use rootfork::api::v1;
use rootfork::client::Clients;
use rootfork::config::Config;
use rootfork::daemon::Daemon;

const BLOCK: u64 = 4096;

async fn fork(
    c: &mut Clients,
    id: &str,
    count: u32,
    prefix: &str,
) -> Result<Vec<v1::Sandbox>, tonic::Status> {
    c.sandboxes
        .fork_sandbox(v1::ForkSandboxRequest {
            id: id.into(),
            count,
            id_prefix: prefix.into(),
        })
        .await
        .map(|r| r.into_inner().sandboxes)
}

fn state_of(s: &v1::Sandbox) -> v1::SandboxState {
    v1::SandboxState::try_from(s.state).unwrap()
}

async fn live_ids(c: &mut Clients) -> Vec<String> {
    let mut v: Vec<String> = c
        .sandboxes
        .list_sandboxes(v1::ListSandboxesRequest {
            include_deleted: false,
            paused_in_store: false,
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .into_iter()
        .map(|s| s.id)
        .collect();
    v.sort();
    v
}

/// The layers in the build store: every build but the template's.
fn layers(d: &TestDaemon) -> Vec<String> {
    layers_in(&d.state())
}

/// The layers in the build store of `state`.
fn layers_in(state: &Path) -> Vec<String> {
    let base = template_build(state, "tpl");
    builds_in(state)
        .into_iter()
        .filter(|b| *b != base)
        .collect()
}

/// A daemon with template `tpl` (16 tagged blocks) and a paused sandbox `p` whose block 1 is
/// 0xAA.
async fn paused_parent(f: impl FnOnce(&mut Config)) -> (TestDaemon, Clients) {
    let d = TestDaemon::start_with(false, f).await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let p = create(&mut c, "tpl", "p").await.unwrap();
    nbd_write(&p.nbd_uri, BLOCK, BLOCK as u32, 0xAA);
    pause(&mut c, "p").await.unwrap();
    (d, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_start_from_the_pause_and_see_only_their_own_writes() {
    let (d, mut c) = paused_parent(|_| {}).await;
    let template = template_files(&d.state(), "tpl");
    let parent_layer = layers(&d);
    assert_eq!(parent_layer.len(), 1, "{parent_layer:?}");
    let forks = fork(&mut c, "p", 3, "").await.unwrap();
    // The forks read the parent's layer as it is: no build is written for them.
    assert_eq!(layers(&d), parent_layer);
    let ids: Vec<&str> = forks.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["p-fork-0", "p-fork-1", "p-fork-2"]);
    for (k, f) in forks.iter().enumerate() {
        assert_eq!(state_of(f), v1::SandboxState::Running, "{}", f.message);
        assert_eq!(f.template, "tpl");
        // The parent's paused write and the template under it.
        assert_eq!(nbd_read(&f.nbd_uri, BLOCK, 4096), vec![0xAA; 4096]);
        assert_eq!(&nbd_read(&f.nbd_uri, 2 * BLOCK, 12), b"tpl block 2\n");
        nbd_write(&f.nbd_uri, 2 * BLOCK, 4096, 0x10 + k as u8);
        nbd_write(&f.nbd_uri, BLOCK, 4096, 0x20 + k as u8);
    }
    for (k, f) in forks.iter().enumerate() {
        assert_eq!(
            nbd_read(&f.nbd_uri, 2 * BLOCK, 4096),
            vec![0x10 + k as u8; 4096]
        );
        assert_eq!(
            nbd_read(&f.nbd_uri, BLOCK, 4096),
            vec![0x20 + k as u8; 4096]
        );
    }
    // The parent is still paused with its own data only; the template never changed.
    assert_eq!(state_of(&get(&mut c, "p").await), v1::SandboxState::Paused);
    let p = resume(&mut c, "p").await.unwrap();
    assert_eq!(nbd_read(&p.nbd_uri, BLOCK, 4096), vec![0xAA; 4096]);
    assert_eq!(&nbd_read(&p.nbd_uri, 2 * BLOCK, 12), b"tpl block 2\n");
    assert_eq!(template_files(&d.state(), "tpl"), template);
    // A paused fork forks too, with its own prefix.
    pause(&mut c, "p-fork-1").await.unwrap();
    let grand = fork(&mut c, "p-fork-1", 1, "g").await.unwrap();
    assert_eq!(grand[0].id, "g-0");
    assert_eq!(nbd_read(&grand[0].nbd_uri, BLOCK, 4096), vec![0x21; 4096]);
    assert_eq!(
        nbd_read(&grand[0].nbd_uri, 2 * BLOCK, 4096),
        vec![0x11; 4096]
    );
    for id in ["p", "p-fork-0", "p-fork-1", "p-fork-2", "g-0"] {
        assert!(delete(&mut c, id).await.unwrap());
    }
    for sub in ["cache", "paused", "sandboxes"] {
        assert!(d.files(sub).is_empty(), "{sub}: {:?}", d.files(sub));
    }
    assert!(layers(&d).is_empty(), "{:?}", layers(&d));
    d.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parent_layer_stays_while_a_fork_uses_it() {
    let (d, mut c) = paused_parent(|_| {}).await;
    let parent_layer = layers(&d);
    assert_eq!(parent_layer.len(), 1, "{parent_layer:?}");
    let forks = fork(&mut c, "p", 2, "f").await.unwrap();
    // The parent goes first: its layer stays for the forks.
    assert!(delete(&mut c, "p").await.unwrap());
    assert_eq!(layers(&d), parent_layer);
    for f in &forks {
        assert_eq!(nbd_read(&f.nbd_uri, BLOCK, 4096), vec![0xAA; 4096]);
    }
    // A fork's pause writes a layer of its own over the parent's.
    nbd_write(&forks[0].nbd_uri, 3 * BLOCK, 4096, 0x30);
    pause(&mut c, "f-0").await.unwrap();
    let now = layers(&d);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.contains(&parent_layer[0]));
    let f0 = resume(&mut c, "f-0").await.unwrap();
    assert_eq!(nbd_read(&f0.nbd_uri, BLOCK, 4096), vec![0xAA; 4096]);
    assert_eq!(nbd_read(&f0.nbd_uri, 3 * BLOCK, 4096), vec![0x30; 4096]);
    // A new sandbox with the parent's id starts clean, over the template.
    let p = create(&mut c, "tpl", "p").await.unwrap();
    assert_eq!(&nbd_read(&p.nbd_uri, BLOCK, 12), b"tpl block 1\n");
    nbd_write(&p.nbd_uri, BLOCK, 4096, 0xBB);
    pause(&mut c, "p").await.unwrap();
    assert_eq!(layers(&d).len(), 3, "{:?}", layers(&d));
    pause(&mut c, "f-1").await.unwrap();
    let f1 = resume(&mut c, "f-1").await.unwrap();
    assert_eq!(nbd_read(&f1.nbd_uri, BLOCK, 4096), vec![0xAA; 4096]);
    let p = resume(&mut c, "p").await.unwrap();
    assert_eq!(nbd_read(&p.nbd_uri, BLOCK, 4096), vec![0xBB; 4096]);
    assert!(delete(&mut c, "p").await.unwrap());
    // The new p's layer is gone; the old parent's stays under both forks' layers.
    let now = layers(&d);
    assert_eq!(now.len(), 3, "{now:?}");
    assert!(now.contains(&parent_layer[0]));
    assert!(delete(&mut c, "f-0").await.unwrap());
    assert!(layers(&d).contains(&parent_layer[0]));
    assert!(delete(&mut c, "f-1").await.unwrap());
    assert!(layers(&d).is_empty(), "{:?}", layers(&d));
    d.daemon.shutdown().await;
}

async fn start(state: &Path, locks: &Path) -> Daemon {
    let mut config = Config::with_state_dir(state).unwrap();
    config.demo_template = false;
    config.nbd_lock_dir = locks.to_owned();
    config.health_interval = Duration::from_secs(3600);
    Daemon::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_of_a_layer_are_known_again_after_a_restart() {
    let dir = tempfile::Builder::new()
        .prefix("rff")
        .tempdir_in("/tmp")
        .unwrap();
    let (state, locks) = (dir.path().join("s"), dir.path().join("locks"));
    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    let src = make_template(dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let p = create(&mut c, "tpl", "p").await.unwrap();
    nbd_write(&p.nbd_uri, BLOCK, 4096, 0xAA);
    pause(&mut c, "p").await.unwrap();
    let parent_layer = layers_in(&state);
    let forks = fork(&mut c, "p", 2, "").await.unwrap();
    nbd_write(&forks[0].nbd_uri, 2 * BLOCK, 4096, 0x01);
    d.shutdown().await;

    // The forks are adopted over the parent's layer, which the start kept.
    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    assert_eq!(layers_in(&state), parent_layer);
    for f in &forks {
        let again = get(&mut c, &f.id).await;
        assert_eq!(
            state_of(&again),
            v1::SandboxState::Running,
            "{}",
            again.message
        );
        assert_eq!(nbd_read(&again.nbd_uri, BLOCK, 4096), vec![0xAA; 4096]);
    }
    assert_eq!(
        nbd_read(&forks[0].nbd_uri, 2 * BLOCK, 4096),
        vec![0x01; 4096]
    );
    // Counted from the records: the parent's delete keeps what the forks use.
    assert!(delete(&mut c, "p").await.unwrap());
    assert_eq!(layers_in(&state), parent_layer);
    assert!(delete(&mut c, "p-fork-0").await.unwrap());
    assert_eq!(layers_in(&state), parent_layer);
    d.shutdown().await;

    // With the parent's record gone, the fork's record alone keeps the layer.
    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    assert_eq!(layers_in(&state), parent_layer);
    let f1 = get(&mut c, "p-fork-1").await;
    assert_eq!(nbd_read(&f1.nbd_uri, BLOCK, 4096), vec![0xAA; 4096]);
    assert!(delete(&mut c, "p-fork-1").await.unwrap());
    assert!(layers_in(&state).is_empty(), "{:?}", layers_in(&state));
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_that_fails_half_way_deletes_the_forks_it_made() {
    // Room for the parent and two forks: the third fork is refused after two were made.
    let (d, mut c) = paused_parent(|cfg| cfg.max_sandboxes = 3).await;
    let before = (d.files("paused"), d.builds());
    let e = fork(&mut c, "p", 3, "").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert_eq!(live_ids(&mut c).await, ["p"]);
    for id in ["p-fork-0", "p-fork-1"] {
        assert_eq!(state_of(&get(&mut c, id).await), v1::SandboxState::Deleted);
    }
    assert_eq!(d.files("sandboxes"), ["p.json"]);
    assert!(d.files("cache").is_empty(), "{:?}", d.files("cache"));
    assert_eq!((d.files("paused"), d.builds()), before);
    // The parent is as it was: paused, and it resumes with its data.
    let p = get(&mut c, "p").await;
    assert_eq!(state_of(&p), v1::SandboxState::Paused);
    assert_eq!(p.pause_count, 1);
    let p = resume(&mut c, "p").await.unwrap();
    assert_eq!(nbd_read(&p.nbd_uri, BLOCK, 4096), vec![0xAA; 4096]);
    // Within the limit the same ids can be forked afterwards.
    pause(&mut c, "p").await.unwrap();
    let forks = fork(&mut c, "p", 2, "").await.unwrap();
    assert_eq!(nbd_read(&forks[1].nbd_uri, BLOCK, 4096), vec![0xAA; 4096]);
    d.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fork_requests_get_precise_statuses_and_change_nothing() {
    let (d, mut c) = paused_parent(|_| {}).await;
    let code = |r: Result<Vec<v1::Sandbox>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(fork(&mut c, "nope", 1, "").await),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(fork(&mut c, "bad/id", 1, "").await),
        tonic::Code::InvalidArgument
    );
    for count in [0, 65] {
        let e = fork(&mut c, "p", count, "").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("count"), "{}", e.message());
    }
    for prefix in ["a/b", &"x".repeat(64)] {
        assert_eq!(
            code(fork(&mut c, "p", 1, prefix).await),
            tonic::Code::InvalidArgument,
            "{prefix}"
        );
    }
    // An id in use: nothing is made.
    create(&mut c, "tpl", "p-fork-1").await.unwrap();
    let e = fork(&mut c, "p", 2, "").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("p-fork-1"), "{}", e.message());
    assert_eq!(live_ids(&mut c).await, ["p", "p-fork-1"]);
    // Only a paused sandbox forks.
    let e = fork(&mut c, "p-fork-1", 1, "").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("running"), "{}", e.message());
    assert_eq!(live_ids(&mut c).await, ["p", "p-fork-1"]);
    assert_eq!(state_of(&get(&mut c, "p").await), v1::SandboxState::Paused);
    d.daemon.shutdown().await;
}
