//! Overlay basics: creation over huge sparse templates, the cache file's life cycle, option and
//! range checking, counters, freeze and flush.

mod common;

use std::sync::Arc;

use common::*;
use rootfork_block::{
    BlockDevice, BlockError, BlockState, Durability, Extent, Overlay, OverlayOptions, TemplateFile,
    TemplatePath,
};

fn sparse_template(dir: &std::path::Path, size: u64) -> Arc<TemplateFile> {
    let path = dir.join("sparse.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    Arc::new(TemplateFile::open(&TemplatePath::new(&path)).unwrap())
}

#[test]
fn creates_over_a_64_gib_template() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 << 30;
    let base = sparse_template(dir.path(), size);
    let cache = dir.path().join("cache");
    let ov = Overlay::create(base, &cache, OverlayOptions::default()).unwrap();
    assert_eq!(ov.size(), size);
    assert_eq!(std::fs::metadata(&cache).unwrap().len(), size);
    let stats = ov.stats();
    assert_eq!(stats.blocks_absent, size / 4096);
    assert_eq!((stats.blocks_data, stats.blocks_zero), (0, 0));
    assert_eq!(
        ov.extents(0, size).unwrap(),
        vec![Extent {
            len: size,
            state: BlockState::Absent
        }]
    );
    // Write at the very end and read it back.
    ov.write_at(&[7u8; 3], size - 3).unwrap();
    let mut b = [0u8; 4];
    ov.read_at(&mut b, size - 4).unwrap();
    assert_eq!(b, [0, 7, 7, 7]);
    assert_eq!(
        ov.extents(size - 8192, 8192).unwrap(),
        vec![
            Extent {
                len: 4096,
                state: BlockState::Absent
            },
            Extent {
                len: 4096,
                state: BlockState::Data
            },
        ]
    );
    assert!(ov.backing().is_some());
    drop(ov);
    assert!(!cache.exists(), "cache must be unlinked on drop");
}

#[test]
fn cache_life_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let base = sparse_template(dir.path(), 1 << 20);
    let cache = dir.path().join("cache");
    let keep = OverlayOptions {
        keep_cache: true,
        ..OverlayOptions::default()
    };
    let ov = Overlay::create(base.clone(), &cache, keep).unwrap();
    // O_EXCL: an existing cache is never reused.
    let err = Overlay::create(base.clone(), &cache, keep).unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST);
    drop(ov);
    assert!(cache.exists());
    assert!(Overlay::create(base, &cache, keep).is_err());
}

#[test]
fn rejects_bad_options_and_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let base = sparse_template(dir.path(), 1 << 20);
    for bs in [0, 256, 1000, 4097, 32 << 20] {
        let opts = OverlayOptions {
            block_size: bs,
            ..OverlayOptions::default()
        };
        let err = Overlay::create(base.clone(), &dir.path().join("c"), opts).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "block size {bs}");
        assert!(!dir.path().join("c").exists());
    }
    let ov = Overlay::create(base, &dir.path().join("c"), OverlayOptions::default()).unwrap();
    let mut buf = [0u8; 10];
    for r in [
        ov.read_at(&mut buf, (1 << 20) - 9),
        ov.write_at(&buf, 1 << 20),
        ov.write_zeroes(u64::MAX, 2, true),
        ov.trim(0, (1 << 20) + 1),
        ov.extents(1 << 20, 1).map(|_| ()),
    ] {
        assert!(matches!(r, Err(BlockError::OutOfRange { .. })), "{r:?}");
    }
    // Empty requests at the end are fine.
    ov.read_at(&mut [], 1 << 20).unwrap();
    ov.write_at(&[], 1 << 20).unwrap();
    ov.write_zeroes(1 << 20, 0, false).unwrap();
    assert!(ov.extents(1 << 20, 0).unwrap().is_empty());
    assert_eq!(ov.stats().blocks_data, 0);
}

