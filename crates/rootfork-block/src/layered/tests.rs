//! Tests of the layered format end to end: import, layers, merge against a model, and refusal of
//! every kind of damaged or mismatched build.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;

use super::*;
use crate::device::{BlockDevice, BlockState};

const BS: u64 = 4096;

fn opts() -> BuildOptions {
    BuildOptions {
        block_size: BS as u32,
        chunk_size: 16 * 1024,
    }
}

/// Writes `image` as a file with the all-zero 64 KiB stretches left as holes.
fn write_sparse(path: &std::path::Path, image: &[u8]) {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(image.len() as u64).unwrap();
    for (i, c) in image.chunks(65536).enumerate() {
        if c.iter().any(|&b| b != 0) {
            f.write_all_at(c, (i * 65536) as u64).unwrap();
        }
    }
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut out = vec![0u8; dev.size() as usize];
    dev.read_at(&mut out, 0).unwrap();
    out
}

fn sample_image(size: usize) -> Vec<u8> {
    let mut img = vec![0u8; size];
    for (i, b) in img.iter_mut().enumerate() {
        // Data in some blocks, zero blocks in others, one hole-sized zero stretch.
        let block = i / BS as usize;
        if block % 3 != 1 && !(40..60).contains(&block) {
            *b = (i % 251) as u8 | 1;
        }
    }
    img
}

#[test]
fn import_is_sparse_and_exact() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample_image(300 * 1024 + 100);
    let path = dir.path().join("img");
    write_sparse(&path, &img);
    let store = LocalStore::new(dir.path().join("store"));
    let map = store.import_image(&path, opts()).unwrap();
    let nonzero = img
        .chunks(BS as usize)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64;
    // The last partial block is data too; data_len counts its real length.
    assert!(map.header.data_len <= nonzero * BS);
    assert!(map.header.data_len > (nonzero - 1) * BS);
    let t = store.open(&map.header.id).unwrap();
    assert_eq!(t.size(), img.len() as u64);
    assert_eq!(read_all(&t), img);
    let ext = t.extents(0, t.size()).unwrap();
    assert_eq!(ext[0].state, BlockState::Data);
    assert_eq!(ext[1].state, BlockState::Zero);
    assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), t.size());
    // Unaligned reads across run boundaries.
    let mut buf = vec![0u8; 10_000];
    t.read_at(&mut buf, 3 * BS - 17).unwrap();
    assert_eq!(buf, img[(3 * BS - 17) as usize..][..10_000]);
    assert!(t.read_at(&mut buf, t.size() - 1).is_err());
    assert!(t.write_at(&buf, 0).is_err());
}

fn data_diff(
    runs: &[(u64, Vec<u8>)],
    zeros: &[(u64, u64)],
) -> (Vec<(u64, u64, DiffSource)>, MemData) {
    let mut all: Vec<(u64, u64, Option<&Vec<u8>>)> = runs
        .iter()
        .map(|(o, d)| (*o, d.len() as u64, Some(d)))
        .collect();
    all.extend(zeros.iter().map(|&(o, l)| (o, l, None)));
    all.sort_by_key(|r| r.0);
    let mut data = Vec::new();
    let mut out = Vec::new();
    for (o, l, d) in all {
        match d {
            Some(d) => {
                out.push((o, l, DiffSource::Data(data.len() as u64)));
                data.extend_from_slice(d);
            }
            None => out.push((o, l, DiffSource::Zero)),
        }
    }
    (out, MemData(data))
}

#[test]
fn layers_merge_and_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = sample_image(256 * 1024);
    let path = dir.path().join("img");
    write_sparse(&path, &model);
    let store = LocalStore::new(dir.path().join("store"));
    let base = store.import_image(&path, opts()).unwrap();
    let (runs, data) = data_diff(
        &[
            (BS, vec![7u8; 2 * BS as usize]),
            (100 * 1024, vec![9u8; 5000]),
        ],
        &[(200 * 1024, 3 * BS)],
    );
    let diff = LayerDiff {
        size: model.len() as u64,
        runs,
        data: &data,
    };
    let l1 = store.create_layer(&base.header.id, &diff).unwrap();
    model[BS as usize..3 * BS as usize].fill(7);
    model[100 * 1024..100 * 1024 + 5000].fill(9);
    model[200 * 1024..200 * 1024 + 3 * BS as usize].fill(0);
    assert_eq!(l1.header.generation, 1);
    assert_eq!(l1.header.parent, Some(base.header.id));
    assert_eq!(l1.lineage, vec![l1.header.id, base.header.id]);
    assert_eq!(read_all(&store.open(&l1.header.id).unwrap()), model);
    // The base is unchanged.
    let base_t = store.open(&base.header.id).unwrap();
    assert_ne!(read_all(&base_t), model);
    // A zero-only layer referencing no own data still opens.
    let (runs, data) = data_diff(&[], &[(0, model.len() as u64)]);
    let diff = LayerDiff {
        size: model.len() as u64,
        runs,
        data: &data,
    };
    let l2 = store.create_layer(&l1.header.id, &diff).unwrap();
    assert_eq!(l2.mapping.runs().len(), 1);
    assert!(read_all(&store.open(&l2.header.id).unwrap())
        .iter()
        .all(|&b| b == 0));
}

