//! The demo template a first start builds when there are no templates: a sparse 64 MiB ext4 file
//! system (made with `mkfs.ext4 -d`, holding `/hello.txt` and `/etc/os-release`) when
//! `mkfs.ext4` is installed, else a 16 MiB raw image whose every 4 KiB block starts with the text
//! `rootfork demo block N` (recognizable with `nbdcopy ... - | strings`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::daemon::model::TemplateFormat;
use crate::daemon::templates::{TemplateMeta, TemplateStore};
use crate::error::{DaemonError, Result};

/// The demo template's name.
pub const DEMO_NAME: &str = "demo";

const EXT4_SIZE: u64 = 64 << 20;
const RAW_SIZE: u64 = 16 << 20;

fn find_mkfs() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
}

fn build_ext4(mkfs: &Path, out: &Path, scratch: &Path) -> std::io::Result<()> {
    let root = scratch.join("root");
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::write(
        root.join("hello.txt"),
        "Hello from a rootfork sandbox. This file lives in the shared read-only demo template;\nwrites you make land in your sandbox's own copy-on-write overlay.\n",
    )?;
    std::fs::write(
        root.join("etc/os-release"),
        "NAME=\"rootfork demo\"\nID=rootfork-demo\n",
    )?;
    std::fs::File::create(out)?.set_len(EXT4_SIZE)?;
    let o = Command::new(mkfs)
        // 4 KiB blocks, the overlay's block: a file-system block is never a read-modify-write of
        // an overlay block. (Not needed to mount: /dev/nbdN has 512-byte logical blocks, so
        // 1 KiB-block ext4 mounts too; a device attached with 4096 would refuse it.)
        .args(["-q", "-F", "-b", "4096", "-L", "rootfork-demo", "-d"])
        .arg(&root)
        .arg(out)
        .output()?;
    if !o.status.success() {
        return Err(std::io::Error::other(format!(
            "{} failed: {}",
            mkfs.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}

fn build_raw(out: &Path) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)?;
    let mut block = vec![0u8; 4096];
    for n in 0..RAW_SIZE / 4096 {
        block.fill(0);
        let tag = format!("rootfork demo block {n}\n");
        block[..tag.len()].copy_from_slice(tag.as_bytes());
        f.write_all(&block)?;
    }
    f.sync_all()
}

/// Builds the demo template into `store`, saying which kind it built.
pub fn build(store: &TemplateStore, scratch: &Path) -> Result<TemplateMeta> {
    let out = scratch.join("demo.img");
    let (format, how) = match find_mkfs() {
        Some(mkfs) => match build_ext4(&mkfs, &out, scratch) {
            Ok(()) => (
                TemplateFormat::Ext4,
                format!("64 MiB sparse ext4 made with {}", mkfs.display()),
            ),
            Err(e) => {
                tracing::warn!("mkfs.ext4 failed ({e}); building a raw demo image instead");
                let _ = std::fs::remove_file(&out);
                build_raw(&out).map_err(|e| DaemonError::io("building the raw demo image", e))?;
                (
                    TemplateFormat::Raw,
                    "16 MiB raw image, every 4 KiB block tagged \"rootfork demo block N\"".into(),
                )
            }
        },
        None => {
            build_raw(&out).map_err(|e| DaemonError::io("building the raw demo image", e))?;
            (TemplateFormat::Raw, "16 MiB raw image, every 4 KiB block tagged \"rootfork demo block N\" (mkfs.ext4 not found)".into())
        }
    };
    let file =
        std::fs::File::open(&out).map_err(|e| DaemonError::io("opening the demo image", e))?;
    let (src, size) = (
        file,
        std::fs::metadata(&out)
            .map_err(|e| DaemonError::io("stat demo", e))?
            .len(),
    );
    let policy = crate::daemon::templates::ImportPolicy {
        allow_block_devices: false,
        allowed_dirs: None,
    };
    let _ = store.begin_import(DEMO_NAME, &out, &policy)?;
    let r = store.copy_in(DEMO_NAME, src, size, |_| {}).and_then(|tmp| {
        store.finish_import(DEMO_NAME, &tmp, format, &format!("built-in demo: {how}"))
    });
    if r.is_err() {
        store.abort_import(DEMO_NAME);
    }
    let _ = std::fs::remove_dir_all(scratch);
    let meta = r?;
    tracing::info!(template = DEMO_NAME, "built the demo template: {how}");
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// The demo file system has the overlay's 4 KiB blocks (it also mounts on a `/dev/nbdN`
    /// attached with 4096-byte logical blocks; ext4 refuses a block size below the device's).
    #[test]
    fn the_demo_ext4_has_4k_blocks() {
        let Some(mkfs) = find_mkfs() else {
            eprintln!("mkfs.ext4 not installed; the demo is a raw image");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("demo.img");
        build_ext4(&mkfs, &out, &dir.path().join("scratch")).unwrap();
        let mut sb = [0u8; 4];
        let f = std::fs::File::open(&out).unwrap();
        // The superblock starts at byte 1024; s_log_block_size (block size = 1024 << it) at +24,
        // s_magic 0xEF53 at +56.
        f.read_exact_at(&mut sb, 1024 + 24).unwrap();
        let log = u32::from_le_bytes(sb);
        let mut magic = [0u8; 2];
        f.read_exact_at(&mut magic, 1024 + 56).unwrap();
        assert_eq!(u16::from_le_bytes(magic), 0xEF53, "not an ext4 image");
        assert_eq!(1024u32 << log, 4096);
    }
}
