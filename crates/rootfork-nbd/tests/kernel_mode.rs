//! Kernel-mode tests: requests sent over a socketpair exactly as the Linux `nbd` driver sends
//! them (compact headers, 512-aligned, many in flight, simple replies expected).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use rootfork_block::BlockDevice;
use rootfork_nbd::consts::*;
use rootfork_nbd::kernel::{transmission_flags, KernelConnection};
use rootfork_nbd::request::{encode_header, RequestHeader};
use rootfork_nbd::testing::MemDevice;
use rootfork_nbd::{Op, ServeOptions};

const SIZE: u64 = 1 << 20;

fn req(kind: u16, flags: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    encode_header(
        &RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        },
        false,
    )
}

/// Reads one simple reply; returns (errno, cookie).
fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut b = [0u8; 16];
    s.read_exact(&mut b).unwrap();
    assert_eq!(
        u32::from_be_bytes(b[0..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes(b[4..8].try_into().unwrap()),
        u64::from_be_bytes(b[8..16].try_into().unwrap()),
    )
}

fn setup(dev: Arc<MemDevice>) -> (UnixStream, KernelConnection) {
    let (ours, kernel) = UnixStream::pair().unwrap();
    kernel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let conn = KernelConnection::spawn(ours, dev, ServeOptions::default()).unwrap();
    (kernel, conn)
}

#[test]
fn flags_for_writable_and_read_only_devices() {
    let rw = MemDevice::new(SIZE, 4096);
    let f = transmission_flags(&rw);
    assert_ne!(f & TFLAG_HAS_FLAGS, 0);
    assert_ne!(f & TFLAG_SEND_FLUSH, 0);
    assert_ne!(f & TFLAG_SEND_FUA, 0);
    assert_ne!(f & TFLAG_SEND_TRIM, 0);
    assert_ne!(f & TFLAG_SEND_WRITE_ZEROES, 0);
    assert_ne!(f & TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(f & TFLAG_READ_ONLY, 0);
    assert_eq!(
        f & TFLAG_SEND_DF,
        0,
        "DF needs structured replies, which the kernel lacks"
    );
    let ro = MemDevice::read_only(vec![0; 4096], 4096);
    let f = transmission_flags(&ro);
    assert_ne!(f & TFLAG_READ_ONLY, 0);
    assert_eq!(f & TFLAG_SEND_TRIM, 0);
}

#[test]
fn pipelined_writes_reads_flush_trim_zeroes_disc() {
    let dev = Arc::new(MemDevice::new(SIZE, 4096));
    let (mut k, conn) = setup(Arc::clone(&dev));
    // 64 writes in flight at once, each 4 KiB with its own pattern, some with FUA.
    let mut out = Vec::new();
    for i in 0..64u64 {
        let flags = if i % 8 == 0 { CMD_FLAG_FUA } else { 0 };
        out.extend(req(CMD_WRITE, flags, 1000 + i, i * 4096, 4096));
        out.extend(std::iter::repeat_n(i as u8 + 1, 4096));
    }
    k.write_all(&out).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..64 {
        let (err, cookie) = reply(&mut k);
        assert_eq!(err, 0);
        assert!(seen.insert(cookie));
    }
    assert_eq!(seen.len(), 64);
    assert!(dev.flushes() >= 8, "FUA writes flush");
    // Read them all back, pipelined; replies may come in any order.
    let mut out = Vec::new();
    for i in 0..64u64 {
        out.extend(req(CMD_READ, 0, 5000 + i, i * 4096, 4096));
    }
    k.write_all(&out).unwrap();
    for _ in 0..64 {
        let (err, cookie) = reply(&mut k);
        assert_eq!(err, 0);
        let i = cookie - 5000;
        let mut data = vec![0u8; 4096];
        k.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|&b| b == i as u8 + 1), "block {i}");
    }
    // FLUSH as the kernel sends it (its flush request's sector may be garbage).
    k.write_all(&req(CMD_FLUSH, 0, 7, u64::MAX << 9, 0))
        .unwrap();
    assert_eq!(reply(&mut k), (0, 7));
    // TRIM and WRITE_ZEROES (with NO_HOLE, as the kernel sends for REQ_NOUNMAP).
    k.write_all(&req(CMD_TRIM, 0, 8, 0, 8192)).unwrap();
    assert_eq!(reply(&mut k), (0, 8));
    k.write_all(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 9, 8192, 4096))
        .unwrap();
    assert_eq!(reply(&mut k), (0, 9));
    let mut b = vec![1u8; 12288];
    dev.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // Out of range and read-only style errors keep the connection alive.
    k.write_all(&req(CMD_READ, 0, 10, SIZE, 4096)).unwrap();
    assert_eq!(reply(&mut k), (EINVAL, 10));
    k.write_all(&req(CMD_WRITE, 0, 11, SIZE - 512, 1024))
        .unwrap();
    k.write_all(&[0u8; 1024]).unwrap();
    assert_eq!(reply(&mut k), (ENOSPC, 11));
    k.write_all(&req(CMD_BLOCK_STATUS, 0, 12, 0, 4096)).unwrap();
    assert_eq!(
        reply(&mut k),
        (EINVAL, 12),
        "no meta context in kernel mode"
    );
    k.write_all(&req(CMD_READ, 0, 13, 0, 512)).unwrap();
    assert_eq!(reply(&mut k), (0, 13));
    let mut d = [0u8; 512];
    k.read_exact(&mut d).unwrap();
    k.write_all(&req(CMD_DISC, 0, 14, 0, 0)).unwrap();
    // After DISC the server closes its end.
    let mut rest = Vec::new();
    k.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let stats = conn.wait();
    assert_eq!(stats.op(Op::Write).count, 64);
    assert_eq!(stats.op(Op::Read).count, 65);
    assert_eq!(stats.op(Op::Rejected).count, 3);
}

