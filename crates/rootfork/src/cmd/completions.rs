//! `rootfork completions SHELL`: shell completion scripts (clap_complete).

/// Arguments of `rootfork completions`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

/// Prints the script for `cmd`.
pub fn run(args: Args, mut cmd: clap::Command) -> anyhow::Result<()> {
    let name = cmd.get_name().to_owned();
    clap_complete::generate(args.shell, &mut cmd, name, &mut std::io::stdout());
    Ok(())
}
