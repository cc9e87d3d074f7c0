//! `rootfork nbd serve`: a fresh overlay of a template, served over NBD until SIGINT/SIGTERM.

use std::path::PathBuf;

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
    anyhow::bail!("nbd serve is not built yet ({args:?})")
}
