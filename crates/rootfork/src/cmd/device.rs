//! `rootfork device list`: the kernel's /dev/nbdN slots as the daemon sees them.

use rootfork::api::v1;

use super::client_opts::{block_on, status, ClientOpts};
use super::output::{age, device_json, print_json, table};

/// `rootfork device ...`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List the kernel NBD slots with state, sandbox, backend identifier and since-when.
    List,
}

/// Runs the command.
pub fn run(opts: ClientOpts, cmd: Command) -> anyhow::Result<()> {
    let Command::List = cmd;
    block_on(async move {
        let mut c = opts.connect().await?;
        let r = c
            .devices
            .list_devices(v1::ListDevicesRequest {})
            .await
            .map_err(status)?
            .into_inner();
        if opts.json {
            print_json(&serde_json::json!({
                "available": r.available, "reason": r.reason,
                "devices": r.devices.iter().map(device_json).collect::<Vec<_>>(),
            }));
            return Ok(());
        }
        if !r.available {
            println!("kernel NBD pool unavailable: {}", r.reason);
            return Ok(());
        }
        let rows: Vec<Vec<String>> = r
            .devices
            .iter()
            .map(|d| {
                vec![
                    d.path.clone(),
                    d.state.clone(),
                    if d.sandbox.is_empty() {
                        "-".into()
                    } else {
                        d.sandbox.clone()
                    },
                    if d.owner_pid == 0 {
                        "-".into()
                    } else {
                        d.owner_pid.to_string()
                    },
                    age(d.since_unix_ms),
                    if d.backend.is_empty() {
                        "-".into()
                    } else {
                        d.backend.clone()
                    },
                ]
            })
            .collect();
        table(
            &["DEVICE", "STATE", "SANDBOX", "PID", "SINCE", "BACKEND"],
            &rows,
        );
        Ok(())
    })
}
