//! Sandboxes that move between hosts through the object store (`serve --store`), with two
//! in-process daemons (separate state directories: two hosts) sharing one store directory
//! (`file://`; the same code talks to S3, see `store_s3.rs`): a sandbox paused on A is uploaded
//! in the background and resumed on B, which reads only what it needs from the store; A's resume
//! of it is then refused; B's next pause goes back to the store and A takes it back; a delete
//! removes the manifest of the host that holds it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::nbd_client::NbdClient;
use common::*;
use rootfork::api::v1;
use rootfork::config::Config;
use rootfork::daemon::remote::StoreUrl;
use tonic::Code;

const MIB: u64 = 1 << 20;
const TEMPLATE: u64 = 64 * MIB;
/// The template's data: its first 32 MiB (the rest is zeroes).
const TEMPLATE_DATA: u64 = 32 * MIB;

fn byte_at(offset: u64) -> u8 {
    if offset < TEMPLATE_DATA {
        ((offset / 4096) as u8).wrapping_mul(31) ^ (offset as u8) | 1
    } else {
        0
    }
}

/// A 64 MiB template: 32 MiB of data, then zeroes.
fn template(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("tpl.img");
    let data: Vec<u8> = (0..TEMPLATE_DATA).map(byte_at).collect();
    std::fs::write(&p, &data).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(TEMPLATE)
        .unwrap();
    p
}

fn with_store(store: &Path) -> impl FnOnce(&mut Config) {
    let store = store.to_owned();
    move |c: &mut Config| {
        c.store_url = Some(StoreUrl::Dir(store));
        c.health_interval = Duration::from_secs(3600);
    }
}

/// The Unix socket and export name of an `nbd+unix:///NAME?socket=PATH` URI.
fn socket_of(uri: &str) -> (std::path::PathBuf, String) {
    let rest = uri.strip_prefix("nbd+unix:///").unwrap();
    let (name, sock) = rest.split_once("?socket=").unwrap();
    (sock.into(), name.into())
}

