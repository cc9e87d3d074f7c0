//! Panics in device code: for every device operation that can panic (`read_at`, `write_at`,
//! `flush`, `trim`, `write_zeroes`, `extents`), on the reader's inline path and on a worker, in
//! socket mode and kernel mode, the request that hit the panic is answered `EIO`, later
//! requests are served, and the connection still ends promptly when the client leaves.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use rootfork_nbd::consts::*;
use rootfork_nbd::kernel::KernelConnection;
use rootfork_nbd::meta::BASE_ALLOCATION;
use rootfork_nbd::request::{encode_header, RequestHeader};
use rootfork_nbd::testing::{DeviceOp, MemDevice, PanicDevice};
use rootfork_nbd::{Op, ServeOptions};

/// How long the connection may take to end once the client has left.
const BOUND: Duration = Duration::from_secs(5);
/// A read long enough to go to a worker (the reader runs reads up to 128 KiB).
const BIG: u64 = 256 << 10;

/// One request: (kind, flags, offset, length, write payload).
type Req = (u16, u16, u64, u64, Option<Vec<u8>>);

/// The request that makes `op` run on a worker (`worker`) or on the reader itself. `None`: the
/// engine never runs it there (FLUSH always goes to a worker).
fn request_for(op: DeviceOp, worker: bool) -> Option<Req> {
    let fua = if worker { CMD_FLAG_FUA } else { 0 };
    Some(match op {
        DeviceOp::Read => (CMD_READ, 0, 0, if worker { BIG } else { 4096 }, None),
        DeviceOp::Write => (CMD_WRITE, fua, 0, 4096, Some(vec![7u8; 4096])),
        DeviceOp::Flush if worker => (CMD_FLUSH, 0, 0, 0, None),
        DeviceOp::Flush => return None,
        DeviceOp::Trim => (CMD_TRIM, fua, 0, 4096, None),
        DeviceOp::WriteZeroes => (CMD_WRITE_ZEROES, fua, 0, 4096, None),
        // A structured read looks for holes first (on a worker for a big read); block status
        // runs on the reader.
        DeviceOp::Extents if worker => (CMD_READ, 0, 0, BIG, None),
        DeviceOp::Extents => (CMD_BLOCK_STATUS, 0, 0, 65536, None),
    })
}

const OPS: [DeviceOp; 6] = [
    DeviceOp::Read,
    DeviceOp::Write,
    DeviceOp::Flush,
    DeviceOp::Trim,
    DeviceOp::WriteZeroes,
    DeviceOp::Extents,
];

fn check_thread(dev: &PanicDevice, op: DeviceOp, worker: bool) {
    let on = dev.panicked_on().expect("the device never panicked");
    assert_eq!(
        on.starts_with("nbd-worker"),
        worker,
        "{op:?} panicked on thread {on}"
    );
}

