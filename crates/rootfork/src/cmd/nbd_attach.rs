//! `rootfork nbd attach`: a fresh overlay attached to a free `/dev/nbdN` until SIGINT/SIGTERM.

use std::path::PathBuf;

/// Arguments of `rootfork nbd attach`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The read-only template image.
    #[arg(long)]
    pub template: PathBuf,
    /// Number of sockets (kernel connections) for the device.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::bail!("nbd attach is not built yet ({args:?})")
}
