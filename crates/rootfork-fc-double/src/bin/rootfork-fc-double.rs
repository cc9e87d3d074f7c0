//! `rootfork-fc-double`: a Firecracker API double for tests. Serves the API on `--api-sock`,
//! validating every request against the built-in description of Firecracker's API (or, with
//! `--spec` / `$ROOTFORK_FC_SPEC`, a full Swagger document), and writes what it opened to
//! `--report` (JSON lines) or stdout.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use rootfork_fc_double::{description, serve, Double, Reporter, Spec};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

/// Command line (a subset of Firecracker's, plus the optional spec and the report path).
#[derive(Debug, Parser)]
#[command(
    name = "rootfork-fc-double",
    about = "Firecracker API double for rootfork tests"
)]
struct Args {
    /// Path of the API Unix socket to create.
    #[arg(long)]
    api_sock: PathBuf,
    /// A full Swagger 2.0 document of Firecracker's API to validate against instead of the
    /// built-in description.
    #[arg(long, env = "ROOTFORK_FC_SPEC")]
    spec: Option<PathBuf>,
    /// Where to write the JSON-lines report (default: stdout).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Instance id.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spec = match &args.spec {
        Some(path) => Spec::load(path)?,
        None => description(),
    };
    let reporter = Reporter::new(args.report.as_deref())
        .with_context(|| format!("cannot open the report file {:?}", args.report))?;
    let double = Arc::new(Double::new(spec, args.id, reporter));
    let _ = std::fs::remove_file(&args.api_sock);
    let listener = UnixListener::bind(&args.api_sock)
        .with_context(|| format!("cannot bind {}", args.api_sock.display()))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let result = tokio::select! {
        r = serve(listener, double) => r.context("API server failed"),
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    };
    let _ = std::fs::remove_file(&args.api_sock);
    result
}
