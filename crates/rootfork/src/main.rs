//! The `rootfork` command: serves copy-on-write root disks for microVM sandboxes.

mod cmd;

use clap::{Parser, Subcommand};

/// rootfork gives every microVM sandbox its own writable root disk, forked in O(1) from a shared
/// read-only template.
#[derive(Debug, Parser)]
#[command(name = "rootfork", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve or attach overlays over NBD directly, without the daemon.
    #[command(subcommand)]
    Nbd(NbdCommand),
}

#[derive(Debug, Subcommand)]
enum NbdCommand {
    /// Serve a fresh copy-on-write overlay of a template over NBD (Unix socket, optionally TCP).
    Serve(cmd::nbd_serve::Args),
    /// Attach a fresh overlay of a template to a free /dev/nbdN and serve it until signalled.
    Attach(cmd::nbd_attach::Args),
    /// List the kernel's /dev/nbdN slots and their state.
    List(cmd::nbd_list::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cmd::init_logging();
    let result = match cli.command {
        Command::Nbd(NbdCommand::Serve(args)) => cmd::nbd_serve::run(args),
        Command::Nbd(NbdCommand::Attach(args)) => cmd::nbd_attach::run(args),
        Command::Nbd(NbdCommand::List(args)) => cmd::nbd_list::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("rootfork: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
