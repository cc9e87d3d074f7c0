//! The `rootfork` command: the daemon (`serve`), its clients (`template`, `sandbox`, `device`,
//! `events`), shell completions, man pages (hidden `generate man`), and direct NBD tools
//! (`nbd serve|attach|list|reclaim`).

mod cmd;
#[cfg(test)]
mod main_tests;

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
    #[command(about = ATTACH_ABOUT)]
    Attach(cmd::nbd_attach::Args),
    /// List the kernel's /dev/nbdN slots and their state.
    List(cmd::nbd_list::Args),
    /// Disconnect rootfork devices whose owner is gone (another instance's only after its
    /// dead_conn_timeout, unless --force).
    Reclaim(cmd::nbd_reclaim::Args),
}

/// `rootfork nbd attach` alone, parsed by a parser of its own arguments: building the whole
/// command tree (every subcommand's arguments and help) was about a third of the attach's
/// start-up under a slow CPU (the TCG test VM: ~40 ms), and an attach is timed from its spawn.
/// Its usual argument lists are read without clap at all (`cmd::nbd_attach_argv`); the rest
/// goes through this parser. The arguments, their environment variables and messages are the
/// same `cmd::nbd_attach::Args`.
#[derive(Debug, Parser)]
#[command(
    name = "rootfork nbd attach",
    bin_name = "rootfork nbd attach",
    about = ATTACH_ABOUT
)]
struct AttachCli {
    #[command(flatten)]
    args: cmd::nbd_attach::Args,
}

const ATTACH_ABOUT: &str =
    "Attach a fresh overlay of a template to a free /dev/nbdN and serve it until signalled.";

/// The arguments of `rootfork nbd attach …` when `argv` is that command (exits with clap's
/// message on bad arguments, like the full parser); `None` for every other command.
fn attach_args<I>(argv: I) -> Option<cmd::nbd_attach::Args>
where
    I: IntoIterator<Item = std::ffi::OsString>,
{
    parse_attach(argv).map(|r| r.unwrap_or_else(|e| e.exit()))
}

/// [`attach_args`] without the exit: `None` for another command, else the parse.
fn parse_attach<I>(argv: I) -> Option<Result<cmd::nbd_attach::Args, clap::Error>>
where
    I: IntoIterator<Item = std::ffi::OsString>,
{
    let mut argv = argv.into_iter();
    let _bin = argv.next();
    if argv.next()? != "nbd" || argv.next()? != "attach" {
        return None;
    }
    let rest: Vec<std::ffi::OsString> = argv.collect();
    if let Some(args) = cmd::nbd_attach_argv::parse(&rest) {
        return Some(Ok(args));
    }
    let rest = std::iter::once(std::ffi::OsString::from("rootfork nbd attach")).chain(rest);
    Some(AttachCli::try_parse_from(rest).map(|c| c.args))
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
    cmd::phase_profile::mark("main");
    if let Some(args) = attach_args(std::env::args_os()) {
        cmd::phase_profile::mark("parsed");
        cmd::init_logging();
        cmd::phase_profile::mark("logging");
        return exit_code(cmd::nbd_attach::run(args));
    }
    let cli = Cli::parse();
    cmd::phase_profile::mark("parsed");
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
            cmd::phase_profile::mark("logging");
            match n {
                NbdCommand::Serve(args) => cmd::nbd_serve::run(args),
                NbdCommand::Attach(args) => cmd::nbd_attach::run(args),
                NbdCommand::List(args) => cmd::nbd_list::run(args),
                NbdCommand::Reclaim(args) => cmd::nbd_reclaim::run(args),
            }
        }
    };
    exit_code(result)
}

/// Success, or the error's chain on stderr and a failure status.
fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("rootfork: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