/// Socket mode, structured replies and `base:allocation`.
fn socket_case(op: DeviceOp, worker: bool) {
    let Some((kind, flags, offset, len, payload)) = request_for(op, worker) else {
        return;
    };
    let mem = Arc::new(MemDevice::new(SIZE, 4096));
    let dev = Arc::new(PanicDevice::new(mem, op, 1));
    let (server, _dir, path) = server_for(ServeOptions::default(), dev.clone());
    let mut c = Raw::connect(&path);
    c.go("disk", true, false, &[BASE_ALLOCATION]);
    // Reads of the read case say `DF`, so no hole detection skips the device read.
    let flags = match op {
        DeviceOp::Read => flags | CMD_FLAG_DF,
        _ => flags,
    };
    let send = |c: &mut Raw, cookie| {
        c.req(kind, flags, cookie, offset, len);
        if let Some(p) = &payload {
            c.send(p);
        }
    };
    send(&mut c, 1);
    assert_eq!(c.status(), (EIO, 1), "{op:?} worker={worker}");
    check_thread(&dev, op, worker);
    // The same request again: the device no longer panics, the connection still serves.
    send(&mut c, 2);
    match kind {
        CMD_READ => assert_eq!(c.read_data(offset, len as usize).0.len(), len as usize),
        CMD_BLOCK_STATUS => {
            let chunks = c.chunks();
            assert_eq!(chunks[0].ty, REPLY_TYPE_BLOCK_STATUS);
        }
        _ => assert_eq!(c.status(), (0, 2)),
    }
    c.req(CMD_WRITE, 0, 3, 8192, 4096);
    c.send(&[9u8; 4096]);
    assert_eq!(c.status(), (0, 3));
    c.req(CMD_READ, CMD_FLAG_DF, 4, 8192, 4096);
    assert_eq!(c.read_data(8192, 4096).0, vec![9u8; 4096]);
    let stats = server.stats();
    assert_eq!(stats.panics, 1);
    let class = match op {
        DeviceOp::Extents if !worker => Op::BlockStatus,
        DeviceOp::Extents => Op::Read,
        _ => match kind {
            CMD_READ => Op::Read,
            CMD_WRITE => Op::Write,
            CMD_FLUSH => Op::Flush,
            CMD_TRIM => Op::Trim,
            _ => Op::WriteZeroes,
        },
    };
    assert_eq!(stats.op(class).errors, 1);
    // The client leaves: the connection ends, and the server shuts down, within the bound.
    c.req(CMD_DISC, 0, 5, 0, 0);
    let start = Instant::now();
    while server.connections() > 0 {
        assert!(start.elapsed() < BOUND, "the connection did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(server.in_flight(), 0);
    server.shutdown(Duration::from_secs(1));
    assert!(start.elapsed() < BOUND, "shutdown took too long");
}

fn kernel_reply(k: &mut UnixStream) -> (u32, u64) {
    let mut b = [0u8; 16];
    k.read_exact(&mut b).unwrap();
    assert_eq!(
        u32::from_be_bytes(b[0..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes(b[4..8].try_into().unwrap()),
        u64::from_be_bytes(b[8..16].try_into().unwrap()),
    )
}

/// Kernel mode: compact requests, simple replies (no block status, no hole detection).
fn kernel_case(op: DeviceOp, worker: bool) {
    if op == DeviceOp::Extents {
        return;
    }
    let Some((kind, flags, offset, len, payload)) = request_for(op, worker) else {
        return;
    };
    let mem = Arc::new(MemDevice::new(SIZE, 4096));
    let dev = Arc::new(PanicDevice::new(mem, op, 1));
    let (ours, mut k) = UnixStream::pair().unwrap();
    k.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = KernelConnection::spawn(ours, dev.clone(), ServeOptions::default()).unwrap();
    let send = |k: &mut UnixStream, cookie| {
        let h = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length: len,
        };
        let mut v = encode_header(&h, false);
        if let Some(p) = &payload {
            v.extend_from_slice(p);
        }
        k.write_all(&v).unwrap();
    };
    send(&mut k, 1);
    // An error reply carries no data, even for a read.
    assert_eq!(kernel_reply(&mut k), (EIO, 1), "{op:?} worker={worker}");
    check_thread(&dev, op, worker);
    send(&mut k, 2);
    assert_eq!(kernel_reply(&mut k), (0, 2));
    if kind == CMD_READ {
        let mut b = vec![0u8; len as usize];
        k.read_exact(&mut b).unwrap();
    }
    assert_eq!(conn.stats().panics, 1);
    // Every slot comes back (a slot is released just after its reply is written).
    let start = Instant::now();
    while conn.in_flight() > 0 {
        assert!(start.elapsed() < BOUND, "a window slot was never released");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The kernel disconnects: `wait` returns within the bound.
    let h = RequestHeader {
        flags: 0,
        kind: CMD_DISC,
        cookie: 3,
        offset: 0,
        length: 0,
    };
    k.write_all(&encode_header(&h, false)).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(conn.wait_reason()).unwrap());
    let (reason, stats) = rx.recv_timeout(BOUND).expect("wait() did not return");
    assert_eq!(reason, rootfork_nbd::EndReason::Disconnect);
    assert_eq!(stats.panics, 1);
}

#[test]
fn socket_mode_device_panics_on_the_reader_answer_eio() {
    for op in OPS {
        socket_case(op, false);
    }
}

#[test]
fn socket_mode_device_panics_on_a_worker_answer_eio() {
    for op in OPS {
        socket_case(op, true);
    }
}

#[test]
fn kernel_mode_device_panics_on_the_reader_answer_eio() {
    for op in OPS {
        kernel_case(op, false);
    }
}

#[test]
fn kernel_mode_device_panics_on_a_worker_answer_eio() {
    for op in OPS {
        kernel_case(op, true);
    }
}
