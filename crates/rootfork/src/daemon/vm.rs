//! VM control: booting QEMU on a sandbox's served disk when its [`VmSpec`] asks for it (after
//! checking that the QEMU process opened no template), and stopping it before the disk goes.

use std::path::PathBuf;
use std::time::Duration;

use rootfork_block::TemplatePath;
use rootfork_provider::{AnyProvider, Provider};
use rootfork_vmm::qemu::{QemuBinary, QemuConfig, QemuProcess, RootDisk};

use crate::daemon::core::Core;
use crate::daemon::sandbox::Sandbox;
use crate::daemon::spec::VmSpec;
use crate::error::{DaemonError, Result};

/// The kernel command line when the spec gives none.
pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 root=/dev/vda rw panic=-1";

/// The QEMU configuration of `spec` on `disk`.
fn qemu_config(
    spec: &VmSpec,
    kernel: PathBuf,
    disk: RootDisk,
    console: &std::path::Path,
) -> QemuConfig {
    let mut cfg = QemuConfig::new(kernel, disk, console);
    cfg.initrd.clone_from(&spec.initrd);
    cfg.append = spec
        .kernel_args
        .clone()
        .unwrap_or_else(|| DEFAULT_KERNEL_ARGS.to_owned());
    if let Some(m) = spec.memory_mib {
        cfg.memory_mib = m;
    }
    if let Some(n) = spec.vcpus {
        cfg.cpus = n;
    }
    cfg
}

/// Boots QEMU on the sandbox's served disk when its VM spec asks for it; `None` otherwise.
pub async fn boot(
    core: &Core,
    sb: &Sandbox,
    provider: &AnyProvider,
) -> Result<Option<QemuProcess>> {
    let Some(spec) = sb.vm.as_ref().filter(|v| v.boots_qemu()) else {
        return Ok(None);
    };
    let Some(kernel) = spec.kernel.clone() else {
        // `VmSpec::validated` refuses a QEMU spec without a kernel.
        return Err(crate::daemon::spec::SpecError::QemuNeedsKernel.into());
    };
    let device = provider
        .path(Duration::ZERO, std::future::ready(()))
        .await?;
    let n = core.next_seq();
    let dir = &core.dirs.vm;
    std::fs::create_dir_all(dir).map_err(|e| DaemonError::io("creating the vm directory", e))?;
    let console = dir.join(format!("{}.console", sb.id));
    let log = dir.join(format!("{}.qemu.log", sb.id));
    let qmp = dir.join(format!("{n}.qmp"));
    let cfg = qemu_config(spec, kernel, device.into_root_disk(), &console);
    let template = rootfork_vmm::firecracker::TemplateIdentity::of(&TemplatePath::new(
        core.templates.image_path(&sb.template),
    ))
    .map_err(|e| DaemonError::io("stat template", e))?;
    let qemu = QemuBinary::from_env();
    let vm = tokio::task::spawn_blocking(move || {
        let r = QemuProcess::spawn_verified(&qemu, &cfg, &log, &qmp, &[template]);
        let _ = std::fs::remove_file(&qmp);
        r
    })
    .await
    .map_err(|e| DaemonError::task("booting the VM", e))??;
    let pid = vm.pid();
    sb.update(|s| {
        s.vm_pid = pid;
        s.vm_console = console.display().to_string();
    });
    tracing::info!(sandbox = %sb.id, pid, "booted QEMU on the sandbox's disk");
    Ok(Some(vm))
}

/// Kills the sandbox's VM and removes its console and log (the disk is closed after this, under
/// nobody).
pub async fn stop(core: &Core, sb: &Sandbox, mut vm: QemuProcess) {
    tokio::task::spawn_blocking(move || vm.kill()).await.ok();
    sb.update(|s| s.vm_pid = 0);
    for ext in ["console", "qemu.log"] {
        let _ = std::fs::remove_file(core.dirs.vm.join(format!("{}.{ext}", sb.id)));
    }
}