/// A layer of `runs` (data in `data`) over `parent`, on a device of `size` bytes.
fn layer_over(
    store: &LocalStore,
    parent: &BuildId,
    size: u64,
    runs: Vec<(u64, u64, DiffSource)>,
    data: &MemData,
) -> BuildMap {
    store
        .create_layer(parent, &LayerDiff { size, runs, data })
        .unwrap()
}

#[test]
fn a_layer_grows_the_device_with_zeros_past_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample_image(256 * 1024);
    let path = dir.path().join("img");
    write_sparse(&path, &img);
    let store = LocalStore::new(dir.path().join("store"));
    let base = store.import_image(&path, opts()).unwrap();
    let grown = img.len() as u64 + 16 * BS;
    // One write straddling the old end, one past it.
    let (runs, data) = data_diff(
        &[
            (img.len() as u64 - BS, vec![3u8; 2 * BS as usize]),
            (grown - BS, vec![4u8; BS as usize]),
        ],
        &[],
    );
    let l1 = layer_over(&store, &base.header.id, grown, runs, &data);
    assert_eq!(l1.header.size, grown);
    let mut model = img.clone();
    model.resize(grown as usize, 0);
    let end = img.len();
    model[end - BS as usize..end + BS as usize].fill(3);
    model[grown as usize - BS as usize..].fill(4);
    assert_eq!(read_all(&store.open(&l1.header.id).unwrap()), model);
    // A layer over the grown one keeps its size; it opens with the smaller base below.
    let (runs, data) = data_diff(&[(0, vec![8u8; BS as usize])], &[]);
    let l2 = layer_over(&store, &l1.header.id, grown, runs, &data);
    model[..BS as usize].fill(8);
    assert_eq!(read_all(&store.open(&l2.header.id).unwrap()), model);
}

#[test]
fn block_status_flags_what_the_layers_changed_against_the_base() {
    use crate::status::{Contents, RangeStatus};
    let dir = tempfile::tempdir().unwrap();
    // sample_image: block 1 (mod 3) and blocks 40..60 are zero, the rest data.
    let img = sample_image(256 * 1024);
    let path = dir.path().join("img");
    write_sparse(&path, &img);
    let store = LocalStore::new(dir.path().join("store"));
    let base = store.import_image(&path, opts()).unwrap();
    let status = |t: &LayeredTemplate, block: u64| -> RangeStatus {
        t.block_status(block * BS, BS).unwrap()[0]
    };
    let bt = store.open(&base.header.id).unwrap();
    assert!(!status(&bt, 0).changed && status(&bt, 0).contents == Contents::Data);
    assert!(!status(&bt, 1).changed && status(&bt, 1).contents == Contents::Hole);
    // Data over block 3, zeroes over block 0 (data in the base) and block 4 (zero in the base),
    // and the device grown by two blocks.
    let grown = img.len() as u64 + 2 * BS;
    let (runs, data) = data_diff(
        &[(3 * BS, vec![7u8; BS as usize])],
        &[(0, BS), (4 * BS, BS)],
    );
    let l1 = layer_over(&store, &base.header.id, grown, runs, &data);
    // One more layer on top: the base's view goes through the whole chain.
    let (runs, data) = data_diff(&[(6 * BS, vec![8u8; BS as usize])], &[]);
    let l2 = layer_over(&store, &l1.header.id, grown, runs, &data);
    let t = store.open(&l2.header.id).unwrap();
    let want = [
        (0, Contents::Hole, true),
        (1, Contents::Hole, false),
        (2, Contents::Data, false),
        (3, Contents::Data, true),
        (4, Contents::Hole, false),
        (6, Contents::Data, true),
        (grown / BS - 1, Contents::Hole, true),
    ];
    for (block, contents, changed) in want {
        let s = status(&t, block);
        assert_eq!(
            (s.contents, s.changed),
            (contents, changed),
            "block {block}"
        );
    }
    // The runs cover the whole device, in order.
    let all = t.block_status(0, grown).unwrap();
    assert_eq!(all.iter().map(|r| r.len).sum::<u64>(), grown);
}

