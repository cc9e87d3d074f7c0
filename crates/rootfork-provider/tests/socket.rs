//! Socket provider: lifecycle, timeouts and cancellation, pause (export_diff) and resume over a
//! diff layer, the template staying read-only throughout, and a hand-over to a provider that
//! reopens the kept overlay (a daemon restart).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{make_template, never, sha256, WriteWatch};
use rootfork_block::{BlockDevice, OverlayOptions, TemplatePath};
use rootfork_provider::{
    BaseImage, PausedDisk, Provider, ProviderError, ProviderKind, SocketConfig, SocketProvider,
};

fn config(dir: &Path, base: BaseImage, name: &str) -> SocketConfig {
    SocketConfig {
        base,
        socket: dir.join(format!("{name}.sock")),
        export: name.to_owned(),
        cache: dir.join(format!("{name}.cache")),
        overlay: OverlayOptions::default(),
    }
}

fn template_base(p: &Path) -> BaseImage {
    BaseImage::Template(TemplatePath::new(p))
}

/// Reads `len` bytes at `offset` through the NBD export with libnbd's `nbdcopy`.
fn read_via_nbd(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("nbdcopy-{}.raw", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let st = Command::new("nbdcopy")
        .arg(uri)
        .arg(&out)
        .status()
        .expect("nbdcopy (Debian package libnbd-bin) must be installed");
    assert!(st.success(), "nbdcopy {uri} failed");
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

#[tokio::test]
async fn lifecycle_serves_a_private_overlay_and_releases_everything() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = make_template(dir.path(), 4);
    let before = sha256(&tpl);
    let watch = WriteWatch::new(&tpl);
    let cfg = config(dir.path(), template_base(&tpl), "sb1");
    let (sock, cache) = (cfg.socket.clone(), cfg.cache.clone());

    let mut p = SocketProvider::new(cfg);
    assert_eq!(p.kind(), ProviderKind::Socket);
    assert!(p.nbd_stats().is_none(), "NBD stats before the attach");
    assert!(matches!(
        p.path(Duration::from_secs(1), never()).await,
        Err(ProviderError::NotStarted)
    ));
    let t = Instant::now();
    p.start().unwrap();
    let started_in = t.elapsed();
    let ep = p.path(Duration::from_secs(30), never()).await.unwrap();
    assert_eq!(ep.socket(), sock);
    assert_eq!(ep.export(), "sb1");
    assert!(sock.exists() && cache.exists());
    eprintln!(
        "start() returned in {started_in:?}, ready after {:?}",
        t.elapsed()
    );

    // A guest-like write through the overlay, then read the whole disk through the export.
    let overlay = p.overlay().unwrap();
    overlay.write_at(b"private to sb1", 8192).unwrap();
    let disk = tokio::task::spawn_blocking({
        let (uri, d) = (ep.uri(), dir.path().to_owned());
        move || read_via_nbd(&uri, &d)
    })
    .await
    .unwrap();
    assert_eq!(disk.len(), 4 << 20);
    assert_eq!(&disk[8192..8192 + 14], b"private to sb1");
    assert_eq!(
        &disk[4096 * 5..4096 * 5 + 8],
        &5u64.to_le_bytes(),
        "template block not visible"
    );
    drop(overlay);

    // The export's NBD server counted nbdcopy's reads (the whole 4 MiB disk).
    let live = p.nbd_stats().expect("NBD stats while attached");
    let reads = live.op(rootfork_nbd::Op::Read);
    assert!(reads.count > 0, "{live:?}");
    assert_eq!(reads.bytes, 4 << 20);
    assert_eq!(live.op(rootfork_nbd::Op::Write).count, 0);

    p.close().await.unwrap();
    p.close().await.unwrap();
    let last = p.nbd_stats().expect("final NBD stats after close");
    assert_eq!(last.op(rootfork_nbd::Op::Read), reads);
    assert!(!sock.exists(), "socket left behind");
    assert!(!cache.exists(), "overlay cache left behind");
    assert!(matches!(
        p.path(Duration::from_secs(1), never()).await,
        Err(ProviderError::Closed)
    ));
    assert!(matches!(
        p.export_diff(&dir.path().join("d")).await,
        Err(ProviderError::Closed)
    ));
    assert_eq!(sha256(&tpl), before);
    assert_eq!(
        watch.events().0,
        0,
        "the template was opened writable or modified"
    );
}

#[tokio::test]
async fn two_sandboxes_on_one_template_do_not_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = make_template(dir.path(), 2);
    let mut a = SocketProvider::new(config(dir.path(), template_base(&tpl), "a"));
    let mut b = SocketProvider::new(config(dir.path(), template_base(&tpl), "b"));
    a.start().unwrap();
    b.start().unwrap();
    a.path(Duration::from_secs(30), never()).await.unwrap();
    b.path(Duration::from_secs(30), never()).await.unwrap();
    a.overlay().unwrap().write_at(b"AAAA", 0).unwrap();
    b.overlay().unwrap().write_at(b"BBBB", 0).unwrap();
    let mut buf = [0u8; 4];
    a.overlay().unwrap().read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"AAAA");
    b.overlay().unwrap().read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"BBBB");
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A FIFO as the "template": opening it read-only blocks until a writer appears, which stands
/// in for an attach that takes arbitrarily long.
fn blocking_template(dir: &Path) -> PathBuf {
    let fifo = dir.join("slow.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    fifo
}

/// Unblocks whoever is opening `fifo` for reading.
fn release_fifo(fifo: &Path) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags_nonblock()
        .open(fifo);
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_NONBLOCK)
    }
}

