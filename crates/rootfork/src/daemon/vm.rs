//! VM control: booting QEMU on a sandbox's served disk when its [`VmSpec`] asks for it (after
//! checking that the QEMU process opened no template), restoring it there from a paused
//! sandbox's saved state (`snapshot.rs` writes it), and stopping it before the disk goes.

use std::path::{Path, PathBuf};
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
    if !sb.vm.as_ref().is_some_and(VmSpec::boots_qemu) {
        return Ok(None);
    }
    launch(core, sb, provider, None).await.map(Some)
}

/// Starts QEMU on the sandbox's served disk from the state a pause saved at `state` (the same
/// machine, a new disk with the same data): the guest continues where it stopped.
pub async fn restore(
    core: &Core,
    sb: &Sandbox,
    provider: &AnyProvider,
    state: &Path,
) -> Result<QemuProcess> {
    launch(core, sb, provider, Some(state.to_owned())).await
}

/// Starts QEMU on `provider`'s device: booting, or restored from `state`.
async fn launch(
    core: &Core,
    sb: &Sandbox,
    provider: &AnyProvider,
    state: Option<PathBuf>,
) -> Result<QemuProcess> {
    let Some(spec) = sb.vm.as_ref().filter(|v| v.boots_qemu()) else {
        return Err(DaemonError::NoVm(sb.id.clone()));
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
    let restoring = state.is_some();
    let vm = tokio::task::spawn_blocking(move || {
        let r = match &state {
            None => QemuProcess::spawn_verified(&qemu, &cfg, &log, &qmp, &[template]),
            Some(state) => QemuProcess::spawn_restored(&qemu, &cfg, &log, &qmp, &[template], state),
        };
        let _ = std::fs::remove_file(&qmp);
        r
    })
    .await
    .map_err(|e| DaemonError::task("starting the VM", e))??;
    let pid = vm.pid();
    sb.update(|s| {
        s.vm_pid = pid;
        s.vm_console = console.display().to_string();
    });
    if restoring {
        tracing::info!(sandbox = %sb.id, pid, "restored QEMU from its saved state on the sandbox's disk");
    } else {
        tracing::info!(sandbox = %sb.id, pid, "booted QEMU on the sandbox's disk");
    }
    Ok(vm)
}

/// Kills the sandbox's VM (its console and log stay: a paused sandbox's restored VM goes on
/// writing them).
pub async fn halt(sb: &Sandbox, mut vm: QemuProcess) {
    tokio::task::spawn_blocking(move || vm.kill()).await.ok();
    sb.update(|s| s.vm_pid = 0);
}

/// Kills the sandbox's VM and removes its console and log (the disk is closed after this, under
/// nobody).
pub async fn stop(core: &Core, sb: &Sandbox, vm: QemuProcess) {
    halt(sb, vm).await;
    for ext in ["console", "qemu.log"] {
        let _ = std::fs::remove_file(core.dirs.vm.join(format!("{}.{ext}", sb.id)));
    }
}
