//! Shared helpers of rootfork-kernel's integration tests that need a real `/dev/nbdN` (the in-VM
//! suite `tests/vm_kernel/`): inputs from the environment, a per-test runtime and attacher that
//! checks every slot was released, fresh overlays of the template, and percentiles.
//!
//! Submodules: `killable` (a dispatcher whose connections the test can kill), `direct` (aligned
//! buffers and `O_DIRECT` I/O on the device).

pub mod direct;
pub mod killable;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rootfork_block::{BlockDevice, Overlay, OverlayOptions, TemplateFile, TemplatePath};
use rootfork_kernel::netlink::chain;
use rootfork_kernel::{
    AttachOptions, Attacher, Attachment, DevicePool, Dispatcher, HostNodes, NbdNetlink, PoolConfig,
};

/// The template every test attaches overlays of: `ROOTFORK_VM_TEMPLATE` (the guest's init writes
/// a 16 MiB random file and sets it).
pub fn template() -> PathBuf {
    std::env::var_os("ROOTFORK_VM_TEMPLATE")
        .map(PathBuf::from)
        .expect("ROOTFORK_VM_TEMPLATE: path of the template image (set by tests/vm/kernel/init.sh)")
}

/// A count from the environment variable `name`, or `default` when unset.
pub fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: not a count")),
        Err(_) => default,
    }
}

/// A fresh overlay of `template` with its cache at `cache` (removed first).
pub fn overlay(template: &Path, cache: &Path) -> Arc<dyn BlockDevice> {
    let t = TemplateFile::open(&TemplatePath::new(template)).expect("template");
    let _ = std::fs::remove_file(cache);
    Arc::new(Overlay::create(Arc::new(t), cache, OverlayOptions::default()).expect("overlay"))
}

/// A fresh overlay of the test template, its cache file named after `name` in /tmp.
pub fn fresh_overlay(name: &str) -> Arc<dyn BlockDevice> {
    overlay(
        &template(),
        &Path::new("/tmp").join(format!("{name}.cache")),
    )
}

/// An attacher on the default pool (`/dev/nbd*`, the default lock directory) and the kernel's
/// netlink family.
pub fn attacher() -> Attacher {
    let pool = DevicePool::new(PoolConfig::default());
    let control = Arc::new(NbdNetlink::open(Duration::from_secs(10)).expect("nbd netlink"));
    Attacher::new(pool, control, Arc::new(HostNodes))
}

/// One test's kernel environment: a current-thread runtime and an attacher. Attachments are RAII
/// (dropping one disconnects the device, stops its dispatchers and releases the slot), so a
/// failing test leaves no slot claimed; `finish` checks that a passing one released every slot
/// it claimed.
pub struct Env {
    pub rt: tokio::runtime::Runtime,
    pub at: Attacher,
}

impl Env {
    pub fn new() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("tokio runtime");
        Env { rt, at: attacher() }
    }

    /// Attaches `d` with `opts`; panics with the error chain on failure.
    pub fn attach(&self, d: &dyn Dispatcher, opts: &AttachOptions) -> Attachment {
        self.rt
            .block_on(self.at.attach(d, opts))
            .unwrap_or_else(|e| panic!("attach {}: {}", opts.sandbox, chain(&e)))
    }

    /// Closes `a` (flush, DISCONNECT, quiescent, release) and checks its slot is quiescent.
    pub fn close(&self, a: Attachment) {
        let index = a.index();
        self.rt
            .block_on(a.close())
            .unwrap_or_else(|e| panic!("close nbd{index}: {}", chain(&e)));
        self.assert_quiescent(index);
    }

    /// Panics unless slot `index` is quiescent in sysfs.
    pub fn assert_quiescent(&self, index: u32) {
        let st = self
            .at
            .pool()
            .sysfs()
            .slot(index)
            .unwrap_or_else(|e| panic!("sysfs nbd{index}: {e}"));
        if let Err(w) = st.check_quiescent() {
            panic!("nbd{index} not quiescent: {w}");
        }
    }

    /// The end of a passing test: no slot of this pool is still claimed.
    pub fn finish(self) {
        let m = self.at.pool().metrics();
        assert_eq!(m.claimed, 0, "slots still claimed at the end of the test");
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

/// The `p` quantile (0.0..=1.0, nearest rank) of `v`, sorting it.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// `p50_ms=… p95_ms=… max_ms=…` of `v` (milliseconds) with `prec` decimals.
pub fn percentiles(v: &mut [f64], prec: usize) -> String {
    format!(
        "p50_ms={:.prec$} p95_ms={:.prec$} max_ms={:.prec$}",
        pct(v, 0.5),
        pct(v, 0.95),
        pct(v, 1.0)
    )
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