#[tokio::test]
async fn path_times_out_is_cancellable_and_close_interrupts_the_attach() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = blocking_template(dir.path());
    let cfg = config(dir.path(), template_base(&fifo), "slow");
    let (sock, cache) = (cfg.socket.clone(), cfg.cache.clone());
    let mut p = SocketProvider::new(cfg);

    let t = Instant::now();
    p.start().unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "start() blocked");

    let t = Instant::now();
    let r = p.path(Duration::from_millis(100), never()).await;
    assert!(matches!(r, Err(ProviderError::Timeout(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let waiter = p.path(Duration::from_secs(60), async {
        let _ = rx.await;
    });
    let canceller = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send(()).unwrap();
    };
    let t = Instant::now();
    let (r, ()) = tokio::join!(waiter, canceller);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(matches!(r, Err(ProviderError::Cancelled)), "{r:?}");

    let t = Instant::now();
    p.close().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "close() waited for a stuck attach"
    );
    assert!(matches!(
        p.path(Duration::from_secs(1), never()).await,
        Err(ProviderError::Closed)
    ));
    release_fifo(&fifo);
    // The abandoned attach fails on its own (a FIFO is not a template) and leaves nothing.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!sock.exists() && !cache.exists());
}

#[tokio::test]
async fn attach_failure_reaches_path_and_bad_input_fails_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = SocketProvider::new(config(
        dir.path(),
        template_base(&dir.path().join("missing")),
        "m",
    ));
    p.start().unwrap();
    let r = p.path(Duration::from_secs(30), never()).await;
    assert!(matches!(r, Err(ProviderError::AttachFailed(_))), "{r:?}");
    p.close().await.unwrap();

    let tpl = make_template(dir.path(), 1);
    let mut cfg = config(dir.path(), template_base(&tpl), "bad,name");
    assert!(SocketProvider::new(cfg.clone()).start().is_err());
    cfg.export = "ok".into();
    cfg.socket = "relative.sock".into();
    assert!(SocketProvider::new(cfg.clone()).start().is_err());
    cfg.socket = dir.path().join("taken.sock");
    std::fs::write(&cfg.socket, b"").unwrap();
    assert!(matches!(
        SocketProvider::new(cfg).start(),
        Err(ProviderError::Exists(_))
    ));
}

#[tokio::test]
async fn drop_without_close_releases_socket_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = make_template(dir.path(), 1);
    let cfg = config(dir.path(), template_base(&tpl), "dropped");
    let (sock, cache) = (cfg.socket.clone(), cfg.cache.clone());
    let mut p = SocketProvider::new(cfg);
    p.start().unwrap();
    p.path(Duration::from_secs(30), never()).await.unwrap();
    drop(p);
    assert!(!sock.exists(), "socket leaked");
    assert!(!cache.exists(), "cache leaked");
}

