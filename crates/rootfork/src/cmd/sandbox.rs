//! `rootfork sandbox create | get | list | pause | resume | fork | delete`.

use std::path::PathBuf;

use rootfork::api::v1;

use super::client_opts::{block_on, status, ClientOpts};
use super::output::{self, print_json, sandbox_json, table};

/// Provider kinds on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Provider {
    /// NBD on a per-sandbox Unix socket.
    Socket,
    /// A kernel /dev/nbdN.
    Kernel,
}

/// `rootfork sandbox ...`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Fork a sandbox from a template; prints it with its NBD URI or device path.
    Create {
        /// The template.
        #[arg(long)]
        template: String,
        /// The sandbox id (default: generated).
        #[arg(long)]
        id: Option<String>,
        /// The provider.
        #[arg(long, value_enum, default_value_t = Provider::Socket)]
        provider: Provider,
        /// VMM: qemu (the daemon boots QEMU on the disk) or firecracker (with --kernel and
        /// --provider kernel the daemon launches vmm.firecracker_bin on the device;
        /// without a kernel, recorded only).
        #[arg(long)]
        vmm: Option<String>,
        /// Guest kernel (absolute path on the daemon's host).
        #[arg(long, requires = "vmm")]
        kernel: Option<PathBuf>,
        /// Guest initramfs.
        #[arg(long, requires = "vmm")]
        initrd: Option<PathBuf>,
        /// Guest kernel command line [default: console=ttyS0 root=/dev/vda rw panic=-1].
        #[arg(long, requires = "vmm")]
        kernel_args: Option<String>,
        /// Guest memory (MiB) for the VMM settings.
        #[arg(long, requires = "vmm")]
        memory_mib: Option<u32>,
        /// Guest vCPUs for the VMM settings.
        #[arg(long, requires = "vmm")]
        vcpus: Option<u32>,
        /// A disk larger than the template (bytes, or with a K/M/G/T suffix, binary); the tail
        /// reads as zeroes until written.
        #[arg(long, value_parser = parse_size)]
        disk_size: Option<u64>,
        /// The most the sandbox's writes may occupy on the host (bytes or K/M/G/T); past it
        /// the guest gets ENOSPC from its own disk.
        #[arg(long, value_parser = parse_size)]
        quota: Option<u64>,
    },
    /// Show one sandbox.
    Get {
        /// Sandbox id.
        id: String,
    },
    /// List sandboxes.
    List {
        /// Include recently deleted ones.
        #[arg(long)]
        all: bool,
        /// List the sandboxes in the object store (`serve --store`) instead: what this host
        /// could resume, and who holds each (MESSAGE).
        #[arg(long, conflicts_with = "all")]
        paused_in_store: bool,
    },
    /// Pause: flush, freeze and export the disk's changes, release the device.
    Pause {
        /// Sandbox id.
        id: String,
    },
    /// Resume a paused sandbox on a fresh overlay.
    Resume {
        /// Sandbox id (one this host paused, or one paused in the object store by another host).
        id: String,
        /// When another host is still uploading it to the object store, wait (up to 10 minutes)
        /// instead of failing with UNAVAILABLE.
        #[arg(long)]
        wait: bool,
    },
    /// Start new sandboxes from a paused one: each gets its own overlay over the paused disk
    /// and, when the pause saved a running VM, its own VM continuing from that snapshot.
    Fork {
        /// The paused sandbox.
        id: String,
        /// How many forks (1 to 64).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Name the forks PREFIX-0, PREFIX-1, ... [default: ID-fork].
        #[arg(long)]
        id_prefix: Option<String>,
    },
    /// Delete a sandbox (succeeds if it does not exist).
    Delete {
        /// Sandbox id.
        id: String,
    },
}

