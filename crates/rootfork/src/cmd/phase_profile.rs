//! Per-phase timestamps of a short command (`rootfork nbd attach`), for profiling its start-up
//! under a slow machine (the TCG test VM): enabled by `ROOTFORK_PHASE_PROFILE=1`, off (one env
//! read) otherwise.
//!
//! Each [`mark`] records `CLOCK_MONOTONIC` (system-wide, so comparable with another process's
//! clock). [`report`] prints one line to stderr,
//! `PHASES t0=<ns> main=<ms> <phase>=<ms> … minflt=<n> majflt=<n>`, every time relative to
//! `ROOTFORK_PHASE_T0_NS` when the caller set it (the monotonic time just before it spawned this
//! process, e.g. `attach_timer`), else to the first mark; the page faults are this process's so
//! far (`/proc/self/stat`).

use std::sync::{Mutex, OnceLock};

/// The environment variable that enables the profile.
pub const ENABLE_VAR: &str = "ROOTFORK_PHASE_PROFILE";
/// The environment variable with the caller's spawn time (`CLOCK_MONOTONIC`, nanoseconds).
pub const T0_VAR: &str = "ROOTFORK_PHASE_T0_NS";

/// The phases marked so far: name and `CLOCK_MONOTONIC` nanoseconds.
type Marks = Mutex<Vec<(&'static str, u128)>>;

fn marks() -> Option<&'static Marks> {
    static MARKS: OnceLock<Option<Marks>> = OnceLock::new();
    MARKS
        .get_or_init(|| {
            std::env::var_os(ENABLE_VAR)
                .is_some_and(|v| v == "1")
                .then(|| Mutex::new(Vec::new()))
        })
        .as_ref()
}

/// `CLOCK_MONOTONIC` in nanoseconds (0 if the clock cannot be read).
pub fn now_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call, and
    // CLOCK_MONOTONIC is always available on Linux.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Records that `phase` ended now (nothing when the profile is off).
pub fn mark(phase: &'static str) {
    if let Some(m) = marks() {
        let t = now_ns();
        if let Ok(mut v) = m.lock() {
            v.push((phase, t));
        }
    }
}

/// This process's minor and major page faults so far.
fn page_faults() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, minflt 10,
    // majflt 12.
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(7)?.parse().ok()?, f.get(9)?.parse().ok()?))
}

/// Prints the marks so far as one `PHASES …` line on stderr (nothing when the profile is off).
pub fn report() {
    let Some(m) = marks() else {
        return;
    };
    let Ok(v) = m.lock() else {
        return;
    };
    let t0 = std::env::var(T0_VAR)
        .ok()
        .and_then(|s| s.parse::<u128>().ok())
        .or_else(|| v.first().map(|(_, t)| *t))
        .unwrap_or(0);
    let mut line = format!("PHASES t0={t0}");
    for (phase, t) in v.iter() {
        let ms = t.saturating_sub(t0) as f64 / 1e6;
        line.push_str(&format!(" {phase}={ms:.1}"));
    }
    if let Some((minflt, majflt)) = page_faults() {
        line.push_str(&format!(" minflt={minflt} majflt={majflt}"));
    }
    eprintln!("{line}");
}
