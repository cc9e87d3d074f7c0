//! `rootfork store gc`: garbage collection of the object store shared by daemons (`serve
//! --store`), run from any host that can reach it; no daemon needed.

use std::time::Duration;

use anyhow::Context;
use rootfork::daemon::remote::{gc, Keys, StoreUrl};
use rootfork_store::{CacheConfig, FetchPolicy, RemoteStore, StoreConfig};

use super::output::{bytes, print_json};

/// `rootfork store ...`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Remove the builds no template or sandbox manifest in the store references.
    Gc(GcArgs),
}

/// `rootfork store gc`.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// The object store: s3://BUCKET/PREFIX (AWS_* variables) or a directory.
    #[arg(long, env = "ROOTFORK_STORE")]
    pub store: String,
    /// Only report what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep unreferenced builds younger than this many seconds (an upload whose manifest is
    /// not written yet looks unreferenced).
    #[arg(long, default_value_t = 3600)]
    pub min_age: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    let Command::Gc(a) = cmd;
    let url = StoreUrl::parse(&a.store).map_err(anyhow::Error::msg)?;
    let (backend, prefix) = url.backend();
    let cache = tempfile::tempdir().context("a scratch chunk cache")?;
    let cfg = StoreConfig {
        backend,
        prefix: prefix.clone(),
        fetch: FetchPolicy::default(),
        cache: CacheConfig {
            dir: cache.path().to_owned(),
            budget: 64 << 20,
        },
        runtime_threads: 1,
    };
    let store = RemoteStore::new(&cfg).with_context(|| format!("connecting to {url}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let report = rt
        .block_on(gc::collect(
            &store,
            &Keys::new(&prefix),
            Duration::from_secs(a.min_age),
            a.dry_run,
        ))
        .with_context(|| format!("collecting {url}"))?;
    if a.json {
        print_json(&serde_json::json!({
            "builds": report.builds, "referenced": report.referenced,
            "removed": report.removed.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
            "removed_bytes": report.removed_bytes, "young": report.young, "dry_run": a.dry_run,
        }));
    } else {
        let verb = if a.dry_run { "would remove" } else { "removed" };
        println!(
            "{} builds, {} referenced; {verb} {} ({}); {} unreferenced kept as younger than {} s",
            report.builds,
            report.referenced,
            report.removed.len(),
            bytes(report.removed_bytes),
            report.young,
            a.min_age
        );
        for b in &report.removed {
            println!("  {b}");
        }
    }
    Ok(())
}