fn show(opts: &ClientOpts, s: &v1::Sandbox) {
    if opts.json {
        print_json(&sandbox_json(s));
        return;
    }
    println!("id:        {}", s.id);
    println!("template:  {}", s.template);
    println!(
        "provider:  {}",
        sandbox_json(s)["provider"].as_str().unwrap_or("")
    );
    println!("state:     {}", output::state(s.state));
    println!("health:    {}", output::health(s.health));
    if !s.nbd_uri.is_empty() {
        println!("nbd uri:   {}", s.nbd_uri);
    }
    if !s.device_path.is_empty() {
        println!("device:    {}", s.device_path);
    }
    if s.create_to_ready_us > 0 {
        println!("ready in:  {:.2} ms", s.create_to_ready_us as f64 / 1000.0);
    }
    if s.overlay_bytes_written > 0 {
        println!("written:   {}", output::bytes(s.overlay_bytes_written));
    }
    if s.pause_count > 0 {
        println!(
            "paused:    {} time(s), last diff {}",
            s.pause_count,
            output::bytes(s.paused_diff_bytes)
        );
    }
    if !s.store_status.is_empty() {
        println!("store:     {}", s.store_status);
    }
    if s.recoveries > 0 {
        println!(
            "recovered: {} time(s) (dead NBD connections replaced)",
            s.recoveries
        );
    }
    if s.vm_pid != 0 {
        let kind = s
            .vmm
            .as_ref()
            .and_then(|v| v1::vmm_settings::Kind::try_from(v.kind).ok())
            .map_or("vmm", |k| match k {
                v1::vmm_settings::Kind::Firecracker => "firecracker",
                _ => "qemu",
            });
        if s.vm_console.is_empty() {
            println!("vm:        {kind} pid {}", s.vm_pid);
        } else {
            println!(
                "vm:        {kind} pid {}, console {}",
                s.vm_pid, s.vm_console
            );
        }
    }
    if s.vm_pid != 0 && !s.vm_generation_id.is_empty() {
        println!("vm genid:  {}", s.vm_generation_id);
    }
    if s.vm_state_bytes > 0 {
        println!(
            "vm state:  {} saved by the pause (a resume continues the VM)",
            output::bytes(s.vm_state_bytes)
        );
    }
    if !s.message.is_empty() {
        println!("message:   {}", s.message);
    }
    if !s.nbd_uri.is_empty() && s.state == v1::SandboxState::Running as i32 {
        println!("\ntry:       nbdinfo '{}'", s.nbd_uri);
    }
}

