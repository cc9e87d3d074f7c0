//! Sandboxes across a daemon restart. A stop (SIGTERM, `Daemon::shutdown`) hands the running
//! socket sandboxes over and keeps every sandbox; a SIGKILL leaves them as they were. Either
//! way the next start adopts every running socket sandbox: its overlay reopened from its cache
//! file and block state, served again on the same socket and export name, with every byte the
//! client saw acknowledged; paused ones stay paused and resume with their data. A sandbox whose
//! overlay cannot be reopened is FAILED with its files kept. The state directory's format is
//! versioned: a newer one is refused. Files no record owns are removed at start, those of a
//! record that cannot be read are kept.

mod common;

use std::path::Path;
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

async fn list(c: &mut rootfork::client::Clients) -> Vec<v1::Sandbox> {
    c.sandboxes
        .list_sandboxes(v1::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_keeps_running_sandboxes_running_at_the_same_uri() {
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
    create(&mut c, "tpl", "gone").await.unwrap();
    d.shutdown().await;
    // The running sandboxes' overlays are kept (cache file and block state), sockets are gone.
    let cache = files(&state.join("cache"));
    assert_eq!(cache.len(), 4, "{cache:?}");
    assert!(files(&state.join("nbd")).is_empty());
    let lost = cache
        .iter()
        .find(|f| f.starts_with("gone.") && f.ends_with(".state"));
    std::fs::remove_file(state.join("cache").join(lost.unwrap())).unwrap();

    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    let m = d.core().render_metrics();
    for line in [
        r#"rootfork_adoptions_total{result="adopted",reason="none"} 1"#,
        r#"rootfork_adoptions_total{result="failed",reason="state_missing"} 1"#,
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }
    let gone = get(&mut c, "gone").await;
    assert_eq!(
        state_of(&gone),
        v1::SandboxState::Failed,
        "{}",
        gone.message
    );
    assert!(delete(&mut c, "gone").await.unwrap());
    let again = get(&mut c, "run").await;
    assert_eq!(
        state_of(&again),
        v1::SandboxState::Running,
        "{}",
        again.message
    );
    assert!(again.message.contains("adopted"), "{}", again.message);
    assert_eq!(again.nbd_uri, run.nbd_uri);
    assert_eq!(nbd_read(&run.nbd_uri, 4096, 4096), vec![0x11; 4096]);
    assert_eq!(&nbd_read(&run.nbd_uri, 0, 12), b"tpl block 0\n");
    assert_eq!(
        state_of(&get(&mut c, "held").await),
        v1::SandboxState::Paused
    );
    let held = resume(&mut c, "held").await.unwrap();
    assert_eq!(nbd_read(&held.nbd_uri, 8192, 4096), vec![0x22; 4096]);
    // A new sandbox gets a socket of its own, not the adopted one's.
    let other = create(&mut c, "tpl", "other").await.unwrap();
    assert_ne!(other.nbd_uri, run.nbd_uri);
    assert_ne!(other.nbd_uri, held.nbd_uri);
    // The adopted sandbox pauses and resumes like any other, and deletes leave nothing.
    nbd_write(&run.nbd_uri, 12288, 4096, 0x13);
    pause(&mut c, "run").await.unwrap();
    let run = resume(&mut c, "run").await.unwrap();
    assert_eq!(nbd_read(&run.nbd_uri, 4096, 4096), vec![0x11; 4096]);
    assert_eq!(nbd_read(&run.nbd_uri, 12288, 4096), vec![0x13; 4096]);
    for id in ["run", "held", "other"] {
        assert!(delete(&mut c, id).await.unwrap());
    }
    d.shutdown().await;
    for sub in ["cache", "paused", "sandboxes", "nbd"] {
        assert!(
            files(&state.join(sub)).is_empty(),
            "{sub}: {:?}",
            files(&state.join(sub))
        );
    }
    let d = start(&state, &locks).await;
    let mut c = connect_when_up(d.api_socket()).await;
    assert!(list(&mut c).await.is_empty());
    d.shutdown().await;
}

/// The issue's "done when", as a user runs it: `rootfork serve`; a running socket sandbox A
/// and a paused one B; data written and flushed through A; the daemon stopped by `signal`
/// (SIGKILL or SIGTERM) and started again on the same state directory: A runs at the same URI
/// with the data, B is paused and resumes with its data.
async fn both_sandboxes_come_back(stop: fn(ServeProcess)) {
    let ServedState {
        dir: _dir,
        state,
        locks,
        api,
        serve,
        client: mut c,
    } = serve_with_template("rfd", 16).await;
    let a = create(&mut c, "tpl", "a").await.unwrap();
    let b = create(&mut c, "tpl", "b").await.unwrap();
    nbd_write(&b.nbd_uri, 0, 4096, 0xb1);
    pause(&mut c, "b").await.unwrap();
    nbd_write(&a.nbd_uri, 8192, 8192, 0xa1);
    stop(serve);

    let _serve = ServeProcess::spawn(&state, &locks);
    let mut c = connect_when_up(&api).await;
    let all = list(&mut c).await;
    let states: Vec<(String, v1::SandboxState)> =
        all.iter().map(|s| (s.id.clone(), state_of(s))).collect();
    assert_eq!(
        states,
        [
            ("a".to_owned(), v1::SandboxState::Running),
            ("b".to_owned(), v1::SandboxState::Paused)
        ],
        "{all:?}"
    );
    assert_eq!(all[0].nbd_uri, a.nbd_uri, "the same socket path and export");
    assert_eq!(nbd_read(&a.nbd_uri, 8192, 8192), vec![0xa1; 8192]);
    assert_eq!(&nbd_read(&a.nbd_uri, 4096, 12), b"tpl block 1\n");
    // It keeps taking writes.
    nbd_write(&a.nbd_uri, 0, 4096, 0xa2);
    assert_eq!(nbd_read(&a.nbd_uri, 0, 4096), vec![0xa2; 4096]);
    let b = resume(&mut c, "b").await.unwrap();
    assert_eq!(nbd_read(&b.nbd_uri, 0, 4096), vec![0xb1; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_the_running_sandbox_is_served_again_and_the_paused_one_resumes() {
    both_sandboxes_come_back(ServeProcess::kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_the_running_sandbox_is_served_again_and_the_paused_one_resumes() {
    both_sandboxes_come_back(ServeProcess::terminate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_a_resumed_sandbox_keeps_the_writes_after_its_pause() {
    let ServedState {
        dir: _dir,
        state,
        locks,
        api,
        serve,
        client: mut c,
    } = serve_with_template("rfk", 16).await;
    // again: paused, resumed, written after (its overlay lies over its pause's diff).
    let again = create(&mut c, "tpl", "again").await.unwrap();
    nbd_write(&again.nbd_uri, 0, 4096, 0x41);
    pause(&mut c, "again").await.unwrap();
    let again = resume(&mut c, "again").await.unwrap();
    nbd_write(&again.nbd_uri, 4096, 4096, 0x42);
    serve.kill9();
    // Orphans (a pause or create interrupted before its record) are removed at the next start.
    let orphans = [
        state.join("paused").join("gone.7.diff"),
        state.join("cache").join("gone.3.cache"),
        state.join("cache").join("gone.3.cache.state"),
        state.join("cache").join("again.0.cache"),
    ];
    for o in &orphans {
        std::fs::write(o, b"x").unwrap();
    }
    // A build no template or record uses (a pause that died before its record) is collected;
    // so is an interrupted build.
    let orphan_builds = [
        state.join("store").join("0123456789abcdef0123456789abcdef"),
        state
            .join("store")
            .join(".pending-0123456789abcdef0123456789abcdee"),
    ];
    for b in &orphan_builds {
        std::fs::create_dir_all(b).unwrap();
        std::fs::write(b.join("data"), b"x").unwrap();
    }
    // A file the daemon never names is reported and kept.
    let stranger = state.join("cache").join("notes.txt");
    std::fs::write(&stranger, b"mine").unwrap();

    let _serve = ServeProcess::spawn(&state, &locks);
    let mut c = connect_when_up(&api).await;
    let got = get(&mut c, "again").await;
    assert_eq!(state_of(&got), v1::SandboxState::Running, "{}", got.message);
    assert_eq!(got.nbd_uri, again.nbd_uri);
    assert_eq!(nbd_read(&again.nbd_uri, 0, 4096), vec![0x41; 4096]);
    assert_eq!(nbd_read(&again.nbd_uri, 4096, 4096), vec![0x42; 4096]);
    assert_eq!(&nbd_read(&again.nbd_uri, 8192, 12), b"tpl block 2\n");
    for o in orphans.iter().chain(&orphan_builds) {
        assert!(!o.exists(), "{}", o.display());
    }
    assert!(stranger.exists());
    // A pause writes a layer over the one the adopted overlay lay over.
    pause(&mut c, "again").await.unwrap();
    let again = resume(&mut c, "again").await.unwrap();
    assert_eq!(nbd_read(&again.nbd_uri, 0, 4096), vec![0x41; 4096]);
    assert_eq!(nbd_read(&again.nbd_uri, 4096, 4096), vec![0x42; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_whose_block_state_is_lost_fails_with_its_files_kept() {
    let ServedState {
        dir: _dir,
        state,
        locks,
        api,
        serve,
        client: mut c,
    } = serve_with_template("rfs", 16).await;
    for id in ["lost", "bent", "fine"] {
        let s = create(&mut c, "tpl", id).await.unwrap();
        nbd_write(&s.nbd_uri, 0, 4096, 0x61);
    }
    serve.kill9();
    let cache = state.join("cache");
    let state_file = |id: &str| {
        files(&cache)
            .into_iter()
            .find(|f| f.starts_with(&format!("{id}.")) && !f.ends_with(".cache"))
            .map(|f| cache.join(f))
            .unwrap_or_else(|| panic!("no block state of {id} in {:?}", files(&cache)))
    };
    std::fs::remove_file(state_file("lost")).unwrap();
    let bent = state_file("bent");
    let len = std::fs::metadata(&bent).unwrap().len();
    std::fs::write(&bent, vec![0xff; len as usize]).unwrap();
    // A record this daemon cannot read keeps the files of its sandbox.
    std::fs::write(state.join("sandboxes").join("odd.json"), b"{not json").unwrap();
    std::fs::write(cache.join("odd.1.cache"), b"x").unwrap();
    let before = files(&cache);

    let _serve = ServeProcess::spawn(&state, &locks);
    let mut c = connect_when_up(&api).await;
    for id in ["lost", "bent"] {
        let s = get(&mut c, id).await;
        assert_eq!(
            state_of(&s),
            v1::SandboxState::Failed,
            "{id}: {}",
            s.message
        );
        assert!(s.message.contains("files are kept"), "{id}: {}", s.message);
    }
    assert!(get(&mut c, "lost").await.message.contains("missing"));
    let bent_message = get(&mut c, "bent").await.message;
    assert!(
        bent_message.contains("could not be reopened"),
        "{bent_message}"
    );
    assert!(bent_message.contains("damaged"), "{bent_message}");
    let fine = get(&mut c, "fine").await;
    assert_eq!(
        state_of(&fine),
        v1::SandboxState::Running,
        "{}",
        fine.message
    );
    assert_eq!(nbd_read(&fine.nbd_uri, 0, 4096), vec![0x61; 4096]);
    assert_eq!(files(&cache), before, "nothing is removed at start");
    // A delete removes a failed sandbox's kept files.
    assert!(delete(&mut c, "lost").await.unwrap());
    assert!(delete(&mut c, "bent").await.unwrap());
    let left = files(&cache);
    assert!(
        left.iter()
            .all(|f| f.starts_with("fine.") || f.starts_with("odd.")),
        "{left:?}"
    );
    assert!(cache.join("odd.1.cache").exists());
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
        "rootfork-state 4\n"
    );
    std::fs::write(state.join("format"), "rootfork-state 99\n").unwrap();
    let mut config = Config::with_state_dir(&state).unwrap();
    config.demo_template = false;
    let e = Daemon::start(config).await.unwrap_err();
    assert!(e.to_string().contains("format 99"), "{e}");
    assert_eq!(
        std::fs::read_to_string(state.join("format")).unwrap(),
        "rootfork-state 99\n",
        "a refused directory is left as it was"
    );
}

/// A format-3 directory (a daemon from before the build store: template images in `templates/`,
/// paused diffs in `paused/`, here one diff two records share, as a parent and its fork do) is
/// migrated at start: the template becomes a base build, the diff one layer both records name,
/// the image and the diff are removed, and the directory is marked with the current format,
/// which older daemons refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_3_state_directory_is_migrated_to_the_build_store() {
    let dir = tempfile::Builder::new()
        .prefix("rfv")
        .tempdir_in("/tmp")
        .unwrap();
    let state = dir.path().join("s");
    let locks = dir.path().join("locks");
    for sub in ["templates", "paused", "sandboxes"] {
        std::fs::create_dir_all(state.join(sub)).unwrap();
    }
    std::fs::write(state.join("format"), "rootfork-state 3\n").unwrap();
    let src = make_template(dir.path(), "src.img", 16);
    std::fs::copy(&src, state.join("templates/tpl.img")).unwrap();
    std::fs::write(
        state.join("templates/tpl.json"),
        serde_json::json!({
            "name": "tpl", "size_bytes": 16 * 4096, "format": "raw",
            "created_unix_ms": 1, "source": src.display().to_string(),
        })
        .to_string(),
    )
    .unwrap();
    // The diff: block 5 is 0x1f, block 7 reads as zeroes.
    let diff = state.join("paused/kept.1.diff");
    std::fs::write(&diff, vec![0x1f; 4096]).unwrap();
    for id in ["kept", "kept-fork-0"] {
        let rec = serde_json::json!({
            "version": 1, "id": id, "template": "tpl", "provider": "socket", "vm": null,
            "disk_size": 16 * 4096, "quota": null, "created_unix_ms": 1, "state": "paused",
            "paused": {
                "size": 16 * 4096, "block_size": 4096,
                "runs": [
                    {"offset": 5 * 4096, "len": 4096, "data_offset": 0},
                    {"offset": 7 * 4096, "len": 4096, "data_offset": null},
                ],
                "data": diff,
            },
            "pause_count": 1, "generation": 2, "vm_state": null,
        });
        std::fs::write(
            state.join("sandboxes").join(format!("{id}.json")),
            rec.to_string(),
        )
        .unwrap();
    }
    let d = start(&state, &locks).await;
    assert_eq!(
        std::fs::read_to_string(state.join("format")).unwrap(),
        "rootfork-state 4\n"
    );
    assert!(!state.join("templates/tpl.img").exists());
    assert!(!diff.exists(), "the migrated diff is removed");
    // The base build and one layer, shared by both records.
    let base = template_build(&state, "tpl");
    let builds = builds_in(&state);
    assert_eq!(builds.len(), 2, "{builds:?}");
    let layers: Vec<String> = ["kept", "kept-fork-0"]
        .iter()
        .map(|id| {
            let r: serde_json::Value = serde_json::from_slice(
                &std::fs::read(state.join("sandboxes").join(format!("{id}.json"))).unwrap(),
            )
            .unwrap();
            assert!(r.get("paused").is_none(), "{r}");
            r["layer"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(layers[0], layers[1]);
    assert!(builds.contains(&base) && builds.contains(&layers[0]));
    assert_eq!(template_bytes(&state, "tpl"), std::fs::read(&src).unwrap());
    let mut c = connect_when_up(d.api_socket()).await;
    for id in ["kept", "kept-fork-0"] {
        let resumed = resume(&mut c, id).await.unwrap();
        assert_eq!(nbd_read(&resumed.nbd_uri, 4096 * 5, 4096), vec![0x1f; 4096]);
        assert_eq!(nbd_read(&resumed.nbd_uri, 4096 * 7, 4096), vec![0; 4096]);
        assert_eq!(&nbd_read(&resumed.nbd_uri, 4096 * 3, 12), b"tpl block 3\n");
    }
    assert!(delete(&mut c, "kept").await.unwrap());
    assert!(delete(&mut c, "kept-fork-0").await.unwrap());
    // With both gone only the template's base build stays (collected in the background).
    assert_eq!(
        builds_settle(&state, std::slice::from_ref(&base)).await,
        vec![base]
    );
    drop(c);
    d.shutdown().await;
}
