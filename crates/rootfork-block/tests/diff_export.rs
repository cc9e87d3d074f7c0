//! Diff export round trip: applying an exported diff onto a copy of the template reproduces
//! exactly what the overlay reads, and a `DiffLayer` over the template reads the same and reports
//! the same block status (allocated zeroes exported as zero runs).

mod common;

use std::sync::Arc;

use common::*;
use rand::{Rng, SeedableRng};
use rootfork_block::{
    BlockDevice, BlockError, Contents, DiffKind, DiffLayer, DiffMap, Overlay, OverlayOptions,
    RangeStatus, TemplateFile, TemplatePath,
};

/// Random writes, write-zeroes and trims over an overlay of `size` bytes.
fn scribble(ov: &Overlay, seed: u64, ops: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let size = ov.size();
    let bs = u64::from(ov.block_size());
    for _ in 0..ops {
        let off = rng.gen_range(0..size);
        let len = rng.gen_range(0..=(size - off).min(5 * bs));
        match rng.gen_range(0..6) {
            0..=2 => {
                let mut buf = vec![0u8; len as usize];
                fill_pattern(&mut buf, rng.gen());
                ov.write_at(&buf, off).unwrap();
            }
            3 => ov.write_at(&vec![0u8; len as usize], off).unwrap(),
            4 => ov.write_zeroes(off, len, rng.gen()).unwrap(),
            _ => ov.trim(off, len).unwrap(),
        }
    }
}

/// An overlay's block status as its exported diff says it: allocated zeroes become zero runs
/// (holes), merged with their neighbours.
fn as_diff(st: Vec<RangeStatus>) -> Vec<RangeStatus> {
    let mut out: Vec<RangeStatus> = Vec::new();
    for mut s in st {
        if s.contents == Contents::Zeroes {
            s.contents = Contents::Hole;
        }
        match out.last_mut() {
            Some(l) if l.contents == s.contents && l.changed == s.changed => l.len += s.len,
            _ => out.push(s),
        }
    }
    out
}

