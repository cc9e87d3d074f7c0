//! Both metadata contexts over real devices, on the wire: a template file with a hole, a
//! sandbox's overlay on it, and a resumed sandbox's overlay over template + the exported diff.
//! `rootfork:overlay` must flag everything written before the pause; `base:allocation` must
//! report zeroes written with `NO_HOLE` as `ZERO` (allocated) and punched ones, trims and the
//! diff's zero runs as `HOLE|ZERO`.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::Raw;
use rootfork_block::{BlockDevice, DiffLayer, Overlay, OverlayOptions, TemplateFile, TemplatePath};
use rootfork_nbd::consts::*;
use rootfork_nbd::meta::{BASE_ALLOCATION, ROOTFORK_OVERLAY, STATE_OVERLAY_WRITTEN};
use rootfork_nbd::{Export, ServeOptions, Server};

const K: u64 = 1024;
const SIZE: u64 = 256 * K;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[0..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[0..8].try_into().unwrap())
}

/// BLOCK_STATUS of the whole device: (base:allocation, rootfork:overlay) descriptors.
#[allow(clippy::type_complexity)]
fn status(c: &mut Raw, cookie: u64) -> (Vec<(u64, u32)>, Vec<(u64, u32)>) {
    c.req(CMD_BLOCK_STATUS, 0, cookie, 0, SIZE);
    let mut by_id = std::collections::BTreeMap::new();
    for ch in c.chunks() {
        assert_eq!(ch.cookie, cookie);
        let p = &ch.payload;
        let mut d = Vec::new();
        if c.extended {
            for i in 0..be32(&p[4..]) as usize {
                let at = 8 + 16 * i;
                d.push((be64(&p[at..]), be64(&p[at + 8..]) as u32));
            }
        } else {
            for i in 0..(p.len() - 4) / 8 {
                let at = 4 + 8 * i;
                d.push((u64::from(be32(&p[at..])), be32(&p[at + 4..])));
            }
        }
        by_id.insert(be32(p), d);
    }
    // Ids in the order the contexts were asked for: base:allocation first.
    let mut v = by_id.into_values();
    (v.next().unwrap(), v.next().unwrap())
}

fn serve(dir: &tempfile::TempDir, name: &str, dev: Arc<dyn BlockDevice>) -> (Server, Raw, Raw) {
    let path = dir.path().join(format!("{name}.sock"));
    let server = Server::new(ServeOptions::default());
    server
        .add_export(Export {
            name: "disk".into(),
            description: String::new(),
            device: dev,
        })
        .unwrap();
    server.listen_unix(&path).unwrap();
    let mut structured = Raw::connect(&path);
    structured.go("disk", true, false, &[BASE_ALLOCATION, ROOTFORK_OVERLAY]);
    let mut extended = Raw::connect(&path);
    extended.go("disk", true, true, &[BASE_ALLOCATION, ROOTFORK_OVERLAY]);
    (server, structured, extended)
}

