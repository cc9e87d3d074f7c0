//! One module per subcommand; each has an `Args` (clap) and a `run`.

pub mod attach_reclaim;
pub mod client_opts;
pub mod completions;
pub mod device;
pub mod events;
pub mod generate;
pub mod nbd_attach;
pub mod nbd_attach_argv;
pub mod nbd_list;
pub mod nbd_reclaim;
pub mod nbd_serve;
pub mod output;
pub mod phase_profile;
pub mod sandbox;
pub mod serve;
pub mod store;
pub mod template;

/// Logs to stderr; `RUST_LOG` picks the level (default `info`).
pub fn init_logging() {
    let b = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(stderr_is_terminal());
    // Without `RUST_LOG`, a plain level filter: parsing filter directives is a measurable
    // part of a short command's start-up (`nbd attach` is timed from its spawn).
    match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => b.with_env_filter(filter).init(),
        Err(_) => b.with_max_level(tracing::Level::INFO).init(),
    }
}

/// Logs to stderr in `format` for the daemon; `RUST_LOG` picks the level (default `info`, with the
/// NBD server's per-connection lines — one per health probe — at `warn`).
pub fn init_logging_as(format: rootfork::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rootfork_nbd::server=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(stderr_is_terminal());
    match format {
        rootfork::config::LogFormat::Json => b.json().init(),
        rootfork::config::LogFormat::Text => b.init(),
    }
}

/// Colours only for a person at a terminal, never in log files or pipes.
fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
