//! `rootfork events [--sandbox ID]`: follow the daemon's event feed until interrupted.

use rootfork::api::v1;

use super::client_opts::{block_on, status, ClientOpts};
use super::output::{event_json, event_line};

/// Arguments of `rootfork events`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub client: ClientOpts,
    /// Only events about this sandbox.
    #[arg(long)]
    pub sandbox: Option<String>,
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = args.client.clone();
    block_on(async move {
        let mut c = opts.connect().await?;
        let mut s = c
            .events
            .watch_events(v1::WatchEventsRequest {
                sandbox: args.sandbox.unwrap_or_default(),
            })
            .await
            .map_err(status)?
            .into_inner();
        while let Some(e) = s.message().await.map_err(status)? {
            if opts.json {
                println!("{}", event_json(&e));
            } else {
                println!("{}", event_line(&e));
            }
        }
        Ok(())
    })
}