#[test]
fn counters_and_coalescing() {
    let bytes = template_bytes(1 << 20, 3);
    let (_t, base) = template_file(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let ov = Overlay::create(base, &dir.path().join("c"), OverlayOptions::default()).unwrap();
    ov.write_at(&[1u8; 8192], 8192).unwrap(); // blocks 2, 3: data
    ov.write_at(&[0u8; 4096], 16384).unwrap(); // block 4: zero (all-zero write)
    ov.write_zeroes(20480, 4096, false).unwrap(); // block 5: data (allocated zeroes)
    ov.trim(24576, 100).unwrap(); // block 6: partial trim, data
    let s = ov.stats();
    assert_eq!((s.blocks_data, s.blocks_zero), (4, 1));
    assert_eq!(s.bytes_written, 8192 + 4096);
    // Partial trim read the block from the template once.
    assert_eq!(s.bytes_read_base, 4096);
    let mut buf = vec![0u8; 7 * 4096];
    ov.read_at(&mut buf, 0).unwrap();
    let s2 = ov.stats();
    // One template run (blocks 0-1), cache runs (2-3, 5-6), one zero run (4).
    assert_eq!(s2.bytes_read_base - s.bytes_read_base, 8192);
    assert_eq!(s2.bytes_read_cache - s.bytes_read_cache, 4 * 4096);
    assert_eq!(&buf[..8192], &bytes[..8192]);
    assert!(buf[8192..16384].iter().all(|&b| b == 1));
    assert!(buf[16384..24576].iter().all(|&b| b == 0));
    assert!(buf[24576..24676].iter().all(|&b| b == 0));
    assert_eq!(&buf[24676..], &bytes[24676..7 * 4096]);
    assert_eq!(
        ov.extents(0, 7 * 4096 + 1).unwrap(),
        vec![
            Extent {
                len: 8192,
                state: BlockState::Absent
            },
            Extent {
                len: 8192,
                state: BlockState::Data
            },
            Extent {
                len: 4096,
                state: BlockState::Zero
            },
            Extent {
                len: 8192,
                state: BlockState::Data
            },
            Extent {
                len: 1,
                state: BlockState::Absent
            },
        ]
    );
}

#[test]
fn freeze_stops_writes_but_not_reads() {
    let (_t, base) = template_file(&template_bytes(1 << 20, 8));
    let dir = tempfile::tempdir().unwrap();
    let opts = OverlayOptions {
        durability: Durability::Durable,
        ..OverlayOptions::default()
    };
    let ov = Arc::new(Overlay::create(base, &dir.path().join("c"), opts).unwrap());
    ov.write_at(&[3u8; 5000], 100).unwrap();
    ov.flush().unwrap();
    // Freeze while writers are running: each write either completes or fails with Shutdown,
    // and after freeze() returns nothing changes any more.
    let writer = {
        let ov = ov.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            loop {
                match ov.write_at(&[n as u8; 10000], (n * 10000) % 1_000_000) {
                    Ok(()) => n += 1,
                    Err(BlockError::Shutdown) => return n,
                    Err(e) => panic!("{e}"),
                }
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    ov.freeze();
    let snapshot = read_all(ov.as_ref());
    writer.join().unwrap();
    assert!(ov.is_frozen());
    assert_same(&read_all(ov.as_ref()), &snapshot, "after freeze");
    assert_eq!(
        ov.write_zeroes(0, 10, false).unwrap_err().errno(),
        libc::ESHUTDOWN
    );
    ov.flush().unwrap();
    // A thaw (a pause that failed after its freeze) makes the disk writable again.
    ov.thaw();
    assert!(!ov.is_frozen());
    ov.write_at(&[9u8; 4096], 8192).unwrap();
    let mut b = vec![0u8; 4096];
    ov.read_at(&mut b, 8192).unwrap();
    assert_eq!(b, vec![9u8; 4096]);
}

#[test]
fn a_full_quota_is_enospc_for_new_blocks_only() {
    let dir = tempfile::tempdir().unwrap();
    let base = sparse_template(dir.path(), 1 << 20);
    let opts = OverlayOptions {
        quota: Some(4 * 4096),
        ..OverlayOptions::default()
    };
    let ov = Overlay::create(base, &dir.path().join("c"), opts).unwrap();
    ov.write_at(&[1u8; 3 * 4096], 0).unwrap();
    // Two new blocks do not fit in the one left; nothing of the request is written.
    let e = ov.write_at(&[2u8; 2 * 4096], 8 * 4096).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    let mut b = vec![0xffu8; 2 * 4096];
    ov.read_at(&mut b, 8 * 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // One new block fits; then overwrites of data blocks, punched zeroes and trims still work.
    ov.write_at(&[3u8; 4096], 8 * 4096).unwrap();
    assert_eq!(
        ov.write_at(&[4u8; 4096], 9 * 4096).unwrap_err().errno(),
        libc::ENOSPC
    );
    ov.write_at(&[5u8; 4096], 0).unwrap();
    ov.write_zeroes(20 * 4096, 4096, true).unwrap();
    ov.trim(4096, 4096).unwrap();
    // The trim gave a block back: one new block fits again.
    ov.write_at(&[6u8; 4096], 9 * 4096).unwrap();
    ov.read_at(&mut b[..4096], 0).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 5));
}
