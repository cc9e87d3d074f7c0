//! Acknowledged writes outlive a SIGKILLed daemon: a client keeps 16 random 4 KiB overwrites in
//! flight on a socket sandbox, never flushing, while `rootfork serve` is killed with SIGKILL.
//! After the next start adopts the sandbox, the client reconnects to the same socket and export
//! and finds, in every block it wrote, the last write it saw acknowledged, or the one write to
//! that block still in flight at the kill (which may or may not have landed): never an older
//! one, never a torn block.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::nbd_client::NbdClient;
use common::*;
use rootfork::api::v1;

/// Blocks of the template (and of the disk) the client writes into.
const BLOCKS: u64 = 256;
/// Writes in flight at once.
const IN_FLIGHT: usize = 16;

/// A block written by write number `seq`: `seq` in every 8 bytes.
fn block_of(seq: u64) -> Vec<u8> {
    seq.to_le_bytes().repeat(4096 / 8)
}

/// What one block of the disk holds: `Some(seq)` for a block written by write `seq`, `None`
/// for anything else (the template, a torn block).
fn seq_in(block: &[u8]) -> Option<u64> {
    let first = &block[..8];
    block
        .chunks(8)
        .all(|c| c == first)
        .then(|| u64::from_le_bytes(first.try_into().unwrap()))
}

/// Per block: the last write acknowledged, and the write in flight (at most one per block, so
/// their order is the order they were sent).
#[derive(Debug, Default, Clone, Copy)]
struct BlockWrites {
    acked: Option<u64>,
    in_flight: Option<u64>,
}

/// A small xorshift, enough to spread the writes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Keeps [`IN_FLIGHT`] writes to distinct random blocks in flight until the connection fails;
/// returns what it saw. `acked` counts the acknowledgements as they come.
fn overwrite_until_cut(mut c: NbdClient, acked: &AtomicU64) -> HashMap<u64, BlockWrites> {
    let mut blocks: HashMap<u64, BlockWrites> = HashMap::new();
    let mut by_cookie: HashMap<u64, u64> = HashMap::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seq = 0u64;
    loop {
        while by_cookie.len() < IN_FLIGHT {
            let block = loop {
                let b = rng.next() % BLOCKS;
                if blocks.get(&b).is_none_or(|w| w.in_flight.is_none()) {
                    break b;
                }
            };
            seq += 1;
            // Marked in flight before it is sent: a write cut off mid-send may have landed.
            blocks.entry(block).or_default().in_flight = Some(seq);
            by_cookie.insert(seq, block);
            if c.send_write(seq, block * 4096, &block_of(seq)).is_err() {
                return blocks;
            }
        }
        match c.reply() {
            Ok(r) => {
                assert_eq!(r.errno, 0, "write {} failed", r.cookie);
                let block = by_cookie.remove(&r.cookie).expect("a cookie we sent");
                let w = blocks.get_mut(&block).unwrap();
                assert_eq!(w.in_flight, Some(r.cookie));
                w.acked = w.in_flight.take();
                acked.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => return blocks,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_in_flight_at_a_sigkill_are_found_after_the_restart() {
    let ServedState {
        dir: _dir,
        state,
        locks,
        api,
        serve,
        client: mut c,
    } = serve_with_template("rfi", BLOCKS).await;
    let sb = create(&mut c, "tpl", "busy").await.unwrap();
    let socket = state.join("nbd").join(
        sb.nbd_uri
            .rsplit_once("/nbd/")
            .map(|(_, s)| s.to_owned())
            .expect("a socket under STATE/nbd"),
    );
    assert!(socket.exists(), "{} from {}", socket.display(), sb.nbd_uri);

    let client = NbdClient::connect(&socket, "busy").unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let acked = acked.clone();
        std::thread::spawn(move || overwrite_until_cut(client, &acked))
    };
    // Let a few hundred writes be acknowledged, then kill the daemon under the client.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while acked.load(Ordering::SeqCst) < 400 {
        assert!(
            std::time::Instant::now() < deadline && !writer.is_finished(),
            "the writes are not being acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    serve.kill9();
    let blocks = writer.join().unwrap();
    let cut = blocks.values().filter(|w| w.in_flight.is_some()).count();
    assert!(cut > 0, "no write was in flight at the kill");

    let _serve = ServeProcess::spawn(&state, &locks);
    let mut c = connect_when_up(&api).await;
    let after = get(&mut c, "busy").await;
    assert_eq!(
        v1::SandboxState::try_from(after.state).unwrap(),
        v1::SandboxState::Running,
        "{}",
        after.message
    );
    assert_eq!(after.nbd_uri, sb.nbd_uri, "served again at the same URI");
    let mut reader = NbdClient::connect_within(&socket, "busy", Duration::from_secs(30));
    let mut checked = 0;
    for (block, w) in &blocks {
        let got = seq_in(&reader.read(block * 4096, 4096).unwrap());
        let ok = got.is_some() && (got == w.acked || got == w.in_flight)
            || got.is_none() && w.acked.is_none();
        assert!(
            ok,
            "block {block}: holds write {got:?}; last acknowledged {:?}, in flight {:?}",
            w.acked, w.in_flight
        );
        if w.acked.is_some() {
            checked += 1;
        }
    }
    assert!(checked > 0);
    eprintln!(
        "{} writes acknowledged over {} blocks ({checked} checked), {cut} in flight at the kill",
        acked.load(Ordering::SeqCst),
        blocks.len()
    );
    reader.disconnect();
}
