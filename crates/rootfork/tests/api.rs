//! The daemon's API end to end over its Unix socket: an in-process daemon in a temporary state
//! directory, the socket provider, real NBD clients on the sandboxes' exports.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use rootfork::api::v1;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_end_to_end() {
    let d = TestDaemon::start(true).await;
    let mode = std::fs::metadata(d.daemon.api_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "API socket mode");
    let mut c = d.client().await;

    // The first start built the demo template.
    let ts = c
        .templates
        .list_templates(v1::ListTemplatesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ts.templates.len(), 1);
    assert_eq!(ts.templates[0].name, "demo");

    // Events from here on.
    let mut events = c
        .events
        .watch_events(v1::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();

    // Import a template with progress.
    let src = make_template(d.dir.path(), "src.img", 64);
    let t = import(&mut c, "tpl", &src).await.unwrap();
    assert_eq!(t.size_bytes, 64 * 4096);
    assert_eq!(t.format, v1::TemplateFormat::Raw as i32);

    // Create: served at once, reads the template.
    let sb = create(&mut c, "tpl", "alpha").await.unwrap();
    assert_eq!(sb.state, v1::SandboxState::Running as i32);
    assert!(
        sb.nbd_uri.starts_with("nbd+unix:///alpha?socket="),
        "{}",
        sb.nbd_uri
    );
    assert_eq!(&nbd_read(&sb.nbd_uri, 4096 * 3, 12), b"tpl block 3\n");

    // A write lands in the overlay only; pause keeps it, resume serves it again.
    nbd_write(&sb.nbd_uri, 4096 * 5, 4096, 0xAB);
    let builds = d.builds();
    let paused = pause(&mut c, "alpha").await.unwrap();
    assert_eq!(paused.state, v1::SandboxState::Paused as i32);
    assert!(paused.nbd_uri.is_empty());
    assert_eq!(paused.paused_diff_bytes, 4096);
    let resumed = resume(&mut c, "alpha").await.unwrap();
    assert_eq!(resumed.state, v1::SandboxState::Running as i32);
    assert_eq!(nbd_read(&resumed.nbd_uri, 4096 * 5, 4), vec![0xAB; 4]);
    assert_eq!(&nbd_read(&resumed.nbd_uri, 4096 * 6, 12), b"tpl block 6\n");
    // The template's base build is untouched, and the pause's layer is a build of its own.
    assert_eq!(
        template_bytes(&d.state(), "tpl"),
        std::fs::read(&src).unwrap()
    );
    assert!(t.path.ends_with(&d.template_build("tpl")), "{}", t.path);
    assert_eq!(d.builds().len(), builds.len() + 1, "{:?}", d.builds());

    // A second sandbox does not see the first one's write.
    let beta = create(&mut c, "tpl", "").await.unwrap();
    assert!(beta.id.starts_with("sb-"), "{}", beta.id);
    assert_eq!(&nbd_read(&beta.nbd_uri, 4096 * 5, 12), b"tpl block 5\n");

    let list = c
        .sandboxes
        .list_sandboxes(v1::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sandboxes.len(), 2);
    let got = get(&mut c, "alpha").await;
    assert_eq!(got.pause_count, 1);
    assert_eq!(got.health, v1::HealthState::Healthy as i32);
    let ts = c
        .templates
        .list_templates(v1::ListTemplatesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ts.templates
            .iter()
            .find(|t| t.name == "tpl")
            .unwrap()
            .sandboxes,
        2
    );

    // Devices: without the nbd module the pool is reported unavailable with its reason.
    let dev = c
        .devices
        .list_devices(v1::ListDevicesRequest {})
        .await
        .unwrap()
        .into_inner();
    if !std::path::Path::new("/sys/module/nbd").exists() {
        assert!(!dev.available);
        assert!(dev.reason.contains("nbd kernel module"), "{}", dev.reason);
    }

    // Deletes are idempotent and release everything.
    assert!(delete(&mut c, "alpha").await.unwrap());
    assert!(!delete(&mut c, "alpha").await.unwrap());
    assert!(delete(&mut c, &beta.id).await.unwrap());
    let gone = get(&mut c, "alpha").await;
    assert_eq!(gone.state, v1::SandboxState::Deleted as i32);
    assert!(
        d.files("nbd").is_empty(),
        "sockets left: {:?}",
        d.files("nbd")
    );
    assert!(
        d.files("cache").is_empty(),
        "caches left: {:?}",
        d.files("cache")
    );
    assert!(
        d.files("paused").is_empty(),
        "diffs left: {:?}",
        d.files("paused")
    );
    assert!(
        c.templates
            .delete_template(v1::DeleteTemplateRequest { name: "tpl".into() })
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    assert!(
        !c.templates
            .delete_template(v1::DeleteTemplateRequest { name: "tpl".into() })
            .await
            .unwrap()
            .into_inner()
            .deleted
    );

    // The feed saw the life cycle in order.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Ok(Some(e))) = tokio::time::timeout_at(deadline, events.message()).await {
        if e.sandbox == "alpha" {
            seen.push((e.kind, e.sandbox_state));
        }
        if e.sandbox == "alpha" && e.sandbox_state == v1::SandboxState::Deleted as i32 {
            break;
        }
    }
    use v1::{EventKind as K, SandboxState as S};
    let want = [
        (K::Sandbox, S::Creating),
        (K::Claimed, S::Unspecified),
        (K::Connected, S::Unspecified),
        (K::Sandbox, S::Running),
        (K::Sandbox, S::Pausing),
        (K::Released, S::Unspecified),
        (K::Sandbox, S::Paused),
        (K::Sandbox, S::Resuming),
        (K::Claimed, S::Unspecified),
        (K::Connected, S::Unspecified),
        (K::Sandbox, S::Running),
        (K::Sandbox, S::Deleting),
        (K::Released, S::Unspecified),
        (K::Sandbox, S::Deleted),
    ]
    .map(|(k, s)| (k as i32, s as i32));
    assert_eq!(seen, want);

    let sock = d.daemon.api_socket().to_owned();
    d.daemon.shutdown().await;
    assert!(!sock.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_exact_codes_and_changes_nothing() {
    let d = TestDaemon::start(false).await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    create(&mut c, "tpl", "live").await.unwrap();
    create(&mut c, "tpl", "paused").await.unwrap();
    c.sandboxes
        .pause_sandbox(v1::PauseSandboxRequest {
            id: "paused".into(),
        })
        .await
        .unwrap();
    create(&mut c, "tpl", "dead").await.unwrap();
    assert!(delete(&mut c, "dead").await.unwrap());

    let snapshot = |c: &mut rootfork::client::Clients| {
        let mut c = c.clone();
        async move {
            let mut s = c
                .sandboxes
                .list_sandboxes(v1::ListSandboxesRequest {
                    include_deleted: true,
                    paused_in_store: false,
                })
                .await
                .unwrap()
                .into_inner()
                .sandboxes;
            s.sort_by(|a, b| a.id.cmp(&b.id));
            let s: Vec<_> = s
                .into_iter()
                .map(|s| (s.id, s.state, s.nbd_uri, s.state_since_unix_ms))
                .collect();
            let t: Vec<_> = c
                .templates
                .list_templates(v1::ListTemplatesRequest {})
                .await
                .unwrap()
                .into_inner()
                .templates
                .into_iter()
                .map(|t| (t.name, t.sandboxes))
                .collect();
            (s, t)
        }
    };
    let before = snapshot(&mut c).await;
    let files_before = (
        d.files("nbd"),
        d.files("cache"),
        d.files("paused"),
        d.files("templates"),
    );

    let code = |r: Result<v1::Sandbox, tonic::Status>| r.map(|_| ()).unwrap_err().code();
    assert_eq!(
        code(create(&mut c, "nope", "x1").await),
        Code::NotFound,
        "unknown template"
    );
    assert_eq!(
        code(create(&mut c, "../x", "x1").await),
        Code::InvalidArgument,
        "template ../x"
    );
    assert_eq!(
        code(create(&mut c, "tpl", "../x").await),
        Code::InvalidArgument,
        "id ../x"
    );
    assert_eq!(
        code(create(&mut c, "tpl", ".hidden").await),
        Code::InvalidArgument,
        "leading dot"
    );
    assert_eq!(
        code(create(&mut c, "tpl", &"a".repeat(65)).await),
        Code::InvalidArgument,
        "oversized id"
    );
    assert_eq!(
        code(create(&mut c, &"t".repeat(65), "x1").await),
        Code::InvalidArgument,
        "oversized template"
    );
    assert_eq!(
        code(create(&mut c, "tpl", "live").await),
        Code::AlreadyExists,
        "duplicate id"
    );
    assert_eq!(
        code(create(&mut c, "tpl", "paused").await),
        Code::AlreadyExists,
        "duplicate of a paused one"
    );
    let bad_vmm = c
        .sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: "tpl".into(),
            id: "x2".into(),
            provider: 0,
            vmm: Some(v1::VmmSettings {
                kind: 1,
                kernel: "relative/vmlinuz".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(
        code(bad_vmm.map(|r| r.into_inner())),
        Code::InvalidArgument,
        "relative kernel path"
    );
    let bad_kind = c
        .sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: "tpl".into(),
            id: "x3".into(),
            provider: 99,
            vmm: None,
            ..Default::default()
        })
        .await;
    assert_eq!(
        code(bad_kind.map(|r| r.into_inner())),
        Code::InvalidArgument,
        "unknown provider kind"
    );
    if !std::path::Path::new("/sys/module/nbd").exists() {
        let kernel = c
            .sandboxes
            .create_sandbox(v1::CreateSandboxRequest {
                template: "tpl".into(),
                id: "x4".into(),
                provider: v1::ProviderKind::Kernel as i32,
                vmm: None,
                ..Default::default()
            })
            .await;
        assert_eq!(
            code(kernel.map(|r| r.into_inner())),
            Code::Unavailable,
            "kernel pool absent"
        );
    }

    let pause = |id: &str| {
        let mut c = c.clone();
        let id = id.to_owned();
        async move {
            c.sandboxes
                .pause_sandbox(v1::PauseSandboxRequest { id })
                .await
                .map(|r| r.into_inner())
        }
    };
    assert_eq!(
        code(pause("dead").await),
        Code::FailedPrecondition,
        "pausing a deleted sandbox"
    );
    assert_eq!(
        code(pause("paused").await),
        Code::FailedPrecondition,
        "pausing a paused sandbox"
    );
    assert_eq!(
        code(pause("never").await),
        Code::NotFound,
        "pausing an unknown sandbox"
    );
    assert_eq!(
        code(pause("../x").await),
        Code::InvalidArgument,
        "pausing ../x"
    );
    let resume = c
        .sandboxes
        .resume_sandbox(v1::ResumeSandboxRequest {
            id: "live".into(),
            wait: false,
        })
        .await;
    assert_eq!(
        code(resume.map(|r| r.into_inner())),
        Code::FailedPrecondition,
        "resuming a running sandbox"
    );
    let get = c
        .sandboxes
        .get_sandbox(v1::GetSandboxRequest { id: "never".into() })
        .await;
    assert_eq!(code(get.map(|r| r.into_inner())), Code::NotFound);
    assert!(
        !delete(&mut c, "never").await.unwrap(),
        "deleting an unknown sandbox is a no-op"
    );
    assert!(
        !delete(&mut c, "dead").await.unwrap(),
        "deleting twice is a no-op"
    );
    assert_eq!(
        delete(&mut c, "../x").await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let tcode = |r: Result<v1::Template, tonic::Status>| r.map(|_| ()).unwrap_err().code();
    assert_eq!(
        tcode(import(&mut c, "tpl", &src).await),
        Code::AlreadyExists,
        "duplicate template"
    );
    assert_eq!(
        tcode(import(&mut c, "../t", &src).await),
        Code::InvalidArgument,
        "template ../t"
    );
    assert_eq!(
        tcode(import(&mut c, "t2", std::path::Path::new("rel.img")).await),
        Code::InvalidArgument,
        "relative source"
    );
    assert_eq!(
        tcode(import(&mut c, "t2", &d.dir.path().join("missing.img")).await),
        Code::InvalidArgument,
        "missing source"
    );
    let odd = d.dir.path().join("odd.img");
    std::fs::write(&odd, vec![1u8; 5000]).unwrap();
    assert_eq!(
        tcode(import(&mut c, "t2", &odd).await),
        Code::InvalidArgument,
        "misaligned size"
    );
    let del = c
        .templates
        .delete_template(v1::DeleteTemplateRequest { name: "tpl".into() })
        .await;
    assert_eq!(
        del.unwrap_err().code(),
        Code::FailedPrecondition,
        "deleting a template in use"
    );
    let del = c
        .templates
        .delete_template(v1::DeleteTemplateRequest {
            name: "../tpl".into(),
        })
        .await;
    assert_eq!(del.unwrap_err().code(), Code::InvalidArgument);
    let w = c
        .events
        .watch_events(v1::WatchEventsRequest {
            sandbox: "../x".into(),
        })
        .await;
    assert_eq!(w.map(|_| ()).unwrap_err().code(), Code::InvalidArgument);

    assert_eq!(
        snapshot(&mut c).await,
        before,
        "bad calls changed the sandboxes or templates"
    );
    assert_eq!(
        (
            d.files("nbd"),
            d.files("cache"),
            d.files("paused"),
            d.files("templates")
        ),
        files_before,
        "bad calls changed the state directory"
    );
    d.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_the_bearer_token() {
    let d = TestDaemon::start_with(false, |c| {
        c.api_tcp = Some("127.0.0.1:0".parse().unwrap());
        c.token_file = Some(c.state_dir.join("api.token"));
    })
    .await;
    let addr = d.daemon.tcp_addr().unwrap();
    let token_file = d.state().join("api.token");
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    let url = format!("tcp://{addr}");
    for (tok, ok) in [
        (None, false),
        (Some("wrong".to_owned()), false),
        (Some(token), true),
    ] {
        let mut c = rootfork::client::connect(&rootfork::client::ApiTarget::parse(&url, tok))
            .await
            .unwrap();
        let r = c
            .templates
            .list_templates(v1::ListTemplatesRequest {})
            .await;
        match ok {
            true => assert!(r.is_ok(), "{r:?}"),
            false => assert_eq!(r.unwrap_err().code(), Code::Unauthenticated),
        }
    }
    d.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_sandboxes_and_latency() {
    let d = TestDaemon::start_with(false, |c| {
        c.metrics = rootfork::config::MetricsListen::Tcp("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let Some(rootfork::metrics_http::Bound::Tcp(addr)) = d.daemon.metrics_endpoint().cloned()
    else {
        panic!("metrics endpoint not bound")
    };
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create(&mut c, "tpl", "m1").await.unwrap();
    nbd_read(&sb.nbd_uri, 0, 4096);
    let _ = create(&mut c, "nope", "m2").await;
    let scrape = || {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    };
    let body = scrape().await.unwrap();
    for want in [
        "rootfork_sandboxes{state=\"running\"} 1",
        "rootfork_attach_latency_seconds_count{provider=\"socket\"} 1",
        "rootfork_errors_total{op=\"create_sandbox\",errno=\"ENOENT\"} 1",
        "rootfork_template_read_bytes_total 4096",
        "rootfork_overlay_bytes{state=\"absent\"} 65536",
        "rootfork_pool_available",
        "rootfork_nbd_requests_total{command=\"write\"} 0",
        "rootfork_nbd_request_bytes_total{command=\"read\"} 4096",
    ] {
        assert!(body.contains(want), "missing {want:?} in\n{body}");
    }
    let reads = sample(&body, "rootfork_nbd_requests_total{command=\"read\"}");
    assert!(reads >= 1.0, "{body}");
    assert_eq!(
        sample(
            &body,
            "rootfork_nbd_request_latency_seconds_count{command=\"read\"}"
        ),
        reads
    );

    // A write through a second sandbox that is then deleted: its counts outlive it.
    let sb3 = create(&mut c, "tpl", "m3").await.unwrap();
    let uri = sb3.nbd_uri.clone();
    tokio::task::spawn_blocking(move || nbd_write(&uri, 4096, 8192, 0xCD))
        .await
        .unwrap();
    assert!(delete(&mut c, "m3").await.unwrap());
    let body = scrape().await.unwrap();
    assert!(sample(&body, "rootfork_nbd_requests_total{command=\"write\"}") >= 1.0);
    assert!(sample(&body, "rootfork_nbd_requests_total{command=\"flush\"}") >= 1.0);
    assert_eq!(
        sample(&body, "rootfork_nbd_request_bytes_total{command=\"write\"}"),
        8192.0
    );
    assert!(sample(&body, "rootfork_nbd_requests_total{command=\"read\"}") >= reads);
    assert!(
        sample(
            &body,
            "rootfork_nbd_request_latency_seconds_bucket{le=\"+Inf\",command=\"write\"}"
        ) >= 1.0,
        "{body}"
    );
    d.daemon.shutdown().await;
}

/// The value of one series in a metrics text (panics when absent).
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("missing {series} in\n{body}"))
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_marks_a_dead_export_failed() {
    let d = TestDaemon::start_with(false, |c| {
        c.health_interval = Duration::from_millis(100);
        c.probe_timeout = Duration::from_millis(500);
    })
    .await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create(&mut c, "tpl", "h1").await.unwrap();
    // The user's data, written before the export goes away.
    nbd_write(&sb.nbd_uri, 4096 * 5, 4096, 0xab);
    let mut events = c
        .events
        .watch_events(v1::WatchEventsRequest {
            sandbox: "h1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Take the export away behind the daemon's back: the socket file disappears, so the
    // probe's connect fails (as it would if the server's listener died).
    let sock = sb.nbd_uri.split_once("socket=").unwrap().1.to_owned();
    std::fs::remove_file(&sock).unwrap();
    let mut healths = Vec::new();
    let mut failed_state = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Ok(Some(e))) = tokio::time::timeout_at(deadline, events.message()).await {
        if e.kind == v1::EventKind::Health as i32 {
            healths.push(e.health);
        }
        if e.kind == v1::EventKind::Sandbox as i32
            && e.sandbox_state == v1::SandboxState::Failed as i32
        {
            failed_state = true;
            break;
        }
    }
    assert_eq!(
        healths,
        vec![
            v1::HealthState::Degraded as i32,
            v1::HealthState::Failed as i32
        ]
    );
    assert!(failed_state);
    let got = get(&mut c, "h1").await;
    assert_eq!(got.state, v1::SandboxState::Failed as i32);
    assert_eq!(got.health, v1::HealthState::Failed as i32);
    assert!(got.message.contains("connecting"), "{}", got.message);
    // A failed sandbox whose overlay is intact can still be paused, so its data is saved, and
    // resumed on a fresh export with that data.
    let paused = pause(&mut c, "h1").await.unwrap();
    assert_eq!(paused.state, v1::SandboxState::Paused as i32);
    let resumed = resume(&mut c, "h1").await.unwrap();
    assert_eq!(resumed.state, v1::SandboxState::Running as i32);
    assert_eq!(nbd_read(&resumed.nbd_uri, 4096 * 5, 4096), vec![0xab; 4096]);
    assert_eq!(&nbd_read(&resumed.nbd_uri, 4096 * 2, 12), b"tpl block 2\n");
    // It can be deleted, releasing everything.
    assert!(delete(&mut c, "h1").await.unwrap());
    assert!(d.files("cache").is_empty());
    d.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let d = TestDaemon::start(false).await;
    let config = rootfork::config::Config::with_state_dir(d.state()).unwrap();
    let e = rootfork::daemon::Daemon::start(config).await.unwrap_err();
    assert!(e.to_string().contains("another rootfork daemon"), "{e}");
    d.daemon.shutdown().await;
}

#[tokio::test]
async fn client_says_when_the_daemon_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let e = rootfork::client::connect(&rootfork::client::ApiTarget::Unix(sock.clone()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not running"), "{e}");
    // A stale socket file with nobody behind it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let e = rootfork::client::connect(&rootfork::client::ApiTarget::Unix(sock))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not answering"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_five_times_keeps_every_write_in_a_bounded_chain() {
    // At most two layers: the third pause flattens the chain into one layer over the template.
    let d = TestDaemon::start_with(false, |c| c.store_max_layers = 2).await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 32);
    import(&mut c, "tpl", &src).await.unwrap();
    let mut sb = create(&mut c, "tpl", "p").await.unwrap();
    for round in 0..5u8 {
        // Each round overwrites block 2 and writes a block of its own.
        nbd_write(&sb.nbd_uri, 2 * 4096, 4096, 0x10 + round);
        nbd_write(
            &sb.nbd_uri,
            (10 + u64::from(round)) * 4096,
            4096,
            0x20 + round,
        );
        let paused = c
            .sandboxes
            .pause_sandbox(v1::PauseSandboxRequest { id: "p".into() })
            .await
            .unwrap()
            .into_inner();
        // Layers 1, 2, then flattened to 1, 2, 1: the template's build and the chain's, the
        // flattened-away ones collected.
        let depth = [1, 2, 1, 2, 1][round as usize];
        let builds = d.builds_settle_count(1 + depth).await;
        assert_eq!(builds.len(), 1 + depth, "round {round}: {builds:?}");
        // What the chain holds: the first round's two blocks, then one new block per round
        // (block 2 is rewritten each time; a flattened chain holds it once).
        let expected = match depth {
            1 => 4096 * (u64::from(round) + 2),
            _ => 4096 * (u64::from(round) + 2) + 4096,
        };
        assert_eq!(paused.paused_diff_bytes, expected, "round {round}");
        sb = c
            .sandboxes
            .resume_sandbox(v1::ResumeSandboxRequest {
                id: "p".into(),
                wait: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(nbd_read(&sb.nbd_uri, 2 * 4096, 2), vec![0x10 + round; 2]);
        for r in 0..=round {
            assert_eq!(
                nbd_read(&sb.nbd_uri, (10 + u64::from(r)) * 4096, 2),
                vec![0x20 + r; 2],
                "round {round} block of round {r}"
            );
        }
        assert_eq!(&nbd_read(&sb.nbd_uri, 3 * 4096, 12), b"tpl block 3\n");
    }
    assert_eq!(sb.pause_count, 5);
    assert!(delete(&mut c, "p").await.unwrap());
    assert!(d.files("paused").is_empty());
    let base = d.template_build("tpl");
    assert_eq!(
        d.builds_settle(std::slice::from_ref(&base)).await,
        vec![base]
    );
    assert_eq!(
        template_bytes(&d.state(), "tpl"),
        std::fs::read(&src).unwrap()
    );
    d.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_racing_create_never_leaves_a_running_ghost() {
    let d = TestDaemon::start(false).await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    for i in 0..20 {
        let id = format!("race-{i}");
        let (mut c1, mut c2) = (c.clone(), c.clone());
        let id2 = id.clone();
        let create = tokio::spawn(async move { create(&mut c1, "tpl", &id2).await });
        // Delete as soon as the create has registered the id.
        loop {
            let got = c2
                .sandboxes
                .get_sandbox(v1::GetSandboxRequest { id: id.clone() })
                .await;
            if got.is_ok() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let deleted = delete(&mut c2, &id).await.unwrap();
        let created = create.await.unwrap();
        assert!(created.is_ok() && deleted, "{created:?} {deleted}");
        let now = c
            .sandboxes
            .get_sandbox(v1::GetSandboxRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(now.state, v1::SandboxState::Deleted as i32, "{i}");
    }
    assert!(d.files("nbd").is_empty());
    assert!(d.files("cache").is_empty());
    d.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_marks_a_stuck_request_failed() {
    use rootfork_nbd::testing::GatedDevice;
    use std::sync::{Arc, Mutex};

    // Every socket export of this daemon is served through a gate the test holds.
    let gate: Arc<Mutex<Option<Arc<GatedDevice>>>> = Arc::default();
    let g = gate.clone();
    let d = TestDaemon::start_with(false, move |c| {
        c.health_interval = Duration::from_millis(200);
        c.stuck_request = Duration::from_secs(1);
        c.seams.socket_device_wrapper =
            Some(rootfork_provider::DeviceWrapper(Arc::new(move |dev| {
                let gd = Arc::new(GatedDevice::new(dev));
                *g.lock().unwrap() = Some(gd.clone());
                gd
            })));
    })
    .await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create(&mut c, "tpl", "stuck").await.unwrap();
    /// Opens the gate however the test ends, so a failing assertion fails instead of hanging.
    struct OpenOnDrop(Arc<GatedDevice>);
    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.open();
        }
    }
    let gd = OpenOnDrop(gate.lock().unwrap().clone().expect("the export is gated"));
    // Healthy while requests flow.
    assert_eq!(&nbd_read(&sb.nbd_uri, 4096 * 2, 12), b"tpl block 2\n");
    let mut events = c
        .events
        .watch_events(v1::WatchEventsRequest {
            sandbox: "stuck".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Hold reads: a client's read now hangs in the device.
    gd.0.close();
    let uri = sb.nbd_uri.clone();
    let reader = std::thread::spawn(move || nbd_read(&uri, 4096 * 3, 12));
    let mut healths = Vec::new();
    let mut messages = Vec::new();
    let mut failed_state = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Ok(Ok(Some(e))) = tokio::time::timeout_at(deadline, events.message()).await {
        if e.kind == v1::EventKind::Health as i32 {
            healths.push(e.health);
            messages.push(e.message.clone());
        }
        if e.kind == v1::EventKind::Sandbox as i32
            && e.sandbox_state == v1::SandboxState::Failed as i32
        {
            failed_state = true;
            break;
        }
    }
    assert_eq!(gd.0.waiting(), 1, "the read is still held");
    assert_eq!(
        healths,
        vec![
            v1::HealthState::Degraded as i32,
            v1::HealthState::Failed as i32
        ]
    );
    assert!(failed_state);
    assert!(
        messages.iter().all(|m| m.contains("stuck for")),
        "{messages:?}"
    );
    let got = get(&mut c, "stuck").await;
    assert_eq!(got.health, v1::HealthState::Failed as i32);
    assert!(
        got.message.contains("NBD request has been stuck for"),
        "{}",
        got.message
    );
    // Releasing the gate answers the read; the sandbox can still be deleted cleanly.
    // (The test's handles on the gate keep the overlay and its cache file alive: drop them.)
    drop(gd);
    gate.lock().unwrap().take();
    assert_eq!(&reader.join().unwrap(), b"tpl block 3\n");
    // Healthy again: the health check brings the failed sandbox back to RUNNING, with events.
    let (mut healthy, mut running) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Ok(Some(e))) = tokio::time::timeout_at(deadline, events.message()).await {
        healthy |=
            e.kind == v1::EventKind::Health as i32 && e.health == v1::HealthState::Healthy as i32;
        running |= e.kind == v1::EventKind::Sandbox as i32
            && e.sandbox_state == v1::SandboxState::Running as i32;
        if healthy && running {
            break;
        }
    }
    assert!(healthy && running, "healthy {healthy}, running {running}");
    let got = get(&mut c, "stuck").await;
    assert_eq!(
        (got.state, got.health),
        (
            v1::SandboxState::Running as i32,
            v1::HealthState::Healthy as i32
        )
    );
    assert_eq!(&nbd_read(&sb.nbd_uri, 4096 * 2, 12), b"tpl block 2\n");
    assert!(delete(&mut c, "stuck").await.unwrap());
    assert!(d.files("cache").is_empty());
    d.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_is_confirmed_before_the_sandbox_is_degraded() {
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    let d = TestDaemon::start_with(false, |c| {
        c.health_interval = Duration::from_secs(3600);
        c.probe_timeout = Duration::from_millis(500);
    })
    .await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create(&mut c, "tpl", "blip").await.unwrap();
    // One probe meets something that is not the export (here: a stand-in that answers garbage
    // once), the next finds the export again: a passing moment, not a failure.
    let sock = std::path::PathBuf::from(sb.nbd_uri.split_once("socket=").unwrap().1);
    let real = sock.with_extension("real");
    std::fs::rename(&sock, &real).unwrap();
    let stand_in = UnixListener::bind(&sock).unwrap();
    let (sock2, real2) = (sock.clone(), real.clone());
    let blip = std::thread::spawn(move || {
        let (mut conn, _) = stand_in.accept().unwrap();
        std::fs::rename(&real2, &sock2).unwrap();
        conn.write_all(b"this is not an NBD server").unwrap();
    });
    rootfork::daemon::health::round(d.daemon.core()).await;
    blip.join().unwrap();
    let got = get(&mut c, "blip").await;
    assert_eq!(
        (got.state, got.health),
        (
            v1::SandboxState::Running as i32,
            v1::HealthState::Healthy as i32
        ),
        "{}",
        got.message
    );
    let m = d.daemon.core().render_metrics();
    assert!(
        m.contains("rootfork_health_checks_total{result=\"ok\"} 1"),
        "{m}"
    );
    assert!(delete(&mut c, "blip").await.unwrap());
    d.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_over_tcp_only_from_import_dirs_and_no_block_devices() {
    let root = tempfile::tempdir().unwrap();
    let allowed = root.path().join("allowed");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let inside_img = make_template(&allowed, "in.img", 4);
    let outside_img = make_template(&outside, "out.img", 4);
    // A link inside the allowed directory to a file outside it does not get the file in.
    let link = allowed.join("link.img");
    std::os::unix::fs::symlink(&outside_img, &link).unwrap();
    let dirs = vec![allowed.clone()];
    let d = TestDaemon::start_with(false, move |c| {
        c.api_tcp = Some("127.0.0.1:0".parse().unwrap());
        c.token_file = Some(c.state_dir.join("api.token"));
        c.tcp_import_dirs = dirs;
    })
    .await;
    let token = std::fs::read_to_string(d.state().join("api.token"))
        .unwrap()
        .trim()
        .to_owned();
    let url = format!("tcp://{}", d.daemon.tcp_addr().unwrap());
    let mut tcp = rootfork::client::connect(&rootfork::client::ApiTarget::parse(&url, Some(token)))
        .await
        .unwrap();
    import(&mut tcp, "in", &inside_img).await.unwrap();
    for (name, path) in [("out", &outside_img), ("link", &link)] {
        let e = import(&mut tcp, name, path).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{name}: {e:?}");
        assert!(e.message().contains("templates.import_dirs"), "{e:?}");
    }
    // The Unix socket's callers are not held to the directories.
    let mut local = d.client().await;
    import(&mut local, "out", &outside_img).await.unwrap();
    // Block devices are refused unless templates.allow_block_devices is on.
    let block = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .map(|e| std::path::PathBuf::from("/dev").join(e.file_name()))
        .find(|p| p.exists());
    if let Some(dev) = block {
        let e = import(&mut local, "blk", &dev).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{dev:?}: {e:?}");
        assert!(e.message().contains("allow_block_devices"), "{e:?}");
    }
    let names: Vec<String> = local
        .templates
        .list_templates(v1::ListTemplatesRequest {})
        .await
        .unwrap()
        .into_inner()
        .templates
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["in", "out"]);
    d.daemon.shutdown().await;
}
