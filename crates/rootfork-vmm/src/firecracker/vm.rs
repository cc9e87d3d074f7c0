//! [`FirecrackerVm`]: one VMM process and the calls that bring it up, in order, with the drive
//! verified before the guest runs.
//!
//! Cold boot ([`FirecrackerVm::configure_and_start`]):
//! `PUT /logger`? → `PUT /metrics`? → link → device → `PUT /boot-source` → `PUT /drives/rootfs`
//! → `PUT /machine-config` → `PUT /network-interfaces/*` → `PUT /mmds/config`? → `PUT /mmds`?
//! → verify `/proc/<pid>/fd` → `PUT /actions InstanceStart`.
//!
//! Resume ([`FirecrackerVm::resume`]): `PUT /logger`? → `PUT /metrics`? → link → new device →
//! `PUT /snapshot/load` (not resumed) → verify `/proc/<pid>/fd` → `PATCH /vm Resumed`.
//!
//! If verification fails the process is killed at once, so a VMM that opened the wrong disk can
//! never run the guest.
//!
//! Adoption ([`FirecrackerVm::adopt`]): a VM launched by an earlier process that
//! [`release`](FirecrackerVm::release)d it (or died) is taken back by pid and start time
//! (`crate::procstat`), its command line naming its API socket; the host link must still
//! resolve to the device, `GET /` must show a started instance, and `/proc/<pid>/fd` is verified
//! as at a launch.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use super::client::{FirecrackerClient, RootDriveOptions};
use super::error::ApiError;
use super::jailer::{JailError, JailOwner, JailedDeviceNode, JailerConfig};
use super::link::{HostLink, LinkError};
use super::models::*;
use super::namespace::{NamespaceError, NamespacePlan};
use super::process::{ProcessError, VmmCommand, VmmProcess};
use super::verify::{verify_opened, OpenedFile, TemplateIdentity, VerifyError};
use crate::drive::{DriveAccess, DriveError, ReadyDevice, RootDrive, StableDrivePath};
use crate::procstat::ProcessIdentity;

/// Errors of the VM flow.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Preparing the run directory failed.
    #[error("run directory {path}: {source}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The mount namespace plan is invalid.
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// Launching or stopping the process failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The host link could not be set.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The jail device node could not be made.
    #[error(transparent)]
    Jail(#[from] JailError),
    /// The device changed or vanished since it was verified.
    #[error(transparent)]
    Drive(#[from] DriveError),
    /// An API call was refused or failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The VMM opened the wrong file; the process has been killed.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The recorded VMM process is gone, is another process now, or could not be checked.
    #[error("the VMM was not adopted: {0}")]
    Adopt(#[from] crate::procstat::IdentityError),
    /// An adopted VMM's instance is not running a guest.
    #[error("the adopted VMM (pid {pid}) is {state:?}, not running a guest")]
    NotRunning {
        /// The pid.
        pid: u32,
        /// What its API says.
        state: crate::firecracker::models::InstanceState,
    },
    /// The call is not valid in the VM's current state.
    #[error("{op} is not allowed while the VM is {state:?}")]
    State {
        /// The attempted operation.
        op: &'static str,
        /// The current state.
        state: VmPhase,
    },
}

/// Where a [`FirecrackerVm`] is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPhase {
    /// The process runs and its API answers; nothing configured.
    Launched,
    /// The guest runs.
    Running,
    /// The guest is paused.
    Paused,
    /// Verification failed or a call failed half-way; the process is gone or must be dropped.
    Failed,
}

/// Launch parameters common to both modes.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// VM id (`--id`); also the name of its run directory.
    pub vm_id: String,
    /// Parent of the per-VM run directory (`<run_dir>/<vm_id>/{api.sock,rootfs.link,vmm.log}`).
    pub run_dir: PathBuf,
    /// The drive path the VMM is given.
    pub stable: StableDrivePath,
    /// How long to wait for the API socket.
    pub socket_timeout: Duration,
    /// Per-request API timeout.
    pub api_timeout: Duration,
}

impl LaunchConfig {
    /// Defaults: stable path `/fc-vm/rootfs.ext4`, 5 s socket wait, 10 s API timeout.
    pub fn new(vm_id: impl Into<String>, run_dir: impl Into<PathBuf>) -> Self {
        LaunchConfig {
            vm_id: vm_id.into(),
            run_dir: run_dir.into(),
            stable: StableDrivePath::new(DEFAULT_STABLE_DRIVE_PATH).expect("valid constant"),
            socket_timeout: Duration::from_secs(5),
            api_timeout: FirecrackerClient::DEFAULT_TIMEOUT,
        }
    }

