//! A shutdown is bounded even when a device call never returns: the server waits its grace
//! period, closes the connections, waits `SHUTDOWN_JOIN` for their threads, and returns, leaving
//! the stuck thread to end on its own.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rootfork_nbd::consts::*;
use rootfork_nbd::testing::{GatedDevice, MemDevice};
use rootfork_nbd::{Export, ServeOptions, Server};

#[test]
fn a_read_that_never_returns_does_not_hold_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let gate = Arc::new(GatedDevice::new(Arc::new(MemDevice::new(SIZE, 4096))));
    let server = Server::new(ServeOptions::default());
    server
        .add_export(Export {
            name: "disk".into(),
            description: String::new(),
            device: gate.clone(),
        })
        .unwrap();
    server.listen_unix(&path).unwrap();
    let mut c = Raw::connect(&path);
    c.go("disk", false, false, &[]);
    gate.close();
    c.req(CMD_READ, 0, 1, 0, 4096);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.in_flight() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(server.in_flight(), 1, "the read is held in the device");
    let grace = Duration::from_millis(200);
    let started = Instant::now();
    let s = server.clone();
    let done = std::thread::spawn(move || s.shutdown(grace));
    let bound = grace + rootfork_nbd::SHUTDOWN_JOIN + Duration::from_secs(3);
    while !done.is_finished() && started.elapsed() < bound {
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = started.elapsed();
    // Let the stuck thread go however the assertion ends.
    gate.open();
    assert!(done.is_finished(), "shutdown still waiting after {took:?}");
    done.join().unwrap();
    assert!(took >= grace, "{took:?}");
}