#[tokio::test]
async fn export_diff_then_resume_reads_back_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = make_template(dir.path(), 4);
    let before = sha256(&tpl);
    let watch = WriteWatch::new(&tpl);

    let mut p = SocketProvider::new(config(dir.path(), template_base(&tpl), "pause"));
    assert!(matches!(
        p.export_diff(&dir.path().join("early")).await,
        Err(ProviderError::NotStarted)
    ));
    p.start().unwrap();
    p.path(Duration::from_secs(30), never()).await.unwrap();
    let ov = p.overlay().unwrap();
    ov.write_at(&[0xAB; 4096], 4096 * 10).unwrap();
    ov.write_at(b"tail", (4 << 20) - 4).unwrap();
    ov.write_zeroes(4096 * 20, 4096, true).unwrap();

    let data = dir.path().join("pause.diff");
    let paused: PausedDisk = p.export_diff(&data).await.unwrap();
    assert!(data.exists());
    assert!(!paused.map.runs.is_empty());
    assert!(
        paused
            .map
            .runs
            .windows(2)
            .all(|w| w[0].end() <= w[1].offset),
        "diff runs are not in ascending order"
    );
    // Frozen: further writes are refused.
    assert!(
        ov.write_at(b"late", 0).is_err(),
        "write after export_diff was accepted"
    );
    drop(ov);
    p.close().await.unwrap();

    let resumed_base = BaseImage::Resumed {
        template: TemplatePath::new(&tpl),
        paused: paused.clone(),
    };
    let mut r = SocketProvider::new(config(dir.path(), resumed_base, "resumed"));
    r.start().unwrap();
    let ep = r.path(Duration::from_secs(30), never()).await.unwrap();
    let disk = tokio::task::spawn_blocking({
        let (uri, d) = (ep.uri(), dir.path().to_owned());
        move || read_via_nbd(&uri, &d)
    })
    .await
    .unwrap();
    assert_eq!(
        &disk[4096 * 10..4096 * 11],
        &[0xAB; 4096][..],
        "paused write lost"
    );
    assert_eq!(&disk[(4 << 20) - 4..], b"tail");
    assert!(
        disk[4096 * 20..4096 * 21].iter().all(|&b| b == 0),
        "zeroed block came back"
    );
    assert_eq!(
        &disk[4096 * 5..4096 * 5 + 8],
        &5u64.to_le_bytes(),
        "template block lost"
    );
    // The resumed sandbox writes into its own new overlay; the paused diff stays as it was.
    let diff_sha = sha256(&data);
    r.overlay()
        .unwrap()
        .write_at(b"after resume", 4096 * 10)
        .unwrap();
    r.close().await.unwrap();
    assert_eq!(sha256(&data), diff_sha, "the paused diff was modified");
    assert_eq!(sha256(&tpl), before, "template modified");
    assert_eq!(
        watch.events().0,
        0,
        "the template was opened writable or modified"
    );
}

#[tokio::test]
async fn a_handed_over_overlay_is_served_again_by_a_provider_reopening_it() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = make_template(dir.path(), 4);
    let mut cfg = config(dir.path(), template_base(&tpl), "kept");
    cfg.overlay = OverlayOptions {
        keep_cache: true,
        persist_state: true,
        ..OverlayOptions::default()
    };
    let (sock, cache) = (cfg.socket.clone(), cfg.cache.clone());
    let mut first = SocketProvider::new(cfg.clone());
    first.start().unwrap();
    let ep = first.path(Duration::from_secs(30), never()).await.unwrap();
    first
        .overlay()
        .unwrap()
        .write_at(&[0x77; 4096], 4096)
        .unwrap();
    first.hand_over().await.unwrap();
    assert!(!sock.exists(), "the socket goes with the server");
    assert!(cache.exists() && rootfork_block::state_path(&cache).exists());
    assert!(first.overlay().is_none());

    // The next provider reopens the same files and serves them at the same endpoint.
    let mut second = SocketProvider::new(cfg.clone()).reopening_cache();
    assert!(second.reopens_cache());
    second.start().unwrap();
    let again = second.path(Duration::from_secs(30), never()).await.unwrap();
    assert_eq!(again.uri(), ep.uri());
    let report = second.reopen_report().expect("a reopen report");
    assert_eq!(report.blocks_data, 1);
    let disk = tokio::task::spawn_blocking({
        let (uri, d) = (again.uri(), dir.path().to_owned());
        move || read_via_nbd(&uri, &d)
    })
    .await
    .unwrap();
    assert_eq!(&disk[4096..8192], &[0x77; 4096][..]);
    assert_eq!(&disk[..4096], &std::fs::read(&tpl).unwrap()[..4096]);
    second.close().await.unwrap();

    // Reopening without the block state fails clearly and leaves the cache alone.
    std::fs::remove_file(rootfork_block::state_path(&cache)).unwrap();
    let mut third = SocketProvider::new(cfg).reopening_cache();
    third.start().unwrap();
    let e = third
        .path(Duration::from_secs(30), never())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("state file"), "{e}");
    assert!(cache.exists());
}
