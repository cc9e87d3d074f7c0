//! The daemon's shared state and its operations: templates (import, list, delete) and the
//! sandbox lifecycle (create, get, list, pause, resume, delete). The gRPC service is a thin layer
//! over these; tests call them through the API.
//!
//! Locking: `templates.map` is taken before `sandboxes` whenever both are needed, so a template
//! cannot be deleted between a create's existence check and the sandbox's registration (which is
//! what makes the template's reference count exact). Each sandbox's `live` lock is held for the
//! whole of an operation on it and never while taking the maps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rootfork_block::{OverlayOptions, TemplatePath};
use rootfork_kernel::AttachOptions;
use rootfork_nbd::ServeOptions;
use rootfork_provider::{
    AnyProvider, BaseImage, DeviceWrapper, KernelConfig, KernelProvider, PausedDisk, Provider,
    ProviderDevice, ProviderKind, SocketConfig, SocketProvider,
};

use crate::api::v1::{self, EventKind, HealthState, SandboxState, VmmSettings};
use crate::config::Config;
use crate::daemon::kernel::KernelSide;
use crate::daemon::sandbox::{overlay_stats, Sandbox};
use crate::daemon::templates::TemplateStore;
use crate::error::{DaemonError, Result};
use crate::events::EventBus;
use crate::metrics::{Metrics, Snapshot};
use crate::names;

/// Deleted sandboxes remembered (state DELETED) so that late calls get a precise answer.
const TOMBSTONES: usize = 1024;

/// Directories under the state directory.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// Template images and records.
    pub templates: PathBuf,
    /// Per-sandbox NBD sockets.
    pub nbd: PathBuf,
    /// Overlay cache files.
    pub cache: PathBuf,
    /// Paused sandboxes' diffs.
    pub paused: PathBuf,
    /// Scratch space.
    pub tmp: PathBuf,
    /// VM consoles, QEMU logs and QMP sockets.
    pub vm: PathBuf,
}

impl Dirs {
    /// The layout under `state`.
    pub fn new(state: &Path) -> Dirs {
        Dirs {
            templates: state.join("templates"),
            nbd: state.join("nbd"),
            cache: state.join("cache"),
            paused: state.join("paused"),
            tmp: state.join("tmp"),
            vm: state.join("vm"),
        }
    }
}

/// Everything the daemon shares between its tasks.
#[derive(Debug)]
pub struct Core {
    /// The configuration.
    pub config: Config,
    /// Directories.
    pub dirs: Dirs,
    /// Templates.
    pub templates: TemplateStore,
    /// Sandboxes by id (live ones and recent tombstones).
    pub sandboxes: parking_lot::RwLock<BTreeMap<String, Arc<Sandbox>>>,
    tombstones: parking_lot::Mutex<std::collections::VecDeque<(String, Arc<Sandbox>)>>,
    /// The event feed.
    pub events: Arc<EventBus>,
    /// Metrics.
    pub metrics: Metrics,
    /// The kernel pool.
    pub kernel: KernelSide,
    socket_seq: AtomicU64,
    /// Template bytes read by overlays that have been closed.
    closed_template_bytes: AtomicU64,
    /// NBD request counters of exports that have been closed.
    closed_nbd: parking_lot::Mutex<rootfork_nbd::StatsSnapshot>,
    /// Test seam: when set, socket providers created from now on serve `wrap(overlay)` (tests
    /// use it to make a sandbox's requests hang). Never set outside tests.
    #[doc(hidden)]
    pub socket_device_wrapper: parking_lot::Mutex<Option<DeviceWrapper>>,
    /// Test seam: the same for kernel providers. Never set outside tests.
    #[doc(hidden)]
    pub kernel_device_wrapper: parking_lot::Mutex<Option<DeviceWrapper>>,
}

fn kind_from_proto(k: i32) -> Result<ProviderKind> {
    match v1::ProviderKind::try_from(k) {
        Ok(v1::ProviderKind::Unspecified | v1::ProviderKind::Socket) => Ok(ProviderKind::Socket),
        Ok(v1::ProviderKind::Kernel) => Ok(ProviderKind::Kernel),
        Err(_) => Err(DaemonError::InvalidArgument(format!(
            "unknown provider kind {k}"
        ))),
    }
}

