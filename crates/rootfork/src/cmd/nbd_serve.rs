//! `rootfork nbd serve`: a fresh overlay of a template, served over NBD until SIGINT/SIGTERM.
//!
//! The overlay's cache lives in a private temporary directory; on SIGINT/SIGTERM the server
//! stops accepting, drains its connections (in-flight requests finish), removes its socket, and
//! the overlay and its cache directory are deleted.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};
use rootfork_block::{BlockDevice, Overlay, OverlayOptions, TemplateFile, TemplatePath};
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
        let cache = cache_dir.path().join("overlay.cache");
        Arc::new(
            Overlay::create(base, &cache, OverlayOptions::default())
                .with_context(|| format!("creating the overlay cache {}", cache.display()))?,
        )
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
