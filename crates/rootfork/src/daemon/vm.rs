//! VM control: booting QEMU on a sandbox's served disk, or Firecracker on a kernel sandbox's
//! device (`firecracker.rs`), when its [`VmSpec`] asks for it (after checking that the process
//! opened no template), restoring it there from a paused sandbox's saved state (`snapshot.rs`
//! writes it), and stopping it before the disk goes.
//!
//! A VM outlives the daemon process: it runs in its own session, its QMP socket (QEMU) or run
//! directory with its API socket and host link (Firecracker, `STATE/vm/fc/rf-N/`) stays in
//! `STATE/vm/`, and its record names it ([`process_record`]), so a daemon that stops for a
//! restart lets it run on ([`release`]) and the next one adopts it (`vm_adopt.rs`). A QEMU NBD
//! client (a socket sandbox's) waits `vmm.nbd_reconnect_delay_secs` for the disk to come back;
//! a kernel sandbox's device (QEMU's or Firecracker's) stays connected, the kernel holding its
//! I/O until the next daemon adopts it.

use std::path::PathBuf;
use std::time::Duration;

use rootfork_block::TemplatePath;
use rootfork_provider::ProviderDevice;
use rootfork_provider::{AnyProvider, Provider};
use rootfork_vmm::firecracker::{FirecrackerVm, TemplateIdentity};
use rootfork_vmm::qemu::{QemuBinary, QemuConfig, QemuProcess, RootDisk, DISK_SERIAL_MAX};

use crate::daemon::core::Core;
use crate::daemon::firecracker::{self, SnapshotFiles};
use crate::daemon::records::{FcProcess, RecordedVm, VmProcess};
use crate::daemon::sandbox::Sandbox;
use crate::daemon::snapshot::VmState;
use crate::daemon::spec::{SpecError, VmSpec};
use crate::daemon::start::VmStart;
use crate::error::{DaemonError, Result};

/// A VM the daemon runs on a sandbox's disk (killed on drop).
#[derive(Debug)]
pub enum RunningVm {
    /// QEMU, on the socket's NBD export or the kernel device.
    Qemu(QemuProcess),
    /// Firecracker (or a binary speaking its API) on the kernel device's stable path.
    Firecracker(Box<FirecrackerVm>),
}

impl RunningVm {
    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        match self {
            RunningVm::Qemu(q) => q.pid(),
            RunningVm::Firecracker(f) => f.pid().unwrap_or(0),
        }
    }

    /// How the VMM ended, once it has exited; `None` while it runs.
    pub fn exited(&mut self) -> Option<String> {
        match self {
            RunningVm::Qemu(q) => match q.try_exit() {
                Ok(Some(exit)) => Some(exit.to_string()),
                _ => None,
            },
            RunningVm::Firecracker(f) => f.check_running().err().map(|e| e.to_string()),
        }
    }
}

/// What `vm`'s record says of it, when a restarted daemon can adopt it (a QEMU VM with its QMP
/// socket, or a Firecracker VM in its run directory, still running).
pub fn process_record(vm: &RunningVm) -> Option<RecordedVm> {
    match vm {
        RunningVm::Qemu(q) => {
            let id = match q.identity() {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(pid = q.pid(), "the VM cannot be recorded for adoption: {e}");
                    return None;
                }
            };
            Some(RecordedVm::Qemu(VmProcess {
                pid: id.pid,
                start_time: id.start_time,
                qmp: q.qmp_socket()?.to_owned(),
                console: q.console_path()?.to_owned(),
                log: q.log_path().to_owned(),
            }))
        }
        RunningVm::Firecracker(f) => {
            let id = match f.identity() {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(
                        pid = f.pid().unwrap_or(0),
                        "the VM cannot be recorded for adoption: {e}"
                    );
                    return None;
                }
            };
            let run_dir = f.run_dir()?.to_owned();
            Some(RecordedVm::Firecracker(FcProcess {
                pid: id.pid,
                start_time: id.start_time,
                api_socket: run_dir.join("api.sock"),
                run_dir,
            }))
        }
    }
}

/// Lets `vm` run on after this daemon process (a stop for a restart: the next start adopts it).
pub async fn release(sb: &Sandbox, vm: RunningVm) {
    tracing::info!(sandbox = %sb.id, pid = vm.pid(), "the VM runs on for the next daemon to adopt");
    match vm {
        RunningVm::Qemu(q) => q.release(),
        RunningVm::Firecracker(f) => f.release(),
    }
}

