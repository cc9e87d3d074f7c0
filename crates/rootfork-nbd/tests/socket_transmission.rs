//! Raw-socket conformance tests of the transmission phase: every command, flag and error path,
//! in simple, structured and extended framing, plus connection-level behaviour (multi-conn,
//! vanishing clients, draining, shutdown, TCP).

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rootfork_block::BlockDevice;
use rootfork_nbd::consts::*;
use rootfork_nbd::meta::{BASE_ALLOCATION, ROOTFORK_OVERLAY, STATE_OVERLAY_WRITTEN};
use rootfork_nbd::testing::MemDevice;
use rootfork_nbd::{Op, ServeOptions};

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[0..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[0..8].try_into().unwrap())
}

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
}

fn write(c: &mut Raw, cookie: u64, offset: u64, data: &[u8], flags: u16) {
    c.req(CMD_WRITE, flags, cookie, offset, data.len() as u64);
    c.send(data);
}

/// Block status descriptors per context id.
fn block_status(c: &mut Raw) -> Vec<(u32, Vec<(u64, u32)>)> {
    let mut out = Vec::new();
    for ch in c.chunks() {
        let p = &ch.payload;
        let id = be32(p);
        let mut d = Vec::new();
        if c.extended {
            assert_eq!(ch.ty, REPLY_TYPE_BLOCK_STATUS_EXT);
            let n = be32(&p[4..]) as usize;
            for i in 0..n {
                let at = 8 + 16 * i;
                d.push((be64(&p[at..]), be64(&p[at + 8..]) as u32));
            }
        } else {
            assert_eq!(ch.ty, REPLY_TYPE_BLOCK_STATUS);
            for i in 0..(p.len() - 4) / 8 {
                let at = 4 + 8 * i;
                d.push((u64::from(be32(&p[at..])), be32(&p[at + 4..])));
            }
        }
        out.push((id, d));
    }
    out
}

#[test]
fn simple_replies_read_write_flush_trim_zeroes_cache() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.go("disk", false, false, &[]);
    let data = pattern(3, 8192);
    write(&mut c, 1, 4096, &data, CMD_FLAG_FUA);
    assert_eq!(c.simple(), (0, 1));
    c.req(CMD_READ, 0, 2, 4096, 8192);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.read_n(8192), data);
    c.req(CMD_TRIM, 0, 3, 4096, 4096);
    assert_eq!(c.simple(), (0, 3));
    c.req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 4, 8192, 4096);
    assert_eq!(c.simple(), (0, 4));
    c.req(CMD_READ, 0, 5, 4096, 8192);
    assert_eq!(c.simple(), (0, 5));
    assert!(c.read_n(8192).iter().all(|&b| b == 0));
    c.req(CMD_CACHE, 0, 6, 0, SIZE);
    assert_eq!(c.simple(), (0, 6));
    c.req(CMD_FLUSH, 0, 7, 0, 0);
    assert_eq!(c.simple(), (0, 7));
    c.req(CMD_DISC, 0, 8, 0, 0);
    assert!(c.at_eof());
}

