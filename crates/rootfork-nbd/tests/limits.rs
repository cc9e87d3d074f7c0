//! Raw-socket tests of the engine's size and work limits: writes over the advertised maximum
//! block size up to `ServeOptions::write_limit`, read reply buffers counted in the in-flight
//! byte budget, and bounded `BLOCK_STATUS` work on a large fragmented device.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rootfork_block::BlockDevice;
use rootfork_nbd::consts::*;
use rootfork_nbd::meta::BASE_ALLOCATION;
use rootfork_nbd::testing::{FragmentedDevice, MemDevice};
use rootfork_nbd::ServeOptions;

const MIB: u64 = 1 << 20;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[0..4].try_into().unwrap())
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i >> 20) as u8).collect()
}

#[test]
fn a_48_mib_write_is_served_and_reads_back() {
    let dev = Arc::new(MemDevice::new(64 * MIB, 4096));
    let f = fixture_with(ServeOptions::default(), dev);
    let mut c = Raw::connect(&f.path);
    c.go("disk", false, false, &[]);
    let data = pattern(48 << 20);
    c.req(CMD_WRITE, 0, 1, 4096, data.len() as u64);
    c.send(&data);
    assert_eq!(c.simple(), (0, 1));
    // Reads stay within the advertised 32 MiB maximum: two halves.
    let half = data.len() / 2;
    for (i, part) in data.chunks(half).enumerate() {
        let cookie = 2 + i as u64;
        c.req(CMD_READ, 0, cookie, 4096 + (i * half) as u64, half as u64);
        assert_eq!(c.simple(), (0, cookie));
        assert!(c.read_n(half) == part, "half {i} reads back");
    }
    assert_eq!(f.server.stats().refused_too_large, 0);
}

#[test]
fn pipelined_big_reads_stay_within_the_byte_budget() {
    let budget = 8 * MIB as usize;
    let dev = Arc::new(MemDevice::new(16 * MIB, 4096));
    let data = pattern(16 << 20);
    dev.write_at(&data, 0).unwrap();
    let opts = ServeOptions {
        max_in_flight_bytes: budget,
        ..Default::default()
    };
    let f = fixture_with(opts, dev);
    let mut c = Raw::connect(&f.path);
    c.go("disk", false, false, &[]);
    // 64 reads of 1 MiB, none of whose replies is read for now.
    let n = 64u64;
    for i in 0..n {
        c.req(CMD_READ, 0, i, (i % 16) * MIB, MIB);
    }
    std::thread::sleep(Duration::from_millis(500));
    let s = f.server.stats();
    assert!(s.buffer_bytes > 0, "replies are waiting for the client");
    assert!(
        s.buffer_bytes_peak <= budget as u64,
        "{} bytes of buffers pinned, budget {budget}",
        s.buffer_bytes_peak
    );
    // Now read everything: every reply, right data.
    for _ in 0..n {
        let (err, cookie) = c.simple();
        assert_eq!(err, 0);
        let at = ((cookie % 16) * MIB) as usize;
        assert!(c.read_n(MIB as usize) == data[at..at + MIB as usize]);
    }
    let s = f.server.stats();
    assert!(s.buffer_bytes_peak <= budget as u64);
    assert_eq!(s.op(rootfork_nbd::Op::Read).count, n);
}

/// Descriptors of a one-context structured block status reply.
fn descriptors(c: &mut Raw) -> Vec<(u64, u32)> {
    let chunks = c.chunks();
    assert_eq!(chunks.len(), 1);
    let p = &chunks[0].payload;
    assert_eq!(chunks[0].ty, REPLY_TYPE_BLOCK_STATUS);
    (0..(p.len() - 4) / 8)
        .map(|i| (u64::from(be32(&p[4 + 8 * i..])), be32(&p[8 + 8 * i..])))
        .collect()
}

#[test]
fn block_status_on_a_large_fragmented_device_does_bounded_work() {
    let dev = Arc::new(FragmentedDevice::new(16 << 30, 4096));
    let opts = ServeOptions::default();
    let max = opts.block_status_max_descriptors;
    let (_server, _dir, path) = server_for(opts, dev.clone());
    let mut c = Raw::connect(&path);
    c.go("disk", true, false, &[BASE_ALLOCATION]);
    // Nearly 4 GiB of alternating 4 KiB data and zero blocks: a million extents.
    let len = (4u64 << 30) - 4096;
    c.req(CMD_BLOCK_STATUS, 0, 1, 0, len);
    let d = descriptors(&mut c);
    assert_eq!(d.len(), max, "a full reply, not the whole range");
    for (i, &(l, flags)) in d.iter().enumerate() {
        let want = if i % 2 == 0 {
            0
        } else {
            STATE_HOLE | STATE_ZERO
        };
        assert_eq!((l, flags), (4096, want), "descriptor {i}");
    }
    assert!(
        dev.longest_query() <= max as u64 * 4096,
        "the device was asked about {} bytes at once",
        dev.longest_query()
    );
    assert!(
        dev.extents_reported() <= 2 * max as u64 + 2,
        "the device built {} extents for a {max}-descriptor reply",
        dev.extents_reported()
    );
    // REQ_ONE: one descriptor.
    c.req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 2, 8192, len - 8192);
    assert_eq!(descriptors(&mut c), vec![(4096, 0)]);
}