/// The template `sb` is forked from, as the VMM verification compares it: its base build's data
/// file, which a VMM must never have open (none when the build is read from the object store
/// only: there is no local file a VMM could open).
pub(crate) fn template_identity(core: &Core, sb: &Sandbox) -> Result<Vec<TemplateIdentity>> {
    let build = core
        .templates
        .build(&sb.template)
        .ok_or_else(|| DaemonError::TemplateNotFound(sb.template.clone()))?;
    if !core.builds.exists(&build) {
        return Ok(Vec::new());
    }
    let data = core.builds.data_path(&build);
    let id = TemplateIdentity::of(&TemplatePath::new(data))
        .map_err(|e| DaemonError::io("stat template", e))?;
    Ok(vec![id])
}

/// The provider's device, which Firecracker needs to be a block device (or file).
pub async fn ready_device(provider: &AnyProvider) -> Result<rootfork_vmm::ReadyDevice> {
    match provider
        .path(Duration::ZERO, std::future::ready(()))
        .await?
    {
        ProviderDevice::Device(d) => Ok(d),
        ProviderDevice::Nbd(_) => Err(SpecError::FirecrackerNeedsKernelProvider.into()),
    }
}

/// The kernel command line when the spec gives none.
pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 root=/dev/vda rw panic=-1";

/// The root disk's serial number of sandbox `id`, which its guest reads as
/// `/sys/block/vda/serial` (a fork restored from its parent's memory reads its own): the id
/// when it fits in [`DISK_SERIAL_MAX`] bytes, else its first 11 bytes, `~` and 8 hex digits of
/// a hash of the whole id (FNV-1a, 32 bits).
pub fn disk_serial(id: &str) -> String {
    if id.len() <= DISK_SERIAL_MAX {
        return id.to_owned();
    }
    let hash = id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    // Sandbox ids are ASCII: any byte is a char boundary.
    format!("{}~{hash:08x}", &id[..11])
}

/// The QEMU configuration of `spec` on `disk`; `vmgenid`: with a VM generation ID device
/// (every boot has one; a restore has one when the saved machine had).
fn qemu_config(
    spec: &VmSpec,
    kernel: PathBuf,
    disk: RootDisk,
    console: &std::path::Path,
    vmgenid: bool,
    id: &str,
) -> QemuConfig {
    let mut cfg = QemuConfig::new(kernel, disk, console);
    cfg.vmgenid = vmgenid;
    cfg.disk_serial = Some(disk_serial(id));
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

/// A Firecracker process started ahead of the disk ([`firecracker::launch`]), when the VM
/// `sb` is about to get needs one: booted from a Firecracker spec, or restored from a
/// Firecracker snapshot. `None` for QEMU or no VM.
pub fn prelaunch(
    core: &Core,
    sb: &Sandbox,
    start: VmStart<'_>,
) -> Option<impl std::future::Future<Output = Result<FirecrackerVm>> + 'static> {
    let firecracker = match start {
        VmStart::Boot => sb.vm.as_ref().is_some_and(VmSpec::runs_firecracker),
        VmStart::Restore(state) => state.is_some_and(|s| s.memory.is_some()),
    };
    firecracker.then(|| firecracker::launch(core))
}

/// Boots the sandbox's VM on its served disk when its VM spec asks for one; `None` otherwise.
/// A Firecracker VM runs in `launched` ([`prelaunch`]), or in a process launched now.
pub async fn boot(
    core: &Core,
    sb: &Sandbox,
    provider: &AnyProvider,
    launched: Option<FirecrackerVm>,
) -> Result<Option<RunningVm>> {
    let Some(spec) = sb.vm.as_ref() else {
        return Ok(None);
    };
    if spec.boots_qemu() {
        return launch(core, sb, provider, None)
            .await
            .map(|q| Some(RunningVm::Qemu(q)));
    }
    if spec.runs_firecracker() {
        let device = ready_device(provider).await?;
        let template = template_identity(core, sb)?;
        let launched = match launched {
            Some(vm) => vm,
            None => firecracker::launch(core).await?,
        };
        let vm = firecracker::boot(sb, spec, &device, &template, launched).await?;
        sb.update(|s| s.vm_pid = vm.pid().unwrap_or(0));
        return Ok(Some(RunningVm::Firecracker(Box::new(vm))));
    }
    Ok(None)
}