#[test]
fn invalid_requests_get_the_spec_errno_and_keep_sync() {
    let opts = ServeOptions {
        min_block_size: 512,
        max_payload: 65536,
        max_write_payload: 65536,
        ..Default::default()
    };
    let f = fixture_with(opts, Arc::new(MemDevice::new(SIZE, 4096)));
    let mut c = Raw::connect(&f.path);
    c.go("disk", false, false, &[]);
    // Unknown command.
    c.req(42, 0, 1, 0, 512);
    assert_eq!(c.simple(), (EINVAL, 1));
    // Unknown flag, and flags on commands that do not take them.
    c.req(CMD_READ, 1 << 9, 2, 0, 512);
    assert_eq!(c.simple(), (EINVAL, 2));
    c.req(CMD_READ, CMD_FLAG_DF, 3, 0, 512);
    assert_eq!(c.simple(), (EINVAL, 3), "DF needs structured replies");
    c.req(CMD_READ, CMD_FLAG_FUA, 4, 0, 512);
    assert_eq!(c.simple(), (EINVAL, 4));
    // Out of range: ENOSPC for writes (payload consumed) and write-zeroes, EINVAL for reads,
    // trims (also on overflow of u64) and cache, as the protocol says.
    c.req(CMD_READ, 0, 5, SIZE - 512, 1024);
    assert_eq!(c.simple(), (EINVAL, 5));
    write(&mut c, 6, SIZE, &[9u8; 512], 0);
    assert_eq!(c.simple(), (ENOSPC, 6));
    c.req(CMD_TRIM, 0, 7, u64::MAX - 511, 512);
    assert_eq!(c.simple(), (EINVAL, 7));
    c.req(CMD_CACHE, 0, 8, SIZE, 512);
    assert_eq!(c.simple(), (EINVAL, 8));
    c.req(CMD_TRIM, 0, 80, SIZE - 512, 1024);
    assert_eq!(c.simple(), (EINVAL, 80));
    c.req(CMD_WRITE_ZEROES, 0, 81, SIZE - 512, 1024);
    assert_eq!(c.simple(), (ENOSPC, 81));
    // Misaligned against the advertised minimum of 512.
    c.req(CMD_READ, 0, 9, 100, 512);
    assert_eq!(c.simple(), (EINVAL, 9));
    write(&mut c, 10, 0, &[1u8; 100], 0);
    assert_eq!(c.simple(), (EINVAL, 10));
    // Over the maximum: a read gets EOVERFLOW, a write EINVAL (the protocol keeps EOVERFLOW
    // for commands without payload); the write's payload is still consumed.
    c.req(CMD_READ, 0, 11, 0, 131072);
    assert_eq!(c.simple(), (EOVERFLOW, 11));
    write(&mut c, 12, 0, &vec![7u8; 131072], 0);
    assert_eq!(c.simple(), (EINVAL, 12));
    // Zero length.
    c.req(CMD_READ, 0, 13, 0, 0);
    assert_eq!(c.simple(), (EINVAL, 13));
    // Block status with no context negotiated.
    c.req(CMD_BLOCK_STATUS, 0, 14, 0, 512);
    assert_eq!(c.simple(), (EINVAL, 14));
    // FAST_ZERO with NO_HOLE: rootfork's devices zero without moving data, so it succeeds
    // (`qemu-io -c 'write -z -n 0 1M'` sends exactly this).
    write(&mut c, 150, 0, &[3u8; 1024], 0);
    assert_eq!(c.simple(), (0, 150));
    c.req(
        CMD_WRITE_ZEROES,
        CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
        15,
        0,
        512,
    );
    assert_eq!(c.simple(), (0, 15));
    c.req(CMD_READ, 0, 151, 0, 1024);
    assert_eq!(c.simple(), (0, 151));
    let mut want = vec![0u8; 512];
    want.extend([3u8; 512]);
    assert_eq!(c.read_n(1024), want);
    // After all that the stream is still in sync.
    write(&mut c, 16, 0, &[5u8; 512], 0);
    assert_eq!(c.simple(), (0, 16));
    c.req(CMD_READ, 0, 17, 0, 512);
    assert_eq!(c.simple(), (0, 17));
    assert_eq!(c.read_n(512), vec![5u8; 512]);
    let s = f.server.stats();
    assert_eq!(s.op(Op::Rejected).count, 16);
    assert_eq!(s.refused_too_large, 2);
    assert_eq!(s.op(Op::WriteZeroes).errors, 0);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.go("ro", false, false, &[]);
    write(&mut c, 1, 0, &[1u8; 512], 0);
    assert_eq!(c.simple(), (EPERM, 1));
    c.req(CMD_TRIM, 0, 2, 0, 512);
    assert_eq!(c.simple(), (EPERM, 2));
    c.req(CMD_WRITE_ZEROES, 0, 3, 0, 512);
    assert_eq!(c.simple(), (EPERM, 3));
    c.req(CMD_READ, 0, 4, 0, 4);
    assert_eq!(c.simple(), (0, 4));
    assert_eq!(c.read_n(4), vec![0x5a; 4]);
}

#[test]
fn device_errors_map_to_eio() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.go("disk", true, false, &[]);
    f.dev.set_failing(true);
    c.req(CMD_READ, 0, 1, 0, 4096);
    assert_eq!(c.status(), (EIO, 1));
    write(&mut c, 2, 0, &[1u8; 4096], 0);
    assert_eq!(c.status(), (EIO, 2));
    c.req(CMD_FLUSH, 0, 3, 0, 0);
    assert_eq!(c.status(), (EIO, 3));
    f.dev.set_failing(false);
    c.req(CMD_FLUSH, 0, 4, 0, 0);
    assert_eq!(c.status(), (0, 4));
}

