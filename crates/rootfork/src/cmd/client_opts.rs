//! How client subcommands find the daemon (`--api`, `ROOTFORK_API`, the default socket) and the
//! runtime they run on.

use std::path::PathBuf;

use rootfork::client::{self, ApiTarget, Clients};

/// Options shared by every client subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOpts {
    /// The daemon's API: a Unix socket path or tcp://HOST:PORT [default: STATE/api.sock, STATE
    /// being $ROOTFORK_STATE_DIR, $XDG_STATE_HOME/rootfork or ./.rootfork].
    #[arg(long, env = "ROOTFORK_API", global = true)]
    pub api: Option<String>,
    /// File holding the bearer token (TCP only).
    #[arg(long, env = "ROOTFORK_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ClientOpts {
    /// The target.
    pub fn target(&self) -> anyhow::Result<ApiTarget> {
        let token = match &self.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("reading token file {}: {e}", p.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => std::env::var("ROOTFORK_TOKEN").ok(),
        };
        Ok(match &self.api {
            Some(a) => ApiTarget::parse(a, token),
            None => ApiTarget::Unix(client::default_api_socket()),
        })
    }

    /// Connects.
    pub async fn connect(&self) -> anyhow::Result<Clients> {
        Ok(client::connect(&self.target()?).await?)
    }
}

/// Runs `f` on a small runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime")
        .block_on(f)
}

/// A gRPC status as a one-line error.
pub fn status(e: tonic::Status) -> anyhow::Error {
    let code = format!("{:?}", e.code());
    anyhow::anyhow!("{} ({})", e.message(), to_snake(&code))
}

fn to_snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}
