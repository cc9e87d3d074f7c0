//! A hand-over (a daemon restart) stops reading requests without refusing any: the request in
//! flight is answered, the client's next request cannot be sent (it reconnects to the next
//! server and sends it there), and no reply is `ESHUTDOWN`, unlike a shutdown's drain.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rootfork_nbd::consts::*;
use rootfork_nbd::request::{encode_header, RequestHeader};
use rootfork_nbd::testing::{GatedDevice, MemDevice};
use rootfork_nbd::ServeOptions;

fn write_request(cookie: u64, offset: u64) -> Vec<u8> {
    let mut v = encode_header(
        &RequestHeader {
            flags: 0,
            kind: CMD_WRITE,
            cookie,
            offset,
            length: 4096,
        },
        false,
    );
    v.extend_from_slice(&[cookie as u8; 4096]);
    v
}

#[test]
fn a_hand_over_answers_what_it_read_and_refuses_nothing() {
    let gate = Arc::new(GatedDevice::new(Arc::new(MemDevice::new(SIZE, 4096))));
    let (server, _dir, path) = server_for(ServeOptions::default(), gate.clone());
    let mut c = Raw::connect(&path);
    c.go("disk", false, false, &[]);
    gate.close();
    c.req(CMD_READ, 0, 1, 0, 4096);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.in_flight() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(server.in_flight(), 1, "the read is held in the device");

    let grace = Duration::from_secs(60);
    let started = Instant::now();
    let s = server.clone();
    let done = std::thread::spawn(move || s.hand_over(grace));
    // Writes sent before the server stopped reading are read and answered; once it stopped, a
    // send fails (the client would reconnect and send it again).
    let mut sent = 0u64;
    let refused = loop {
        if let Err(e) =
            c.s.write_all(&write_request(2 + sent, 4096 * (1 + sent % 8)))
        {
            break Some(e);
        }
        sent += 1;
        if started.elapsed() > Duration::from_secs(20) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let refused = refused.expect("the server kept reading requests after the hand-over began");
    assert_eq!(refused.kind(), std::io::ErrorKind::BrokenPipe, "{refused}");
    assert!(!path.exists(), "the listener's socket file is removed");
    gate.open();

    let mut answered = Vec::new();
    loop {
        let mut head = [0u8; 16];
        if std::io::Read::read_exact(&mut c.s, &mut head).is_err() {
            break;
        }
        assert_eq!(
            u32::from_be_bytes(head[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let errno = u32::from_be_bytes(head[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        assert_eq!(errno, 0, "request {cookie} was refused (errno {errno})");
        if cookie == 1 {
            let _ = c.read_n(4096);
        }
        answered.push(cookie);
    }
    assert!(
        answered.contains(&1),
        "the held read was answered: {answered:?}"
    );
    assert!(
        answered.len() as u64 <= 1 + sent,
        "{answered:?} of {sent} writes"
    );
    // It returned once the connection had answered everything, not after its grace period.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(done.is_finished(), "the hand-over is still waiting");
    done.join().unwrap();
    assert!(started.elapsed() < grace);
    assert_eq!(server.connections(), 0);
}