fn structured_reads(extended: bool) {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.go("disk", true, extended, &[]);
    let data = pattern(9, 16384);
    write(&mut c, 1, 0, &data, 0);
    assert_eq!(c.status(), (0, 1));
    c.req(CMD_WRITE_ZEROES, 0, 2, 4096, 4096);
    assert_eq!(c.status(), (0, 2));
    // A read over data, zeroes, data: the zero block comes as a hole.
    c.req(CMD_READ, 0, 3, 0, 16384);
    let (got, types) = c.read_data(0, 16384);
    let mut want = data.clone();
    want[4096..8192].fill(0);
    assert_eq!(got, want);
    assert_eq!(
        types,
        vec![
            REPLY_TYPE_OFFSET_DATA,
            REPLY_TYPE_OFFSET_HOLE,
            REPLY_TYPE_OFFSET_DATA
        ]
    );
    // With DF, one data chunk.
    c.req(CMD_READ, CMD_FLAG_DF, 4, 0, 16384);
    let (got, types) = c.read_data(0, 16384);
    assert_eq!(got, want);
    assert_eq!(types, vec![REPLY_TYPE_OFFSET_DATA]);
    // Unwritten blocks of a device without backing are holes too.
    c.req(CMD_READ, 0, 5, 65536, 8192);
    let (got, types) = c.read_data(65536, 8192);
    assert!(got.iter().all(|&b| b == 0));
    assert_eq!(types, vec![REPLY_TYPE_OFFSET_HOLE]);
    // Errors as structured error chunks.
    c.req(CMD_READ, 0, 6, SIZE, 4096);
    assert_eq!(c.status(), (EINVAL, 6));
    c.req(99, 0, 7, 0, 0);
    assert_eq!(c.status(), (EINVAL, 7));
}

#[test]
fn structured_reads_with_holes() {
    structured_reads(false);
}

#[test]
fn extended_reads_with_holes() {
    structured_reads(true);
}

fn block_status_contexts(extended: bool) {
    let base = Arc::new(MemDevice::read_only(vec![1u8; SIZE as usize], 4096));
    let dev = Arc::new(MemDevice::over(base, 4096));
    let f = fixture_with(ServeOptions::default(), dev);
    let mut c = Raw::connect(&f.path);
    c.go("disk", true, extended, &[BASE_ALLOCATION, ROOTFORK_OVERLAY]);
    write(&mut c, 1, 8192, &[3u8; 4096], 0);
    assert_eq!(c.status(), (0, 1));
    c.req(CMD_TRIM, 0, 2, 12288, 4096);
    assert_eq!(c.status(), (0, 2));
    c.req(CMD_BLOCK_STATUS, 0, 3, 0, 32768);
    let st = block_status(&mut c);
    assert_eq!(st.len(), 2);
    let (alloc, overlay) = (&st[0].1, &st[1].1);
    // Template blocks are data (the backing device says so), the written block data, the
    // trimmed block a zero hole.
    assert_eq!(
        alloc,
        &vec![(12288, 0), (4096, STATE_HOLE | STATE_ZERO), (16384, 0)]
    );
    assert_eq!(
        overlay,
        &vec![(8192, 0), (8192, STATE_OVERLAY_WRITTEN), (16384, 0)]
    );
    // REQ_ONE: one descriptor per context.
    c.req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4, 8192, 16384);
    let st = block_status(&mut c);
    assert_eq!(st[0].1, vec![(4096, 0)]);
    assert_eq!(st[1].1, vec![(8192, STATE_OVERLAY_WRITTEN)]);
    c.req(CMD_BLOCK_STATUS, 0, 5, SIZE - 4096, 8192);
    assert_eq!(c.status(), (EINVAL, 5));
    // Reads of absent blocks come from the template as data.
    c.req(CMD_READ, 0, 6, 0, 4096);
    let (got, types) = c.read_data(0, 4096);
    assert_eq!(got, vec![1u8; 4096]);
    assert_eq!(types, vec![REPLY_TYPE_OFFSET_DATA]);
}

#[test]
fn block_status_structured() {
    block_status_contexts(false);
}

#[test]
fn block_status_extended() {
    block_status_contexts(true);
}

#[test]
fn extended_headers_carry_64_bit_lengths_and_payload_len_flag() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.go("disk", true, true, &[]);
    // A write that says PAYLOAD_LEN explicitly.
    write(&mut c, 1, 0, &[4u8; 4096], CMD_FLAG_PAYLOAD_LEN);
    assert_eq!(c.status(), (0, 1));
    // A 64-bit length beyond 4 GiB: rejected as too large for a read, beyond the end (EINVAL)
    // for a trim.
    c.req(CMD_READ, 0, 2, 0, 1 << 33);
    assert_eq!(c.status(), (EOVERFLOW, 2));
    c.req(CMD_TRIM, 0, 3, 0, 1 << 33);
    assert_eq!(c.status(), (EINVAL, 3));
    // PAYLOAD_LEN on a command that takes no payload: rejected, the payload skipped.
    c.req(CMD_FLUSH, CMD_FLAG_PAYLOAD_LEN, 4, 0, 10);
    c.send(&[0u8; 10]);
    assert_eq!(c.status(), (EINVAL, 4));
    c.req(CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(c.status(), (0, 5));
    // A compact header after extended headers were negotiated: sync is lost, the server closes.
    c.extended = false;
    c.req(CMD_FLUSH, 0, 6, 0, 0);
    assert!(c.at_eof());
}