#[test]
fn contexts_through_a_pause_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    // Template: data, with a hole from 64 KiB to 128 KiB.
    let tpath = dir.path().join("template.img");
    let f = std::fs::File::create(&tpath).unwrap();
    f.set_len(SIZE).unwrap();
    f.write_all_at(&[0x11; 64 * K as usize], 0).unwrap();
    f.write_all_at(&[0x22; 128 * K as usize], 128 * K).unwrap();
    drop(f);
    let template: Arc<dyn BlockDevice> =
        Arc::new(TemplateFile::open(&TemplatePath::new(&tpath)).unwrap());
    let first = Arc::new(
        Overlay::create(
            template.clone(),
            &dir.path().join("first.cache"),
            OverlayOptions::default(),
        )
        .unwrap(),
    );

    let (server, mut c, mut x) = serve(&dir, "first", first.clone());
    c.req(CMD_WRITE, 0, 1, 8 * K, 8 * K);
    c.send(&[7u8; 8 * K as usize]);
    assert_eq!(c.status(), (0, 1));
    c.req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 2, 16 * K, 8 * K);
    assert_eq!(c.status(), (0, 2));
    c.req(CMD_WRITE_ZEROES, 0, 3, 24 * K, 4 * K);
    assert_eq!(c.status(), (0, 3));
    c.req(CMD_TRIM, 0, 4, 80 * K, 4 * K);
    assert_eq!(c.status(), (0, 4));
    let written = vec![
        (8 * K, 0),
        (20 * K, STATE_OVERLAY_WRITTEN),
        (52 * K, 0),
        (4 * K, STATE_OVERLAY_WRITTEN),
        (172 * K, 0),
    ];
    for (raw, cookie) in [(&mut c, 5), (&mut x, 6)] {
        let (alloc, overlay) = status(raw, cookie);
        assert_eq!(
            alloc,
            vec![
                (16 * K, 0),
                // NO_HOLE zeroes: known zeroes, still allocated.
                (8 * K, STATE_ZERO),
                (4 * K, STATE_HOLE | STATE_ZERO),
                (36 * K, 0),
                (64 * K, STATE_HOLE | STATE_ZERO),
                (128 * K, 0),
            ],
            "extended {}",
            raw.extended
        );
        assert_eq!(overlay, written, "extended {}", raw.extended);
    }
    drop((c, x));
    server.shutdown(std::time::Duration::from_secs(5));

    // Pause: freeze and export; resume: a fresh overlay over template + diff.
    first.freeze();
    let data = dir.path().join("paused.data");
    let map = first.export_diff(&data).unwrap();
    let layer = Arc::new(DiffLayer::open(template, map, &data).unwrap());
    let resumed = Arc::new(
        Overlay::create(
            layer,
            &dir.path().join("resumed.cache"),
            OverlayOptions::default(),
        )
        .unwrap(),
    );
    let (server, mut c, mut x) = serve(&dir, "resumed", resumed);
    for (raw, cookie) in [(&mut c, 7), (&mut x, 8)] {
        let (alloc, overlay) = status(raw, cookie);
        assert_eq!(
            alloc,
            vec![
                (16 * K, 0),
                // The diff's zero run (NO_HOLE zeroes and the punched block): nothing allocated.
                (12 * K, STATE_HOLE | STATE_ZERO),
                (36 * K, 0),
                (64 * K, STATE_HOLE | STATE_ZERO),
                (128 * K, 0),
            ],
            "extended {}",
            raw.extended
        );
        // Everything written before the pause still differs from the template.
        assert_eq!(overlay, written, "extended {}", raw.extended);
    }
    // NO_HOLE zeroes in the resumed overlay, over template data.
    c.req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 9, 160 * K, 8 * K);
    assert_eq!(c.status(), (0, 9));
    let (alloc, overlay) = status(&mut x, 10);
    assert_eq!(
        alloc,
        vec![
            (16 * K, 0),
            (12 * K, STATE_HOLE | STATE_ZERO),
            (36 * K, 0),
            (64 * K, STATE_HOLE | STATE_ZERO),
            (32 * K, 0),
            (8 * K, STATE_ZERO),
            (88 * K, 0),
        ]
    );
    assert_eq!(
        overlay,
        vec![
            (8 * K, 0),
            (20 * K, STATE_OVERLAY_WRITTEN),
            (52 * K, 0),
            (4 * K, STATE_OVERLAY_WRITTEN),
            (76 * K, 0),
            (8 * K, STATE_OVERLAY_WRITTEN),
            (88 * K, 0),
        ]
    );
    // The data written before the pause reads back.
    c.req(CMD_READ, 0, 11, 8 * K, 4 * K);
    let (got, _) = c.read_data(8 * K, 4 * K as usize);
    assert_eq!(got, vec![7u8; 4 * K as usize]);
    drop((c, x));
    server.shutdown(std::time::Duration::from_secs(5));
}