#[test]
fn flattening_a_chain_serves_the_same_bytes_from_one_layer_over_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = sample_image(256 * 1024);
    let path = dir.path().join("img");
    write_sparse(&path, &model);
    let store = LocalStore::new(dir.path().join("store"));
    let base = store.import_image(&path, opts()).unwrap();
    let mut top = base.header.id;
    for g in 1..=5u8 {
        let at = u64::from(g) * 7 * BS;
        let (runs, data) = data_diff(
            &[(at, vec![g; 3 * BS as usize])],
            &[((u64::from(g) * 5 + 30) * BS, BS)],
        );
        let layer = layer_over(&store, &top, model.len() as u64, runs, &data);
        model[at as usize..(at + 3 * BS) as usize].fill(g);
        let z = ((u64::from(g) * 5 + 30) * BS) as usize;
        model[z..z + BS as usize].fill(0);
        top = layer.header.id;
    }
    let flat = store.flatten(&top, &base.header.id).unwrap();
    assert_eq!(flat.header.generation, 1);
    assert_eq!(flat.lineage, vec![flat.header.id, base.header.id]);
    let t = store.open(&flat.header.id).unwrap();
    assert_eq!(read_all(&t), model);
    // Only what the layers decided was copied: the base's own data stays in the base.
    assert!(flat.header.data_len <= 5 * 3 * BS);
    // Not an ancestor: refused.
    assert!(matches!(
        store.flatten(&base.header.id, &top),
        Err(LayerError::InvalidDiff(_))
    ));
}

fn store_with_layer() -> (tempfile::TempDir, LocalStore, BuildMap, BuildMap) {
    let dir = tempfile::tempdir().unwrap();
    let img = sample_image(256 * 1024);
    let path = dir.path().join("img");
    write_sparse(&path, &img);
    let store = LocalStore::new(dir.path().join("store"));
    let base = store.import_image(&path, opts()).unwrap();
    let (runs, data) = data_diff(&[(0, vec![5u8; 64 * 1024])], &[]);
    let diff = LayerDiff {
        size: img.len() as u64,
        runs,
        data: &data,
    };
    let l1 = store.create_layer(&base.header.id, &diff).unwrap();
    (dir, store, base, l1)
}

#[test]
fn corrupt_data_chunk_is_eio_only_for_that_chunk() {
    let (_d, store, base, _l1) = store_with_layer();
    let path = store.data_path(&base.header.id);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // Flip one byte in the second checksum chunk of the base's data.
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 16 * 1024 + 5).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, 16 * 1024 + 5).unwrap();
    let t = store.open(&base.header.id).unwrap();
    // Find the device offset that maps to data offset 16 KiB + 5.
    let target = t
        .mapping()
        .runs()
        .iter()
        .find_map(|r| match r.kind {
            RunKind::Data { data_offset, .. }
                if data_offset <= 16 * 1024 + 5 && data_offset + r.len > 16 * 1024 + 5 =>
            {
                Some(r.offset + (16 * 1024 + 5 - data_offset))
            }
            _ => None,
        })
        .unwrap();
    let mut buf = [0u8; 1];
    // Another byte in the same chunk fails too (the whole chunk is verified).
    let err = t.read_at(&mut buf, target).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    let err = t.read_at(&mut buf, target).unwrap_err();
    assert_eq!(
        err.errno(),
        libc::EIO,
        "a failed chunk never becomes readable"
    );
    // The first chunk still reads.
    t.read_at(&mut buf, 0).unwrap();
}