/// Waits until `id`'s `store_status` is `want` (the upload runs in the background; 60 s at most).
async fn store_status(c: &mut rootfork::client::Clients, id: &str, want: &str) -> String {
    let mut last = String::new();
    for _ in 0..600 {
        last = get(c, id).await.store_status;
        if last == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// `ListSandboxes(paused_in_store)`.
async fn in_store(c: &mut rootfork::client::Clients) -> Vec<v1::Sandbox> {
    c.sandboxes
        .list_sandboxes(v1::ListSandboxesRequest {
            include_deleted: false,
            paused_in_store: true,
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes
}

fn state_of(s: &v1::Sandbox) -> v1::SandboxState {
    v1::SandboxState::try_from(s.state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sandbox_paused_on_one_host_resumes_on_another() {
    let shared = tempfile::tempdir().unwrap();
    let store = shared.path().join("store");
    let a = TestDaemon::start_with(false, with_store(&store)).await;
    let b = TestDaemon::start_with(false, with_store(&store)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);

    // A: import, create, write 1 MiB, pause.
    let src = template(shared.path());
    import(&mut ca, "tpl", &src).await.unwrap();
    let sb = create(&mut ca, "tpl", "mover").await.unwrap();
    nbd_write(&sb.nbd_uri, 40 * MIB, MIB as u32, 0x5a);
    nbd_write(&sb.nbd_uri, 4096, 4096, 0xa5);
    let p = pause(&mut ca, "mover").await.unwrap();
    assert_eq!(state_of(&p), v1::SandboxState::Paused);
    assert_eq!(
        store_status(&mut ca, "mover", "in the store").await,
        "in the store"
    );

    // The store lists it, paused, held by A.
    let listed = in_store(&mut cb).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, "mover");
    assert_eq!(state_of(&listed[0]), v1::SandboxState::Paused);

    // B: resume a sandbox it never saw.
    let fetched_before = b.daemon.core().builds.remote().unwrap().stats();
    let r = resume(&mut cb, "mover").await.unwrap();
    assert_eq!(state_of(&r), v1::SandboxState::Running, "{}", r.message);
    assert_eq!(r.template, "tpl");
    assert_eq!(r.pause_count, 1);
    assert_eq!(nbd_read(&r.nbd_uri, 40 * MIB, 4096), vec![0x5a; 4096]);
    assert_eq!(
        nbd_read(&r.nbd_uri, 41 * MIB - 4096, 4096),
        vec![0x5a; 4096]
    );
    assert_eq!(nbd_read(&r.nbd_uri, 4096, 4096), vec![0xa5; 4096]);
    for at in [0, 8 * MIB + 123, 31 * MIB] {
        let want: Vec<u8> = (at..at + 512).map(byte_at).collect();
        assert_eq!(
            nbd_read(&r.nbd_uri, at, 512),
            want,
            "template bytes at {at}"
        );
    }
    // B fetched what those reads needed, far below the image.
    let fetched = b
        .daemon
        .core()
        .builds
        .remote()
        .unwrap()
        .stats()
        .bytes_fetched
        - fetched_before.bytes_fetched;
    eprintln!(
        "MEASURE resume on another host fetched {fetched} bytes ({:.1} % of the {TEMPLATE}-byte image) for 1 MiB written + 3 sampled template reads",
        fetched as f64 * 100.0 / TEMPLATE as f64,
    );
    assert!(
        fetched < TEMPLATE / 4,
        "fetched {fetched} bytes for a few reads"
    );
    // The whole disk, compared.
    let (sock, name) = socket_of(&r.nbd_uri);
    let mut client = NbdClient::connect(&sock, &name).unwrap();
    for mib in 0..TEMPLATE / MIB {
        let got = client.read(mib * MIB, MIB as usize).unwrap();
        let want: Vec<u8> = (mib * MIB..(mib + 1) * MIB)
            .map(|o| match o {
                o if (40 * MIB..41 * MIB).contains(&o) => 0x5a,
                o if (4096..8192).contains(&o) => 0xa5,
                o => byte_at(o),
            })
            .collect();
        assert!(got == want, "MiB {mib} differs");
    }
    client.disconnect();

    // A's copy is stale: its resume is refused, and says who holds it.
    let e = resume(&mut ca, "mover").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("held by host"), "{e:?}");
    assert_eq!(
        state_of(&get(&mut ca, "mover").await),
        v1::SandboxState::Paused
    );

    // B writes and pauses; A takes it back with B's writes.
    nbd_write(&r.nbd_uri, 50 * MIB, 4096, 0x77);
    pause(&mut cb, "mover").await.unwrap();
    assert_eq!(
        store_status(&mut cb, "mover", "in the store").await,
        "in the store"
    );
    let back = resume(&mut ca, "mover").await.unwrap();
    assert_eq!(
        state_of(&back),
        v1::SandboxState::Running,
        "{}",
        back.message
    );
    assert_eq!(nbd_read(&back.nbd_uri, 50 * MIB, 4096), vec![0x77; 4096]);
    assert_eq!(nbd_read(&back.nbd_uri, 40 * MIB, 4096), vec![0x5a; 4096]);
    let e = resume(&mut cb, "mover").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // A, the holder, deletes it: the manifest goes; B's delete of its stale copy is local.
    assert!(delete(&mut ca, "mover").await.unwrap());
    let listed = in_store(&mut ca).await;
    assert!(listed.is_empty(), "{listed:?}");
    assert!(delete(&mut cb, "mover").await.unwrap());
    // Gone from the store: B's resume finds only its own tombstone.
    let e = resume(&mut cb, "mover").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("deleted"), "{e:?}");
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_the_store_calls_say_so() {
    let d = TestDaemon::start(false).await;
    let mut c = d.client().await;
    let e = c
        .sandboxes
        .list_sandboxes(v1::ListSandboxesRequest {
            include_deleted: false,
            paused_in_store: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("--store"), "{e:?}");
    let e = resume(&mut c, "nowhere").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    d.daemon.shutdown().await;
}

/// The builds (ids) in a `file://` store: directories holding a map (the local file system
/// store leaves a removed build's empty directory behind).
fn store_builds(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("map").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 32)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_gc_removes_exactly_the_builds_no_manifest_references() {
    let shared = tempfile::tempdir().unwrap();
    let store = shared.path().join("store");
    let a = TestDaemon::start_with(false, with_store(&store)).await;
    let mut c = a.client().await;
    let src = make_template(shared.path(), "src.img", 64);
    import(&mut c, "tpl", &src).await.unwrap();
    for id in ["kept", "dropped"] {
        let sb = create(&mut c, "tpl", id).await.unwrap();
        nbd_write(&sb.nbd_uri, 8192, 4096, 0x42);
        pause(&mut c, id).await.unwrap();
        assert_eq!(
            store_status(&mut c, id, "in the store").await,
            "in the store"
        );
    }
    let before = store_builds(&store);
    // The template's base build and two layers.
    assert_eq!(before.len(), 3, "{before:?}");
    let layer_of = |id: &str| {
        let r: serde_json::Value = serde_json::from_slice(
            &std::fs::read(store.join("sandboxes").join(format!("{id}.json"))).unwrap(),
        )
        .unwrap();
        r["layer"].as_str().unwrap().to_owned()
    };
    let dropped = layer_of("dropped");
    assert!(delete(&mut c, "dropped").await.unwrap());
    assert!(!store.join("sandboxes/dropped.json").exists());
    let remote = a.daemon.core().remote.as_ref().unwrap();
    // Young builds are kept.
    let r = remote
        .collect(Duration::from_secs(3600), false)
        .await
        .unwrap();
    assert_eq!((r.removed.len(), r.young), (0, 1), "{r:?}");
    // A dry run reports it and removes nothing.
    let r = remote.collect(Duration::ZERO, true).await.unwrap();
    assert_eq!(
        r.removed.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
        std::slice::from_ref(&dropped)
    );
    assert_eq!(store_builds(&store), before);
    // Then exactly that build goes; the other sandbox still resumes from the store's chain.
    let r = remote.collect(Duration::ZERO, false).await.unwrap();
    assert_eq!(r.removed.len(), 1, "{r:?}");
    let after = store_builds(&store);
    assert_eq!(
        after,
        before
            .iter()
            .filter(|b| **b != dropped)
            .cloned()
            .collect::<Vec<_>>()
    );
    let b = TestDaemon::start_with(false, with_store(&store)).await;
    let mut cb = b.client().await;
    let r = resume(&mut cb, "kept").await.unwrap();
    assert_eq!(nbd_read(&r.nbd_uri, 8192, 4096), vec![0x42; 4096]);
    assert_eq!(&nbd_read(&r.nbd_uri, 4096 * 3, 12), b"tpl block 3\n");
    // Running on B, its chain is still referenced (the manifest names the layer it runs on).
    let r = remote.collect(Duration::ZERO, false).await.unwrap();
    assert!(r.removed.is_empty(), "{r:?}");
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
}

/// An in-process daemon on `state` with the object store `store`.
async fn daemon_on(state: &Path, store: &Path) -> rootfork::daemon::Daemon {
    let mut config = Config::with_state_dir(state).unwrap();
    config.demo_template = false;
    config.nbd_lock_dir = state.join("locks");
    with_store(store)(&mut config);
    rootfork::daemon::Daemon::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_that_keeps_failing_is_retried_and_finished_after_a_restart() {
    let dir = tempfile::Builder::new()
        .prefix("rfu")
        .tempdir_in("/tmp")
        .unwrap();
    let (state, store) = (dir.path().join("s"), dir.path().join("store"));
    let a = daemon_on(&state, &store).await;
    let mut c = connect_when_up(a.api_socket()).await;
    let src = make_template(dir.path(), "src.img", 64);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create(&mut c, "tpl", "late").await.unwrap();
    nbd_write(&sb.nbd_uri, 8192, 4096, 0x3c);
    // A file where the manifests go: every manifest write fails.
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join("sandboxes"), b"in the way").unwrap();
    let p = pause(&mut c, "late").await.unwrap();
    assert_eq!(state_of(&p), v1::SandboxState::Paused);
    let mut status = String::new();
    for _ in 0..300 {
        status = get(&mut c, "late").await.store_status;
        if status.starts_with("upload failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(status.starts_with("upload failed"), "{status}");
    drop(c);
    a.shutdown().await;
    // The record keeps the upload pending; the next start finishes it.
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("sandboxes/late.json")).unwrap()).unwrap();
    assert!(rec["store"]["pending"].is_string(), "{rec}");
    std::fs::remove_file(store.join("sandboxes")).unwrap();
    let a = daemon_on(&state, &store).await;
    let mut c = connect_when_up(a.api_socket()).await;
    assert_eq!(
        store_status(&mut c, "late", "in the store").await,
        "in the store"
    );
    let b = TestDaemon::start_with(false, with_store(&store)).await;
    let mut cb = b.client().await;
    let r = resume(&mut cb, "late").await.unwrap();
    assert_eq!(nbd_read(&r.nbd_uri, 8192, 4096), vec![0x3c; 4096]);
    drop(c);
    a.shutdown().await;
    b.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_template_first_booted_from_the_store_leaves_a_trace_the_next_host_prefetches() {
    let shared = tempfile::tempdir().unwrap();
    let store = shared.path().join("store");
    let a = TestDaemon::start_with(false, with_store(&store)).await;
    let b = TestDaemon::start_with(false, with_store(&store)).await;
    let c = TestDaemon::start_with(false, with_store(&store)).await;
    let (mut ca, mut cb, mut cc) = (a.client().await, b.client().await, c.client().await);
    let src = template(shared.path());
    import(&mut ca, "tpl", &src).await.unwrap();
    let tb = a.template_build("tpl");
    create(&mut ca, "tpl", "s").await.unwrap();
    pause(&mut ca, "s").await.unwrap();
    assert_eq!(
        store_status(&mut ca, "s", "in the store").await,
        "in the store"
    );
    // B takes s over: it knows the template now, its base build only in the store.
    resume(&mut cb, "s").await.unwrap();
    assert!(!b.builds().contains(&tb));
    // B's first sandbox of it has no trace to prefetch: its reads are recorded, and published
    // when it is deleted.
    let first = create(&mut cb, "tpl", "first").await.unwrap();
    let reads = [MIB, 12 * MIB + 4096, 27 * MIB];
    for &at in &reads {
        let want: Vec<u8> = (at..at + 4096).map(byte_at).collect();
        assert_eq!(nbd_read(&first.nbd_uri, at, 4096), want);
    }
    assert!(!store.join(&tb).join("boot-trace").exists());
    assert!(delete(&mut cb, "first").await.unwrap());
    assert!(
        store.join(&tb).join("boot-trace").exists(),
        "no trace published"
    );
    // C takes s over from B and prefetches the template's trace while it resumes: the reads
    // the first boot made are then served without a fetch.
    pause(&mut cb, "s").await.unwrap();
    assert_eq!(
        store_status(&mut cb, "s", "in the store").await,
        "in the store"
    );
    let r = resume(&mut cc, "s").await.unwrap();
    let remote = c.daemon.core().builds.remote().unwrap().clone();
    let waiter = remote.clone();
    tokio::task::spawn_blocking(move || waiter.wait_background())
        .await
        .unwrap();
    let before = remote.stats();
    assert!(before.prefetched >= reads.len() as u64, "{before:?}");
    for &at in &reads {
        let want: Vec<u8> = (at..at + 4096).map(byte_at).collect();
        assert_eq!(nbd_read(&r.nbd_uri, at, 4096), want);
    }
    let after = remote.stats();
    assert_eq!(
        after.bytes_fetched, before.bytes_fetched,
        "{before:?} {after:?}"
    );
    assert!(after.prefetch_hits > before.prefetch_hits, "{after:?}");
    for cl in [&mut ca, &mut cb, &mut cc] {
        delete(cl, "s").await.unwrap();
    }
    a.daemon.shutdown().await;
    b.daemon.shutdown().await;
    c.daemon.shutdown().await;
}
