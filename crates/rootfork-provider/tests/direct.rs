//! Direct provider: a full writable copy of the template, kept only after a successful close.

mod common;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Duration;

use common::{make_template, never, sha256, WriteWatch};
use rootfork_block::TemplatePath;
use rootfork_provider::{DirectProvider, Provider, ProviderError, ProviderKind};

#[tokio::test]
async fn copy_is_a_writable_twin_and_the_template_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = make_template(dir.path(), 8);
    let before = sha256(&tpl);
    let watch = WriteWatch::new(&tpl);
    let dest = dir.path().join("rootfs.ext4");

    let mut p = DirectProvider::new(TemplatePath::new(&tpl), &dest);
    assert_eq!(p.kind(), ProviderKind::Direct);
    p.start().unwrap();
    assert!(matches!(p.start(), Err(ProviderError::AlreadyStarted)));
    let dev = p.path(Duration::from_secs(30), never()).await.unwrap();
    assert_eq!(dev.path(), dest);
    assert!(!dev.is_block());
    assert!(p.copy_method().is_some());
    assert_eq!(sha256(&dest), before, "the copy differs from the template");

    // Writes go to the copy only.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev.path())
        .unwrap();
    f.write_all_at(b"sandbox write", 4096 * 5).unwrap();
    drop(f);
    assert_ne!(sha256(&dest), before);

    p.close().await.unwrap();
    p.close().await.unwrap(); // idempotent
    assert!(matches!(
        p.path(Duration::from_secs(1), never()).await,
        Err(ProviderError::Closed)
    ));
    assert!(matches!(p.start(), Err(ProviderError::Closed)));
    drop(p);
    assert!(
        dest.exists(),
        "a closed direct copy is the product and must be kept"
    );
    assert_eq!(sha256(&tpl), before, "template modified");
    let (writes, reads) = watch.events();
    assert_eq!(writes, 0, "the template was opened for writing or modified");
    assert!(reads >= 1, "the template was never read");
}

#[tokio::test]
async fn dropping_without_close_removes_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = make_template(dir.path(), 4);
    let dest = dir.path().join("copy");
    let mut p = DirectProvider::new(TemplatePath::new(&tpl), &dest);
    p.start().unwrap();
    p.path(Duration::from_secs(30), never()).await.unwrap();
    assert!(dest.exists());
    drop(p);
    assert!(!dest.exists(), "an unclosed copy was left behind");
}

#[tokio::test]
async fn existing_destination_and_missing_template_fail_the_attach() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = make_template(dir.path(), 1);
    let dest = dir.path().join("taken");
    std::fs::write(&dest, b"someone else's").unwrap();
    let mut p = DirectProvider::new(TemplatePath::new(&tpl), &dest);
    p.start().unwrap();
    let err = p.path(Duration::from_secs(30), never()).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::AttachFailed(e) if matches!(**e, ProviderError::Exists(_))),
        "{err}"
    );
    drop(p);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        b"someone else's",
        "clobbered a file it did not create"
    );

    let mut p = DirectProvider::new(
        TemplatePath::new(dir.path().join("nope")),
        dir.path().join("x"),
    );
    p.start().unwrap();
    assert!(matches!(
        p.path(Duration::from_secs(30), never()).await,
        Err(ProviderError::AttachFailed(_))
    ));
    assert!(!dir.path().join("x").exists());
}

#[tokio::test]
async fn export_diff_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = make_template(dir.path(), 1);
    let mut p = DirectProvider::new(TemplatePath::new(&tpl), dir.path().join("c"));
    p.start().unwrap();
    p.path(Duration::from_secs(30), never()).await.unwrap();
    assert!(matches!(
        p.export_diff(&dir.path().join("diff")).await,
        Err(ProviderError::Unsupported { .. })
    ));
    assert!(!dir.path().join("diff").exists());
}

#[test]
fn the_write_watch_notices_a_writable_open() {
    // Guards the guard: the template checks above rely on this watch seeing writable opens.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    let watch = WriteWatch::new(&f);
    drop(std::fs::File::open(&f).unwrap());
    assert_eq!(watch.events(), (0, 1));
    drop(std::fs::OpenOptions::new().write(true).open(&f).unwrap());
    assert_eq!(watch.events().0, 1);
}

#[tokio::test]
async fn close_does_not_wait_for_a_stuck_copy() {
    let dir = tempfile::tempdir().unwrap();
    // Opening a FIFO for reading blocks until a writer appears: an attach that never finishes.
    let fifo = dir.path().join("slow.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let dest = dir.path().join("copy");
    let mut p = DirectProvider::new(TemplatePath::new(&fifo), &dest);
    p.start().unwrap();
    assert!(matches!(
        p.path(Duration::from_millis(50), never()).await,
        Err(ProviderError::Timeout(_))
    ));
    let t = std::time::Instant::now();
    p.close().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "close() waited for the stuck copy"
    );
    assert!(matches!(
        p.path(Duration::from_secs(1), never()).await,
        Err(ProviderError::Closed)
    ));
    // Unblock the abandoned open; it fails (a FIFO is not a template) and leaves nothing.
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!dest.exists());
}
