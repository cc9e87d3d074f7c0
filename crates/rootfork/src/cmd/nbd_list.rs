//! `rootfork nbd list`: every `/dev/nbdN` slot with its state.

use std::path::PathBuf;

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::Context;
use rootfork_kernel::pool::now_ms;
use rootfork_kernel::{DevicePool, PoolConfig, SlotStatus};

/// Arguments of `rootfork nbd list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Directory of the host-wide slot lock files.
    #[arg(
        long,
        env = "ROOTFORK_NBD_LOCK_DIR",
        default_value = "/run/rootfork/nbd"
    )]
    pub lock_dir: PathBuf,
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    let pool = DevicePool::new(PoolConfig {
        lock_dir: args.lock_dir,
        ..PoolConfig::default()
    });
    let slots = pool.list().context("listing nbd slots")?;
    let mut out = String::new();
    if args.json {
        out = serde_json::to_string_pretty(&slots)?;
        out.push('\n');
    } else {
        table(&mut out, &slots)?;
    }
    // A reader that stops early (`| head`, `| grep -q`) is not an error.
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing the listing"),
    }
}

fn table(out: &mut String, slots: &[SlotStatus]) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:<12} {:<10} {:>7} {:>8} {:<20} BACKEND",
        "DEVICE", "STATE", "PID", "AGE_S", "SANDBOX"
    )?;
    let now = now_ms();
    for s in slots {
        let state = serde_json::to_value(s.state)?;
        writeln!(
            out,
            "{:<12} {:<10} {:>7} {:>8} {:<20} {}",
            s.device.display(),
            state.as_str().unwrap_or("?"),
            s.owner_pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            s.since_ms
                .map(|t| format!("{:.1}", now.saturating_sub(t) as f64 / 1e3))
                .unwrap_or_else(|| "-".into()),
            s.sandbox.as_deref().unwrap_or("-"),
            s.backend.as_deref().unwrap_or("-"),
        )?;
    }
    Ok(())
}
