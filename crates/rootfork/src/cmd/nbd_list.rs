//! `rootfork nbd list`: every `/dev/nbdN` slot with its state.

/// Arguments of `rootfork nbd list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::bail!("nbd list is not built yet ({args:?})")
}
