//! Stale writes across kernel connections (docs/kernel.md, *Stale writes*): two connections, a
//! 6 s `NBD_ATTR_TIMEOUT`, and a write W1 the device holds back past it. The kernel marks W1's
//! socket dead and requeues W1 on the other connection; the test then writes W2 to the same
//! block. The held W1 must never land over W2.
//!
//! The device ([`StallingWrites`]) lets W1 go as soon as a write with other data lands over it.
//! Without the fence the requeued copy completes at once (the test gives it 1.5 s), W2 lands and
//! releases W1, which overwrites W2 (`rootfork-nbd/tests/kernel_fence.rs` has that unfenced twin,
//! deterministic, on a fake kernel). With the fence the requeued copy waits for W1; the test
//! releases W1 itself 1.5 s after the kernel shut the socket down, well inside the copy's own
//! timeout. No outcome depends on timing: a fenced copy can never complete early.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rootfork_kernel::AttachOptions;
use rootfork_nbd::testing::StallingWrites;

use crate::common::direct::{direct, read_direct, Aligned};
use crate::common::killable::Killable;
use crate::common::{fresh_overlay, ms, Env};

const AT: u64 = 3 << 20;
const LEN: usize = 4096;
const MARK: u8 = 0x5e;
const NEWER: u8 = 0x7b;

#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn a_write_the_kernel_requeued_never_lands_over_a_newer_one() {
    let env = Env::new();
    if let Err(e) = case(&env) {
        panic!("fence: {e}");
    }
    env.finish();
}

fn filled(byte: u8) -> Aligned {
    let mut a = Aligned::new(LEN);
    a.as_mut().fill(byte);
    a
}

fn case(env: &Env) -> Result<(), String> {
    let overlay = fresh_overlay("fence");
    let stall = Arc::new(StallingWrites::new(
        overlay.clone(),
        &[MARK; 16],
        Duration::from_secs(120),
    ));
    let d = Killable::new(stall.clone());
    let opts = AttachOptions {
        sandbox: "fence".into(),
        connections: 2,
        timeout: Duration::from_secs(6),
        ..Default::default()
    };
    let a = env.attach(&d, &opts);
    let f = direct(&a).map_err(|e| format!("open O_DIRECT: {e}"))?;

    // W1, on its own thread: it returns once the kernel has completed it (on either connection).
    let f1 = f.try_clone().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let w1 = std::thread::spawn(move || f1.write_all_at(filled(MARK).as_ref(), AT));
    if !stall.wait_holding(Duration::from_secs(30)) {
        return Err("W1 never reached the device".into());
    }
    // The kernel's timeout marks W1's socket dead (shutdown) and requeues W1 elsewhere.
    let t = Instant::now();
    while d.hung_up_count() == 0 {
        if t.elapsed() > Duration::from_secs(60) {
            return Err("the kernel never timed W1 out".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let timed_out = started.elapsed();
    // Unfenced, the requeued copy completes at once and W1's write returns; fenced, it waits.
    let t = Instant::now();
    while !w1.is_finished() && t.elapsed() < Duration::from_millis(1500) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let overtook = w1.is_finished();
    if !overtook {
        stall.release();
    }
    w1.join()
        .expect("W1 thread")
        .map_err(|e| format!("W1 failed: {e}"))?;
    f.write_all_at(filled(NEWER).as_ref(), AT)
        .map_err(|e| format!("W2 failed: {e}"))?;
    let t = Instant::now();
    while !stall.stalled_write_applied() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err("the held W1 never finished".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "FENCE: W1 timed out after {:.0} ms; requeued copy overtook the held write: {overtook}; \
         marked writes {}, writes over the held range {}, fenced {}",
        ms(timed_out),
        stall.marked_writes(),
        stall.overtaken(),
        d.inner.fenced_writes()
    );
    if stall.marked_writes() != 2 {
        return Err(format!(
            "the kernel sent W1 {} times, expected 2 (the original and its requeued copy)",
            stall.marked_writes()
        ));
    }
    let via_device = read_direct(&f, LEN, AT).map_err(|e| format!("read back: {e}"))?;
    let mut via_overlay = vec![0u8; LEN];
    overlay
        .read_at(&mut via_overlay, AT)
        .map_err(|e| format!("overlay read: {e}"))?;
    if via_device.as_ref() != filled(NEWER).as_ref() || via_overlay != filled(NEWER).as_ref() {
        return Err(format!(
            "stale data read back: device starts {:#x}, overlay {:#x} (W2 is {NEWER:#x}, W1 {MARK:#x})",
            via_device.as_ref()[0],
            via_overlay[0]
        ));
    }
    if overtook || stall.overtaken() != 0 {
        return Err("a write overtook the held W1".into());
    }
    drop(f);
    env.close(a);
    Ok(())
}
