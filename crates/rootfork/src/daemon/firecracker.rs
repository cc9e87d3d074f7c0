//! Firecracker sandboxes: on a kernel sandbox's `/dev/nbdN` the daemon launches Firecracker (or
//! any binary speaking its API, such as the test double), in its own mount namespace where the
//! root drive's stable path resolves to the device; it configures the drive with that path only,
//! verifies what the process opened and starts the instance (rootfork-vmm's [`FirecrackerVm`]).
//! A pause is `PATCH /vm Paused` + `PUT /snapshot/create` into files next to the paused diff; a
//! resume launches a new process, points the stable path at the new device, `PUT /snapshot/load`,
//! checks the fds and `PATCH /vm Resumed`.
//!
//! The VMM runs in a session of its own and outlives the daemon: a stop for a restart releases
//! it (its run directory `STATE/vm/fc/rf-N/` with the API socket and the host link stays), and
//! the next daemon adopts it ([`adopt`], from `vm_adopt.rs`) by pid and start time once the
//! kernel device is adopted, checking that the host link still resolves to that device and that
//! the process holds it open.
//!
//! The binary is `vmm.firecracker_bin` (`--firecracker-bin`, `$ROOTFORK_FIRECRACKER_BIN`), else
//! `firecracker` on `PATH`; it is started with Firecracker's own arguments (`--api-sock`, `--id`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rootfork_vmm::firecracker::models::{EntropyDevice, SnapshotCreateParams};
use rootfork_vmm::firecracker::{
    ColdBootConfig, FirecrackerClient, FirecrackerVm, LaunchConfig, ResumeConfig, TemplateIdentity,
    VmError, VmmCommand, DEFAULT_STABLE_DRIVE_PATH,
};
use rootfork_vmm::{ProcessIdentity, ReadyDevice, StableDrivePath};

use crate::daemon::core::Core;
use crate::daemon::sandbox::Sandbox;
use crate::daemon::spec::{SpecError, VmSpec};
use crate::error::{DaemonError, Result};

/// The kernel command line when the spec gives none.
pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw";

/// Guest memory when the spec names none (MiB).
const DEFAULT_MEMORY_MIB: u64 = 256;

/// How long a stopped VMM gets between `SIGTERM` and `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The Firecracker binary: `vmm.firecracker_bin` (`--firecracker-bin`,
/// `$ROOTFORK_FIRECRACKER_BIN`), else `firecracker` on `PATH`.
fn command(core: &Core) -> VmmCommand {
    VmmCommand::new(core.config.firecracker_bin.clone())
}

/// Where each launch's run directory (`api.sock`, `rootfs.link`, `vmm.log`) goes.
fn launch_config(core: &Core) -> LaunchConfig {
    // Firecracker's `--id` allows letters, digits and `-` only: a daemon-wide sequence number
    // rather than the sandbox id.
    LaunchConfig::new(format!("rf-{}", core.next_seq()), core.dirs.vm.join("fc"))
}

fn fc_err(e: rootfork_vmm::firecracker::VmError) -> DaemonError {
    DaemonError::Firecracker(Box::new(e))
}

/// Launches a Firecracker process and waits for its API socket; nothing is configured yet, so
/// this can run while the sandbox's device is still being attached (see `start.rs`).
pub fn launch(core: &Core) -> impl std::future::Future<Output = Result<FirecrackerVm>> + 'static {
    let (command, config) = (command(core), launch_config(core));
    async move {
        FirecrackerVm::launch(&command, &config)
            .await
            .map_err(fc_err)
    }
}

