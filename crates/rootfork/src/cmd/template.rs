//! `rootfork template import NAME FILE | list | export NAME FILE | delete NAME`.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rootfork::api::v1;

use super::client_opts::{block_on, status, ClientOpts};
use super::output::{self, bytes, print_json, table, template_json};

/// `rootfork template ...`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Import a raw or ext4 image file as a template (the daemon reads the file).
    Import {
        /// Template name ([A-Za-z0-9._-], at most 64, no leading dot).
        name: String,
        /// The image file (its size must be a multiple of 4096 bytes).
        file: PathBuf,
    },
    /// List templates.
    List,
    /// Write a template's bytes to a new raw image file (zeroes as holes). Reads the daemon's
    /// build store directly, read-only: for the host the daemon runs on.
    Export {
        /// Template name.
        name: String,
        /// The image file to create (must not exist).
        file: PathBuf,
    },
    /// Delete a template no sandbox uses (succeeds if it does not exist).
    Delete {
        /// Template name.
        name: String,
    },
}

/// Runs the command.
pub fn run(opts: ClientOpts, cmd: Command) -> anyhow::Result<()> {
    block_on(async move {
        let mut c = opts.connect().await?;
        match cmd {
            Command::Import { name, file } => {
                let file = std::path::absolute(&file)
                    .with_context(|| format!("resolving {}", file.display()))?;
                let mut stream = c
                    .templates
                    .import_template(v1::ImportTemplateRequest {
                        name,
                        source_path: file.display().to_string(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                let bar = if opts.json {
                    ProgressBar::hidden()
                } else {
                    ProgressBar::new(0)
                };
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_message("importing");
                let mut done = None;
                while let Some(p) = stream.message().await.map_err(|e| {
                    bar.abandon();
                    status(e)
                })? {
                    bar.set_length(p.bytes_total);
                    bar.set_position(p.bytes_done);
                    if let Some(t) = p.template {
                        done = Some(t);
                    }
                }
                bar.finish_and_clear();
                let t = done.context("the daemon ended the import without a result")?;
                if opts.json {
                    print_json(&template_json(&t));
                } else {
                    println!(
                        "imported template {} ({}, {}, {} on disk)",
                        t.name,
                        output::bytes(t.size_bytes),
                        fmt_format(t.format),
                        bytes(t.allocated_bytes)
                    );
                }
            }
            Command::List => {
                let r = c
                    .templates
                    .list_templates(v1::ListTemplatesRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                if opts.json {
                    print_json(&serde_json::Value::Array(
                        r.templates.iter().map(template_json).collect(),
                    ));
                } else {
                    let rows: Vec<Vec<String>> = r
                        .templates
                        .iter()
                        .map(|t| {
                            vec![
                                t.name.clone(),
                                fmt_format(t.format),
                                bytes(t.size_bytes),
                                bytes(t.allocated_bytes),
                                t.sandboxes.to_string(),
                                output::age(t.created_unix_ms),
                            ]
                        })
                        .collect();
                    table(
                        &["NAME", "FORMAT", "SIZE", "ON DISK", "SANDBOXES", "AGE"],
                        &rows,
                    );
                }
            }
            Command::Export { name, file } => {
                let r = c
                    .templates
                    .list_templates(v1::ListTemplatesRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                let t = r
                    .templates
                    .iter()
                    .find(|t| t.name == name)
                    .with_context(|| format!("template {name:?} not found"))?;
                let build = PathBuf::from(&t.path);
                let written = tokio::task::spawn_blocking(move || export(&build, &file))
                    .await
                    .context("the export task failed")??;
                if opts.json {
                    print_json(&serde_json::json!({"name": name, "bytes": written}));
                } else {
                    println!("exported template {name} ({})", output::bytes(written));
                }
            }
            Command::Delete { name } => {
                let r = c
                    .templates
                    .delete_template(v1::DeleteTemplateRequest { name: name.clone() })
                    .await
                    .map_err(status)?
                    .into_inner();
                if opts.json {
                    print_json(&serde_json::json!({"name": name, "deleted": r.deleted}));
                } else if r.deleted {
                    println!("deleted template {name}");
                } else {
                    println!("template {name} did not exist");
                }
            }
        }
        Ok(())
    })
}

/// Writes the build at `build` (a directory of the daemon's build store) to the new file `out`
/// as a raw image: data runs written, zero runs left as holes. Returns the image size.
fn export(build: &std::path::Path, out: &std::path::Path) -> anyhow::Result<u64> {
    use rootfork_block::layered::{LocalStore, RunKind};
    use rootfork_block::BlockDevice;
    use std::os::unix::fs::FileExt;
    let (Some(store), Some(id)) = (build.parent(), build.file_name()) else {
        anyhow::bail!(
            "the daemon named no build for the template ({})",
            build.display()
        );
    };
    let id = id
        .to_string_lossy()
        .parse()
        .with_context(|| format!("{} is not a build", build.display()))?;
    let tpl = LocalStore::new(store).open(&id).with_context(|| {
        format!(
            "opening build {} (export reads the daemon's store: run it on the daemon's host, with access to its state directory)",
            build.display()
        )
    })?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    let size = tpl.size();
    f.set_len(size)
        .with_context(|| format!("sizing {}", out.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    for run in tpl.mapping().runs() {
        if run.kind == RunKind::Zero {
            continue;
        }
        let mut done = 0u64;
        while done < run.len {
            let n = ((run.len - done) as usize).min(buf.len());
            tpl.read_at(&mut buf[..n], run.offset + done)
                .with_context(|| format!("reading the template at {}", run.offset + done))?;
            f.write_all_at(&buf[..n], run.offset + done)
                .with_context(|| format!("writing {}", out.display()))?;
            done += n as u64;
        }
    }
    f.sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    Ok(size)
}

fn fmt_format(f: i32) -> String {
    match v1::TemplateFormat::try_from(f) {
        Ok(v1::TemplateFormat::Ext4) => "ext4".into(),
        _ => "raw".into(),
    }
}
