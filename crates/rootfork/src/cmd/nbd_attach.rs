//! `rootfork nbd attach`: a fresh overlay attached to a free `/dev/nbdN` until SIGINT/SIGTERM.
//!
//! Each run is its own rootfork instance (a random instance id in the backend identifier, unless
//! `--instance` names one). On start it checks the lock and cache directories (this user's, not
//! writable by others) and reclaims devices whose owner is gone, by the rule in
//! `rootfork_kernel::reclaim`, on a thread of its own beside the attach (`attach_reclaim`: its walk
//! starts once the attach has claimed its slot, so the two do not take turns on the slots; the
//! claim passes over a dead device's slot anyway: it is not quiescent; only when no slot is left
//! does the attach wait for the reclaim and try again), so the walk overlaps the connect; the
//! device is printed once both are done. It creates the overlay
//! (cache file `<cache-dir>/attach-<instance>-<sandbox>.cache`, recorded in the slot's claim so a
//! later reclaim can remove it after a crash), attaches it, prints the device path as the first
//! line on stdout, and serves until signalled; then it flushes, detaches (waiting for the
//! kernel's teardown) and releases the slot.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};
use rootfork_block::{BlockDevice, Overlay, OverlayOptions, TemplateFile, TemplatePath};
use rootfork_kernel::identity::Identity;
use rootfork_kernel::pool::PrivateDir;
use rootfork_kernel::{
    AttachError, AttachOptions, Attacher, DevicePool, HostNodes, NbdDispatcher, NbdNetlink,
    PoolConfig, PoolError,
};
use rootfork_nbd::ServeOptions;

use super::attach_reclaim;
use super::nbd_attach_argv::{DEFAULT_CACHE_DIR, DEFAULT_LOCK_DIR};
use super::phase_profile::mark;

/// Arguments of `rootfork nbd attach`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The read-only template image.
    #[arg(long)]
    pub template: PathBuf,
    /// Number of sockets (kernel connections) for the device.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// The sandbox name (in the claim and the device's backend identifier).
    #[arg(long)]
    pub sandbox: Option<String>,
    /// Directory for the overlay's cache file.
    #[arg(long, env = "ROOTFORK_CACHE_DIR", default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Directory of the host-wide slot lock files (the same for every rootfork on the host).
    #[arg(long, env = "ROOTFORK_NBD_LOCK_DIR", default_value = DEFAULT_LOCK_DIR)]
    pub lock_dir: PathBuf,
    /// The kernel's request timeout in seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// The device's logical block size in bytes (512 to the page size, a power of two; the
    /// template's size must be a multiple of it). 512 mounts every file system; a larger one
    /// refuses file systems with smaller blocks.
    #[arg(long, default_value_t = rootfork_kernel::BLOCK_SIZE)]
    pub block_size: u64,
    /// Seconds the kernel waits for a dead connection to be replaced before failing I/O (none by
    /// default: at once). Recorded in the claim: another rootfork instance reclaims the device
    /// only this long after its owner is found gone.
    #[arg(long)]
    pub dead_conn_timeout: Option<u64>,
    /// The rootfork instance id to attach as (1 to 64 of [0-9A-Za-z_-]); a new random one by
    /// default. An instance reclaims its own orphaned devices at once.
    #[arg(long)]
    pub instance: Option<String>,
    /// Skip reclaiming dead rootfork devices on start.
    #[arg(long)]
    pub no_reclaim: bool,
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    // Block the signals before any thread exists so every thread inherits the mask and the
    // main thread alone receives them with sigwait.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking SIGINT/SIGTERM")?;

    let identity = match &args.instance {
        Some(id) => Identity::this_boot(id),
        None => Identity::new_instance(),
    }
    .context("naming this rootfork instance")?;
    mark("identity");
    let sandbox = args
        .sandbox
        .clone()
        .unwrap_or_else(|| format!("attach-{}", identity.instance));
    // Both directories are checked before anything is written into them.
    PrivateDir::open(&args.cache_dir).context("the cache directory")?;
    mark("cache_dir");
    let pool = DevicePool::new(PoolConfig {
        lock_dir: args.lock_dir.clone(),
        cache_dir: Some(args.cache_dir.clone()),
        ..PoolConfig::with_identity(identity.clone())
    });
    pool.check_lock_dir().context("the lock directory")?;
    mark("lock_dir");
    let control = Arc::new(
        NbdNetlink::open(Duration::from_secs(10))
            .context("opening the kernel's nbd netlink family (is the nbd module loaded?)")?,
    );
    mark("netlink");
    let mut reclaiming = (!args.no_reclaim).then(|| attach_reclaim::start(pool.clone()));
    mark("reclaim_spawned");

    let template = TemplateFile::open(&TemplatePath::new(&args.template))
        .with_context(|| format!("opening template {}", args.template.display()))?;
    mark("template");
    // The instance id, unlike a pid (1 in every pid namespace), is this run's own.
    let cache = args.cache_dir.join(format!(
        "attach-{}-{}.cache",
        identity.instance,
        sanitize(&sandbox)
    ));
    let overlay: Arc<dyn BlockDevice> = Arc::new(
        Overlay::create(Arc::new(template), &cache, OverlayOptions::default())
            .with_context(|| format!("creating the overlay cache {}", cache.display()))?,
    );
    mark("overlay");
    let dispatcher = NbdDispatcher::new(overlay, ServeOptions::default());
    let attacher = Attacher::new(pool, control, Arc::new(HostNodes));
    let opts = AttachOptions {
        sandbox: sandbox.clone(),
        connections: args.connections as usize,
        timeout: Duration::from_secs(args.timeout.max(1)),
        block_size: args.block_size,
        dead_conn_timeout: args.dead_conn_timeout.map(Duration::from_secs),
        cache_path: Some(cache.clone()),
        ..AttachOptions::default()
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .context("starting the runtime")?;
    mark("runtime");
    let attachment = match rt.block_on(attacher.attach(&dispatcher, &opts)) {
        // Every slot taken: the reclaim may free one.
        Err(AttachError::Pool(PoolError::Exhausted { .. })) if reclaiming.is_some() => {
            attach_reclaim::finish(reclaiming.take())?;
            rt.block_on(attacher.attach(&dispatcher, &opts))
        }
        other => other,
    }
    .context("attaching the overlay")?;
    mark("attached");
    // Once the device is printed the reclaim is over (callers may rely on the dead devices being
    // gone by then).
    attach_reclaim::finish(reclaiming.take())?;
    mark("reclaim_joined");
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", attachment.device_path().display())?;
    out.flush()?;
    drop(out);
    mark("printed");
    super::phase_profile::report();
    tracing::info!(
        device = %attachment.device_path().display(),
        sandbox,
        template = %args.template.display(),
        latency_ms = attachment.connect_latency().as_secs_f64() * 1e3,
        "attached; serving until SIGINT/SIGTERM"
    );

    let sig = signals.wait().context("waiting for a signal")?;
    tracing::info!(?sig, "detaching");
    let closed = rt.block_on(attachment.close());
    drop(dispatcher); // the overlay goes with it, and its cache file
    closed.context("detaching")?;
    Ok(())
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