/// Starts the sandbox's VM on its served disk from the state a pause saved (the same machine,
/// a new disk with the same data): the guest continues where it stopped.
/// A Firecracker snapshot is restored in `launched` ([`prelaunch`]), or in a process launched
/// now.
pub async fn restore(
    core: &Core,
    sb: &Sandbox,
    provider: &AnyProvider,
    state: &VmState,
    launched: Option<FirecrackerVm>,
) -> Result<RunningVm> {
    match &state.memory {
        None => launch(core, sb, provider, Some(state))
            .await
            .map(RunningVm::Qemu),
        Some(memory) => {
            let device = ready_device(provider).await?;
            let template = template_identity(core, sb)?;
            let files = SnapshotFiles {
                state: state.path.clone(),
                memory: memory.clone(),
            };
            let launched = match launched {
                Some(vm) => vm,
                None => firecracker::launch(core).await?,
            };
            let vm = firecracker::restore(sb, &device, &template, &files, launched).await?;
            sb.update(|s| s.vm_pid = vm.pid().unwrap_or(0));
            Ok(RunningVm::Firecracker(Box::new(vm)))
        }
    }
}

/// Starts QEMU on `provider`'s device: booting, or restored from `state`. Either way the
/// machine gets a VM generation ID with a GUID of its own (unless `state` was saved from a
/// machine without the device): a restored guest, a fork's above all, is told it is a new
/// generation and reseeds its random number generator.
async fn launch(
    core: &Core,
    sb: &Sandbox,
    provider: &AnyProvider,
    state: Option<&VmState>,
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
    let vmgenid = state.is_none_or(|s| s.vmgenid);
    let mut cfg = qemu_config(
        spec,
        kernel,
        device.into_root_disk(),
        &console,
        vmgenid,
        &sb.id,
    );
    cfg.nbd_reconnect_delay_secs = core.config.vmm_nbd_reconnect_delay;
    let state = state.map(|s| s.path.clone());
    let template = template_identity(core, sb)?;
    let qemu = QemuBinary::from_env();
    let restoring = state.is_some();
    let (vm, genid) = tokio::task::spawn_blocking(move || {
        // The QMP socket stays while the VM runs (a restarted daemon reconnects to it).
        let r = match &state {
            None => QemuProcess::spawn_verified(&qemu, &cfg, &log, &qmp, &template),
            Some(state) => QemuProcess::spawn_restored(&qemu, &cfg, &log, &qmp, &template, state),
        };
        if r.is_err() {
            let _ = std::fs::remove_file(&qmp);
        }
        r.map(|mut vm| {
            let genid = vm.generation_id();
            (vm, genid)
        })
    })
    .await
    .map_err(|e| DaemonError::task("starting the VM", e))??;
    let genid = genid.unwrap_or_else(|e| {
        tracing::warn!(sandbox = %sb.id, "reading the VM generation ID: {e}");
        None
    });
    let pid = vm.pid();
    sb.update(|s| {
        s.vm_pid = pid;
        s.vm_console = console.display().to_string();
        s.vm_generation_id = genid.unwrap_or_default();
    });
    if restoring {
        tracing::info!(sandbox = %sb.id, pid, "restored QEMU from its saved state on the sandbox's disk");
    } else {
        tracing::info!(sandbox = %sb.id, pid, "booted QEMU on the sandbox's disk");
    }
    Ok(vm)
}

/// Stops the sandbox's VM (its console and log stay: a paused sandbox's restored VM goes on
/// writing them).
pub async fn halt(sb: &Sandbox, vm: RunningVm) {
    match vm {
        RunningVm::Qemu(mut q) => {
            tokio::task::spawn_blocking(move || {
                q.kill();
                if let Some(s) = q.qmp_socket() {
                    let _ = std::fs::remove_file(s);
                }
            })
            .await
            .ok();
        }
        RunningVm::Firecracker(f) => firecracker::stop(*f).await,
    }
    sb.update(|s| {
        s.vm_pid = 0;
        s.vm_generation_id.clear();
    });
}

/// Kills the sandbox's VM and removes its console and log (the disk is closed after this, under
/// nobody).
pub async fn stop(core: &Core, sb: &Sandbox, vm: RunningVm) {
    halt(sb, vm).await;
    for ext in ["console", "qemu.log"] {
        let _ = std::fs::remove_file(core.dirs.vm.join(format!("{}.{ext}", sb.id)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_serials_are_the_id_or_a_hashed_short_form() {
        assert_eq!(disk_serial("vm-c-fork-0"), "vm-c-fork-0");
        let a = disk_serial("a-sandbox-with-a-long-name-fork-0");
        let b = disk_serial("a-sandbox-with-a-long-name-fork-1");
        assert_eq!(a.len(), DISK_SERIAL_MAX);
        assert!(a.starts_with("a-sandbox-w~"), "{a}");
        assert_ne!(a, b);
        assert_eq!(a, disk_serial("a-sandbox-with-a-long-name-fork-0"));
    }
}
