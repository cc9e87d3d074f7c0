//! Finding the `rootfork-fc-double` executable from the tests of other crates, which cannot use
//! `CARGO_BIN_EXE_*` for a binary of another package: `$ROOTFORK_FC_DOUBLE_BIN` when set, else
//! `cargo build` of this crate's binary (a no-op when it is up to date, so it is never stale),
//! whose JSON messages name the executable. The build uses the same cargo (`$CARGO`) and target
//! directory (`$CARGO_TARGET_DIR`, else the workspace's `target/`) as the test run.

use std::path::PathBuf;
use std::process::Command;

use parking_lot::Mutex;
use serde_json::Value;

/// The binary's name.
pub const BINARY_NAME: &str = "rootfork-fc-double";

/// Errors finding or building the binary.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    /// cargo could not be started.
    #[error("cannot run `{cargo} build` for {BINARY_NAME}: {source}")]
    Spawn {
        /// The cargo command.
        cargo: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The build failed.
    #[error("`cargo build -p rootfork-fc-double` failed ({status}): {stderr}")]
    Build {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The build succeeded but named no executable.
    #[error("`cargo build -p rootfork-fc-double` did not report the {BINARY_NAME} executable")]
    NotReported,
}

static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The path of the `rootfork-fc-double` executable, built on first use in this process.
pub fn binary_path() -> Result<PathBuf, BinaryError> {
    if let Some(p) = std::env::var_os("ROOTFORK_FC_DOUBLE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut built = BUILT.lock();
    if let Some(p) = built.as_ref() {
        return Ok(p.clone());
    }
    let path = build()?;
    *built = Some(path.clone());
    Ok(path)
}

fn build() -> Result<PathBuf, BinaryError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "build",
        "--quiet",
        "--message-format=json",
        "--manifest-path",
    ])
    .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
    .args(["-p", "rootfork-fc-double", "--bin", BINARY_NAME]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .map_err(|source| BinaryError::Spawn { cargo, source })?;
    if !out.status.success() {
        return Err(BinaryError::Build {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == BINARY_NAME)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or(BinaryError::NotReported)
}