#[test]
fn damaged_maps_are_refused() {
    let (_d, store, base, l1) = store_with_layer();
    let path = store.map_path(&l1.header.id);
    let good = fs::read(&path).unwrap();
    let mut bad = good.clone();
    bad[0] = b'X';
    fs::write(&path, &bad).unwrap();
    assert!(matches!(
        store.open(&l1.header.id),
        Err(LayerError::BadMagic { .. })
    ));
    let mut bad = good.clone();
    bad[8] = 9;
    fs::write(&path, &bad).unwrap();
    assert!(matches!(
        store.open(&l1.header.id),
        Err(LayerError::UnsupportedVersion { found: 9, .. })
    ));
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 7] ^= 1;
    fs::write(&path, &bad).unwrap();
    assert!(matches!(
        store.open(&l1.header.id),
        Err(LayerError::MapChecksum { .. })
    ));
    fs::write(&path, &good).unwrap();
    store.open(&l1.header.id).unwrap();
    // Truncated data.
    let dpath = store.data_path(&base.header.id);
    let f = OpenOptions::new().write(true).open(&dpath).unwrap();
    f.set_len(base.header.data_len - 1).unwrap();
    assert!(matches!(
        store.open(&l1.header.id),
        Err(LayerError::DataLength { .. })
    ));
    // Missing parent.
    fs::remove_dir_all(store.build_dir(&base.header.id)).unwrap();
    assert!(
        matches!(store.open(&l1.header.id), Err(LayerError::MissingBuild(id)) if id == base.header.id)
    );
}

#[test]
fn wrong_parent_is_refused() {
    let (d, store, base, l1) = store_with_layer();
    // Another base imported from the same image, then moved into the first base's place.
    let other = store.import_image(&d.path().join("img"), opts()).unwrap();
    let b = store.build_dir(&base.header.id);
    fs::remove_dir_all(&b).unwrap();
    fs::rename(store.build_dir(&other.header.id), &b).unwrap();
    assert!(matches!(
        store.open(&l1.header.id),
        Err(LayerError::WrongBuild { .. })
    ));
    // A layer of another lineage placed under the parent's id.
    let (runs, data) = data_diff(&[], &[(0, BS)]);
    let diff = LayerDiff {
        size: l1.header.size,
        runs,
        data: &data,
    };
    assert!(
        store.create_layer(&l1.header.id, &diff).is_err(),
        "parent chain is broken"
    );
}

#[test]
fn bad_diffs_and_geometry_are_refused_without_leftovers() {
    let (_d, store, base, _l1) = store_with_layer();
    let data = MemData(vec![1; 8192]);
    let size = base.header.size;
    let cases = vec![
        (
            size,
            vec![(4096, 4096, DiffSource::Zero), (0, 4096, DiffSource::Zero)],
        ),
        (
            size,
            vec![(0, 8192, DiffSource::Zero), (4096, 4096, DiffSource::Zero)],
        ),
        (size, vec![(size - 4096, 8192, DiffSource::Zero)]),
        (size, vec![(0, 4096, DiffSource::Data(8000))]),
        (size, vec![(0, 0, DiffSource::Zero)]),
    ];
    for (sz, runs) in cases {
        let diff = LayerDiff {
            size: sz,
            runs,
            data: &data,
        };
        assert!(matches!(
            store.create_layer(&base.header.id, &diff),
            Err(LayerError::InvalidDiff(_))
        ));
    }
    // Smaller than the parent: a layer never shrinks the device.
    let diff = LayerDiff {
        size: size - 4096,
        runs: vec![],
        data: &data,
    };
    assert!(matches!(
        store.create_layer(&base.header.id, &diff),
        Err(LayerError::Geometry { .. })
    ));
    let names: Vec<_> = fs::read_dir(store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "only the two committed builds remain: {names:?}"
    );
    let _ = std::io::stdout().flush();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random chains of layers read back exactly like a byte model, at every generation.
    #[test]
    fn chains_match_model(
        layers in proptest::collection::vec(
            proptest::collection::vec((0u64..64, 1u64..6, any::<u8>(), any::<bool>()), 0..8),
            1..7,
        )
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = sample_image(64 * BS as usize);
        let path = dir.path().join("img");
        write_sparse(&path, &model);
        let store = LocalStore::new(dir.path().join("store"));
        let mut top = store.import_image(&path, opts()).unwrap().header.id;
        for writes in layers {
            // Apply in order to a block-state model, then export ascending runs.
            let mut blocks: Vec<Option<Option<u8>>> = vec![None; 64];
            for (b, n, v, zero) in writes {
                for blk in b..(b + n).min(64) {
                    blocks[blk as usize] = Some(if zero { None } else { Some(v) });
                }
            }
            let mut data = Vec::new();
            let mut runs = Vec::new();
            for (i, s) in blocks.iter().enumerate() {
                let off = i as u64 * BS;
                match s {
                    None => {}
                    Some(None) => {
                        runs.push((off, BS, DiffSource::Zero));
                        model[off as usize..(off + BS) as usize].fill(0);
                    }
                    Some(Some(v)) => {
                        runs.push((off, BS, DiffSource::Data(data.len() as u64)));
                        data.extend_from_slice(&[*v; BS as usize]);
                        model[off as usize..(off + BS) as usize].fill(*v);
                    }
                }
            }
            let data = MemData(data);
            let diff = LayerDiff { size: model.len() as u64, runs, data: &data };
            let m = store.create_layer(&top, &diff).unwrap();
            // Normalised: no two neighbours could be one run.
            for w in m.mapping.runs().windows(2) {
                let joinable = match (w[0].kind, w[1].kind) {
                    (RunKind::Zero, RunKind::Zero) => true,
                    (RunKind::Data { build: a, data_offset: x }, RunKind::Data { build: b, data_offset: y }) => a == b && x + w[0].len == y,
                    _ => false,
                };
                prop_assert!(!joinable);
            }
            top = m.header.id;
            let t = store.open(&top).unwrap();
            prop_assert_eq!(read_all(&t), model.clone());
        }
    }
}