fn check_vmm(v: &VmmSettings) -> Result<()> {
    let bad = |m: String| Err(DaemonError::InvalidArgument(format!("vmm: {m}")));
    if v1::vmm_settings::Kind::try_from(v.kind).is_err() {
        return bad(format!("unknown kind {}", v.kind));
    }
    for (what, p) in [("kernel", &v.kernel), ("initrd", &v.initrd)] {
        if !p.is_empty() && !Path::new(p).is_absolute() {
            return bad(format!("{what} path {p:?} must be absolute"));
        }
    }
    if v.memory_mib != 0 && !(16..=1 << 20).contains(&v.memory_mib) {
        return bad(format!(
            "memory_mib {} is outside 16..=1048576",
            v.memory_mib
        ));
    }
    if v.vcpus > 256 {
        return bad(format!("vcpus {} is more than 256", v.vcpus));
    }
    if v.kernel_args.len() > 4096 {
        return bad("kernel_args is longer than 4096 bytes".into());
    }
    if v.kind == v1::vmm_settings::Kind::Qemu as i32 && v.kernel.is_empty() {
        return bad("a QEMU VM needs a kernel".into());
    }
    Ok(())
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    if getrandom(&mut b).is_err() {
        let t = Instant::now().elapsed().as_nanos() as u64 ^ u64::from(std::process::id());
        b = t.to_le_bytes();
    }
    format!(
        "sb-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

fn state_name(s: SandboxState) -> String {
    s.as_str_name()
        .trim_start_matches("SANDBOX_STATE_")
        .to_ascii_lowercase()
}

impl Core {
    /// Shared state over an opened template store.
    pub fn new(config: Config, dirs: Dirs, templates: TemplateStore) -> Core {
        let events = Arc::new(EventBus::default());
        if config.fault_injection {
            tracing::warn!(
                triggers = %config.state_dir.join("faults").display(),
                "debug.fault_injection is on: for testing recovery only"
            );
        }
        let kernel = KernelSide::new(
            config.nbd_lock_dir.clone(),
            events.clone(),
            config.kernel_backend.clone(),
        );
        Core {
            config,
            dirs,
            templates,
            sandboxes: Default::default(),
            tombstones: Default::default(),
            events,
            metrics: Metrics::new(),
            kernel,
            socket_seq: AtomicU64::new(0),
            closed_template_bytes: AtomicU64::new(0),
            closed_nbd: Default::default(),
            socket_device_wrapper: Default::default(),
            kernel_device_wrapper: Default::default(),
        }
    }

    fn fail<T>(&self, op: &str, e: DaemonError) -> Result<T> {
        self.metrics.error(op, e.errno());
        if !matches!(e, DaemonError::Name(_) | DaemonError::InvalidArgument(_)) {
            tracing::debug!(op, "{e}");
        }
        Err(e)
    }

    // ------------------------------------------------------------------ templates

    /// Sandboxes (not deleted) per template.
    pub fn template_refs(&self) -> BTreeMap<String, u32> {
        let mut m = BTreeMap::new();
        for s in self.sandboxes.read().values().filter(|s| s.is_live()) {
            *m.entry(s.template.clone()).or_default() += 1;
        }
        m
    }

    /// Templates.
    pub fn list_templates(&self) -> Vec<v1::Template> {
        let refs = self.template_refs();
        self.templates
            .list()
            .iter()
            .map(|m| {
                self.templates
                    .to_proto(m, refs.get(&m.name).copied().unwrap_or(0))
            })
            .collect()
    }

    /// Imports `source` as `name`, calling `progress(done, total)` (blocking; run it off the
    /// async threads).
    pub fn import_template_blocking(
        &self,
        name: &str,
        source: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<v1::Template> {
        let (mut file, size) = match self.templates.begin_import(name, source) {
            Ok(x) => x,
            Err(e) => return self.fail("import_template", e),
        };
        let r = crate::daemon::templates::detect_format(&mut file)
            .map_err(|e| DaemonError::io("reading the source", e))
            .and_then(|format| {
                let tmp = self
                    .templates
                    .copy_in(name, file, size, |d| progress(d, size))?;
                self.templates
                    .finish_import(name, &tmp, format, &source.display().to_string())
            });
        match r {
            Ok(meta) => {
                tracing::info!(template = name, size, format = %meta.format, "imported a template");
                self.events.emit(
                    EventBus::event(EventKind::Template)
                        .template(name)
                        .message(format!("imported from {}", source.display())),
                );
                Ok(self.templates.to_proto(&meta, 0))
            }
            Err(e) => {
                self.templates.abort_import(name);
                self.fail("import_template", e)
            }
        }
    }

    /// Deletes a template no sandbox uses. `Ok(false)` when there was none.
    pub fn delete_template(&self, name: &str) -> Result<bool> {
        if let Err(e) = names::template_name(name) {
            return self.fail("delete_template", e.into());
        }
        let mut map = self.templates.map.lock();
        if !map.contains_key(name) {
            return Ok(false);
        }
        let users = self.template_refs().get(name).copied().unwrap_or(0);
        if users > 0 {
            drop(map);
            return self.fail(
                "delete_template",
                DaemonError::FailedPrecondition(format!(
                    "template {name:?} is used by {users} sandbox(es); delete them first"
                )),
            );
        }
        map.remove(name);
        drop(map);
        self.templates.remove_files(name);
        tracing::info!(template = name, "deleted a template");
        self.events.emit(
            EventBus::event(EventKind::Template)
                .template(name)
                .message("deleted"),
        );
        Ok(true)
    }

    // ------------------------------------------------------------------ sandboxes

    fn lookup(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.sandboxes.read().get(id).cloned()
    }

    fn set_state(&self, sb: &Sandbox, state: SandboxState, message: Option<String>) {
        sb.update(|s| {
            s.state = state;
            if let Some(m) = &message {
                s.message.clone_from(m);
            }
        });
        let mut ev = EventBus::event(EventKind::Sandbox)
            .sandbox(&sb.id)
            .state(state);
        if let Some(m) = message {
            ev = ev.message(m);
        }
        self.events.emit(ev);
    }

    /// A sandbox by id.
    pub fn get_sandbox(&self, id: &str) -> Result<v1::Sandbox> {
        if let Err(e) = names::sandbox_id(id) {
            return self.fail("get_sandbox", e.into());
        }
        match self.lookup(id) {
            Some(s) => Ok(s.to_proto()),
            None => self.fail("get_sandbox", DaemonError::SandboxNotFound(id.into())),
        }
    }

    /// Every sandbox (deleted ones only if asked).
    pub fn list_sandboxes(&self, include_deleted: bool) -> Vec<v1::Sandbox> {
        let all: Vec<_> = self.sandboxes.read().values().cloned().collect();
        all.iter()
            .filter(|s| include_deleted || s.is_live())
            .map(|s| s.to_proto())
            .collect()
    }

    fn next_socket(&self) -> PathBuf {
        let n = self.socket_seq.fetch_add(1, Ordering::Relaxed);
        self.dirs.nbd.join(format!("{n}.sock"))
    }

    fn provider_for(&self, sb: &Sandbox, base: BaseImage, generation: u64) -> Result<AnyProvider> {
        let cache = self
            .dirs
            .cache
            .join(format!("{}.{generation}.cache", sb.id));
        match sb.kind {
            ProviderKind::Socket => {
                let mut p = SocketProvider::new(SocketConfig {
                    base,
                    socket: self.next_socket(),
                    export: sb.id.clone(),
                    cache,
                    overlay: OverlayOptions::default(),
                });
                if let Some(w) = self.socket_device_wrapper.lock().clone() {
                    p = p.with_device_wrapper(w);
                }
                Ok(AnyProvider::Socket(p))
            }
            ProviderKind::Kernel => {
                let attacher = self.kernel.attacher()?;
                let mut p = KernelProvider::new(
                    KernelConfig {
                        base,
                        cache,
                        overlay: OverlayOptions::default(),
                        attach: AttachOptions {
                            sandbox: sb.id.clone(),
                            connections: self.config.kernel_connections,
                            timeout: self.config.kernel_request_timeout,
                            dead_conn_timeout: self.config.kernel_dead_conn_timeout,
                            ..AttachOptions::default()
                        },
                        serve: ServeOptions::default(),
                    },
                    attacher,
                );
                if let Some(node_path) = self.kernel.node_path() {
                    p = p.with_node_path(node_path);
                }
                if self.config.fault_injection {
                    p = p.with_fault_injection();
                }
                if let Some(w) = self.kernel_device_wrapper.lock().clone() {
                    p = p.with_device_wrapper(w);
                }
                Ok(AnyProvider::Kernel(Box::new(p)))
            }
            ProviderKind::Direct => Err(DaemonError::InvalidArgument(
                "the direct provider is not offered by the daemon".into(),
            )),
        }
    }

    /// Starts `provider` and waits for its device; on failure closes it again.
    async fn bring_up(&self, sb: &Sandbox, mut provider: AnyProvider) -> Result<AnyProvider> {
        let started = Instant::now();
        if let AnyProvider::Socket(p) = &provider {
            // The kernel pool reports its own claims.
            self.events.emit(
                EventBus::event(EventKind::Claimed)
                    .sandbox(&sb.id)
                    .message(p.config().socket.display().to_string()),
            );
        }
        let r = async {
            provider.start()?;
            provider
                .path(self.config.ready_timeout, std::future::pending())
                .await
        }
        .await;
        let device = match r {
            Ok(d) => d,
            Err(e) => {
                if let Err(ce) = provider.close().await {
                    tracing::warn!(sandbox = %sb.id, "closing a provider that failed to attach: {ce}");
                }
                return Err(e.into());
            }
        };
        let latency = started.elapsed();
        self.metrics.attach_latency(sb.kind.as_str(), latency);
        let index = match &provider {
            AnyProvider::Kernel(k) => k.index(),
            _ => None,
        };
        sb.update(|s| {
            s.ready_latency = latency;
            s.health = HealthState::Healthy;
            s.failed_checks = 0;
            s.device_index = index;
            match &device {
                ProviderDevice::Nbd(ep) => s.nbd_uri = ep.uri(),
                ProviderDevice::Device(d) => s.device_path = d.path().display().to_string(),
            }
        });
        if let ProviderDevice::Nbd(ep) = &device {
            // The kernel pool reports its own claims and connections.
            self.events.emit(
                EventBus::event(EventKind::Connected)
                    .sandbox(&sb.id)
                    .message(ep.uri()),
            );
        }
        Ok(provider)
    }

    /// Boots QEMU on the sandbox's served disk when its VMM settings ask for it.
    async fn boot_vm(
        &self,
        sb: &Sandbox,
        provider: &AnyProvider,
    ) -> Result<Option<rootfork_vmm::qemu::QemuProcess>> {
        use rootfork_vmm::qemu::{QemuBinary, QemuConfig, QemuProcess};
        let Some(v) = sb
            .vmm
            .as_ref()
            .filter(|v| v.kind == v1::vmm_settings::Kind::Qemu as i32)
        else {
            return Ok(None);
        };
        let device = provider
            .path(Duration::ZERO, std::future::ready(()))
            .await?;
        let n = self.socket_seq.fetch_add(1, Ordering::Relaxed);
        std::fs::create_dir_all(&self.dirs.vm)
            .map_err(|e| DaemonError::io("creating the vm directory", e))?;
        let console = self.dirs.vm.join(format!("{}.console", sb.id));
        let log = self.dirs.vm.join(format!("{}.qemu.log", sb.id));
        let qmp = self.dirs.vm.join(format!("{n}.qmp"));
        let mut cfg = QemuConfig::new(&v.kernel, device.into_root_disk(), &console);
        if !v.initrd.is_empty() {
            cfg.initrd = Some(PathBuf::from(&v.initrd));
        }
        if !v.kernel_args.is_empty() {
            cfg.append.clone_from(&v.kernel_args);
        } else {
            cfg.append = "console=ttyS0 root=/dev/vda rw panic=-1".into();
        }
        if v.memory_mib != 0 {
            cfg.memory_mib = v.memory_mib;
        }
        if v.vcpus != 0 {
            cfg.cpus = v.vcpus;
        }
        let template = rootfork_vmm::firecracker::TemplateIdentity::of(&TemplatePath::new(
            self.templates.image_path(&sb.template),
        ))
        .map_err(|e| DaemonError::io("stat template", e))?;
        let qemu = QemuBinary::from_env();
        let vm = tokio::task::spawn_blocking(move || {
            let r = QemuProcess::spawn_verified(&qemu, &cfg, &log, &qmp, &[template]);
            let _ = std::fs::remove_file(&qmp);
            r
        })
        .await
        .map_err(|e| DaemonError::io("booting the VM", std::io::Error::other(e.to_string())))??;
        let pid = vm.pid();
        sb.update(|s| {
            s.vm_pid = pid;
            s.vm_console = console.display().to_string();
        });
        tracing::info!(sandbox = %sb.id, pid, "booted QEMU on the sandbox's disk");
        Ok(Some(vm))
    }

    /// Creates a sandbox and waits until its disk is served.
    pub async fn create_sandbox(&self, req: v1::CreateSandboxRequest) -> Result<v1::Sandbox> {
        match self.create_inner(req).await {
            Ok(s) => Ok(s),
            Err(e) => self.fail("create_sandbox", e),
        }
    }

    async fn create_inner(&self, req: v1::CreateSandboxRequest) -> Result<v1::Sandbox> {
        names::template_name(&req.template)?;
        let id = if req.id.is_empty() {
            random_id()
        } else {
            req.id.clone()
        };
        names::sandbox_id(&id)?;
        let kind = kind_from_proto(req.provider)?;
        if let Some(v) = &req.vmm {
            check_vmm(v)?;
        }
        if kind == ProviderKind::Kernel {
            if let Some(why) = self.kernel.unavailable_reason() {
                return Err(DaemonError::Unavailable(why));
            }
        }
        // The new sandbox's lifecycle lock is taken before it is published, so a concurrent
        // delete (or pause) of the same id waits for this create to finish or fail.
        let sb = Sandbox::new(id.clone(), req.template.clone(), kind, req.vmm.clone());
        let mut live = sb
            .live
            .try_lock()
            .map_err(|_| DaemonError::InvalidArgument("internal: new sandbox locked".into()))?;
        {
            let templates = self.templates.map.lock();
            if !templates.contains_key(&req.template) {
                return Err(DaemonError::TemplateNotFound(req.template));
            }
            let mut map = self.sandboxes.write();
            if map.get(&id).is_some_and(|s| s.is_live()) {
                return Err(DaemonError::SandboxExists(id));
            }
            map.insert(id.clone(), sb.clone());
        }
        self.events.emit(
            EventBus::event(EventKind::Sandbox)
                .sandbox(&id)
                .template(&sb.template)
                .state(SandboxState::Creating),
        );
        let base = BaseImage::Template(TemplatePath::new(self.templates.image_path(&sb.template)));
        let r = match self.provider_for(&sb, base, 0) {
            Ok(p) => self.bring_up(&sb, p).await,
            Err(e) => Err(e),
        };
        let r = match r {
            Ok(mut p) => match self.boot_vm(&sb, &p).await {
                Ok(vm) => Ok((p, vm)),
                Err(e) => {
                    if let Err(ce) = p.close().await {
                        tracing::warn!(sandbox = %sb.id, "closing after a failed VM boot: {ce}");
                    }
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        match r {
            Ok((p, vm)) => {
                live.provider = Some(p);
                live.vm = vm;
                live.generation = 1;
                self.set_state(&sb, SandboxState::Running, None);
                drop(live);
                tracing::info!(sandbox = %id, template = %sb.template, provider = %kind, "sandbox created");
                Ok(sb.to_proto())
            }
            Err(e) => {
                // A failed create changes nothing: forget the sandbox entirely.
                sb.update(|s| s.state = SandboxState::Deleted);
                drop(live);
                let mut map = self.sandboxes.write();
                if map.get(&id).is_some_and(|s| Arc::ptr_eq(s, &sb)) {
                    map.remove(&id);
                }
                drop(map);
                self.events.emit(
                    EventBus::event(EventKind::Error)
                        .sandbox(&id)
                        .message(format!("create failed: {e}")),
                );
                Err(e)
            }
        }
    }

    fn running_or_precondition(&self, sb: &Sandbox, op: &str, want: SandboxState) -> Result<()> {
        let st = sb.state();
        if st == want {
            return Ok(());
        }
        Err(DaemonError::FailedPrecondition(format!(
            "cannot {op} sandbox {:?}: it is {}",
            sb.id,
            state_name(st)
        )))
    }

    /// Pauses a running sandbox: flush, freeze, export its changes, release the device.
    pub async fn pause_sandbox(&self, id: &str) -> Result<v1::Sandbox> {
        match self.pause_inner(id).await {
            Ok(s) => Ok(s),
            Err(e) => self.fail("pause_sandbox", e),
        }
    }

    async fn pause_inner(&self, id: &str) -> Result<v1::Sandbox> {
        names::sandbox_id(id)?;
        let sb = self
            .lookup(id)
            .ok_or_else(|| DaemonError::SandboxNotFound(id.into()))?;
        let mut live = sb.live.lock().await;
        self.running_or_precondition(&sb, "pause", SandboxState::Running)?;
        if live.vm.is_some() {
            return Err(DaemonError::FailedPrecondition(format!(
                "sandbox {id:?} has a running VM; pausing the disk under it is not supported (delete the sandbox instead)"
            )));
        }
        let Some(mut provider) = live.provider.take() else {
            return Err(DaemonError::FailedPrecondition(format!(
                "sandbox {id:?} has no device"
            )));
        };
        self.set_state(&sb, SandboxState::Pausing, None);
        let data = self
            .dirs
            .paused
            .join(format!("{id}.{}.diff", live.generation));
        live.generation += 1;
        let exported = provider.export_diff(&data).await;
        let template_read = provider_template_bytes(&provider);
        let closed = provider.close().await;
        self.closed_template_bytes
            .fetch_add(template_read, Ordering::Relaxed);
        self.add_closed_nbd(&provider);
        self.released(&sb);
        // A sandbox resumed from a pause exported its changes relative to template + the old
        // diff: fold the two into one diff relative to the template.
        let exported = match (exported, live.paused.take()) {
            (Ok(new), Some(old)) => {
                live.files.push(new.data.clone());
                let out = self
                    .dirs
                    .paused
                    .join(format!("{id}.{}.diff", live.generation));
                live.generation += 1;
                let (o, n) = (old.clone(), new.clone());
                let out2 = out.clone();
                match tokio::task::spawn_blocking(move || {
                    crate::daemon::diffmerge::merge(&o.map, &o.data, &n.map, &n.data, &out2)
                })
                .await
                {
                    Ok(Ok(map)) => {
                        // The merged diff replaces both.
                        for f in [&old.data, &new.data] {
                            let _ = std::fs::remove_file(f);
                        }
                        live.files.retain(|f| f != &old.data && f != &new.data);
                        Ok(PausedDisk { map, data: out })
                    }
                    Ok(Err(e)) => {
                        live.paused = Some(old);
                        Err(DaemonError::io("merging the paused diffs", e))
                    }
                    Err(e) => {
                        live.paused = Some(old);
                        Err(DaemonError::io(
                            "merging the paused diffs",
                            std::io::Error::other(e.to_string()),
                        ))
                    }
                }
            }
            (r, old) => {
                live.paused = old;
                r.map_err(DaemonError::from)
            }
        };
        match exported {
            Ok(paused) => {
                if let Err(e) = closed {
                    tracing::warn!(sandbox = id, "closing after pause: {e}");
                }
                let bytes = paused.map.data_len();
                live.files.push(paused.data.clone());
                live.paused = Some(paused);
                sb.update(|s| {
                    s.pause_count += 1;
                    s.paused_diff_bytes = bytes;
                    s.nbd_uri.clear();
                    s.device_path.clear();
                    s.device_index = None;
                    s.health = HealthState::Unspecified;
                });
                self.set_state(&sb, SandboxState::Paused, None);
                drop(live);
                tracing::info!(sandbox = id, diff_bytes = bytes, "sandbox paused");
                Ok(sb.to_proto())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&data);
                self.set_state(
                    &sb,
                    SandboxState::Failed,
                    Some(format!("pause failed: {e}")),
                );
                Err(e)
            }
        }
    }

    /// Resumes a paused sandbox on a fresh overlay over its template and paused changes.
    pub async fn resume_sandbox(&self, id: &str) -> Result<v1::Sandbox> {
        match self.resume_inner(id).await {
            Ok(s) => Ok(s),
            Err(e) => self.fail("resume_sandbox", e),
        }
    }

    async fn resume_inner(&self, id: &str) -> Result<v1::Sandbox> {
        names::sandbox_id(id)?;
        let sb = self
            .lookup(id)
            .ok_or_else(|| DaemonError::SandboxNotFound(id.into()))?;
        let mut live = sb.live.lock().await;
        self.running_or_precondition(&sb, "resume", SandboxState::Paused)?;
        let Some(paused) = live.paused.clone() else {
            return Err(DaemonError::FailedPrecondition(format!(
                "sandbox {id:?} holds no paused disk"
            )));
        };
        self.set_state(&sb, SandboxState::Resuming, None);
        let base = BaseImage::Resumed {
            template: TemplatePath::new(self.templates.image_path(&sb.template)),
            paused,
        };
        let generation = live.generation;
        live.generation += 1;
        let r = match self.provider_for(&sb, base, generation) {
            Ok(p) => self.bring_up(&sb, p).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(p) => {
                live.provider = Some(p);
                self.set_state(&sb, SandboxState::Running, Some(String::new()));
                drop(live);
                tracing::info!(sandbox = id, "sandbox resumed");
                Ok(sb.to_proto())
            }
            Err(e) => {
                self.set_state(
                    &sb,
                    SandboxState::Paused,
                    Some(format!("resume failed: {e}")),
                );
                Err(e)
            }
        }
    }

    fn released(&self, sb: &Sandbox) {
        if sb.kind == ProviderKind::Socket {
            self.events
                .emit(EventBus::event(EventKind::Released).sandbox(&sb.id));
        }
    }

    /// Deletes a sandbox and everything it holds. `Ok(false)` when there was nothing to delete.
    pub async fn delete_sandbox(&self, id: &str) -> Result<bool> {
        if let Err(e) = names::sandbox_id(id) {
            return self.fail("delete_sandbox", e.into());
        }
        let Some(sb) = self.lookup(id) else {
            return Ok(false);
        };
        let mut live = sb.live.lock().await;
        if sb.state() == SandboxState::Deleted {
            return Ok(false);
        }
        self.set_state(&sb, SandboxState::Deleting, None);
        if let Some(mut vm) = live.vm.take() {
            // The VM goes first: the disk is closed under nobody.
            tokio::task::spawn_blocking(move || vm.kill()).await.ok();
            sb.update(|s| s.vm_pid = 0);
            for ext in ["console", "qemu.log"] {
                let _ = std::fs::remove_file(self.dirs.vm.join(format!("{id}.{ext}")));
            }
        }
        if let Some(mut p) = live.provider.take() {
            let read = provider_template_bytes(&p);
            if let Err(e) = p.close().await {
                tracing::warn!(sandbox = id, "closing the provider: {e}");
                self.metrics
                    .error("delete_sandbox", DaemonError::from(e).errno());
            }
            self.closed_template_bytes
                .fetch_add(read, Ordering::Relaxed);
            self.add_closed_nbd(&p);
            self.released(&sb);
        }
        live.paused = None;
        for f in live.files.drain(..) {
            if let Err(e) = std::fs::remove_file(&f) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(file = %f.display(), "removing a paused diff: {e}");
                }
            }
        }
        sb.update(|s| {
            s.nbd_uri.clear();
            s.device_path.clear();
            s.device_index = None;
            s.health = HealthState::Unspecified;
        });
        self.set_state(&sb, SandboxState::Deleted, None);
        drop(live);
        self.remember_deleted(sb);
        tracing::info!(sandbox = id, "sandbox deleted");
        Ok(true)
    }

    fn remember_deleted(&self, sb: Arc<Sandbox>) {
        let mut t = self.tombstones.lock();
        t.push_back((sb.id.clone(), sb));
        while t.len() > TOMBSTONES {
            let Some((id, old)) = t.pop_front() else {
                break;
            };
            let mut map = self.sandboxes.write();
            if map.get(&id).is_some_and(|s| Arc::ptr_eq(s, &old)) {
                map.remove(&id);
            }
        }
    }

    /// Deletes every sandbox (shutdown).
    pub async fn delete_all(&self) {
        let ids: Vec<String> = self.sandboxes.read().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.delete_sandbox(&id).await {
                tracing::warn!(sandbox = %id, "deleting at shutdown: {e}");
            }
        }
    }

    // ------------------------------------------------------------------ metrics

    /// Keeps a closed provider's final NBD counters for the metrics.
    fn add_closed_nbd(&self, p: &AnyProvider) {
        if let Some(st) = p.nbd_stats() {
            crate::nbd_metrics::add(&mut self.closed_nbd.lock(), &st);
        }
    }

    /// The metrics text.
    pub fn render_metrics(&self) -> String {
        let mut snap = Snapshot {
            nbd: self.closed_nbd.lock().clone(),
            ..Snapshot::default()
        };
        let mut live_template_bytes = 0;
        let (mut data, mut zero, mut absent) = (0i64, 0i64, 0i64);
        let all: Vec<_> = self.sandboxes.read().values().cloned().collect();
        for sb in &all {
            *snap.sandboxes.entry(state_name(sb.state())).or_default() += 1;
            if let Ok(live) = sb.live.try_lock() {
                if let Some(st) = live.provider.as_ref().and_then(overlay_stats) {
                    live_template_bytes += st.bytes_read_base;
                    let bs = 4096i64;
                    data += st.blocks_data as i64 * bs;
                    zero += st.blocks_zero as i64 * bs;
                    absent += st.blocks_absent as i64 * bs;
                }
                if let Some(st) = live.provider.as_ref().and_then(AnyProvider::nbd_stats) {
                    crate::nbd_metrics::add(&mut snap.nbd, &st);
                }
            }
        }
        for s in [
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Paused,
            SandboxState::Failed,
            SandboxState::Deleted,
        ] {
            snap.sandboxes.entry(state_name(s)).or_default();
        }
        snap.overlay_bytes = [("data", data), ("zero", zero), ("absent", absent)].into();
        snap.template_bytes_read =
            self.closed_template_bytes.load(Ordering::Relaxed) + live_template_bytes;
        let devices = self.kernel.list();
        snap.pool_available = devices.available;
        for d in devices.devices {
            *snap.slots.entry(d.state).or_default() += 1;
        }
        if devices.available {
            snap.kernel_failures = self.kernel.pool().metrics().failures_by_errno;
        }
        self.metrics.render(snap)
    }

    /// Fault-injection triggers (`debug.fault_injection`).
    pub fn faults_dir(&self) -> PathBuf {
        self.config.state_dir.join("faults")
    }

    /// Time left of the health probe bound.
    pub fn probe_timeout(&self) -> Duration {
        self.config.probe_timeout
    }

    /// How long a request may wait for the server before the health check fails.
    pub fn stuck_request(&self) -> Duration {
        self.config.stuck_request
    }
}

fn provider_template_bytes(p: &AnyProvider) -> u64 {
    overlay_stats(p).map_or(0, |s| s.bytes_read_base)
}