/// Runs the command.
pub fn run(opts: ClientOpts, cmd: Command) -> anyhow::Result<()> {
    block_on(async move {
        let mut c = opts.connect().await?;
        let sb = &mut c.sandboxes;
        match cmd {
            Command::Create {
                template,
                id,
                provider,
                vmm,
                kernel,
                initrd,
                kernel_args,
                memory_mib,
                vcpus,
                disk_size,
                quota,
            } => {
                let vmm = match vmm.as_deref() {
                    None => None,
                    Some(k) => Some(v1::VmmSettings {
                        kind: match k {
                            "qemu" => v1::vmm_settings::Kind::Qemu,
                            "firecracker" => v1::vmm_settings::Kind::Firecracker,
                            other => {
                                anyhow::bail!("--vmm must be qemu or firecracker, not {other:?}")
                            }
                        } as i32,
                        kernel: kernel.map(|p| abs(&p)).unwrap_or_default(),
                        initrd: initrd.map(|p| abs(&p)).unwrap_or_default(),
                        kernel_args: kernel_args.unwrap_or_default(),
                        memory_mib: memory_mib.unwrap_or(0),
                        vcpus: vcpus.unwrap_or(0),
                    }),
                };
                let s = sb
                    .create_sandbox(v1::CreateSandboxRequest {
                        template,
                        id: id.unwrap_or_default(),
                        provider: match provider {
                            Provider::Socket => v1::ProviderKind::Socket,
                            Provider::Kernel => v1::ProviderKind::Kernel,
                        } as i32,
                        vmm,
                        disk_size_bytes: disk_size.unwrap_or(0),
                        quota_bytes: quota.unwrap_or(0),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                show(&opts, &s);
            }
            Command::Get { id } => {
                let s = sb
                    .get_sandbox(v1::GetSandboxRequest { id })
                    .await
                    .map_err(status)?
                    .into_inner();
                show(&opts, &s);
            }
            Command::List {
                all,
                paused_in_store,
            } => {
                let r = sb
                    .list_sandboxes(v1::ListSandboxesRequest {
                        include_deleted: all,
                        paused_in_store,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if opts.json {
                    print_json(&serde_json::Value::Array(
                        r.sandboxes.iter().map(sandbox_json).collect(),
                    ));
                } else {
                    let rows: Vec<Vec<String>> = r
                        .sandboxes
                        .iter()
                        .map(|s| {
                            vec![
                                s.id.clone(),
                                s.template.clone(),
                                sandbox_json(s)["provider"]
                                    .as_str()
                                    .unwrap_or("")
                                    .to_owned(),
                                output::state(s.state),
                                output::health(s.health),
                                output::age(s.created_unix_ms),
                                output::disk(s),
                            ]
                        })
                        .collect();
                    if paused_in_store {
                        let rows: Vec<Vec<String>> = r
                            .sandboxes
                            .iter()
                            .map(|s| {
                                vec![
                                    s.id.clone(),
                                    s.template.clone(),
                                    output::state(s.state),
                                    s.pause_count.to_string(),
                                    s.message.clone(),
                                ]
                            })
                            .collect();
                        table(&["ID", "TEMPLATE", "STATE", "PAUSES", "MESSAGE"], &rows);
                        return Ok(());
                    }
                    table(
                        &[
                            "ID", "TEMPLATE", "PROVIDER", "STATE", "HEALTH", "AGE", "DISK",
                        ],
                        &rows,
                    );
                }
            }
            Command::Pause { id } => {
                let s = sb
                    .pause_sandbox(v1::PauseSandboxRequest { id })
                    .await
                    .map_err(status)?
                    .into_inner();
                show(&opts, &s);
            }
            Command::Resume { id, wait } => {
                let s = sb
                    .resume_sandbox(v1::ResumeSandboxRequest { id, wait })
                    .await
                    .map_err(status)?
                    .into_inner();
                show(&opts, &s);
            }
            Command::Fork {
                id,
                count,
                id_prefix,
            } => {
                let r = sb
                    .fork_sandbox(v1::ForkSandboxRequest {
                        id,
                        count,
                        id_prefix: id_prefix.unwrap_or_default(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if opts.json {
                    print_json(&serde_json::Value::Array(
                        r.sandboxes.iter().map(sandbox_json).collect(),
                    ));
                } else {
                    for (i, s) in r.sandboxes.iter().enumerate() {
                        if i > 0 {
                            println!();
                        }
                        show(&opts, s);
                    }
                }
            }
            Command::Delete { id } => {
                let r = sb
                    .delete_sandbox(v1::DeleteSandboxRequest { id: id.clone() })
                    .await
                    .map_err(status)?
                    .into_inner();
                if opts.json {
                    print_json(&serde_json::json!({"id": id, "deleted": r.deleted}));
                } else if r.deleted {
                    println!("deleted sandbox {id}");
                } else {
                    println!("sandbox {id} did not exist (or was already deleted)");
                }
            }
        }
        Ok(())
    })
}

fn abs(p: &std::path::Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_owned())
        .display()
        .to_string()
}

/// A size in bytes: a number, optionally followed by K, M, G or T (powers of 1024; `KiB`, `MB`
/// and the like are read the same way).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 512M, 2G)"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches('B')
        .trim_end_matches('I')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{s:?}: the unit must be K, M, G or T")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_with_and_without_units() {
        for (s, want) in [
            ("4096", 4096),
            ("64M", 64 << 20),
            ("1G", 1 << 30),
            ("2GiB", 2 << 30),
            ("512k", 512 << 10),
            ("1T", 1 << 40),
        ] {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
        for bad in ["", "G", "1X", "-1", "99999999999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