/// Cold boots `spec` on `device` in `vm`, a process [`launch`] started.
pub async fn boot(
    sb: &Sandbox,
    spec: &VmSpec,
    device: &ReadyDevice,
    templates: &[TemplateIdentity],
    mut vm: FirecrackerVm,
) -> Result<FirecrackerVm> {
    let Some(kernel) = spec.kernel.as_ref() else {
        return Err(DaemonError::NoVm(sb.id.clone()));
    };
    let vcpus = u8::try_from(spec.vcpus.unwrap_or(1).max(1))
        .map_err(|_| SpecError::TooManyVcpus(spec.vcpus.unwrap_or(0)))?;
    let mut cfg = ColdBootConfig::new(
        kernel.display().to_string(),
        Some(
            spec.kernel_args
                .clone()
                .unwrap_or_else(|| DEFAULT_KERNEL_ARGS.to_owned()),
        ),
        vcpus,
        spec.memory_mib.map_or(DEFAULT_MEMORY_MIB, u64::from),
    );
    cfg.boot_source.initrd_path = spec.initrd.as_ref().map(|p| p.display().to_string());
    // Host entropy for the guest: Firecracker's API has no VM generation ID to tell a fork's
    // guest to reseed; a virtio-rng device lets it draw fresh randomness (docs/daemon.md, Fork).
    cfg.entropy = Some(EntropyDevice::default());
    if let Err(e) = vm.configure_and_start(device, templates, &cfg).await {
        stop(vm).await;
        return Err(fc_err(e));
    }
    tracing::info!(sandbox = %sb.id, pid = vm.pid().unwrap_or(0), "started Firecracker on the sandbox's device");
    Ok(vm)
}

/// The two files a Firecracker snapshot is: its VM state and its guest memory.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    /// `snapshot_path`.
    pub state: PathBuf,
    /// `mem_file_path`.
    pub memory: PathBuf,
}

/// Pauses the guest and writes its snapshot. On failure the guest runs on (`Resumed`) and
/// nothing is left on disk.
pub async fn save(vm: &mut FirecrackerVm, files: &SnapshotFiles) -> Result<u64> {
    vm.pause().await.map_err(fc_err)?;
    let params = SnapshotCreateParams {
        snapshot_path: files.state.display().to_string(),
        mem_file_path: files.memory.display().to_string(),
        snapshot_type: None,
    };
    let written = match vm.snapshot(&params).await {
        Ok(()) => sizes(files),
        Err(e) => Err(fc_err(e)),
    };
    match written {
        Ok(bytes) => Ok(bytes),
        Err(e) => {
            for f in [&files.state, &files.memory] {
                let _ = std::fs::remove_file(f);
            }
            if let Err(ue) = vm.unpause().await {
                tracing::warn!("resuming Firecracker after a failed snapshot: {ue}");
            }
            Err(e)
        }
    }
}

/// The snapshot's total size (both files must exist).
fn sizes(files: &SnapshotFiles) -> Result<u64> {
    let len = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .map_err(|e| DaemonError::io(format!("the snapshot file {}", p.display()), e))
    };
    Ok(len(&files.state)? + len(&files.memory)?)
}

/// Restores the snapshot on `device` in `vm`, a process [`launch`] started: the stable path
/// now resolves to the device, `PUT /snapshot/load`, fd check, `PATCH /vm Resumed`.
pub async fn restore(
    sb: &Sandbox,
    device: &ReadyDevice,
    templates: &[TemplateIdentity],
    files: &SnapshotFiles,
    mut vm: FirecrackerVm,
) -> Result<FirecrackerVm> {
    let cfg = ResumeConfig::from_files(
        files.state.display().to_string(),
        files.memory.display().to_string(),
    );
    if let Err(e) = vm.resume(device, templates, &cfg).await {
        stop(vm).await;
        return Err(fc_err(e));
    }
    tracing::info!(sandbox = %sb.id, pid = vm.pid().unwrap_or(0), "restored Firecracker from its snapshot on the sandbox's new device");
    Ok(vm)
}

/// Takes back the VM `identity` names, launched by an earlier daemon in `run_dir` and running
/// on `device` (the kernel sandbox's adopted device): see [`FirecrackerVm::adopt`].
pub async fn adopt(
    identity: ProcessIdentity,
    run_dir: &Path,
    device: &ReadyDevice,
    templates: &[TemplateIdentity],
) -> std::result::Result<FirecrackerVm, VmError> {
    let stable = StableDrivePath::new(DEFAULT_STABLE_DRIVE_PATH).map_err(VmError::Drive)?;
    FirecrackerVm::adopt(
        identity,
        run_dir,
        stable,
        device,
        templates,
        FirecrackerClient::DEFAULT_TIMEOUT,
    )
    .await
}

/// Stops the VMM (`SIGTERM`, then `SIGKILL`) and removes its stable-path link.
pub async fn stop(vm: FirecrackerVm) {
    if let Err(e) = vm.shutdown(STOP_GRACE).await {
        tracing::warn!("stopping Firecracker: {e}");
    }
}
