//! Choosing QEMU's accelerator: TCG by default, KVM only when asked for or proven by a probe.
//!
//! `/dev/kvm` existing is not enough: on some hosts (for example a PVM host) it opens fine but a
//! stock guest kernel hangs silently under it. So "usable" is decided either explicitly
//! (`ROOTFORK_QEMU_ACCEL=kvm`) or by [`probe_kvm`], which boots the real kernel under KVM and
//! waits, with a timeout, for it to print its banner on the serial console.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::config::QemuBinary;
use super::error::QemuError;

/// The environment variable that selects the accelerator policy.
pub const ACCEL_ENV: &str = "ROOTFORK_QEMU_ACCEL";

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// The Tiny Code Generator: pure emulation, works everywhere.
    Tcg,
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
}

impl Accel {
    /// The value of QEMU's `-accel` option.
    pub fn as_arg(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// How to pick the accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelPolicy {
    /// Always TCG (the default).
    #[default]
    Tcg,
    /// Always KVM (the caller knows it works).
    Kvm,
    /// KVM if [`probe_kvm`] succeeds, else TCG.
    Auto,
}

impl FromStr for AccelPolicy {
    type Err = QemuError;

    fn from_str(s: &str) -> Result<Self, QemuError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "tcg" => Ok(AccelPolicy::Tcg),
            "kvm" => Ok(AccelPolicy::Kvm),
            "auto" => Ok(AccelPolicy::Auto),
            _ => Err(QemuError::UnknownAccel(s.to_owned())),
        }
    }
}

impl AccelPolicy {
    /// The policy named by `ROOTFORK_QEMU_ACCEL` (TCG when unset).
    pub fn from_env() -> Result<Self, QemuError> {
        match std::env::var(ACCEL_ENV) {
            Ok(v) => v.parse(),
            Err(std::env::VarError::NotPresent) => Ok(AccelPolicy::Tcg),
            Err(std::env::VarError::NotUnicode(v)) => {
                Err(QemuError::UnknownAccel(v.to_string_lossy().into_owned()))
            }
        }
    }

    /// Resolves the policy to an accelerator; `Auto` runs [`probe_kvm`] with `kernel`.
    pub fn resolve(self, qemu: &QemuBinary, kernel: &Path, timeout: Duration) -> Accel {
        match self {
            AccelPolicy::Tcg => Accel::Tcg,
            AccelPolicy::Kvm => Accel::Kvm,
            AccelPolicy::Auto => match probe_kvm(qemu, kernel, timeout) {
                Ok(true) => Accel::Kvm,
                Ok(false) | Err(_) => Accel::Tcg,
            },
        }
    }
}

/// Whether `kernel` actually boots under KVM: starts it with `-accel kvm` and no disk and waits
/// up to `timeout` for the kernel's `Linux version` banner on the serial console. The probe VM is
/// killed as soon as the banner appears (or at the deadline).
///
/// Returns `Ok(false)` when `/dev/kvm` is missing, QEMU refuses KVM, or the guest stays silent.
pub fn probe_kvm(qemu: &QemuBinary, kernel: &Path, timeout: Duration) -> Result<bool, QemuError> {
    if !Path::new("/dev/kvm").exists() {
        return Ok(false);
    }
    let dir = tempfile_dir()?;
    let console = dir.join("probe.console");
    let mut cmd = qemu.command();
    cmd.args(["-accel", "kvm", "-M", "q35", "-m", "128", "-smp", "1"])
        .args(["-display", "none", "-no-reboot", "-net", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"]);
    let mut guard = super::process::QemuProcess::spawn_command(cmd, &dir.join("probe.log"), None)?;
    let deadline = Instant::now() + timeout;
    let mut seen = false;
    while Instant::now() < deadline {
        if std::fs::read(&console)
            .map(|b| b.windows(13).any(|w| w == b"Linux version"))
            .unwrap_or(false)
        {
            seen = true;
            break;
        }
        if guard.try_exit()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    guard.kill();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(seen)
}

fn tempfile_dir() -> Result<std::path::PathBuf, QemuError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("rootfork-kvm-probe-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&base)
        .map_err(|e| QemuError::io(format!("creating {}", base.display()), e))?;
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses() {
        assert_eq!("tcg".parse::<AccelPolicy>().unwrap(), AccelPolicy::Tcg);
        assert_eq!("KVM".parse::<AccelPolicy>().unwrap(), AccelPolicy::Kvm);
        assert_eq!(" auto ".parse::<AccelPolicy>().unwrap(), AccelPolicy::Auto);
        assert_eq!("".parse::<AccelPolicy>().unwrap(), AccelPolicy::Tcg);
        assert!(
            matches!("hvf".parse::<AccelPolicy>(), Err(QemuError::UnknownAccel(s)) if s == "hvf")
        );
    }

    #[test]
    fn fixed_policies_resolve_without_probing() {
        let qemu = QemuBinary::new("/nonexistent/qemu");
        let k = Path::new("/nonexistent/kernel");
        assert_eq!(
            AccelPolicy::Tcg.resolve(&qemu, k, Duration::from_millis(1)),
            Accel::Tcg
        );
        assert_eq!(
            AccelPolicy::Kvm.resolve(&qemu, k, Duration::from_millis(1)),
            Accel::Kvm
        );
        // A probe that cannot even start QEMU falls back to TCG.
        assert_eq!(
            AccelPolicy::Auto.resolve(&qemu, k, Duration::from_millis(1)),
            Accel::Tcg
        );
    }
}
