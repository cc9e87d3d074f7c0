//! Locking behaviour, made deterministic with a base device that holds one read at a gate:
//! a read-modify-write holds its range lock (a second partial write to the same block waits and
//! nothing is lost), while requests elsewhere — writes to other regions and all reads — do not
//! wait for it (no global lock).

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rootfork_block::{BlockDevice, Overlay, OverlayOptions};

const SIZE: usize = 4 << 20;
/// Block 5 (4 KiB blocks) is gated.
const GATED: u64 = 5 * 4096;

fn setup() -> (Arc<GateDevice>, Arc<Overlay>, tempfile::TempDir) {
    let bytes = template_bytes(SIZE, 3);
    let base = Arc::new(GateDevice::new(bytes, (GATED, GATED + 4096)));
    let dir = tempfile::tempdir().unwrap();
    let ov = Overlay::create(
        base.clone(),
        &dir.path().join("c"),
        OverlayOptions::default(),
    )
    .unwrap();
    (base, Arc::new(ov), dir)
}

/// Runs `f` on a thread and returns a receiver for its completion.
fn spawn(f: impl FnOnce() + Send + 'static) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx
}

#[test]
fn partial_writes_to_one_block_do_not_lose_updates() {
    let (base, ov, _dir) = setup();
    // A: partial write into block 5; its read-modify-write is held at the gate with the lock.
    let a = {
        let ov = ov.clone();
        spawn(move || ov.write_at(&[0xaa; 100], GATED + 10).unwrap())
    };
    base.wait_entered();
    // B: another partial write into the same block. With the range lock it waits for A; without
    // it, it would merge against the template now and A would overwrite its bytes afterwards.
    let b = {
        let ov = ov.clone();
        spawn(move || ov.write_at(&[0xbb; 100], GATED + 2000).unwrap())
    };
    assert!(
        b.recv_timeout(Duration::from_millis(200)).is_err(),
        "a partial write to a block under read-modify-write did not wait for it"
    );
    base.release();
    a.recv_timeout(Duration::from_secs(30)).unwrap();
    b.recv_timeout(Duration::from_secs(30)).unwrap();
    let mut block = vec![0u8; 4096];
    ov.read_at(&mut block, GATED).unwrap();
    let mut want = base.bytes[GATED as usize..GATED as usize + 4096].to_vec();
    want[10..110].fill(0xaa);
    want[2000..2100].fill(0xbb);
    assert_same(&block, &want, "block 5");
}

#[test]
fn other_regions_and_reads_do_not_wait_for_a_held_write() {
    let (base, ov, _dir) = setup();
    let a = {
        let ov = ov.clone();
        spawn(move || ov.write_at(&[0xaa; 100], GATED + 10).unwrap())
    };
    base.wait_entered();
    // While A holds region 0's lock: writes to other regions, trims, flushes and reads (also of
    // the held block itself) complete.
    let others = {
        let ov = ov.clone();
        spawn(move || {
            ov.write_at(&[1u8; 4096], 1 << 20).unwrap();
            ov.write_at(&[2u8; 10], (2 << 20) + 7).unwrap();
            ov.trim(3 << 20, 65536).unwrap();
            ov.flush().unwrap();
            let mut buf = vec![0u8; 8192];
            ov.read_at(&mut buf, GATED).unwrap();
            ov.read_at(&mut buf, 1 << 20).unwrap();
            assert_eq!(&buf[..4096], &[1u8; 4096][..]);
        })
    };
    let done = others.recv_timeout(Duration::from_secs(30));
    base.release();
    a.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(done.is_ok(), "requests elsewhere waited for a held write");
}

#[test]
fn freeze_waits_for_writes_in_flight() {
    let (base, ov, _dir) = setup();
    let a = {
        let ov = ov.clone();
        spawn(move || ov.write_at(&[0xaa; 100], GATED + 10).unwrap())
    };
    base.wait_entered();
    let frozen = {
        let ov = ov.clone();
        spawn(move || ov.freeze())
    };
    assert!(
        frozen.recv_timeout(Duration::from_millis(200)).is_err(),
        "freeze returned while a write was in flight"
    );
    // New writes are refused as soon as the flag is set, even before freeze returns.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ov.is_frozen() {
        assert!(
            std::time::Instant::now() < deadline,
            "freeze never set its flag"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        ov.write_at(&[1], 1 << 20).unwrap_err().errno(),
        libc::ESHUTDOWN
    );
    base.release();
    a.recv_timeout(Duration::from_secs(30)).unwrap();
    frozen.recv_timeout(Duration::from_secs(30)).unwrap();
    // The write that was in flight completed before the freeze.
    let mut b = [0u8; 100];
    ov.read_at(&mut b, GATED + 10).unwrap();
    assert_eq!(b, [0xaa; 100]);
}