#[test]
fn drain_answers_eshutdown_and_lets_in_flight_finish() {
    let dev = Arc::new(MemDevice::new(SIZE, 4096));
    dev.set_delay(Duration::from_millis(200));
    let (mut k, conn) = setup(Arc::clone(&dev));
    k.write_all(&req(CMD_WRITE, 0, 1, 0, 4096)).unwrap();
    k.write_all(&[7u8; 4096]).unwrap();
    // Wait until the write is in flight, then drain.
    for _ in 0..100 {
        if conn.in_flight() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(conn.in_flight(), 1);
    conn.drain();
    k.write_all(&req(CMD_READ, 0, 2, 0, 4096)).unwrap();
    k.write_all(&req(CMD_WRITE, 0, 3, 0, 4096)).unwrap();
    k.write_all(&[9u8; 4096]).unwrap();
    let mut got = vec![reply(&mut k), reply(&mut k), reply(&mut k)];
    got.sort_by_key(|r| r.1);
    assert_eq!(got, vec![(0, 1), (ESHUTDOWN, 2), (ESHUTDOWN, 3)]);
    dev.set_delay(Duration::ZERO);
    let mut b = [0u8; 4096];
    dev.read_at(&mut b, 0).unwrap();
    assert!(
        b.iter().all(|&x| x == 7),
        "the in-flight write finished; the drained one did not"
    );
    conn.shutdown();
    let stats = conn.wait();
    assert_eq!(stats.op(Op::Rejected).count, 2);
}

#[test]
fn device_errors_become_eio_replies() {
    let dev = Arc::new(MemDevice::new(SIZE, 4096));
    let (mut k, conn) = setup(Arc::clone(&dev));
    dev.set_failing(true);
    k.write_all(&req(CMD_READ, 0, 1, 0, 4096)).unwrap();
    // A failed read gets a simple error reply with no payload.
    assert_eq!(reply(&mut k), (EIO, 1));
    dev.set_failing(false);
    k.write_all(&req(CMD_READ, 0, 2, 0, 512)).unwrap();
    assert_eq!(reply(&mut k), (0, 2));
    drop(k);
    let stats = conn.wait();
    assert_eq!(stats.op(Op::Read).errors, 1);
}

#[test]
fn kernel_closing_its_end_mid_payload_ends_the_connection() {
    let dev = Arc::new(MemDevice::new(SIZE, 4096));
    let (mut k, conn) = setup(dev);
    k.write_all(&req(CMD_WRITE, 0, 1, 0, 65536)).unwrap();
    k.write_all(&[1u8; 1000]).unwrap();
    drop(k);
    let (reason, stats) = conn.wait_reason();
    assert_eq!(reason, rootfork_nbd::EndReason::Truncated);
    assert_eq!(stats.op(Op::Write).count, 0);
}

#[test]
fn reader_keeps_reading_while_the_client_is_not_reading_replies() {
    let dev = Arc::new(MemDevice::new(SIZE, 4096));
    let (mut k, conn) = setup(Arc::clone(&dev));
    // 3 MiB of read replies the client does not read yet: far more than the socket buffers.
    let mut out = Vec::new();
    for i in 0..12u64 {
        out.extend(req(CMD_READ, 0, i, 0, 256 << 10));
    }
    out.extend(req(CMD_WRITE, 0, 99, 8192, 4096));
    out.extend([0x77u8; 4096]);
    k.write_all(&out).unwrap();
    // The write behind the reads lands although no reply has been read.
    let mut landed = false;
    for _ in 0..400 {
        let mut b = [0u8; 4096];
        dev.read_at(&mut b, 8192).unwrap();
        if b.iter().all(|&x| x == 0x77) {
            landed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(landed, "the reader was stuck behind unread replies");
    let mut got = Vec::new();
    for _ in 0..13 {
        let (err, cookie) = reply(&mut k);
        assert_eq!(err, 0);
        if cookie != 99 {
            let mut d = vec![0u8; 256 << 10];
            k.read_exact(&mut d).unwrap();
        }
        got.push(cookie);
    }
    got.sort();
    assert_eq!(got, (0..12).chain([99]).collect::<Vec<_>>());
    // A window slot is released just after its reply's send returns, so the client can read the
    // last reply a moment before the slot is free: wait (bounded) for the window to empty.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while conn.in_flight() != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        conn.in_flight(),
        0,
        "window slots leaked after every reply was read"
    );
    drop(k);
    conn.wait();
}

#[test]
fn oldest_request_age_tracks_a_blocked_read() {
    use rootfork_nbd::testing::GatedDevice;
    let gate = Arc::new(GatedDevice::new(Arc::new(MemDevice::new(SIZE, 4096))));
    let (mut k, kernel_conn) = {
        let (ours, kernel) = UnixStream::pair().unwrap();
        kernel
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let dev: Arc<dyn BlockDevice> = gate.clone();
        let conn = KernelConnection::spawn(ours, dev, ServeOptions::default()).unwrap();
        (kernel, conn)
    };
    assert_eq!(kernel_conn.oldest_request_age(), None, "idle");
    gate.close();
    k.write_all(&req(CMD_READ, 0, 7, 0, 4096)).unwrap();
    let t0 = std::time::Instant::now();
    while gate.waiting() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "read never reached the device"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let first = kernel_conn
        .oldest_request_age()
        .expect("a request is blocked");
    std::thread::sleep(Duration::from_millis(50));
    let later = kernel_conn.oldest_request_age().expect("still blocked");
    assert!(
        later >= first + Duration::from_millis(50),
        "{first:?} -> {later:?}"
    );
    // A second request queued behind it does not hide the older one.
    k.write_all(&req(CMD_READ, 0, 8, 4096, 4096)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(kernel_conn.oldest_request_age().unwrap() >= later);
    gate.open();
    let mut cookies = Vec::new();
    for _ in 0..2 {
        let (err, cookie) = reply(&mut k);
        assert_eq!(err, 0);
        let mut data = vec![0u8; 4096];
        k.read_exact(&mut data).unwrap();
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, [7, 8]);
    // A request's age is cleared before its reply is queued, so once both replies arrived
    // nothing is waiting for the server.
    assert_eq!(kernel_conn.oldest_request_age(), None, "idle again");
    k.write_all(&req(CMD_DISC, 0, 9, 0, 0)).unwrap();
    kernel_conn.wait();
}