#[test]
fn block_status_looks_at_most_block_status_max_len() {
    // 1 GiB blocks: few extents, so only the length bound applies.
    let dev = Arc::new(FragmentedDevice::new(16 << 30, 1 << 30));
    let opts = ServeOptions {
        block_status_max_len: 256 * MIB,
        ..Default::default()
    };
    let (_server, _dir, path) = server_for(opts, dev.clone());
    let mut c = Raw::connect(&path);
    c.go("disk", true, false, &[BASE_ALLOCATION]);
    c.req(CMD_BLOCK_STATUS, 0, 1, 0, (4u64 << 30) - 4096);
    assert_eq!(descriptors(&mut c), vec![(256 * MIB, 0)]);
    assert_eq!(dev.longest_query(), 256 * MIB);
}

/// A raw connection that expects to be closed at once (no greeting).
fn refused(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 18];
    matches!(s.read(&mut b), Ok(0))
        || matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

#[test]
fn connections_past_max_connections_are_closed_at_once_and_counted() {
    let opts = ServeOptions {
        max_connections: 2,
        ..ServeOptions::default()
    };
    let f = fixture_with(opts, Arc::new(MemDevice::new(SIZE, 4096)));
    let mut a = Raw::connect(&f.path);
    a.go("disk", false, false, &[]);
    let b = Raw::greet(&f.path);
    assert!(
        refused(&f.path),
        "a third connection must be closed at once"
    );
    assert_eq!(f.server.stats().refused_connections, 1);
    // The admitted ones still work; closing one makes room.
    a.req(CMD_READ, 0, 7, 0, 4096);
    assert_eq!(a.simple(), (0, 7));
    let _ = a.read_n(4096);
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while f.server.connections() > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Raw::connect(&f.path);
    c.go("disk", false, false, &[]);
}

#[test]
fn a_shared_budget_bounds_connections_over_several_servers() {
    let budget = rootfork_nbd::ConnectionBudget::new(2);
    let opts = ServeOptions {
        connection_budget: Some(budget.clone()),
        ..ServeOptions::default()
    };
    let f1 = fixture_with(opts.clone(), Arc::new(MemDevice::new(SIZE, 4096)));
    let f2 = fixture_with(opts, Arc::new(MemDevice::new(SIZE, 4096)));
    let a = Raw::greet(&f1.path);
    let _b = Raw::greet(&f2.path);
    assert_eq!(budget.used(), 2);
    assert!(refused(&f1.path));
    assert!(refused(&f2.path));
    assert_eq!(
        f1.server.stats().refused_connections + f2.server.stats().refused_connections,
        2
    );
    drop(a);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while budget.used() > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(budget.used(), 1, "a closed connection gives its place back");
    let _c = Raw::greet(&f2.path);
}

#[test]
fn a_shared_byte_budget_bounds_buffers_over_several_servers() {
    let shared = rootfork_nbd::ByteBudget::new(8 * MIB as usize);
    let data = pattern(16 << 20);
    let opts = ServeOptions {
        byte_budget: Some(shared.clone()),
        ..Default::default()
    };
    let servers: Vec<Fixture> = (0..2)
        .map(|_| {
            let dev = Arc::new(MemDevice::new(16 * MIB, 4096));
            dev.write_at(&data, 0).unwrap();
            fixture_with(opts.clone(), dev)
        })
        .collect();
    // Each connection alone would take 32 MiB (its own window allows 64 MiB).
    let n = 32u64;
    let mut clients: Vec<Raw> = servers
        .iter()
        .map(|f| {
            let mut c = Raw::connect(&f.path);
            c.go("disk", false, false, &[]);
            for i in 0..n {
                c.req(CMD_READ, 0, i, (i % 16) * MIB, MIB);
            }
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let pinned: u64 = servers
        .iter()
        .map(|f| f.server.stats().buffer_bytes_peak)
        .sum();
    // The budget, plus at most one request per connection admitted past it.
    assert!(pinned > 0);
    assert!(
        pinned <= 10 * MIB,
        "{pinned} bytes pinned over both servers, shared budget 8 MiB"
    );
    for c in &mut clients {
        for _ in 0..n {
            let (err, cookie) = c.simple();
            assert_eq!(err, 0);
            let at = ((cookie % 16) * MIB) as usize;
            assert!(c.read_n(MIB as usize) == data[at..at + MIB as usize]);
        }
    }
    // Slots are released once a reply is on the wire, just after the client can read it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while shared.used() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(shared.used(), 0, "every byte given back");
}
