//! The write fence of kernel connections, against a fake kernel socket peer that behaves like
//! the 6.1 `nbd` driver on a timeout: it shuts its end of the timed-out socket down
//! (`SHUT_RDWR`) and sends the same request again on another connection.
//!
//! Each fenced case has an unfenced twin that shows the corruption the fence prevents, so the
//! fenced assertions cannot pass by accident.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use rootfork_block::BlockDevice;
use rootfork_nbd::consts::*;
use rootfork_nbd::fence::WriteFence;
use rootfork_nbd::kernel::KernelConnection;
use rootfork_nbd::request::{encode_header, RequestHeader};
use rootfork_nbd::stats::Stats;
use rootfork_nbd::testing::{MemDevice, StallingWrites};
use rootfork_nbd::ServeOptions;

const SIZE: u64 = 1 << 20;
const BLOCK: usize = 4096;
const AT: u64 = 8 * BLOCK as u64;

/// One kernel-style WRITE of `fill` bytes at `AT` (header and payload).
fn write_req(cookie: u64, fill: u8) -> Vec<u8> {
    let mut v = encode_header(
        &RequestHeader {
            flags: 0,
            kind: CMD_WRITE,
            cookie,
            offset: AT,
            length: BLOCK as u64,
        },
        false,
    );
    v.extend(std::iter::repeat_n(fill, BLOCK));
    v
}