#[test]
fn out_of_order_replies_under_load() {
    let dev = Arc::new(MemDevice::new(SIZE, 4096));
    let f = fixture_with(
        ServeOptions {
            workers: 4,
            ..Default::default()
        },
        dev,
    );
    f.dev.set_delay(Duration::from_millis(2));
    let mut c = Raw::connect(&f.path);
    c.go("disk", false, false, &[]);
    let mut out = Vec::new();
    for i in 0..100u64 {
        out.extend(rootfork_nbd::request::encode_header(
            &rootfork_nbd::request::RequestHeader {
                flags: 0,
                kind: CMD_WRITE,
                cookie: i,
                offset: i * 4096,
                length: 4096,
            },
            false,
        ));
        out.extend(vec![i as u8; 4096]);
    }
    c.send(&out);
    let mut cookies: Vec<u64> = (0..100)
        .map(|_| c.simple())
        .map(|(e, k)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, (0..100).collect::<Vec<_>>());
    let mut b = [0u8; 4096];
    f.dev.set_delay(Duration::ZERO);
    f.dev.read_at(&mut b, 99 * 4096).unwrap();
    assert!(b.iter().all(|&x| x == 99));
}

#[test]
fn multi_conn_writes_visible_across_connections_after_flush() {
    let f = fixture();
    let mut a = Raw::connect(&f.path);
    a.go("disk", false, false, &[]);
    let mut b = Raw::connect(&f.path);
    b.go("disk", true, false, &[]);
    write(&mut a, 1, 0, &[8u8; 4096], 0);
    assert_eq!(a.simple(), (0, 1));
    b.req(CMD_FLUSH, 0, 2, 0, 0);
    assert_eq!(b.status(), (0, 2));
    b.req(CMD_READ, 0, 3, 0, 4096);
    assert_eq!(b.read_data(0, 4096).0, vec![8u8; 4096]);
}

#[test]
fn client_vanishing_mid_payload_leaves_others_unaffected() {
    let f = fixture();
    let mut good = Raw::connect(&f.path);
    good.go("disk", false, false, &[]);
    {
        let mut bad = Raw::connect(&f.path);
        bad.go("disk", false, false, &[]);
        bad.req(CMD_WRITE, 0, 1, 0, 1 << 20);
        bad.send(&[1u8; 1000]);
        // Also leave a half header behind.
        bad.s.write_all(&[0x25, 0x60]).unwrap();
    }
    for _ in 0..200 {
        if f.server.connections() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        f.server.connections(),
        1,
        "the vanished client's connection was freed"
    );
    assert_eq!(f.server.in_flight(), 0);
    let mut b = [9u8; 1000];
    f.dev.read_at(&mut b, 0).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "a partial payload is never written"
    );
    write(&mut good, 2, 0, &[2u8; 512], 0);
    assert_eq!(good.simple(), (0, 2));
}

#[test]
fn drain_then_shutdown() {
    let f = fixture();
    let mut c = Raw::connect(&f.path);
    c.go("disk", true, false, &[]);
    f.dev.set_delay(Duration::from_millis(300));
    write(&mut c, 1, 0, &[6u8; 4096], 0);
    for _ in 0..100 {
        if f.server.in_flight() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f.server.drain();
    c.req(CMD_READ, 0, 2, 0, 4096);
    let mut r = vec![c.status(), c.status()];
    r.sort_by_key(|x| x.1);
    assert_eq!(r, vec![(0, 1), (ESHUTDOWN, 2)]);
    f.dev.set_delay(Duration::ZERO);
    f.server.shutdown(Duration::from_secs(2));
    assert!(c.at_eof());
    assert!(!f.path.exists());
}

#[test]
fn tcp_listener_serves_too() {
    let f = fixture();
    let addr = f.server.listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::Read;
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    o.extend_from_slice(&4u32.to_be_bytes());
    o.extend_from_slice(b"disk");
    s.write_all(&o).unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    assert_eq!(be64(&r), SIZE);
}
