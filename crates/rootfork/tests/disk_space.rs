//! Disk space. Admission: a create is refused when what the sandboxes may still write exceeds
//! the free space times `limits.disk_overcommit`. Failure-atomic pause: a pause that cannot be
//! done leaves the sandbox as it was — running, its disk served and writable, every byte
//! readable — and a later pause with room succeeds.
//!
//! * no room (the state directory on a small tmpfs): refused before the freeze with
//!   `RESOURCE_EXHAUSTED` naming the directory and the bytes needed;
//! * a failure after the freeze (the diff file cannot be created): the overlay is thawed and the
//!   sandbox keeps running, writable.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use rootfork::api::v1;
use tonic::Code;

/// A tmpfs of `mib` MiB at `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("mount runs (the tests run as root)");
        assert!(st.success(), "mounting a tmpfs at {}", dir.display());
        Tmpfs(dir.to_owned())
    }

    fn resize(&self, mib: u64) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_without_room_changes_nothing_and_succeeds_once_there_is_room() {
    let (d, fs) = TestDaemon::start_prepared(
        false,
        |state| Tmpfs::mount(state, 40),
        |c| {
            c.health_interval = Duration::from_secs(3600);
        },
    )
    .await;
    let (dir, state) = (d.dir.path(), d.state());
    let mut c = d.client().await;
    // A 64 MiB template (sparse after its first tagged blocks) and 24 MiB written: the cache
    // holds 24 MiB of the tmpfs's 40, so a 24 MiB diff cannot fit.
    let src = make_sparse_template(dir, "src.img", 64 << 20);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create(&mut c, "tpl", "full").await.unwrap();
    for mib in 0..24u64 {
        nbd_write(&sb.nbd_uri, (8 + mib) << 20, 1 << 20, mib as u8 + 1);
    }
    let e = pause(&mut c, "full").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains(&state.join("store").display().to_string()),
        "{e:?}"
    );
    assert!(e.message().contains("25165824 bytes needed"), "{e:?}");
    // Nothing changed: running, served, writable, every byte readable, no layer left behind.
    let got = get(&mut c, "full").await;
    assert_eq!(got.state, v1::SandboxState::Running as i32);
    assert_eq!(got.nbd_uri, sb.nbd_uri);
    nbd_write(&sb.nbd_uri, 0, 4096, 0xee);
    assert_eq!(nbd_read(&sb.nbd_uri, 0, 4096), vec![0xee; 4096]);
    for mib in 0..24u64 {
        assert_eq!(
            nbd_read(&sb.nbd_uri, ((8 + mib) << 20) + 4096, 4096),
            vec![mib as u8 + 1; 4096]
        );
    }
    assert_eq!(d.files("store"), vec![d.template_build("tpl")]);
    // With room, the same pause succeeds and the resumed disk has every byte.
    fs.resize(128);
    let p = pause(&mut c, "full").await.unwrap();
    assert_eq!(p.state, v1::SandboxState::Paused as i32);
    let r = resume(&mut c, "full").await.unwrap();
    assert_eq!(nbd_read(&r.nbd_uri, 0, 4096), vec![0xee; 4096]);
    assert_eq!(nbd_read(&r.nbd_uri, 31 << 20, 4096), vec![24; 4096]);
    assert_eq!(&nbd_read(&r.nbd_uri, 4096 * 5, 12), b"tpl block 5\n");
    assert!(delete(&mut c, "full").await.unwrap());
    d.daemon.shutdown().await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_failing_after_the_freeze_thaws_the_disk() {
    let d = TestDaemon::start_with(false, |c| c.health_interval = Duration::from_secs(3600)).await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let sb = create(&mut c, "tpl", "thaw").await.unwrap();
    nbd_write(&sb.nbd_uri, 4096, 4096, 0x11);
    // Something already stands where the pause's export goes: the export cannot create it.
    let planted = d.state().join("store").join(".export-thaw.1");
    std::fs::create_dir(&planted).unwrap();
    let e = pause(&mut c, "thaw").await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    let got = get(&mut c, "thaw").await;
    assert_eq!(got.state, v1::SandboxState::Running as i32);
    assert!(got.message.starts_with("pause failed"), "{}", got.message);
    // Thawed: writes work again, old data intact.
    nbd_write(&sb.nbd_uri, 8192, 4096, 0x22);
    assert_eq!(nbd_read(&sb.nbd_uri, 4096, 4096), vec![0x11; 4096]);
    assert_eq!(nbd_read(&sb.nbd_uri, 8192, 4096), vec![0x22; 4096]);
    // The next pause (new file names) succeeds with both writes.
    let p = pause(&mut c, "thaw").await.unwrap();
    assert_eq!(p.paused_diff_bytes, 8192);
    let r = resume(&mut c, "thaw").await.unwrap();
    assert_eq!(nbd_read(&r.nbd_uri, 8192, 4096), vec![0x22; 4096]);
    assert!(delete(&mut c, "thaw").await.unwrap());
    d.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_are_admitted_against_free_space_times_the_overcommit() {
    let (d, fs) = TestDaemon::start_prepared(
        false,
        |state| Tmpfs::mount(state, 40),
        |c| {
            c.health_interval = Duration::from_secs(3600);
            c.disk_overcommit = 2.0;
        },
    )
    .await;
    let (daemon, dir) = (&d.daemon, d.dir.path());
    let mut c = d.client().await;
    // A sparse 64 MiB template: one sandbox may write 64 MiB, within 2 × ~40 MiB free; a
    // second one would bring the total to 128 MiB.
    let src = make_sparse_template(dir, "src.img", 64 << 20);
    import(&mut c, "tpl", &src).await.unwrap();
    create(&mut c, "tpl", "one").await.unwrap();
    let e = create(&mut c, "tpl", "two").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("disk space"), "{e:?}");
    assert!(e.message().contains("limits.disk_overcommit 2"), "{e:?}");
    let m = daemon.core().render_metrics();
    assert!(
        m.contains("rootfork_errors_total{op=\"create_sandbox\",errno=\"ENOSPC\"} 1"),
        "{m}"
    );
    // More room admits it.
    fs.resize(80);
    create(&mut c, "tpl", "two").await.unwrap();
    for id in ["one", "two"] {
        assert!(delete(&mut c, id).await.unwrap());
    }
    d.daemon.shutdown().await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_larger_than_its_template_and_a_quota_the_guest_meets_as_enospc() {
    let d = TestDaemon::start_with(false, |c| c.health_interval = Duration::from_secs(3600)).await;
    let mut c = d.client().await;
    let src = make_template(d.dir.path(), "src.img", 16);
    import(&mut c, "tpl", &src).await.unwrap();
    let big = c
        .sandboxes
        .create_sandbox(v1::CreateSandboxRequest {
            template: "tpl".into(),
            id: "big".into(),
            disk_size_bytes: 1 << 20,
            quota_bytes: 8 * 4096,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((big.disk_size_bytes, big.quota_bytes), (1 << 20, 8 * 4096));
    assert_eq!(nbd_size(&big.nbd_uri), 1 << 20);
    // The template, then zeroes in the tail; the tail is writable.
    assert_eq!(&nbd_read(&big.nbd_uri, 4096 * 15, 13), b"tpl block 15\n");
    assert_eq!(nbd_read(&big.nbd_uri, 16 * 4096, 4096), vec![0; 4096]);
    nbd_write(&big.nbd_uri, (1 << 20) - 4096, 4096, 0x77);
    // The quota (8 blocks): 7 more fit, the 9th is ENOSPC from the sandbox's own disk.
    nbd_write(&big.nbd_uri, 20 * 4096, 7 * 4096, 0x33);
    let e = nbd_try_write(&big.nbd_uri, 40 * 4096, 4096, 0x44).unwrap_err();
    assert!(e.contains(&libc::ENOSPC.to_string()), "{e}");
    // Overwrites within the quota still work, and everything survives a pause and resume (the
    // diff lies over the template grown to the disk's size).
    nbd_write(&big.nbd_uri, 20 * 4096, 4096, 0x55);
    pause(&mut c, "big").await.unwrap();
    let r = resume(&mut c, "big").await.unwrap();
    assert_eq!(nbd_size(&r.nbd_uri), 1 << 20);
    assert_eq!(
        nbd_read(&r.nbd_uri, (1 << 20) - 4096, 4096),
        vec![0x77; 4096]
    );
    assert_eq!(nbd_read(&r.nbd_uri, 20 * 4096, 4096), vec![0x55; 4096]);
    assert_eq!(nbd_read(&r.nbd_uri, 21 * 4096, 4096), vec![0x33; 4096]);
    assert_eq!(&nbd_read(&r.nbd_uri, 4096 * 2, 12), b"tpl block 2\n");
    // A disk smaller than the template, or not a whole number of blocks, is refused.
    for (size, what) in [
        (4096, "smaller than the template"),
        (1 << 20 | 1, "multiple of 4096"),
    ] {
        let e = c
            .sandboxes
            .create_sandbox(v1::CreateSandboxRequest {
                template: "tpl".into(),
                id: "bad".into(),
                disk_size_bytes: size,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(what), "{e:?}");
    }
    assert!(delete(&mut c, "big").await.unwrap());
    d.daemon.shutdown().await;
}
