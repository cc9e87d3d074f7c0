//! Block status through a stack: template, overlay, and a resumed sandbox's overlay over a
//! `DiffLayer` (template + paused diff). Every range written, zeroed or trimmed in any layer is
//! changed; only ranges that read exactly as the template are not; zeroes written without
//! punching are allocated zeroes, punched ones and the diff's zero runs holes.

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rootfork_block::{
    BlockDevice, Contents, DiffKind, DiffLayer, DiffMap, Overlay, OverlayOptions, RangeStatus,
    TemplateFile, TemplatePath,
};

const BS: u64 = 4096;

fn st(len: u64, contents: Contents, changed: bool) -> RangeStatus {
    RangeStatus {
        len,
        contents,
        changed,
    }
}

/// A 64-block template: data, except blocks 16..32, which are a hole in the file.
fn holey_template() -> (tempfile::NamedTempFile, Arc<TemplateFile>, Vec<u8>) {
    let mut bytes = vec![0u8; 64 * BS as usize];
    fill_pattern(&mut bytes[..16 * BS as usize], 11);
    fill_pattern(&mut bytes[32 * BS as usize..], 12);
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(bytes.len() as u64).unwrap();
    use std::os::unix::fs::FileExt;
    f.as_file()
        .write_all_at(&bytes[..16 * BS as usize], 0)
        .unwrap();
    f.as_file()
        .write_all_at(&bytes[32 * BS as usize..], 32 * BS)
        .unwrap();
    let t = TemplateFile::open(&TemplatePath::new(f.path())).unwrap();
    (f, Arc::new(t), bytes)
}

fn overlay(base: Arc<dyn BlockDevice>, dir: &tempfile::TempDir, name: &str) -> Overlay {
    Overlay::create(base, &dir.path().join(name), OverlayOptions::default()).unwrap()
}

/// Freezes `ov`, exports its diff and returns a fresh overlay over template + diff, as a resume.
fn resume(
    ov: &Overlay,
    template: Arc<dyn BlockDevice>,
    dir: &tempfile::TempDir,
    name: &str,
) -> (Overlay, DiffMap) {
    ov.freeze();
    let data = dir.path().join(format!("{name}.data"));
    let map = ov.export_diff(&data).unwrap();
    let layer = DiffLayer::open(template, map.clone(), &data).unwrap();
    (overlay(Arc::new(layer), dir, name), map)
}

#[test]
fn a_fresh_overlay_reports_the_template_unchanged() {
    let (_f, t, _) = holey_template();
    let want = vec![
        st(16 * BS, Contents::Data, false),
        st(16 * BS, Contents::Hole, false),
        st(32 * BS, Contents::Data, false),
    ];
    assert_eq!(t.block_status(0, 64 * BS).unwrap(), want);
    let dir = tempfile::tempdir().unwrap();
    let ov = overlay(t, &dir, "c");
    assert_eq!(ov.block_status(0, 64 * BS).unwrap(), want);
    // A range inside a run, unaligned.
    assert_eq!(
        ov.block_status(15 * BS + 7, BS).unwrap(),
        vec![
            st(BS - 7, Contents::Data, false),
            st(7, Contents::Hole, false)
        ]
    );
}

#[test]
fn writes_zeroes_and_trims_in_an_overlay_are_changes() {
    let (_f, t, _) = holey_template();
    let dir = tempfile::tempdir().unwrap();
    let ov = overlay(t, &dir, "c");
    ov.write_at(&[7u8; BS as usize], BS).unwrap();
    ov.write_zeroes(4 * BS, 2 * BS, false).unwrap();
    ov.write_zeroes(8 * BS, BS, true).unwrap();
    ov.trim(10 * BS, BS).unwrap();
    ov.write_at(&[0u8; BS as usize], 12 * BS).unwrap();
    ov.write_at(&[1u8; 10], 20 * BS + 5).unwrap();
    assert_eq!(
        ov.block_status(0, 64 * BS).unwrap(),
        vec![
            st(BS, Contents::Data, false),
            st(BS, Contents::Data, true),
            st(2 * BS, Contents::Data, false),
            st(2 * BS, Contents::Zeroes, true),
            st(2 * BS, Contents::Data, false),
            st(BS, Contents::Hole, true),
            st(BS, Contents::Data, false),
            st(BS, Contents::Hole, true),
            st(BS, Contents::Data, false),
            st(BS, Contents::Hole, true),
            st(3 * BS, Contents::Data, false),
            st(4 * BS, Contents::Hole, false),
            st(BS, Contents::Data, true),
            st(11 * BS, Contents::Hole, false),
            st(32 * BS, Contents::Data, false),
        ]
    );
    // The allocated zeroes read as zeroes; overwriting one block makes it data again.
    let mut buf = vec![1u8; 2 * BS as usize];
    ov.read_at(&mut buf, 4 * BS).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    ov.write_at(&[3u8; 100], 5 * BS + 1).unwrap();
    assert_eq!(
        ov.block_status(4 * BS, 2 * BS).unwrap(),
        vec![st(BS, Contents::Zeroes, true), st(BS, Contents::Data, true)]
    );
    // Allocated zeroes are data to the read path's extents (the cache holds them).
    assert_eq!(
        ov.extents(4 * BS, BS).unwrap()[0].state,
        rootfork_block::BlockState::Data
    );
}

