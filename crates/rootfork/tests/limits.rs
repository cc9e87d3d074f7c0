//! Admission limits, in a process of their own (the file-descriptor test lowers this process's
//! `RLIMIT_NOFILE`): `limits.max_sandboxes` and the file-descriptor headroom refuse a create with
//! `RESOURCE_EXHAUSTED` naming what ran out, the API keeps answering, and a delete makes room.

mod common;

use std::time::Duration;

use common::*;
use rootfork::api::v1;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_a_create_with_what_ran_out_and_a_delete_makes_room() {
    // 1. limits.max_sandboxes.
    let d = TestDaemon::start_with(false, |c| {
        c.max_sandboxes = 2;
        c.health_interval = Duration::from_secs(3600);
    })
    .await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    create(&mut c, "tpl", "a").await.unwrap();
    create(&mut c, "tpl", "b").await.unwrap();
    let e = create(&mut c, "tpl", "c").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limits.max_sandboxes is 2"), "{e:?}");
    let m = d.daemon.core().render_metrics();
    for line in [
        "rootfork_resource_used{resource=\"sandboxes\"} 2",
        "rootfork_resource_limit{resource=\"sandboxes\"} 2",
        "rootfork_errors_total{op=\"create_sandbox\",errno=\"EAGAIN\"} 1",
    ] {
        assert!(m.contains(line), "{line} missing from\n{m}");
    }
    assert!(delete(&mut c, "a").await.unwrap());
    create(&mut c, "tpl", "c").await.unwrap();
    d.daemon.shutdown().await;

    // 2. File descriptors: a hard limit that leaves room for a handful of sandboxes.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (open, _) = rootfork::daemon::limits::fds();
    let limit = open + 200;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        limit <= soft && limit <= hard,
        "limit {limit}, soft {soft}, hard {hard}"
    );
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit).unwrap();
    let d = TestDaemon::start_with(false, |c| {
        c.health_interval = Duration::from_secs(3600);
    })
    .await;
    let mut c = d.client().await;
    import(&mut c, "tpl", &src).await.unwrap();
    let mut made = Vec::new();
    let refused = loop {
        let id = format!("s{}", made.len());
        match create(&mut c, "tpl", &id).await {
            Ok(sb) => made.push(sb),
            Err(e) => break e,
        }
        assert!(made.len() < 200, "never refused");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("file descriptors"),
        "{refused:?}"
    );
    assert!(!made.is_empty());
    // Every admitted sandbox still serves, the API answers, and a delete makes room again.
    for sb in &made {
        assert_eq!(&nbd_read(&sb.nbd_uri, 4096 * 3, 12), b"tpl block 3\n");
    }
    let listed = c
        .sandboxes
        .list_sandboxes(v1::ListSandboxesRequest {
            include_deleted: false,
            paused_in_store: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sandboxes.len(), made.len());
    assert!(delete(&mut c, &made[0].id).await.unwrap());
    create(&mut c, "tpl", "again").await.unwrap();
    d.daemon.shutdown().await;
}
