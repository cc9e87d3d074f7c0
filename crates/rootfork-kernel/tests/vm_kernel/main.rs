//! Kernel-in-the-loop tests of rootfork-kernel against the real nbd driver: they need
//! `/dev/nbdN` (nbd.ko loaded with `nbds_max=16`) and root, so every test is `#[ignore]`d and runs
//! inside the test VM, which builds this target with `cargo test --no-run`, installs the binary as
//! `/bin/vm_kernel` and runs it with `--ignored --test-threads=1` (the tests share the kernel's
//! devices). See `tests/vm/kernel/run.sh` and docs/kernel.md.
//!
//! - pass/fail checks: `fence` (a write the kernel timed out and requeued on the other
//!   connection never lands over a newer one), `refusal` (a connect the kernel refuses), `netlink` (STATUS, RECONFIGURE,
//!   DISCONNECT of an idle device), `reconnect` (a killed kernel connection: detection, I/O while
//!   dead, RECONFIGURE) and `reconnect_edges` (a request in flight at the kill, a spare socket,
//!   kill/reconnect churn, close with every connection dead);
//! - `timing::*`: attach and reconnect latencies, printed as `LATENCY …` lines and checked only
//!   for sanity (the guest runs them after the checks, with `LATENCY_N` attaches);
//! - `probe::*`: helpers the guest's shell checks call while they hold kernel state (not part of
//!   the full run: `--skip probe::`).
//!
//! Inputs: `ROOTFORK_VM_TEMPLATE` (the template image), `LATENCY_N` (default 100),
//! `RECONNECT_N` (reconnect timing cycles, default 30).

#[path = "../common/mod.rs"]
mod common;

mod fence;
mod netlink;
mod probe;
mod reconnect;
mod reconnect_edges;
mod refusal;
mod timing;