#[test]
fn a_resumed_overlay_reports_the_paused_diff_as_changed() {
    let (_f, t, _) = holey_template();
    let template: Arc<dyn BlockDevice> = t;
    let dir = tempfile::tempdir().unwrap();
    let first = overlay(template.clone(), &dir, "first");
    first.write_at(&[7u8; 2 * BS as usize], 2 * BS).unwrap();
    first.write_zeroes(6 * BS, BS, true).unwrap();
    first.write_zeroes(8 * BS, 2 * BS, false).unwrap();
    first.write_at(&[9u8; BS as usize], 20 * BS).unwrap();
    let (resumed, map) = resume(&first, template.clone(), &dir, "second");
    // The NO_HOLE zeroes went into the diff as a zero run.
    assert_eq!(
        map.runs
            .iter()
            .map(|r| (r.offset / BS, r.len / BS, r.kind == DiffKind::Zero))
            .collect::<Vec<_>>(),
        vec![(2, 2, false), (6, 1, true), (8, 2, true), (20, 1, false)]
    );
    let paused = vec![
        st(2 * BS, Contents::Data, false),
        st(2 * BS, Contents::Data, true),
        st(2 * BS, Contents::Data, false),
        st(BS, Contents::Hole, true),
        st(BS, Contents::Data, false),
        st(2 * BS, Contents::Hole, true),
        st(6 * BS, Contents::Data, false),
        st(4 * BS, Contents::Hole, false),
        st(BS, Contents::Data, true),
        st(11 * BS, Contents::Hole, false),
        st(32 * BS, Contents::Data, false),
    ];
    assert_eq!(resumed.block_status(0, 64 * BS).unwrap(), paused);
    assert_eq!(
        resumed.backing().unwrap().block_status(0, 64 * BS).unwrap(),
        paused
    );

    // Changes in the new overlay on top: data over a diff zero run, a trim over a diff data run,
    // allocated zeroes over the template, and a write of what the template holds there.
    resumed.write_at(&[5u8; BS as usize], 6 * BS).unwrap();
    resumed.trim(3 * BS, BS).unwrap();
    resumed.write_zeroes(40 * BS, 2 * BS, false).unwrap();
    let mut same = vec![0u8; BS as usize];
    template.read_at(&mut same, 50 * BS).unwrap();
    resumed.write_at(&same, 50 * BS).unwrap();
    assert_eq!(
        resumed.block_status(0, 64 * BS).unwrap(),
        vec![
            st(2 * BS, Contents::Data, false),
            st(BS, Contents::Data, true),
            st(BS, Contents::Hole, true),
            st(2 * BS, Contents::Data, false),
            st(BS, Contents::Data, true),
            st(BS, Contents::Data, false),
            st(2 * BS, Contents::Hole, true),
            st(6 * BS, Contents::Data, false),
            st(4 * BS, Contents::Hole, false),
            st(BS, Contents::Data, true),
            st(11 * BS, Contents::Hole, false),
            st(8 * BS, Contents::Data, false),
            st(2 * BS, Contents::Zeroes, true),
            st(8 * BS, Contents::Data, false),
            // Written, even if with the template's own bytes: it may differ.
            st(BS, Contents::Data, true),
            st(13 * BS, Contents::Data, false),
        ]
    );

    // Paused again, the second diff stacked on the first (two diff layers over the template):
    // the union of both pauses' changes is changed, nothing else.
    let under: Arc<dyn BlockDevice> =
        Arc::new(DiffLayer::open(template.clone(), map, &dir.path().join("second.data")).unwrap());
    let (again, _) = resume(&resumed, under, &dir, "third");
    let changed: Vec<(u64, u64)> = {
        let mut pos = 0;
        let mut v = Vec::new();
        for s in again.block_status(0, 64 * BS).unwrap() {
            match v.last_mut() {
                Some((at, n)) if s.changed && *at + *n == pos / BS => *n += s.len / BS,
                _ if s.changed => v.push((pos / BS, s.len / BS)),
                _ => {}
            }
            pos += s.len;
        }
        v
    };
    assert_eq!(
        changed,
        vec![(2, 2), (6, 1), (8, 2), (20, 1), (40, 2), (50, 1)]
    );
}

