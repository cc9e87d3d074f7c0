//! Starting a sandbox on a new disk, the step create, resume and fork share: build the provider
//! over the base image, serve the disk, start the VM (boot it, restore it from a saved state, or
//! none) and write the record of a running sandbox. A Firecracker process is launched while the
//! disk is attached, so its start-up overlaps the attach. All or nothing: on a failure at any step the
//! VM started is stopped and the disk discarded (its files removed), so the caller only rolls
//! back its own bookkeeping.

use rootfork_provider::{AnyProvider, BaseImage};
use rootfork_vmm::firecracker::FirecrackerVm;

use crate::daemon::core::Core;
use crate::daemon::sandbox::{Live, Sandbox};
use crate::daemon::snapshot::VmState;
use crate::daemon::vm::{self, RunningVm};
use crate::daemon::{disk, persist};
use crate::error::Result;

/// How the VM of a sandbox starts on its new disk.
#[derive(Debug, Clone, Copy)]
pub enum VmStart<'a> {
    /// Booted, when its VM spec asks for one (a create).
    Boot,
    /// Restored from a pause's saved state, when there is one (a resume, a fork).
    Restore(Option<&'a VmState>),
}

/// Serves `sb`'s disk over `base` as disk generation `generation`, starts its VM as `vm_start`
/// says and records the sandbox running (with `live` as it stands). `what` names the operation
/// in logs ("create", "resume", "fork").
pub async fn serve_and_start(
    core: &Core,
    sb: &Sandbox,
    live: &Live,
    base: BaseImage,
    generation: u64,
    vm_start: VmStart<'_>,
    what: &str,
) -> Result<(AnyProvider, Option<RunningVm>)> {
    let disk =
        async { disk::bring_up(core, sb, disk::provider_for(core, sb, base, generation)?).await };
    // A Firecracker process starts while the device is attached (it needs the device only when
    // its drive is configured); QEMU is started on the ready device.
    let (disk, launched) = match vm::prelaunch(core, sb, vm_start) {
        Some(launch) => {
            let (disk, launched) = tokio::join!(disk, launch);
            (disk, Some(launched))
        }
        None => (disk.await, None),
    };
    let (provider, launched) = match (disk, launched) {
        (Ok(p), Some(Ok(vm))) => (p, Some(vm)),
        (Ok(p), None) => (p, None),
        (Ok(mut p), Some(Err(e))) => {
            if let Err(ce) = disk::discard(&mut p).await {
                tracing::warn!(sandbox = %sb.id, "closing the disk after a failed {what}: {ce}");
            }
            return Err(e);
        }
        (Err(e), launched) => {
            if let Some(Ok(vm)) = launched {
                crate::daemon::firecracker::stop(vm).await;
            }
            return Err(e);
        }
    };
    finish(core, sb, live, provider, vm_start, launched, what).await
}

/// Starts the VM on the served disk (in `launched` when one was started ahead) and records the
/// sandbox running; on failure stops what started and discards the disk.
async fn finish(
    core: &Core,
    sb: &Sandbox,
    live: &Live,
    mut provider: AnyProvider,
    vm_start: VmStart<'_>,
    launched: Option<FirecrackerVm>,
    what: &str,
) -> Result<(AnyProvider, Option<RunningVm>)> {
    let started = match vm_start {
        VmStart::Boot => vm::boot(core, sb, &provider, launched).await,
        VmStart::Restore(Some(state)) => vm::restore(core, sb, &provider, state, launched)
            .await
            .map(Some),
        VmStart::Restore(None) => Ok(None),
    };
    let recorded = match started {
        Ok(vm) => match persist::save_running(core, sb, live, &provider, vm.as_ref()) {
            Ok(()) => Ok(vm),
            Err(e) => {
                match (vm, vm_start) {
                    // A new VM's console and log go with it.
                    (Some(v), VmStart::Boot) => vm::stop(core, sb, v).await,
                    // A restored one's console goes on from the paused sandbox's: it stays.
                    (Some(v), VmStart::Restore(_)) => vm::halt(sb, v).await,
                    (None, _) => {}
                }
                Err(e)
            }
        },
        Err(e) => Err(e),
    };
    match recorded {
        Ok(vm) => Ok((provider, vm)),
        Err(e) => {
            if let Err(ce) = disk::discard(&mut provider).await {
                tracing::warn!(sandbox = %sb.id, "closing the disk after a failed {what}: {ce}");
            }
            Err(e)
        }
    }
}
