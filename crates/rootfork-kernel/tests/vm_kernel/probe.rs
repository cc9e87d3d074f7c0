//! Helpers for the guest's shell checks, which hold kernel state (a device kept open, an orphaned
//! device) while they call one of these with `--exact`; they assert nothing and are skipped in the
//! full run (`--skip probe::`).

use rootfork_kernel::{DevicePool, PoolConfig};

/// Claims every free slot, prints `CLAIM_ALL claimed=N not_quiescent={…}` (how many it got and
/// what the pool's quiescence check refused), releases them.
#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn claim_all() {
    let pool = DevicePool::new(PoolConfig::default());
    let mut held = Vec::new();
    while let Ok(l) = pool.claim("claim-all") {
        held.push(l);
    }
    let m = pool.metrics();
    println!(
        "CLAIM_ALL claimed={} not_quiescent={}",
        held.len(),
        serde_json::to_string(&m.not_quiescent_skips).unwrap_or_default()
    );
}
