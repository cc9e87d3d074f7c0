//! Property test: an overlay behaves exactly like a byte array (plus a per-block state model)
//! under long random sequences of reads, writes, write-zeroes, trims, flushes, extent and block
//! status queries at arbitrary offsets and lengths, for 512 B, 4 KiB and 64 KiB blocks. Block
//! status must name blocks zeroed in place as allocated zeroes and everything written as changed.
//!
//! `PROPTEST_CASES` sets the cases per block size (default 4; each case runs 1000-3000 ops).

mod common;

use common::*;
use proptest::prelude::*;
use rootfork_block::{
    BlockDevice, BlockState, Durability, Overlay, OverlayOptions, TemplateFile, TemplatePath,
};

#[derive(Debug, Clone)]
enum Op {
    Read { off: u64, len: u64 },
    Write { off: u64, len: u64, fill: Fill },
    Zeroes { off: u64, len: u64, punch: bool },
    Trim { off: u64, len: u64 },
    Flush,
    Extents { off: u64, len: u64 },
    Status { off: u64, len: u64 },
}

#[derive(Debug, Clone, Copy)]
enum Fill {
    Random(u64),
    Zero,
    /// Zeroes except one byte, to catch "almost zero" blocks taken for zero.
    OneByte(u64),
}

impl Fill {
    fn bytes(self, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        match self {
            Fill::Random(seed) => fill_pattern(&mut v, seed),
            Fill::Zero => {}
            Fill::OneByte(at) => {
                if len > 0 {
                    v[(at % len) as usize] = 0x5a;
                }
            }
        }
        v
    }
}

/// An (offset, length) inside a device of `size` bytes, often block-aligned.
fn range(size: u64, bs: u64, max_blocks: u64) -> impl Strategy<Value = (u64, u64)> {
    (0..size, 0..=max_blocks * bs, any::<u8>()).prop_map(move |(off, len, align)| {
        let (off, len) = match align % 4 {
            // Aligned start and length.
            0 => ((off / bs) * bs, (len / bs).max(1) * bs),
            // Aligned start, any length.
            1 => ((off / bs) * bs, len),
            // Short, anywhere.
            2 => (off, len % (bs + 3)),
            _ => (off, len),
        };
        let off = off.min(size);
        (off, len.min(size - off))
    })
}

fn op(size: u64, bs: u64, max_blocks: u64) -> impl Strategy<Value = Op> {
    let fill = prop_oneof![
        6 => any::<u64>().prop_map(Fill::Random),
        2 => Just(Fill::Zero),
        1 => any::<u64>().prop_map(Fill::OneByte),
    ];
    prop_oneof![
        5 => range(size, bs, max_blocks).prop_map(|(off, len)| Op::Read { off, len }),
        6 => (range(size, bs, max_blocks), fill).prop_map(|((off, len), fill)| Op::Write { off, len, fill }),
        2 => (range(size, bs, max_blocks), any::<bool>()).prop_map(|((off, len), punch)| Op::Zeroes { off, len, punch }),
        1 => range(size, bs, max_blocks).prop_map(|(off, len)| Op::Trim { off, len }),
        1 => Just(Op::Flush),
        1 => range(size, bs, max_blocks).prop_map(|(off, len)| Op::Extents { off, len }),
        1 => range(size, bs, max_blocks).prop_map(|(off, len)| Op::Status { off, len }),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// Runs `ops` against an overlay of a template and the model, checking as it goes.
fn run(bs: u32, size: u64, durability: Durability, ops: &[Op]) {
    let template = template_bytes(size as usize, 0xfeed ^ u64::from(bs));
    let (tfile, base) = template_file(&template);
    let dir = tempfile::tempdir().unwrap();
    let opts = OverlayOptions {
        block_size: bs,
        durability,
        keep_cache: false,
        quota: None,
        disk_size: None,
        // The 4 KiB run also persists its state: that must not change what it reads.
        persist_state: bs == 4096,
    };
    let ov = Overlay::create(base.clone(), &dir.path().join("cache"), opts).unwrap();
    let mut model = Model::new(&template, bs);
    let template_status = |off, len| base.block_status(off, len).unwrap();

    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                ov.read_at(&mut buf, off).unwrap();
                assert_same(&buf, model.read(off, len), &format!("op {i}: {op:?}"));
            }
            Op::Write { off, len, fill } => {
                let data = fill.bytes(len);
                ov.write_at(&data, off).unwrap();
                model.write(off, &data);
            }
            Op::Zeroes { off, len, punch } => {
                ov.write_zeroes(off, len, punch).unwrap();
                model.zero(off, len, punch);
            }
            Op::Trim { off, len } => {
                ov.trim(off, len).unwrap();
                model.zero(off, len, true);
            }
            Op::Flush => ov.flush().unwrap(),
            Op::Extents { off, len } => {
                assert_eq!(
                    ov.extents(off, len).unwrap(),
                    model.extents(off, len),
                    "op {i}: {op:?}"
                );
            }
            Op::Status { off, len } => {
                assert_eq!(
                    ov.block_status(off, len).unwrap(),
                    model.status(off, len, template_status),
                    "op {i}: {op:?}"
                );
            }
        }
    }

    assert_same(&read_all(&ov), &model.data, "final contents");
    assert_eq!(
        ov.extents(0, size).unwrap(),
        model.extents(0, size),
        "final extents"
    );
    assert_eq!(
        ov.block_status(0, size).unwrap(),
        model.status(0, size, template_status),
        "final block status"
    );
    let stats = ov.stats();
    assert_eq!(stats.blocks_absent, model.count(BlockState::Absent));
    assert_eq!(stats.blocks_data, model.count(BlockState::Data));
    assert_eq!(stats.blocks_zero, model.count(BlockState::Zero));
    assert_eq!(stats.bytes_written, model.written);

    // With blocks of at least a page, every block that is not data is a hole in the cache.
    if bs >= 4096 {
        let cache = TemplateFile::open(&TemplatePath::new(ov.cache_path())).unwrap();
        let mut pos = 0;
        for e in cache.extents(0, size).unwrap() {
            if e.state == BlockState::Data {
                for b in pos / u64::from(bs)..(pos + e.len).div_ceil(u64::from(bs)) {
                    assert_eq!(
                        model.states[b as usize],
                        BlockState::Data,
                        "block {b} is allocated in the cache but not data"
                    );
                }
            }
            pos += e.len;
        }
    }
    // The template is untouched.
    assert_same(&std::fs::read(tfile.path()).unwrap(), &template, "template");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn model_512(ops in prop::collection::vec(op(61 * 512 + 100, 512, 6), 1000..3000)) {
        run(512, 61 * 512 + 100, Durability::Ephemeral, &ops);
    }

    #[test]
    fn model_4k(ops in prop::collection::vec(op(50 * 4096 - 1000, 4096, 5), 1000..3000)) {
        run(4096, 50 * 4096 - 1000, Durability::Durable, &ops);
    }

    #[test]
    fn model_64k(ops in prop::collection::vec(op(20 * 65536 + 4096, 65536, 3), 1000..2000)) {
        run(65536, 20 * 65536 + 4096, Durability::Ephemeral, &ops);
    }
}
