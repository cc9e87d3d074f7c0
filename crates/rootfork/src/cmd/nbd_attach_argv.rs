//! A direct reading of `rootfork nbd attach`'s usual argument lists (`--name value` pairs of its
//! known options, `--no-reclaim`), without building clap's parser: under a slow CPU (the TCG test
//! VM) clap's parse alone took ~20 ms of a ~125 ms attach, which is timed from the spawn.
//!
//! Anything else — help, `--name=value`, a repeated or unknown option, an empty value or one that
//! starts with `-` or does not parse, a positional argument, non-UTF-8, an empty environment default — is
//! left to clap (`None`), so clap's messages and rules stay the only ones users see. The
//! defaults and environment variables are the clap definitions' (`nbd_attach::Args`); the tests
//! in main_tests.rs compare both parsers on the same argument lists.

use std::ffi::OsString;
use std::path::PathBuf;

use super::nbd_attach::Args;

/// The default cache directory (`--cache-dir`, `ROOTFORK_CACHE_DIR`).
pub const DEFAULT_CACHE_DIR: &str = "/var/tmp/rootfork";
/// The default lock directory (`--lock-dir`, `ROOTFORK_NBD_LOCK_DIR`).
pub const DEFAULT_LOCK_DIR: &str = "/run/rootfork/nbd";

/// `args` (what follows `nbd attach`) read directly, or `None` to let clap parse them.
pub fn parse(args: &[OsString]) -> Option<Args> {
    let mut template = None;
    let mut connections = None;
    let mut sandbox = None;
    let mut cache_dir = None;
    let mut lock_dir = None;
    let mut timeout = None;
    let mut block_size = None;
    let mut dead_conn_timeout = None;
    let mut instance = None;
    let mut no_reclaim = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let flag = flag.to_str()?;
        if flag == "--no-reclaim" {
            if no_reclaim {
                return None;
            }
            no_reclaim = true;
            continue;
        }
        let value = it.next()?.to_str()?;
        if value.is_empty() || value.starts_with('-') {
            return None;
        }
        match flag {
            "--template" => set(&mut template, PathBuf::from(value))?,
            "--connections" => set(&mut connections, value.parse::<u32>().ok()?)?,
            "--sandbox" => set(&mut sandbox, value.to_owned())?,
            "--cache-dir" => set(&mut cache_dir, PathBuf::from(value))?,
            "--lock-dir" => set(&mut lock_dir, PathBuf::from(value))?,
            "--timeout" => set(&mut timeout, value.parse::<u64>().ok()?)?,
            "--block-size" => set(&mut block_size, value.parse::<u64>().ok()?)?,
            "--dead-conn-timeout" => set(&mut dead_conn_timeout, value.parse::<u64>().ok()?)?,
            "--instance" => set(&mut instance, value.to_owned())?,
            _ => return None,
        }
    }
    Some(Args {
        template: template?,
        connections: connections.unwrap_or(1),
        sandbox,
        cache_dir: or_env(cache_dir, "ROOTFORK_CACHE_DIR", DEFAULT_CACHE_DIR)?,
        lock_dir: or_env(lock_dir, "ROOTFORK_NBD_LOCK_DIR", DEFAULT_LOCK_DIR)?,
        timeout: timeout.unwrap_or(30),
        block_size: block_size.unwrap_or(rootfork_kernel::BLOCK_SIZE),
        dead_conn_timeout,
        instance,
        no_reclaim,
    })
}

/// Sets `slot` once; `None` (clap's business) for a repeat.
fn set<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

/// The option's value, else the environment's (a set but empty or non-UTF-8 one is clap's to
/// judge: `None`), else the default.
fn or_env(given: Option<PathBuf>, var: &str, default: &str) -> Option<PathBuf> {
    if given.is_some() {
        return given;
    }
    match std::env::var_os(var) {
        None => Some(PathBuf::from(default)),
        Some(v) => match v.to_str() {
            Some(s) if !s.is_empty() => Some(PathBuf::from(s)),
            _ => None,
        },
    }
}
