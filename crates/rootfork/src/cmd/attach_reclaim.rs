//! The reclaim `rootfork nbd attach` runs beside its attach: dead rootfork devices disconnected
//! (by the rule in `rootfork_kernel::reclaim`) on a thread of its own, over its own netlink
//! socket (two threads must not share one: each would skip the other's answers).
//!
//! The thread starts at once (its start-up and netlink socket overlap the overlay's creation)
//! but walks the slots only once the attach has claimed its slot, or when the attach waits for
//! it: the walk and the claim take the same per-process probe lock slot by slot, and under a slow
//! CPU (the TCG test VM) the claim took about twice as long while the walk ran. The claim passes
//! over a dead device's slot anyway (it is not quiescent), so the reclaim only has to be over by
//! the time the device is printed.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::Context;
use rootfork_kernel::reclaim::ReclaimOptions;
use rootfork_kernel::{reclaim, DevicePool, NbdNetlink, PoolEvent, Reclaimed};

use super::phase_profile::mark;

/// Opened once: the reclaim waits on it before its walk.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn open(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        *open = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The reclaim thread and the gate it waits behind.
pub struct Reclaiming {
    gate: Arc<Gate>,
    handle: std::thread::JoinHandle<anyhow::Result<Vec<Reclaimed>>>,
}

/// Starts the reclaim of `pool`'s dead devices: its walk begins when this process claims a slot
/// of `pool` (a pool event) or at [`finish`], whichever comes first.
pub fn start(pool: DevicePool) -> Reclaiming {
    let gate = Arc::new(Gate::default());
    let on_claim = gate.clone();
    pool.subscribe(Arc::new(move |ev: &PoolEvent| {
        if matches!(ev, PoolEvent::Claimed { .. }) {
            on_claim.open();
        }
    }));
    let waiting = gate.clone();
    let handle = std::thread::spawn(move || {
        let control = NbdNetlink::open(Duration::from_secs(10))
            .context("opening the kernel's nbd netlink family for the reclaim")?;
        waiting.wait();
        let done = reclaim(&pool, &control, &ReclaimOptions::default());
        mark("reclaim_done");
        Ok(done?)
    });
    Reclaiming { gate, handle }
}

/// Lets the reclaim walk (if it still waits), waits for it, and logs what it did.
pub fn finish(reclaiming: Option<Reclaiming>) -> anyhow::Result<()> {
    let Some(Reclaiming { gate, handle }) = reclaiming else {
        return Ok(());
    };
    gate.open();
    let done = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the reclaim thread panicked"))?;
    for r in done? {
        if r.deferred.is_some() {
            continue; // logged by reclaim
        }
        tracing::info!(
            index = r.index,
            disconnected = ?r.disconnected,
            cache_removed = ?r.cache_removed,
            error = ?r.error,
            "reclaimed a slot of a dead rootfork process"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Gate;
    use std::sync::Arc;

    #[test]
    fn the_gate_holds_until_opened_and_stays_open() {
        let gate = Arc::new(Gate::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let g = gate.clone();
        let waiter = std::thread::spawn(move || {
            g.wait();
            tx.send(()).expect("the test waits");
        });
        assert!(rx.try_recv().is_err(), "passed a closed gate");
        gate.open();
        rx.recv().expect("the waiter passes once opened");
        waiter.join().expect("no panic");
        gate.wait(); // already open: returns at once
        gate.open(); // idempotent
    }
}