/// The expected status of a `DiffLayer` of `map` over `template`, from the map alone.
fn layer_status(template: &dyn BlockDevice, map: &DiffMap, off: u64, len: u64) -> Vec<RangeStatus> {
    let mut out = Vec::new();
    let end = off + len;
    let mut pos = off;
    for r in &map.runs {
        if r.end() <= pos || r.offset >= end {
            continue;
        }
        if r.offset > pos {
            for s in template.block_status(pos, r.offset - pos).unwrap() {
                push_status(&mut out, s);
            }
            pos = r.offset;
        }
        let stop = r.end().min(end);
        let contents = match r.kind {
            DiffKind::Data { .. } => Contents::Data,
            DiffKind::Zero => Contents::Hole,
        };
        push_status(&mut out, st(stop - pos, contents, true));
        pos = stop;
    }
    if pos < end {
        for s in template.block_status(pos, end - pos).unwrap() {
            push_status(&mut out, s);
        }
    }
    out
}

/// Random changes before a pause and after the resume: block status of every queried range
/// matches the model, unchanged bytes read as the template and zero runs read as zeroes.
fn stacked_model(seed: u64, bs: u32) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (_f, t, tbytes) = holey_template();
    let template: Arc<dyn BlockDevice> = t;
    let size = template.size();
    let dir = tempfile::tempdir().unwrap();
    let opts = OverlayOptions {
        block_size: bs,
        ..OverlayOptions::default()
    };
    let first = Overlay::create(template.clone(), &dir.path().join("a"), opts).unwrap();
    // One random change to `ov`, applied to `model` too when there is one.
    let ops = |ov: &Overlay, model: Option<&mut Model>, rng: &mut rand::rngs::StdRng| {
        let off = rng.gen_range(0..size);
        let len = rng.gen_range(0..=(size - off).min(6 * u64::from(bs)));
        let (buf, punch) = match rng.gen_range(0..5) {
            0 | 1 => {
                let mut buf = vec![0u8; len as usize];
                if rng.gen_bool(0.8) {
                    fill_pattern(&mut buf, rng.gen());
                }
                ov.write_at(&buf, off).unwrap();
                (Some(buf), false)
            }
            2 | 3 => {
                let punch = rng.gen();
                ov.write_zeroes(off, len, punch).unwrap();
                (None, punch)
            }
            _ => {
                ov.trim(off, len).unwrap();
                (None, true)
            }
        };
        match (model, buf) {
            (Some(m), Some(buf)) => m.write(off, &buf),
            (Some(m), None) => m.zero(off, len, punch),
            (None, _) => {}
        }
    };
    for _ in 0..60 {
        ops(&first, None, &mut rng);
    }
    first.freeze();
    let data = dir.path().join("a.data");
    let map = first.export_diff(&data).unwrap();
    let layer: Arc<dyn BlockDevice> =
        Arc::new(DiffLayer::open(template.clone(), map.clone(), &data).unwrap());
    let resumed = Overlay::create(layer.clone(), &dir.path().join("b"), opts).unwrap();
    let mut model = Model::new(&read_all(&*layer), bs);
    let base = |off, len| layer_status(&*template, &map, off, len);
    for i in 0..200 {
        if i % 3 != 2 {
            ops(&resumed, Some(&mut model), &mut rng);
            continue;
        }
        let off = rng.gen_range(0..size);
        let len = rng.gen_range(1..=size - off);
        assert_eq!(
            resumed.block_status(off, len).unwrap(),
            model.status(off, len, base),
            "seed {seed} op {i}: {off}+{len}"
        );
    }
    let all = resumed.block_status(0, size).unwrap();
    assert_eq!(all, model.status(0, size, base), "seed {seed}");
    let contents = read_all(&resumed);
    let mut pos = 0usize;
    for s in all {
        let r = pos..pos + s.len as usize;
        if !s.changed {
            assert_same(&contents[r.clone()], &tbytes[r.clone()], "unchanged range");
        }
        if s.contents != Contents::Data {
            assert!(contents[r].iter().all(|&b| b == 0), "seed {seed}: zero run");
        }
        pos += s.len as usize;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn stacked_status_matches_the_model(seed in any::<u64>(), big in any::<bool>()) {
        stacked_model(seed, if big { 16384 } else { 4096 });
    }
}
