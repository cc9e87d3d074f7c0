//! `rootfork nbd serve`: a fresh overlay of a template, served over NBD until SIGINT/SIGTERM.
//!
//! The overlay's cache lives in a private temporary directory; on SIGINT/SIGTERM the server
//! stops accepting, drains its connections (in-flight requests finish), removes its socket, and
//! the overlay and its cache directory are deleted. With `--cache PATH` the cache is created at
//! PATH instead and kept at exit; with `--persist-state` its block state is kept beside it
//! (`PATH.state`), so `--reopen` can serve it again after the server was killed (and, with
//! `--durable`, after a power loss: see docs/overlay.md).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};
use rootfork_block::{
    BlockDevice, Durability, Overlay, OverlayOptions, TemplateFile, TemplatePath,
};
use rootfork_nbd::{Export, ServeOptions, Server};

/// How long in-flight requests may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Arguments of `rootfork nbd serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The read-only template image.
    #[arg(long)]
    pub template: PathBuf,
    /// The Unix socket to listen on (created 0600).
    #[arg(long)]
    pub socket: PathBuf,
    /// The export name.
    #[arg(long, default_value = "")]
    pub export: String,
    /// Also listen on this TCP address (for example 127.0.0.1:10809).
    #[arg(long)]
    pub tcp: Option<std::net::SocketAddr>,
    /// Serve the template read-only, without an overlay.
    #[arg(long)]
    pub read_only: bool,
    /// Create the overlay's cache at this path (it must not exist) and keep it at exit, instead
    /// of a private temporary directory that is deleted.
    #[arg(long, conflicts_with = "read_only")]
    pub cache: Option<PathBuf>,
    /// Keep the overlay's block state in `<cache>.state`: every acknowledged write survives the
    /// server being killed.
    #[arg(long, conflicts_with = "read_only")]
    pub persist_state: bool,
    /// Make FLUSH and FUA durable (fdatasync; with --persist-state also a state checkpoint, so
    /// flushed writes survive a power loss).
    #[arg(long, conflicts_with = "read_only")]
    pub durable: bool,
    /// Reopen the existing overlay at --cache (created with --persist-state) instead of creating
    /// one, after the server that served it died.
    #[arg(long, requires = "cache")]
    pub reopen: bool,
}

impl Args {
    fn overlay_options(&self) -> OverlayOptions {
        OverlayOptions {
            durability: if self.durable {
                Durability::Durable
            } else {
                Durability::Ephemeral
            },
            keep_cache: self.cache.is_some(),
            persist_state: self.persist_state || self.reopen,
            ..OverlayOptions::default()
        }
    }
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    // Block the signals before any thread exists so every thread inherits the mask and the
    // main thread alone receives them with sigwait.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking SIGINT/SIGTERM")?;

    let path = TemplatePath::new(&args.template);
    let template = TemplateFile::open(&path)
        .with_context(|| format!("opening template {}", args.template.display()))?;
    let base: Arc<dyn BlockDevice> = Arc::new(template);
    let cache_dir = tempfile::Builder::new()
        .prefix("rootfork-nbd-serve-")
        .tempdir()
        .context("creating the overlay cache directory")?;
    let device: Arc<dyn BlockDevice> = if args.read_only {
        base
    } else {
        let cache = match &args.cache {
            Some(path) => path.clone(),
            None => cache_dir.path().join("overlay.cache"),
        };
        let opts = args.overlay_options();
        let overlay = if args.reopen {
            let (overlay, report) = Overlay::reopen(base, &cache, opts)
                .with_context(|| format!("reopening the overlay cache {}", cache.display()))?;
            tracing::info!(
                copy = ?report.copy,
                blocks_data = report.blocks_data,
                blocks_zero = report.blocks_zero,
                generation = report.generation,
                "reopened the overlay"
            );
            overlay
        } else {
            Overlay::create(base, &cache, opts)
                .with_context(|| format!("creating the overlay cache {}", cache.display()))?
        };
        Arc::new(overlay)
    };
    let size = device.size();

    let server = Server::new(ServeOptions::default());
    server.add_export(Export {
        name: args.export.clone(),
        description: format!("rootfork overlay of {}", args.template.display()),
        device,
    })?;
    server.listen_unix(&args.socket)?;
    let tcp = match args.tcp {
        Some(addr) => Some(server.listen_tcp(addr)?),
        None => None,
    };
    tracing::info!(
        template = %args.template.display(),
        socket = %args.socket.display(),
        tcp = ?tcp,
        export = args.export,
        size,
        read_only = args.read_only,
        "serving over NBD"
    );

    let sig = signals.wait().context("waiting for a signal")?;
    tracing::info!("{sig:?}: shutting down");
    server.shutdown(SHUTDOWN_GRACE);
    let stats = server.stats();
    drop(server);
    drop(cache_dir);
    tracing::info!(requests = stats.total_requests(), "stopped");
    Ok(())
}