/// Reads one simple reply: `Ok((errno, cookie))`, or the read error (a timeout: no reply yet).
fn reply(s: &mut UnixStream) -> std::io::Result<(u32, u64)> {
    let mut b = [0u8; 16];
    s.read_exact(&mut b)?;
    assert_eq!(
        u32::from_be_bytes(b[0..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    Ok((
        u32::from_be_bytes(b[4..8].try_into().unwrap()),
        u64::from_be_bytes(b[8..16].try_into().unwrap()),
    ))
}

fn block_at(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    dev.read_at(&mut b, AT).unwrap();
    b
}

/// A connection of `dev`, fenced by `fence` when given; returns the fake kernel's end.
fn connect(
    dev: Arc<dyn BlockDevice>,
    fence: Option<&Arc<WriteFence>>,
) -> (UnixStream, KernelConnection) {
    let (ours, kernel) = UnixStream::pair().unwrap();
    kernel
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let conn = match fence {
        Some(f) => KernelConnection::spawn_fenced(
            ours,
            dev,
            ServeOptions::default(),
            Arc::new(Stats::default()),
            f.clone(),
        ),
        None => KernelConnection::spawn(ours, dev, ServeOptions::default()),
    }
    .unwrap();
    (kernel, conn)
}

/// A write still in our receive buffer when the kernel declares the socket dead.
fn queued_write_on_dead_socket(fenced: bool) -> (Vec<u8>, u64) {
    let mem = Arc::new(MemDevice::new(SIZE, BLOCK as u32));
    let fence = WriteFence::new();
    let (ours, mut kernel) = UnixStream::pair().unwrap();
    kernel.write_all(&write_req(1, 0xaa)).unwrap();
    kernel.shutdown(Shutdown::Both).unwrap();
    let dev: Arc<dyn BlockDevice> = mem.clone();
    let conn = if fenced {
        KernelConnection::spawn_fenced(
            ours,
            dev,
            ServeOptions::default(),
            Arc::new(Stats::default()),
            fence.clone(),
        )
    } else {
        KernelConnection::spawn(ours, dev, ServeOptions::default())
    }
    .unwrap();
    conn.wait();
    (block_at(&*mem), fence.fenced())
}

#[test]
fn a_write_received_after_the_kernel_shut_the_socket_never_lands() {
    let (data, fenced) = queued_write_on_dead_socket(true);
    assert_eq!(
        data,
        vec![0u8; BLOCK],
        "the fenced write reached the device"
    );
    assert_eq!(fenced, 1);
}

#[test]
fn unfenced_the_same_write_lands() {
    let (data, _) = queued_write_on_dead_socket(false);
    assert_eq!(data, vec![0xaa; BLOCK]);
}

/// W1 stalls on connection 1 past the "timeout"; the fake kernel shuts connection 1 down and
/// sends W1 again on connection 2, then W2 to the same block. Returns the block at the end and
/// whether W1's copy on connection 2 was answered while W1 was still held.
fn stale_write_across_connections(fenced: bool) -> (Vec<u8>, bool, Arc<StallingWrites>) {
    let mem = Arc::new(MemDevice::new(SIZE, BLOCK as u32));
    let stall = Arc::new(StallingWrites::new(
        mem.clone(),
        &[0xaa; 16],
        Duration::from_secs(60),
    ));
    let fence = WriteFence::new();
    let f = fenced.then_some(&fence);
    let (mut k1, c1) = connect(stall.clone(), f);
    let (mut k2, c2) = connect(stall.clone(), f);

    k1.write_all(&write_req(1, 0xaa)).unwrap();
    assert!(stall.wait_holding(Duration::from_secs(20)), "W1 never held");
    // The kernel's timeout: connection 1 is declared dead, W1 is requeued on connection 2.
    k1.shutdown(Shutdown::Both).unwrap();
    k2.write_all(&write_req(2, 0xaa)).unwrap();
    let mut early = false;
    if fenced {
        // W1's copy waits for W1: no reply while W1 is held (a fence that let it through would
        // answer within microseconds).
        k2.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        match reply(&mut k2) {
            Ok(_) => early = true,
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                "{e}"
            ),
        }
        k2.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        if !early {
            // The stall ends (as a slow disk eventually does): W1, then its copy.
            assert!(stall.holding());
            stall.release();
            assert_eq!(reply(&mut k2).unwrap(), (0, 2));
        }
    } else {
        // Unfenced, W1's copy completes while W1 is still held.
        assert_eq!(reply(&mut k2).unwrap(), (0, 2));
        early = true;
    }
    // The guest writes W2 (which, unfenced, releases the held W1 after it).
    k2.write_all(&write_req(3, 0xbb)).unwrap();
    assert_eq!(reply(&mut k2).unwrap(), (0, 3));
    // Connection 1 ends once W1 is done (its reply goes nowhere).
    c1.wait();
    assert!(stall.stalled_write_applied());
    drop(k2);
    c2.wait();
    (block_at(&*mem), early, stall)
}

#[test]
fn a_stale_write_never_lands_after_a_newer_one_on_another_connection() {
    let (data, early, stall) = stale_write_across_connections(true);
    assert!(!early, "the requeued copy overtook the held write");
    assert_eq!(stall.marked_writes(), 2);
    assert_eq!(stall.overtaken(), 0);
    assert_eq!(
        data,
        vec![0xbb; BLOCK],
        "W2 was overwritten by the stale W1"
    );
}

#[test]
fn unfenced_the_stale_write_lands_after_the_newer_one() {
    let (data, early, stall) = stale_write_across_connections(false);
    assert!(early);
    assert_eq!(stall.overtaken(), 2);
    assert_eq!(
        data,
        vec![0xaa; BLOCK],
        "expected the corruption the fence prevents"
    );
}

#[test]
fn reads_and_disjoint_writes_of_other_connections_pass_a_held_write() {
    let mem = Arc::new(MemDevice::new(SIZE, BLOCK as u32));
    let stall = Arc::new(StallingWrites::new(
        mem.clone(),
        &[0xaa; 16],
        Duration::from_secs(60),
    ));
    let fence = WriteFence::new();
    let (mut k1, c1) = connect(stall.clone(), Some(&fence));
    let (mut k2, c2) = connect(stall.clone(), Some(&fence));
    k1.write_all(&write_req(1, 0xaa)).unwrap();
    assert!(stall.wait_holding(Duration::from_secs(20)));
    // A write elsewhere and a read of the held block go through on connection 2.
    let mut w = encode_header(
        &RequestHeader {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 2,
            offset: 0,
            length: BLOCK as u64,
        },
        false,
    );
    w.extend(std::iter::repeat_n(0xcc, BLOCK));
    k2.write_all(&w).unwrap();
    assert_eq!(reply(&mut k2).unwrap(), (0, 2));
    k2.write_all(&encode_header(
        &RequestHeader {
            flags: 0,
            kind: CMD_READ,
            cookie: 3,
            offset: AT,
            length: BLOCK as u64,
        },
        false,
    ))
    .unwrap();
    assert_eq!(reply(&mut k2).unwrap(), (0, 3));
    let mut data = vec![0u8; BLOCK];
    k2.read_exact(&mut data).unwrap();
    assert!(stall.holding());
    stall.release();
    assert_eq!(reply(&mut k1).unwrap(), (0, 1));
    assert_eq!(fence.fenced(), 0);
    drop((k1, k2));
    c1.wait();
    c2.wait();
}