#[test]
fn concurrent_reads_verify_once_and_agree() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample_image(512 * 1024);
    let path = dir.path().join("img");
    write_sparse(&path, &img);
    let store = LocalStore::new(dir.path().join("store"));
    let base = store.import_image(&path, opts()).unwrap();
    let t = std::sync::Arc::new(store.open(&base.header.id).unwrap());
    let img = std::sync::Arc::new(img);
    let threads: Vec<_> = (0..4u64)
        .map(|seed| {
            let (t, img) = (t.clone(), img.clone());
            std::thread::spawn(move || {
                let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..500 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = x % (img.len() as u64 - 1);
                    let len = (x >> 40) % 20_000 + 1;
                    let len = len.min(img.len() as u64 - off) as usize;
                    let mut buf = vec![0u8; len];
                    t.read_at(&mut buf, off).unwrap();
                    assert_eq!(buf, img[off as usize..off as usize + len]);
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
}

/// A resolver holding maps in memory, for a chain too deep to write.
struct Maps(Vec<BuildMap>);

impl BuildResolver for Maps {
    fn map(&self, id: &BuildId) -> LayerResult<BuildMap> {
        self.0
            .iter()
            .find(|m| m.header.id == *id)
            .cloned()
            .ok_or(LayerError::MissingBuild(*id))
    }

    fn data(&self, _map: &BuildMap) -> LayerResult<std::sync::Arc<dyn BuildData>> {
        Ok(std::sync::Arc::new(MemData(Vec::new())))
    }
}

#[test]
fn a_layer_past_the_generation_limit_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path().join("store"));
    let size = 16 * BS;
    let deepest = format::MAX_GENERATIONS - 1;
    let lineage: Vec<BuildId> = (0..=deepest).map(|_| BuildId::random()).collect();
    let top = BuildMap {
        header: BuildHeader {
            block_size: BS as u32,
            size,
            generation: deepest,
            id: lineage[0],
            parent: Some(lineage[1]),
            data_len: 0,
            chunk_size: opts().chunk_size,
        },
        lineage,
        mapping: Mapping::new(
            size,
            vec![MapRun {
                offset: 0,
                len: size,
                kind: RunKind::Zero,
            }],
        )
        .unwrap(),
        chunk_crcs: Vec::new(),
    };
    let id = top.header.id;
    let base_id = *top.lineage.last().unwrap();
    let base = BuildMap {
        header: BuildHeader {
            generation: 0,
            id: base_id,
            parent: None,
            ..top.header.clone()
        },
        lineage: vec![base_id],
        mapping: top.mapping.clone(),
        chunk_crcs: Vec::new(),
    };
    let builds = Maps(vec![top, base]);
    // The deepest chain a map may hold still opens...
    assert!(LayeredTemplate::open(&builds, &id).is_ok());
    // ... and a layer over it is refused, leaving nothing behind.
    let data = MemData(vec![1; BS as usize]);
    let e = store
        .create_layer_over(
            &builds,
            &id,
            &LayerDiff {
                size,
                runs: vec![(0, BS, DiffSource::Data(0))],
                data: &data,
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, LayerError::TooManyGenerations { generation, .. } if generation == deepest),
        "{e}"
    );
    assert!(!store.root().exists() || fs::read_dir(store.root()).unwrap().next().is_none());
}
