//! `rootfork serve`: run the daemon until SIGINT or SIGTERM. Under systemd (`Type=notify`,
//! `$NOTIFY_SOCKET` set) it sends `READY=1` once the API answers a call, `WATCHDOG=1` while the
//! health loop makes progress (`WatchdogSec=`), and `STOPPING=1` when it begins to stop.

use std::net::SocketAddr;
use std::path::PathBuf;

use rootfork::config::{Config, FileConfig, LogFormat, Overrides};
use rootfork::daemon::notify::{self, Notifier, State};
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
    /// The Firecracker binary for `--vmm firecracker` sandboxes [default: firecracker on PATH].
    #[arg(long, env = "ROOTFORK_FIRECRACKER_BIN")]
    pub firecracker_bin: Option<PathBuf>,
    /// Object storage shared with other hosts, where pauses are uploaded so any host can resume
    /// them: `s3://BUCKET/PREFIX` (credentials from the AWS_* variables) or a directory
    /// (`file:///DIR` or a path) [default: none, everything stays on this host].
    #[arg(long, env = "ROOTFORK_STORE")]
    pub store: Option<String>,
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
            firecracker_bin: args.firecracker_bin,
            store: args.store,
        },
    )?;
    // Read, then clear, the notification variables while this is the only thread, so the VMs
    // and tools the daemon starts do not inherit them.
    let notifier = Notifier::from_env()?.map(std::sync::Arc::new);
    let watchdog = notify::watchdog_period_from_env()?;
    notify::forget_env();
    let health_interval = config.health_interval;
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
        let (stop_watchdog, watchdog_stop) = tokio::sync::watch::channel(false);
        if let Some(n) = &notifier {
            let templates = match notify::api_answers(daemon.api_socket()).await {
                Ok(n) => n,
                Err(e) => {
                    // Never READY: stop cleanly and let the service manager see the failure.
                    daemon.shutdown().await;
                    return Err(
                        anyhow::Error::new(e).context("the API does not answer after start")
                    );
                }
            };
            let status = format!(
                "serving the API on {} ({templates} templates)",
                daemon.api_socket().display()
            );
            if let Err(e) = n.send(&[State::Ready, State::Status(&status)]) {
                tracing::warn!("{e}");
            }
            if let Some(period) = watchdog {
                tracing::info!(
                    period_secs = period.as_secs_f64(),
                    "watchdog keep-alives tied to the health loop"
                );
                tokio::spawn(notify::keep_alive(
                    n.clone(),
                    period,
                    health_interval,
                    daemon.health_heartbeat(),
                    watchdog_stop,
                ));
            }
        }
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        if let Some(n) = &notifier {
            if let Err(e) = n.send(&[State::Stopping, State::Status("stopping")]) {
                tracing::warn!("{e}");
            }
        }
        let _ = stop_watchdog.send(true);
        daemon.shutdown().await;
        Ok(())
    })
}
