//! `rootfork generate man DIR` (hidden): man pages generated from the CLI's own definition
//! (clap_mangen), so the packaged pages never drift from the flags. `scripts/package` calls it;
//! shell completions come from the visible `rootfork completions SHELL`.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// What to generate.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Write rootfork.1 and one page per subcommand (rootfork-serve.1, rootfork-nbd-attach.1, …)
    /// into DIR.
    Man {
        /// Output directory (created if missing).
        out_dir: PathBuf,
    },
}

/// Runs `command` for the CLI `cli`.
pub fn run(command: Command, cli: clap::Command) -> anyhow::Result<()> {
    match command {
        Command::Man { out_dir } => {
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let mut cli = cli;
            cli.build();
            let written = write_pages(&cli, cli.get_name(), &out_dir)?;
            eprintln!("wrote {written} man pages to {}", out_dir.display());
            Ok(())
        }
    }
}

/// Writes the page of `cmd` as `NAME.1` and recurses into its visible subcommands, naming each
/// page after its full command line joined by `-` (`rootfork-nbd-serve.1`). Returns the count.
fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> anyhow::Result<usize> {
    let page = cmd.clone().name(name.to_owned());
    let mut text = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut text)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let mut written = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        written += write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(written)
}