    /// The VM's own run directory (`<run_dir>/<vm_id>`).
    pub fn vm_dir(&self) -> PathBuf {
        self.run_dir.join(&self.vm_id)
    }
}

/// The default stable drive path.
pub const DEFAULT_STABLE_DRIVE_PATH: &str = "/fc-vm/rootfs.ext4";

/// What a cold boot configures.
#[derive(Debug, Clone)]
pub struct ColdBootConfig {
    /// Kernel, initrd, command line.
    pub boot_source: BootSource,
    /// vCPUs and memory.
    pub machine: MachineConfiguration,
    /// Root drive access.
    pub access: DriveAccess,
    /// Root drive tuning.
    pub root_options: RootDriveOptions,
    /// Network interfaces.
    pub network_interfaces: Vec<NetworkInterface>,
    /// Logger, configured first.
    pub logger: Option<Logger>,
    /// Metrics, configured first.
    pub metrics: Option<Metrics>,
    /// MMDS configuration.
    pub mmds_config: Option<MmdsConfig>,
    /// MMDS contents.
    pub mmds_data: Option<serde_json::Value>,
    /// A virtio-rng device (`PUT /entropy`, after the machine configuration).
    pub entropy: Option<EntropyDevice>,
}

impl ColdBootConfig {
    /// A minimal configuration: kernel + command line, `vcpus` and `mem_mib`.
    pub fn new(
        kernel: impl Into<String>,
        boot_args: Option<String>,
        vcpus: u8,
        mem_mib: u64,
    ) -> Self {
        ColdBootConfig {
            boot_source: BootSource {
                kernel_image_path: kernel.into(),
                boot_args,
                initrd_path: None,
            },
            machine: MachineConfiguration {
                vcpu_count: vcpus,
                mem_size_mib: mem_mib,
                smt: None,
                track_dirty_pages: None,
                huge_pages: None,
                cpu_template: None,
            },
            access: DriveAccess::ReadWrite,
            root_options: RootDriveOptions::default(),
            network_interfaces: Vec::new(),
            logger: None,
            metrics: None,
            mmds_config: None,
            mmds_data: None,
            entropy: None,
        }
    }
}

/// What a resume loads.
#[derive(Debug, Clone)]
pub struct ResumeConfig {
    /// The snapshot to load; `resume_vm` is ignored (the VM is resumed after verification).
    pub load: SnapshotLoadParams,
    /// Logger, configured first.
    pub logger: Option<Logger>,
    /// Metrics, configured first.
    pub metrics: Option<Metrics>,
}

impl ResumeConfig {
    /// Loads `snapshot_path` with guest memory from the file `mem_path`.
    pub fn from_files(snapshot_path: impl Into<String>, mem_path: impl Into<String>) -> Self {
        ResumeConfig {
            load: SnapshotLoadParams {
                snapshot_path: snapshot_path.into(),
                mem_backend: Some(MemoryBackend {
                    backend_type: MemoryBackendType::File,
                    backend_path: mem_path.into(),
                }),
                mem_file_path: None,
                track_dirty_pages: None,
                resume_vm: None,
                network_overrides: None,
            },
            logger: None,
            metrics: None,
        }
    }
}

#[derive(Debug)]
enum Binding {
    /// Namespace mode: the stable path is a symlink to this host link.
    Link(HostLink),
    /// Jailer mode: a device node inside the chroot, made when the device is known.
    Jail {
        root: PathBuf,
        owner: JailOwner,
        node: Option<JailedDeviceNode>,
    },
}

/// One Firecracker (or API double) process with its stable drive path.
#[derive(Debug)]
pub struct FirecrackerVm {
    process: Option<VmmProcess>,
    client: FirecrackerClient,
    /// The run directory (`api.sock`, `rootfs.link`, `vmm.log`); namespace mode only.
    dir: Option<PathBuf>,
    binding: Binding,
    stable: StableDrivePath,
    phase: VmPhase,
    root: Option<RootDrive>,
    opened: Option<OpenedFile>,
}

