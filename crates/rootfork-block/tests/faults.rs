//! Faults: a base device with a bad range fails only the requests that touch it, and a cache on a
//! full file system fails writes with `ENOSPC` while leaving the failed blocks as they were.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use rootfork_block::{BlockDevice, BlockState, Extent, Overlay, OverlayOptions};

#[test]
fn failing_base_range_fails_only_requests_touching_it() {
    let size = 1 << 20;
    let bytes = template_bytes(size, 9);
    // Bytes 100_000..110_000: inside blocks 24, 25 (whole) and 26 (4 KiB blocks).
    let base = Arc::new(MemDevice {
        bytes: bytes.clone(),
        bad: Some((100_000, 110_000)),
    });
    let dir = tempfile::tempdir().unwrap();
    let ov = Overlay::create(base, &dir.path().join("cache"), OverlayOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];

    // Reads.
    ov.read_at(&mut buf, 0).unwrap();
    let err = ov.read_at(&mut buf[..1500], 99_000).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(
        ov.read_at(&mut buf[..10], 109_999).unwrap_err().errno(),
        libc::EIO
    );
    // Same block as bad bytes, but not touching them: fine.
    ov.read_at(&mut buf[..1000], 24 * 4096).unwrap();
    assert_eq!(&buf[..1000], &bytes[24 * 4096..24 * 4096 + 1000]);
    ov.read_at(&mut buf[..100], 110_000).unwrap();
    assert_eq!(&buf[..100], &bytes[110_000..110_100]);

    // A partial write into block 24 needs the bad bytes for its read-modify-write: it fails and
    // changes nothing.
    let err = ov.write_at(&[1u8; 100], 24 * 4096 + 10).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(ov.stats().blocks_data, 0);
    // So does a partial write-zeroes, and a write whose tail block is partial.
    assert_eq!(
        ov.write_zeroes(26 * 4096 + 100, 10, true)
            .unwrap_err()
            .errno(),
        libc::EIO
    );
    assert_eq!(
        ov.write_at(&vec![3u8; 4096 + 10], 23 * 4096)
            .unwrap_err()
            .errno(),
        libc::EIO
    );
    assert_eq!(ov.stats().blocks_absent, 256);
    // A partial write elsewhere works.
    ov.write_at(&[2u8; 100], 30 * 4096 + 7).unwrap();
    // A full-block write over bad bytes needs no base read: it works, and the block is then
    // served from the cache.
    ov.write_at(&[5u8; 4096], 25 * 4096).unwrap();
    ov.read_at(&mut buf, 25 * 4096).unwrap();
    assert_eq!(buf, vec![5u8; 4096]);
    // Trimming the rest of the bad range makes all of it readable.
    ov.trim(24 * 4096, 4096).unwrap();
    ov.write_zeroes(26 * 4096, 4096, false).unwrap();
    let mut big = vec![0u8; 3 * 4096];
    ov.read_at(&mut big, 24 * 4096).unwrap();
    assert!(big[..4096].iter().all(|&b| b == 0));
    assert!(big[4096..8192].iter().all(|&b| b == 5));
    assert!(big[8192..].iter().all(|&b| b == 0));
    // And now partial writes there work too.
    ov.write_at(&[7u8; 10], 24 * 4096 + 10).unwrap();
}

/// A tmpfs of 256 KiB mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount() -> Tmpfs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a small tmpfs to fill it up and must run as root"
        );
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=256k"),
        )
        .expect("mount -t tmpfs -o size=256k");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn full_cache_gives_enospc_and_keeps_failed_blocks() {
    let fs = Tmpfs::mount();
    let size = 4 << 20;
    let bytes = template_bytes(size, 5);
    let base = Arc::new(MemDevice {
        bytes: bytes.clone(),
        bad: None,
    });
    let ov = Overlay::create(base, &fs.path().join("cache"), OverlayOptions::default()).unwrap();
    let mut model = Model::new(&bytes, 4096);

    // Some zero blocks first (no space needed).
    ov.write_zeroes(3 << 20, 64 * 1024, true).unwrap();
    model.zero(3 << 20, 64 * 1024, true);

    // Fill the cache with 16 KiB writes until it is full.
    let mut failed_at = None;
    for i in 0..((2 << 20) / 16384) {
        let mut chunk = vec![0u8; 16384];
        fill_pattern(&mut chunk, i);
        let off = i * 16384;
        match ov.write_at(&chunk, off) {
            Ok(()) => model.write(off, &chunk),
            Err(e) => {
                assert_eq!(e.errno(), libc::ENOSPC, "{e}");
                failed_at = Some(off);
                break;
            }
        }
    }
    let failed_at = failed_at.expect("a 256 KiB tmpfs never filled up");
    assert!(failed_at <= 256 * 1024);

    // Previously zero blocks stay zero, absent ones stay absent, partial writes into absent
    // blocks fail the same way.
    let mut chunk = vec![9u8; 8192];
    assert_eq!(
        ov.write_at(&chunk, 3 << 20).unwrap_err().errno(),
        libc::ENOSPC
    );
    assert_eq!(
        ov.write_at(&chunk[..100], (2 << 20) + 5)
            .unwrap_err()
            .errno(),
        libc::ENOSPC
    );
    assert_eq!(
        ov.write_zeroes(failed_at + 32768, 8192, false)
            .unwrap_err()
            .errno(),
        libc::ENOSPC
    );
    // Overwriting data blocks needs no new space.
    chunk.fill(0x11);
    ov.write_at(&chunk[..5000], 1000).unwrap();
    model.write(1000, &chunk[..5000]);

    assert_same(&read_all(&ov), &model.data, "contents after ENOSPC");
    assert_eq!(
        ov.extents(0, size as u64).unwrap(),
        model.extents(0, size as u64)
    );
    let stats = ov.stats();
    assert_eq!(stats.blocks_data, model.count(BlockState::Data));
    assert_eq!(stats.blocks_zero, model.count(BlockState::Zero));
    assert_eq!(
        ov.extents(failed_at, 16384).unwrap(),
        vec![Extent {
            len: 16384,
            state: BlockState::Absent
        }]
    );

    // Trimming data frees space and writes work again.
    ov.trim(0, 64 * 1024).unwrap();
    model.zero(0, 64 * 1024, true);
    let mut chunk = vec![0u8; 16384];
    fill_pattern(&mut chunk, 77);
    ov.write_at(&chunk, failed_at).unwrap();
    model.write(failed_at, &chunk);
    assert_same(&read_all(&ov), &model.data, "contents after freeing space");
    drop(ov);
}