fn round_trip(bs: u32, size: usize, seed: u64) {
    let template = template_bytes(size, seed);
    let (tfile, base) = template_file(&template);
    let dir = tempfile::tempdir().unwrap();
    let opts = OverlayOptions {
        block_size: bs,
        ..OverlayOptions::default()
    };
    let ov = Overlay::create(base.clone(), &dir.path().join("cache"), opts).unwrap();
    scribble(&ov, seed, 400);
    ov.flush().unwrap();
    ov.freeze();
    assert!(matches!(ov.write_at(&[1], 0), Err(BlockError::Shutdown)));
    assert!(matches!(ov.trim(0, 1), Err(BlockError::Shutdown)));
    assert_eq!(
        ov.write_zeroes(0, 1, true).unwrap_err().errno(),
        libc::ESHUTDOWN
    );
    let expect = read_all(&ov);

    let data_path = dir.path().join("diff.data");
    let map = ov.export_diff(&data_path).unwrap();
    assert_eq!(map.size, size as u64);
    assert_eq!(map.block_size, bs);
    map.validate().unwrap();
    // Ascending, maximal runs; data packed back to back; every run matches the overlay's state.
    let mut packed = 0;
    for (i, run) in map.runs.iter().enumerate() {
        if let Some(prev) = i.checked_sub(1).map(|p| map.runs[p]) {
            assert!(prev.end() <= run.offset);
            let same_kind = std::mem::discriminant(&prev.kind) == std::mem::discriminant(&run.kind);
            assert!(prev.end() < run.offset || !same_kind, "runs not maximal");
        }
        let want = match run.kind {
            DiffKind::Data { data_offset } => {
                assert_eq!(data_offset, packed);
                packed += run.len;
                Contents::Data
            }
            // Zero blocks and blocks zeroed in place (allocated zeroes) alike.
            DiffKind::Zero => Contents::Hole,
        };
        let st = as_diff(ov.block_status(run.offset, run.len).unwrap());
        assert_eq!(
            st,
            vec![RangeStatus {
                len: run.len,
                contents: want,
                changed: true
            }],
            "{run:?}"
        );
    }
    assert_eq!(std::fs::metadata(&data_path).unwrap().len(), packed);
    assert_eq!(map.data_len(), packed);
    let covered: u64 = map.runs.iter().map(|r| r.len).sum();
    let stats = ov.stats();
    assert!(covered <= (stats.blocks_data + stats.blocks_zero) * u64::from(bs));

    // Exporting again to the same path is refused (O_EXCL), and leaves the first export alone.
    assert!(ov.export_diff(&data_path).is_err());
    assert_eq!(std::fs::metadata(&data_path).unwrap().len(), packed);

    // Apply onto a copy of the template.
    let copy = dir.path().join("copy.img");
    std::fs::copy(tfile.path(), &copy).unwrap();
    let target = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
    let data = std::fs::File::open(&data_path).unwrap();
    map.apply_to(&data, &target).unwrap();
    drop(target);
    assert_same(&std::fs::read(&copy).unwrap(), &expect, "template + diff");

    // A diff layer over the template reads the same, in whole and in pieces.
    let layer = DiffLayer::open(base.clone(), map.clone(), &data_path).unwrap();
    assert!(layer.is_read_only());
    assert!(matches!(layer.write_at(&[0], 0), Err(BlockError::ReadOnly)));
    assert_same(&read_all(&layer), &expect, "diff layer");
    assert_eq!(
        layer.block_status(0, size as u64).unwrap(),
        as_diff(ov.block_status(0, size as u64).unwrap())
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    for _ in 0..300 {
        let off = rng.gen_range(0..size as u64);
        let len = rng.gen_range(0..=(size as u64 - off).min(3 * u64::from(bs)));
        let mut buf = vec![0u8; len as usize];
        layer.read_at(&mut buf, off).unwrap();
        assert_same(
            &buf,
            &expect[off as usize..(off + len) as usize],
            "diff layer piece",
        );
        assert_eq!(
            layer.block_status(off, len).unwrap(),
            as_diff(ov.block_status(off, len).unwrap())
        );
    }

    // Resume: a new overlay stacked on the diff layer starts where the old one stopped.
    let layer: Arc<dyn BlockDevice> = Arc::new(layer);
    let resumed = Overlay::create(layer, &dir.path().join("cache2"), opts).unwrap();
    assert_same(&read_all(&resumed), &expect, "resumed overlay");
    resumed.write_at(&[0xab; 10], 5).unwrap();
    let mut b = [0u8; 10];
    resumed.read_at(&mut b, 5).unwrap();
    assert_eq!(b, [0xab; 10]);

    // The template itself never changed.
    assert_same(&std::fs::read(tfile.path()).unwrap(), &template, "template");
}

#[test]
fn round_trip_4k() {
    round_trip(4096, 3 << 20, 1);
}

#[test]
fn round_trip_512_odd_size() {
    round_trip(512, (1 << 20) + 777, 2);
}

#[test]
fn round_trip_64k() {
    round_trip(65536, (4 << 20) - 4096, 3);
}

#[test]
fn export_of_untouched_overlay_is_empty() {
    let (_t, base) = template_file(&template_bytes(1 << 20, 4));
    let dir = tempfile::tempdir().unwrap();
    let ov = Overlay::create(base, &dir.path().join("c"), OverlayOptions::default()).unwrap();
    let map = ov.export_diff(&dir.path().join("d")).unwrap();
    assert!(map.runs.is_empty());
    assert_eq!(std::fs::metadata(dir.path().join("d")).unwrap().len(), 0);
}

#[test]
fn diff_layer_rejects_mismatched_inputs() {
    let (tfile, _) = template_file(&template_bytes(1 << 20, 5));
    let base: Arc<dyn BlockDevice> =
        Arc::new(TemplateFile::open(&TemplatePath::new(tfile.path())).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, vec![1u8; 4096]).unwrap();
    let run = |offset, len, data_offset| rootfork_block::DiffRun {
        offset,
        len,
        kind: DiffKind::Data { data_offset },
    };
    let map = |size, runs| DiffMap {
        size,
        block_size: 4096,
        runs,
    };
    let err = |m: DiffMap| DiffLayer::open(base.clone(), m, &data).unwrap_err().errno();
    assert_eq!(err(map(1 << 19, vec![])), libc::EINVAL);
    assert_eq!(err(map(1 << 20, vec![run(0, 8192, 0)])), libc::EINVAL);
    assert_eq!(
        err(map(1 << 20, vec![run(4096, 4096, 0), run(0, 4096, 0)])),
        libc::EINVAL
    );
    let ok = DiffLayer::open(base.clone(), map(1 << 20, vec![run(4096, 4096, 0)]), &data).unwrap();
    let mut b = [0u8; 2];
    ok.read_at(&mut b, 4095).unwrap();
    assert_eq!(b[1], 1);
    assert!(matches!(
        ok.read_at(&mut b, (1 << 20) - 1),
        Err(BlockError::OutOfRange { .. })
    ));
}