impl FirecrackerVm {
    /// Starts `command` (Firecracker or the double; `--api-sock <sock> --id <vm id>` are
    /// prepended to its arguments) in its own mount namespace, with the stable drive path
    /// linked to a host link parked on `/dev/null`, and waits for the API socket.
    pub async fn launch(command: &VmmCommand, config: &LaunchConfig) -> Result<Self, VmError> {
        let dir = config.vm_dir();
        std::fs::create_dir_all(&dir).map_err(|source| VmError::RunDir {
            path: dir.clone(),
            source,
        })?;
        let socket = dir.join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let link = HostLink::create(dir.join("rootfs.link"))?;
        let plan = NamespacePlan::new(&config.stable, link.path())?;
        let mut full = VmmCommand::new(command.program())
            .arg("--api-sock")
            .arg(&socket)
            .arg("--id")
            .arg(&config.vm_id);
        for a in command.args() {
            full = full.arg(a);
        }
        let mut process = VmmProcess::spawn(&full, Some(plan), &dir.join("vmm.log"))?;
        process
            .wait_for_socket(&socket, config.socket_timeout)
            .await?;
        Ok(FirecrackerVm {
            process: Some(process),
            client: FirecrackerClient::new(socket).with_timeout(config.api_timeout),
            dir: Some(dir),
            binding: Binding::Link(link),
            stable: config.stable.clone(),
            phase: VmPhase::Launched,
            root: None,
            opened: None,
        })
    }

    /// Starts Firecracker under the jailer. The stable drive path is inside the chroot; the
    /// device node is created there (owned by the jail uid/gid) once the device is ready.
    pub async fn launch_jailed(
        jailer: &JailerConfig,
        stable: StableDrivePath,
        log: &Path,
        socket_timeout: Duration,
    ) -> Result<Self, VmError> {
        let socket = jailer.host_api_socket();
        let _ = std::fs::remove_file(&socket);
        let mut process = VmmProcess::spawn(&jailer.command(), None, log)?;
        process.wait_for_socket(&socket, socket_timeout).await?;
        Ok(FirecrackerVm {
            process: Some(process),
            client: FirecrackerClient::new(socket),
            dir: None,
            binding: Binding::Jail {
                root: jailer.chroot_root(),
                owner: jailer.owner,
                node: None,
            },
            stable,
            phase: VmPhase::Launched,
            root: None,
            opened: None,
        })
    }

    /// Takes back a VM that an earlier process [`launch`](Self::launch)ed in `dir` (its run
    /// directory, `config.vm_dir()` then) and that outlived it, running a guest on `device`:
    /// the process must still run, have been started at `identity`'s time (a reused pid is
    /// refused) and name `dir`'s `api.sock` on its command line; the host link its stable path
    /// resolves through must still resolve to `device`; its API must answer (a new client on
    /// the kept socket) with a started instance; and its open descriptors must hold `device`
    /// and none of `templates` (the check a launch makes). A VM that is the recorded process
    /// but fails one of the last three checks is killed. From then on it is watched and killed through a pidfd; dropping the returned
    /// value kills it, [`release`](Self::release) lets it run on again.
    pub async fn adopt(
        identity: ProcessIdentity,
        dir: &Path,
        stable: StableDrivePath,
        device: &ReadyDevice,
        templates: &[TemplateIdentity],
        api_timeout: Duration,
    ) -> Result<Self, VmError> {
        let socket = dir.join("api.sock");
        let process = VmmProcess::adopt(identity, &socket, &dir.join("vmm.log"))?;
        // A link resolving elsewhere: `process` is dropped, which kills the VM (it is the recorded
        // one, but nothing vouches for the disk it runs on).
        let link = HostLink::existing(dir.join("rootfs.link"), device)?;
        let mut vm = FirecrackerVm {
            process: Some(process),
            client: FirecrackerClient::new(socket).with_timeout(api_timeout),
            dir: Some(dir.to_owned()),
            binding: Binding::Link(link),
            stable: stable.clone(),
            phase: VmPhase::Failed,
            root: None,
            opened: None,
        };
        let info = vm.client.describe_instance().await?;
        vm.phase = match info.state {
            InstanceState::Running => VmPhase::Running,
            InstanceState::Paused => VmPhase::Paused,
            state => {
                return Err(VmError::NotRunning {
                    pid: identity.pid,
                    state,
                })
            }
        };
        let phase = vm.phase;
        vm.verify(device, templates)?;
        vm.phase = phase;
        vm.root = Some(RootDrive::new(device, stable));
        Ok(vm)
    }

