//! `rootfork serve`: run the daemon until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use rootfork::config::{Config, FileConfig, LogFormat, Overrides};
use rootfork::daemon::Daemon;

/// Arguments of `rootfork serve` (each flag falls back to its environment variable, then to the
/// config file, then to the built-in default).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "ROOTFORK_CONFIG")]
    pub config: Option<PathBuf>,
    /// State directory [default: $XDG_STATE_HOME/rootfork, else ./.rootfork].
    #[arg(long, env = "ROOTFORK_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// API Unix socket [default: STATE/api.sock].
    #[arg(long, env = "ROOTFORK_API_SOCKET")]
    pub api_socket: Option<PathBuf>,
    /// Also serve the API on TCP (bearer token required).
    #[arg(long, env = "ROOTFORK_API_TCP")]
    pub api_tcp: Option<SocketAddr>,
    /// Bearer token file for TCP [default: generated at STATE/api.token].
    #[arg(long, env = "ROOTFORK_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Prometheus endpoint: off, 127.0.0.1:PORT or unix:/PATH [default: off].
    #[arg(long, env = "ROOTFORK_METRICS")]
    pub metrics: Option<String>,
    /// Log format.
    #[arg(long, env = "ROOTFORK_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Do not build the demo template on a first start.
    #[arg(long, env = "ROOTFORK_NO_DEMO")]
    pub no_demo: bool,
    /// Delete every sandbox on SIGTERM (by default they are kept: running socket sandboxes are
    /// served again by the next start, the others paused).
    #[arg(long, env = "ROOTFORK_DELETE_ON_EXIT")]
    pub delete_on_exit: bool,
    /// Seconds between health checks [default: 5].
    #[arg(long, env = "ROOTFORK_HEALTH_INTERVAL")]
    pub health_interval: Option<f64>,
    /// Host-wide nbd slot lock directory [default: /run/rootfork/nbd].
    #[arg(long, env = "ROOTFORK_NBD_LOCK_DIR")]
    pub nbd_lock_dir: Option<PathBuf>,
}

/// Runs the daemon.
pub fn run(args: Args) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let config = Config::resolve(
        file,
        Overrides {
            state_dir: args.state_dir,
            api_socket: args.api_socket,
            api_tcp: args.api_tcp,
            token_file: args.token_file,
            metrics: args.metrics,
            log_format: args.log_format,
            no_demo: args.no_demo,
            delete_on_exit: args.delete_on_exit,
            health_interval_secs: args.health_interval,
            nbd_lock_dir: args.nbd_lock_dir,
        },
    )?;
    super::init_logging_as(config.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("rootfork-daemon")
        .build()?;
    rt.block_on(async move {
        // Handlers first, so a signal during the start is acted on once it has finished.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let daemon = Daemon::start(config).await?;
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        daemon.shutdown().await;
        Ok(())
    })
}
