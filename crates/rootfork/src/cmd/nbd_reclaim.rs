//! `rootfork nbd reclaim`: disconnects rootfork devices whose owner is gone and cleans up dead
//! claims, by the rule in `rootfork_kernel::reclaim` (its own instance's at once, another
//! instance's once its `dead_conn_timeout` has passed, any with `--force`). A device whose claim
//! lock is held is never touched.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use rootfork_kernel::identity::Identity;
use rootfork_kernel::reclaim::{ReclaimOptions, Reclaimed};
use rootfork_kernel::{reclaim, DevicePool, NbdNetlink, PoolConfig};

/// Arguments of `rootfork nbd reclaim`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also disconnect orphaned rootfork devices of other instances whose `dead_conn_timeout`
    /// has not passed, or that have no claim record in this lock directory.
    #[arg(long)]
    pub force: bool,
    /// Reclaim as this rootfork instance (its orphans are taken at once); a new one by default.
    #[arg(long)]
    pub instance: Option<String>,
    /// Directory of the host-wide slot lock files.
    #[arg(
        long,
        env = "ROOTFORK_NBD_LOCK_DIR",
        default_value = "/run/rootfork/nbd"
    )]
    pub lock_dir: PathBuf,
    /// The cache directory whose files dead claims may name for removal (none are removed
    /// without it).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Seconds to wait, in all, for the kernel's teardown of the disconnected devices.
    #[arg(long, default_value_t = 10)]
    pub wait: u64,
    /// Print JSON instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    let identity = match &args.instance {
        Some(id) => Identity::this_boot(id),
        None => Identity::new_instance(),
    }
    .context("naming this rootfork instance")?;
    let pool = DevicePool::new(PoolConfig {
        lock_dir: args.lock_dir.clone(),
        identity,
        cache_dir: args.cache_dir.clone(),
        ..PoolConfig::default()
    });
    pool.check_lock_dir().context("the lock directory")?;
    let control = NbdNetlink::open(Duration::from_secs(10))
        .context("opening the kernel's nbd netlink family (is the nbd module loaded?)")?;
    let opts = ReclaimOptions {
        force: args.force,
        quiesce_wait: Duration::from_secs(args.wait),
    };
    let rows = reclaim(&pool, &control, &opts).context("reclaiming nbd slots")?;
    let mut out = String::new();
    if args.json {
        out = serde_json::to_string_pretty(&rows)?;
        out.push('\n');
    } else {
        for r in &rows {
            out.push_str(&line(r));
            out.push('\n');
        }
    }
    std::io::stdout()
        .lock()
        .write_all(out.as_bytes())
        .context("writing the result")?;
    if rows.iter().any(|r| r.error.is_some()) {
        anyhow::bail!("some slots could not be reclaimed (see above)");
    }
    Ok(())
}

fn line(r: &Reclaimed) -> String {
    let dev = rootfork_kernel::device_path(r.index);
    let dev = dev.display();
    if let Some(e) = &r.error {
        return format!("{dev} failed: {e}");
    }
    if let Some(d) = &r.deferred {
        return format!("{dev} left connected: {d:?} (use --force to take it now)");
    }
    let mut s = match &r.disconnected {
        Some(b) => format!("{dev} disconnected ({b})"),
        None => format!("{dev} dead claim cleared"),
    };
    if let Some(c) = &r.cache_removed {
        s.push_str(&format!(", removed {}", c.display()));
    }
    s
}