    /// The VMM process's pid and start time, by which a later process can
    /// [`adopt`](Self::adopt) it.
    pub fn identity(&self) -> Result<ProcessIdentity, VmError> {
        match &self.process {
            Some(p) => Ok(p.identity()?),
            None => Err(VmError::State {
                op: "identity",
                state: self.phase,
            }),
        }
    }

    /// The run directory (`api.sock`, `rootfs.link`, `vmm.log`) of a VM launched in its own
    /// mount namespace; `None` under the jailer.
    pub fn run_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Lets the VM run on without this value: the process is neither killed nor reaped, and
    /// its host link and API socket stay (a daemon stopping for a restart hands it to the next
    /// one, which [`adopt`](Self::adopt)s it).
    /// (Under the jailer the device node in the chroot is removed; the VMM keeps the device
    /// it opened.)
    pub fn release(self) {
        let FirecrackerVm {
            process, binding, ..
        } = self;
        if let Some(p) = process {
            p.release();
        }
        if let Binding::Link(link) = binding {
            link.release();
        }
    }

    /// The API client.
    pub fn client(&self) -> &FirecrackerClient {
        &self.client
    }

    /// The VMM's pid (`None` once it has been stopped).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(VmmProcess::pid)
    }

    /// The stable drive path.
    pub fn stable_path(&self) -> &StableDrivePath {
        &self.stable
    }

    /// Where the VM is in its life.
    pub fn phase(&self) -> VmPhase {
        self.phase
    }

    /// The host link (namespace mode).
    pub fn host_link(&self) -> Option<&HostLink> {
        match &self.binding {
            Binding::Link(l) => Some(l),
            Binding::Jail { .. } => None,
        }
    }

    /// The root drive, once configured.
    pub fn root_drive(&self) -> Option<&RootDrive> {
        self.root.as_ref()
    }

    /// The descriptor verification found holding the device.
    pub fn opened_drive(&self) -> Option<&OpenedFile> {
        self.opened.as_ref()
    }

    fn expect_phase(&self, op: &'static str, want: VmPhase) -> Result<(), VmError> {
        if self.phase == want {
            Ok(())
        } else {
            Err(VmError::State {
                op,
                state: self.phase,
            })
        }
    }

    /// Points the stable path at `device` (link retarget or jail node).
    fn bind(&mut self, device: &ReadyDevice) -> Result<(), VmError> {
        device.recheck()?;
        match &mut self.binding {
            Binding::Link(link) => link.point_at(device)?,
            Binding::Jail { root, owner, node } => match node {
                Some(n) => n.retarget(device)?,
                None => {
                    *node = Some(JailedDeviceNode::create(
                        root,
                        &self.stable,
                        device,
                        *owner,
                    )?)
                }
            },
        }
        Ok(())
    }

    async fn observability(
        &self,
        logger: &Option<Logger>,
        metrics: &Option<Metrics>,
    ) -> Result<(), VmError> {
        if let Some(l) = logger {
            self.client.put_logger(l).await?;
        }
        if let Some(m) = metrics {
            self.client.put_metrics(m).await?;
        }
        Ok(())
    }

    /// Checks the VMM's open descriptors; on failure kills it and marks the VM failed.
    fn verify(
        &mut self,
        device: &ReadyDevice,
        templates: &[TemplateIdentity],
    ) -> Result<(), VmError> {
        let pid = self.pid().ok_or(VmError::State {
            op: "verify",
            state: self.phase,
        })?;
        match verify_opened(pid, device, templates) {
            Ok(f) => {
                self.opened = Some(f);
                Ok(())
            }
            Err(e) => {
                // Dropping the guard kills and reaps the process: it must never run the guest.
                self.process.take();
                self.phase = VmPhase::Failed;
                Err(e.into())
            }
        }
    }

    /// Cold boot on `device`, refusing to start if the VMM opened anything in `templates` or
    /// did not open `device`.
    pub async fn configure_and_start(
        &mut self,
        device: &ReadyDevice,
        templates: &[TemplateIdentity],
        config: &ColdBootConfig,
    ) -> Result<(), VmError> {
        self.expect_phase("configure_and_start", VmPhase::Launched)?;
        self.phase = VmPhase::Failed;
        self.observability(&config.logger, &config.metrics).await?;
        self.bind(device)?;
        self.client.put_boot_source(&config.boot_source).await?;
        let root = RootDrive::new(device, self.stable.clone()).with_access(config.access);
        self.client
            .put_root_drive(&root, &config.root_options)
            .await?;
        self.root = Some(root);
        self.client.put_machine_config(&config.machine).await?;
        if let Some(e) = &config.entropy {
            self.client.put_entropy(e).await?;
        }
        for iface in &config.network_interfaces {
            self.client.put_network_interface(iface).await?;
        }
        if let Some(m) = &config.mmds_config {
            self.client.put_mmds_config(m).await?;
        }
        if let Some(d) = &config.mmds_data {
            self.client.put_mmds(d).await?;
        }
        self.verify(device, templates)?;
        self.client.instance_start().await?;
        self.phase = VmPhase::Running;
        Ok(())
    }

    /// Resume from a snapshot on `device` (a fresh process; the snapshot's drive path is the
    /// stable path, which now resolves to `device`).
    pub async fn resume(
        &mut self,
        device: &ReadyDevice,
        templates: &[TemplateIdentity],
        config: &ResumeConfig,
    ) -> Result<(), VmError> {
        self.expect_phase("resume", VmPhase::Launched)?;
        self.phase = VmPhase::Failed;
        self.observability(&config.logger, &config.metrics).await?;
        self.bind(device)?;
        let mut load = config.load.clone();
        load.resume_vm = None;
        self.client.load_snapshot(&load).await?;
        self.root = Some(RootDrive::new(device, self.stable.clone()));
        self.verify(device, templates)?;
        self.client.resume().await?;
        self.phase = VmPhase::Running;
        Ok(())
    }

    /// Moves a running or paused VM onto `device` (for example the same overlay re-attached
    /// on another `/dev/nbdN`): retargets the link, `PATCH /drives/rootfs` with the same stable
    /// path so the VMM reopens it, and verifies the VMM now holds `device`. On a failed check
    /// the process is killed.
    pub async fn replace_device(
        &mut self,
        device: &ReadyDevice,
        templates: &[TemplateIdentity],
    ) -> Result<(), VmError> {
        if !matches!(self.phase, VmPhase::Running | VmPhase::Paused) {
            return Err(VmError::State {
                op: "replace_device",
                state: self.phase,
            });
        }
        let access = self
            .root
            .as_ref()
            .map(RootDrive::access)
            .unwrap_or_default();
        self.bind(device)?;
        self.client
            .patch_drive(&PartialDrive {
                drive_id: RootDrive::DRIVE_ID.to_owned(),
                path_on_host: Some(self.stable.to_api_string()),
                rate_limiter: None,
            })
            .await?;
        self.root = Some(RootDrive::new(device, self.stable.clone()).with_access(access));
        let phase = self.phase;
        self.verify(device, templates)?;
        self.phase = phase;
        Ok(())
    }

    /// Pauses the guest.
    pub async fn pause(&mut self) -> Result<(), VmError> {
        self.expect_phase("pause", VmPhase::Running)?;
        self.client.pause().await?;
        self.phase = VmPhase::Paused;
        Ok(())
    }

    /// Lets a paused guest run again (`PATCH /vm Resumed`): the undo of a pause whose later
    /// steps failed.
    pub async fn unpause(&mut self) -> Result<(), VmError> {
        self.expect_phase("unpause", VmPhase::Paused)?;
        self.client.resume().await?;
        self.phase = VmPhase::Running;
        Ok(())
    }

    /// `Err` (with the exit status and the log's tail) once the VMM process has exited or was
    /// stopped; `Ok` while it runs.
    pub fn check_running(&mut self) -> Result<(), VmError> {
        match self.process.as_mut() {
            Some(p) => Ok(p.check_running()?),
            None => Err(VmError::State {
                op: "check_running",
                state: self.phase,
            }),
        }
    }

    /// Writes a snapshot of the paused guest.
    pub async fn snapshot(&self, params: &SnapshotCreateParams) -> Result<(), VmError> {
        self.expect_phase("snapshot", VmPhase::Paused)?;
        self.client.create_snapshot(params).await?;
        Ok(())
    }

    /// Stops the process (`SIGTERM`, then `SIGKILL` after `grace`) and removes the link or
    /// jail node.
    pub async fn shutdown(mut self, grace: Duration) -> Result<Option<ExitStatus>, VmError> {
        let status = match self.process.take() {
            Some(p) => p.shutdown(grace).await?,
            None => None,
        };
        Ok(status)
    }
}
