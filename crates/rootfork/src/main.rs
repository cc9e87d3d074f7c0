//! The `rootfork` command: the daemon (`serve`), its clients (`template`, `sandbox`, `device`,
//! `events`), shell completions, man pages (hidden `generate man`), and direct NBD tools
//! (`nbd serve|attach|list|reclaim`).

mod cmd;

use clap::{CommandFactory, Parser, Subcommand};

/// rootfork gives every microVM sandbox its own writable root disk, forked in O(1) from a shared
/// read-only template.
#[derive(Debug, Parser)]
#[command(name = "rootfork", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A client command group with the options that find the daemon.
#[derive(Debug, clap::Args)]
struct Client<C: Subcommand> {
    #[command(flatten)]
    client: cmd::client_opts::ClientOpts,
    #[command(subcommand)]
    command: C,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (gRPC API on a Unix socket; builds a demo template on a first start).
    Serve(cmd::serve::Args),
    /// Manage templates.
    Template(Client<cmd::template::Command>),
    /// Manage sandboxes.
    Sandbox(Client<cmd::sandbox::Command>),
    /// Kernel NBD devices.
    Device(Client<cmd::device::Command>),
    /// Follow the daemon's events.
    Events(cmd::events::Args),
    /// The object store shared by daemons (`serve --store`).
    #[command(subcommand)]
    Store(cmd::store::Command),
    /// Print a shell completion script.
    Completions(cmd::completions::Args),
    /// Generate packaging files from the CLI (man pages).
    #[command(subcommand, hide = true)]
    Generate(cmd::generate::Command),
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
    /// Disconnect rootfork devices whose owner is gone (another instance's only after its
    /// dead_conn_timeout, unless --force).
    Reclaim(cmd::nbd_reclaim::Args),
}

/// Whether `command` is a short-lived client whose output may go to a pipe that closes early
/// (`rootfork template list | head -1`). Servers keep ignoring `SIGPIPE`: for them a client that
/// hangs up is an `EPIPE` to handle, not a reason to die.
fn prints_for_a_pipe(command: &Command) -> bool {
    !matches!(
        command,
        Command::Serve(_) | Command::Nbd(NbdCommand::Serve(_) | NbdCommand::Attach(_))
    )
}

/// Lets `SIGPIPE` end the process quietly, as it does for other command-line tools, instead of
/// `println!` panicking on `EPIPE` (Rust ignores `SIGPIPE` before `main`).
fn restore_default_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: called first thing in `main`, before any thread exists; installing the default
    // disposition involves no handler code, so nothing can run concurrently with it.
    if let Err(e) = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        eprintln!("rootfork: cannot restore SIGPIPE: {e}");
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if prints_for_a_pipe(&cli.command) {
        restore_default_sigpipe();
    }
    let result = match cli.command {
        Command::Serve(args) => cmd::serve::run(args),
        Command::Completions(args) => cmd::completions::run(args, Cli::command()),
        Command::Generate(c) => cmd::generate::run(c, Cli::command()),
        Command::Template(c) => cmd::template::run(c.client, c.command),
        Command::Sandbox(c) => cmd::sandbox::run(c.client, c.command),
        Command::Device(c) => cmd::device::run(c.client, c.command),
        Command::Events(a) => cmd::events::run(a),
        Command::Store(c) => cmd::store::run(c),
        Command::Nbd(n) => {
            cmd::init_logging();
            match n {
                NbdCommand::Serve(args) => cmd::nbd_serve::run(args),
                NbdCommand::Attach(args) => cmd::nbd_attach::run(args),
                NbdCommand::List(args) => cmd::nbd_list::run(args),
                NbdCommand::Reclaim(args) => cmd::nbd_reclaim::run(args),
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("rootfork: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
