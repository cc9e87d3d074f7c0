//! The daemon's configuration: built-in defaults, overlaid by a TOML file, then by environment
//! variables and flags (flags win over environment, which wins over the file, which wins over the
//! defaults). [`Config::resolve`] validates the result and says exactly what is wrong.
//!
//! Environment and flags arrive together as [`Overrides`] (clap reads each flag's variable when the
//! flag is absent), so the precedence is one rule: an override that is set replaces the file's
//! value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The longest Unix socket path the kernel accepts (`sun_path` minus its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A configuration problem, with the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line, column, key).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid {key}: {message}")]
    Invalid {
        /// The setting (file key; the flag and variable have the same name).
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the Prometheus endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// Not served.
    Off,
    /// A loopback TCP address.
    Tcp(SocketAddr),
    /// A Unix socket (created 0600).
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" || s.is_empty() {
            return Ok(MetricsListen::Off);
        }
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(MetricsListen::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>()
            .map(MetricsListen::Tcp)
            .map_err(|_| {
                format!(
                    "{s:?} is neither \"off\", \"unix:/PATH\" nor an address like 127.0.0.1:9477"
                )
            })
    }
}

/// The `[api]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiFile {
    /// Unix socket path.
    pub socket: Option<PathBuf>,
    /// TCP address (off unless set).
    pub tcp: Option<SocketAddr>,
    /// File holding the bearer token for TCP.
    pub token_file: Option<PathBuf>,
}

/// The `[metrics]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// `off`, `127.0.0.1:PORT` or `unix:/PATH`.
    pub listen: Option<String>,
}

/// The `[health]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// Seconds between checks.
    pub interval_secs: Option<f64>,
    /// Seconds a probe may take before it counts as failed.
    pub probe_timeout_secs: Option<f64>,
    /// Seconds an NBD request may wait for the server before the check fails (1..=3600).
    pub stuck_request_secs: Option<u64>,
}

/// The `[kernel]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelFile {
    /// Host-wide slot lock directory (shared by every rootfork process).
    pub lock_dir: Option<PathBuf>,
    /// Kernel connections per device.
    pub connections: Option<usize>,
    /// The kernel's request timeout, seconds.
    pub request_timeout_secs: Option<f64>,
    /// How long the kernel holds I/O for a dead connection to be replaced (the health check's
    /// reconnect) before failing it, seconds; 0 turns it off (I/O on a dead connection fails at
    /// once).
    pub dead_conn_timeout_secs: Option<u64>,
    /// Pre-connected devices kept ready per disk size (0: none; at most
    /// [`MAX_WARM_SLOTS`]).
    pub warm_slots: Option<usize>,
}

/// The most `kernel.warm_slots`.
pub const MAX_WARM_SLOTS: usize = 8;

/// The default of `vmm.nbd_reconnect_delay_secs`: room for a daemon restart (an upgrade, a
/// crash and the service manager's restart delay).
pub const DEFAULT_NBD_RECONNECT_DELAY_SECS: u32 = 120;

/// The `[templates]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatesFile {
    /// Whether `ImportTemplate` may read block devices (off: regular files only).
    pub allow_block_devices: Option<bool>,
    /// Directories a caller over TCP may import from (none: TCP callers cannot import).
    pub import_dirs: Option<Vec<PathBuf>>,
}

/// The `[store]` table: the build store under the state directory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// The most layers a paused sandbox's chain keeps over its template; a pause that would
    /// make it deeper flattens the chain into one layer.
    pub max_layers: Option<u64>,
    /// Object storage shared with other hosts: `s3://BUCKET/PREFIX` or a directory.
    pub url: Option<String>,
    /// The chunk cache for builds read from the object store, bytes (shared by every sandbox).
    pub cache_bytes: Option<u64>,
    /// Collect the object store's unreferenced builds every this many seconds (0: never; see
    /// `rootfork store gc`).
    pub gc_interval_secs: Option<u64>,
    /// A collection keeps unreferenced builds younger than this many seconds.
    pub gc_min_age_secs: Option<u64>,
}

/// The default `store.cache_bytes`: 4 GiB.
pub const DEFAULT_STORE_CACHE_BYTES: u64 = 4 << 30;

/// The most `store.max_layers`.
pub const MAX_STORE_LAYERS: u64 = 64;
/// The default `store.max_layers`.
pub const DEFAULT_STORE_LAYERS: u64 = 4;

/// The `[limits]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// The most sandboxes (not deleted) at once.
    pub max_sandboxes: Option<usize>,
    /// The most NBD connections open at once over every socket sandbox (default: from the
    /// open-file limit).
    pub max_connections: Option<usize>,
    /// The most NBD connections one socket sandbox's export keeps open at once.
    pub max_connections_per_export: Option<usize>,
    /// How far what sandboxes may still write may exceed the free space (a ratio).
    pub disk_overcommit: Option<f64>,
    /// The most NBD buffer bytes (write payloads, read replies) in flight over every sandbox.
    pub max_inflight_bytes: Option<usize>,
}

/// The `[vmm]` table: the VMMs the daemon launches.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmFile {
    /// The Firecracker binary (a path, or a name looked up on `PATH`).
    pub firecracker_bin: Option<PathBuf>,
    /// How long a QEMU VM on a socket sandbox holds its disk I/O while the daemon is away (a
    /// restart) and its NBD client reconnects, seconds (QEMU's `reconnect-delay`); 0 turns it
    /// off (I/O fails at once when the daemon goes).
    pub nbd_reconnect_delay_secs: Option<u32>,
}

/// The `[debug]` table (testing aids, all off by default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugFile {
    /// Fault injection: a file `STATE/faults/kill-connection.ID` makes the next health round shut
    /// down one connection of kernel sandbox ID, as a crashed dispatcher would. For testing
    /// recovery only.
    pub fault_injection: Option<bool>,
}

/// The TOML file's schema (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Delete every sandbox on SIGTERM instead of keeping it (throwaway use).
    pub delete_on_exit: Option<bool>,
    /// Build a demo template on a first start with no templates.
    pub demo_template: Option<bool>,
    /// `text` or `json`.
    pub log_format: Option<LogFormat>,
    /// Seconds a create/resume waits for the device.
    pub ready_timeout_secs: Option<f64>,
    /// `[api]`.
    #[serde(default)]
    pub api: ApiFile,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: MetricsFile,
    /// `[health]`.
    #[serde(default)]
    pub health: HealthFile,
    /// `[kernel]`.
    #[serde(default)]
    pub kernel: KernelFile,
    /// `[debug]`.
    #[serde(default)]
    pub debug: DebugFile,
    /// `[templates]`.
    #[serde(default)]
    pub templates: TemplatesFile,
    /// `[limits]`.
    #[serde(default)]
    pub limits: LimitsFile,
    /// `[store]`.
    #[serde(default)]
    pub store: StoreFile,
    /// `[vmm]`.
    #[serde(default)]
    pub vmm: VmmFile,
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses TOML text (`path` only names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }
}

/// Values from flags or their environment variables (set ones replace the file's).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--state-dir` / `ROOTFORK_STATE_DIR`.
    pub state_dir: Option<PathBuf>,
    /// `--api-socket` / `ROOTFORK_API_SOCKET`.
    pub api_socket: Option<PathBuf>,
    /// `--api-tcp` / `ROOTFORK_API_TCP`.
    pub api_tcp: Option<SocketAddr>,
    /// `--token-file` / `ROOTFORK_TOKEN_FILE`.
    pub token_file: Option<PathBuf>,
    /// `--metrics` / `ROOTFORK_METRICS`.
    pub metrics: Option<String>,
    /// `--log-format` / `ROOTFORK_LOG_FORMAT`.
    pub log_format: Option<LogFormat>,
    /// `--no-demo` / `ROOTFORK_NO_DEMO`.
    pub no_demo: bool,
    /// `--delete-on-exit`.
    pub delete_on_exit: bool,
    /// `--health-interval` / `ROOTFORK_HEALTH_INTERVAL` (seconds).
    pub health_interval_secs: Option<f64>,
    /// `--nbd-lock-dir` / `ROOTFORK_NBD_LOCK_DIR`.
    pub nbd_lock_dir: Option<PathBuf>,
    /// `--firecracker-bin` / `ROOTFORK_FIRECRACKER_BIN`.
    pub firecracker_bin: Option<PathBuf>,
    /// `--store` / `ROOTFORK_STORE`.
    pub store: Option<String>,
}

/// The resolved, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// State directory (absolute).
    pub state_dir: PathBuf,
    /// API Unix socket.
    pub api_socket: PathBuf,
    /// API TCP address, if any.
    pub api_tcp: Option<SocketAddr>,
    /// Token file for TCP (`STATE/api.token`, generated, unless given).
    pub token_file: Option<PathBuf>,
    /// Metrics endpoint.
    pub metrics: MetricsListen,
    /// Log format.
    pub log_format: LogFormat,
    /// Build the demo template on a first start.
    pub demo_template: bool,
    /// Delete every sandbox on SIGTERM (`delete_on_exit`); by default they are kept: running
    /// ones are paused, so they can be resumed after the restart.
    pub delete_on_exit: bool,
    /// How long a create/resume waits for the device.
    pub ready_timeout: Duration,
    /// Health check period.
    pub health_interval: Duration,
    /// Health probe bound.
    pub probe_timeout: Duration,
    /// A request waiting for the server longer than this fails the health check.
    pub stuck_request: Duration,
    /// Kernel slot lock directory.
    pub nbd_lock_dir: PathBuf,
    /// The Firecracker binary the daemon launches (`vmm.firecracker_bin`; default `firecracker`
    /// on `PATH`).
    pub firecracker_bin: PathBuf,
    /// Kernel connections per device.
    pub kernel_connections: usize,
    /// Kernel request timeout.
    pub kernel_request_timeout: Duration,
    /// How long the kernel waits for a dead connection to be replaced (`None`: not at all).
    pub kernel_dead_conn_timeout: Option<Duration>,
    /// Pre-connected kernel devices kept ready per disk size (`kernel.warm_slots`; 0: none).
    pub kernel_warm_slots: usize,
    /// The deepest chain of layers a pause leaves (`store.max_layers`).
    pub store_max_layers: u64,
    /// Object storage shared with other hosts (`store.url`, `--store`, `ROOTFORK_STORE`).
    pub store_url: Option<crate::daemon::remote::StoreUrl>,
    /// The chunk cache's budget (`store.cache_bytes`).
    pub store_cache_bytes: u64,
    /// How often the daemon collects the object store (`store.gc_interval_secs`; `None`: never).
    pub store_gc_interval: Option<Duration>,
    /// The youngest unreferenced build a collection removes (`store.gc_min_age_secs`).
    pub store_gc_min_age: Duration,
    /// How long a QEMU VM's NBD client waits for a restarting daemon (`None`: not at all).
    pub vmm_nbd_reconnect_delay: Option<u32>,
    /// Fault injection triggers (`debug.fault_injection`; testing only).
    pub fault_injection: bool,
    /// `templates.allow_block_devices`.
    pub import_block_devices: bool,
    /// `templates.import_dirs` (absolute): where TCP callers may import from.
    pub tcp_import_dirs: Vec<PathBuf>,
    /// `limits.max_sandboxes`.
    pub max_sandboxes: usize,
    /// `limits.max_connections` (`None`: derived from the open-file limit at start).
    pub max_connections: Option<usize>,
    /// `limits.max_connections_per_export`.
    pub max_connections_per_export: usize,
    /// `limits.disk_overcommit`.
    pub disk_overcommit: f64,
    /// `limits.max_inflight_bytes`.
    pub max_inflight_bytes: usize,
    /// Fakes for tests; empty (the host's kernel, the real devices) everywhere else.
    #[doc(hidden)]
    pub seams: Seams,
}

/// The daemon's test seams, all in one place: an in-process test sets them on the [`Config`]
/// before [`crate::daemon::Daemon::start`]; nothing outside tests does. (A static binary in the
/// test VM uses `debug.fault_injection` from the file instead.)
#[derive(Clone, Default)]
pub struct Seams {
    /// A fake kernel (sysfs tree, netlink control, device nodes) instead of the host's.
    pub kernel_backend: Option<crate::daemon::kernel::KernelBackend>,
    /// Wraps the device every socket sandbox serves (e.g. to hold its requests).
    pub socket_device_wrapper: Option<rootfork_provider::DeviceWrapper>,
    /// Wraps the device every kernel sandbox serves.
    pub kernel_device_wrapper: Option<rootfork_provider::DeviceWrapper>,
}

impl std::fmt::Debug for Seams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seams")
            .field("kernel_backend", &self.kernel_backend)
            .field(
                "socket_device_wrapper",
                &self.socket_device_wrapper.is_some(),
            )
            .field(
                "kernel_device_wrapper",
                &self.kernel_device_wrapper.is_some(),
            )
            .finish()
    }
}

/// The default of `kernel.dead_conn_timeout_secs`: several default health rounds, so a dead
/// connection is replaced before the guest's I/O on it fails.
pub const DEFAULT_DEAD_CONN_TIMEOUT_SECS: u64 = 30;

/// The default of `limits.max_connections_per_export`: a VM's disk uses one to a few
/// connections; the rest is for tools (and keeps one sandbox from taking the daemon's whole
/// connection budget).
pub const DEFAULT_MAX_CONNECTIONS_PER_EXPORT: usize = 16;

/// The default of `limits.max_inflight_bytes`: 512 MiB of NBD buffers over every sandbox (one
/// connection's own window is 64 MiB).
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 512 << 20;

/// The default of `limits.disk_overcommit`: sandboxes forked from one template mostly write a
/// small part of their disk, so what they may write can exceed the free space this many times.
pub const DEFAULT_DISK_OVERCOMMIT: f64 = 10.0;

/// The default of `limits.max_sandboxes`.
pub const DEFAULT_MAX_SANDBOXES: usize = 4096;

/// The default state directory: `$XDG_STATE_HOME/rootfork`, else `./.rootfork`.
pub fn default_state_dir() -> PathBuf {
    match std::env::var_os("XDG_STATE_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x).join("rootfork"),
        _ => PathBuf::from(".rootfork"),
    }
}

/// The API socket inside a state directory.
pub fn api_socket_in(state_dir: &Path) -> PathBuf {
    state_dir.join("api.sock")
}

fn secs(key: &'static str, v: f64, min: f64, max: f64) -> Result<Duration, ConfigError> {
    if !v.is_finite() || v < min || v > max {
        return Err(invalid(
            key,
            format!("{v} seconds is outside {min}..={max}"),
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    }
}

fn socket_fits(key: &'static str, p: &Path) -> Result<(), ConfigError> {
    let n = p.as_os_str().len();
    if n > MAX_SOCKET_PATH {
        return Err(invalid(
            key,
            format!(
                "{} is {n} bytes; Unix socket paths are limited to {MAX_SOCKET_PATH}",
                p.display()
            ),
        ));
    }
    Ok(())
}

impl Config {
    /// Defaults ← file ← overrides, validated.
    pub fn resolve(file: FileConfig, ov: Overrides) -> Result<Config, ConfigError> {
        let state_dir = absolute(
            &ov.state_dir
                .or(file.state_dir)
                .unwrap_or_else(default_state_dir),
        );
        if state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "must not be empty"));
        }
        // The per-sandbox NBD sockets are STATE/nbd/<counter>.sock.
        socket_fits(
            "state_dir",
            &state_dir.join("nbd").join(format!("{}.sock", u64::MAX)),
        )?;
        let api_socket = absolute(
            &ov.api_socket
                .or(file.api.socket)
                .unwrap_or_else(|| api_socket_in(&state_dir)),
        );
        socket_fits("api.socket", &api_socket)?;
        let api_tcp = ov.api_tcp.or(file.api.tcp);
        let token_file = ov.token_file.or(file.api.token_file).map(|p| absolute(&p));
        let token_file = match (api_tcp, token_file) {
            (Some(_), None) => Some(state_dir.join("api.token")),
            (None, Some(_)) => {
                return Err(invalid(
                    "api.token_file",
                    "a token file is only used with api.tcp; set api.tcp too",
                ))
            }
            (_, t) => t,
        };
        let metrics: MetricsListen = ov
            .metrics
            .or(file.metrics.listen)
            .unwrap_or_else(|| "off".into())
            .parse()
            .map_err(|m| invalid("metrics.listen", m))?;
        match &metrics {
            MetricsListen::Tcp(a) if !a.ip().is_loopback() => {
                return Err(invalid(
                    "metrics.listen",
                    format!("{a} is not a loopback address; the endpoint has no authentication (use 127.0.0.1 or a unix: socket)"),
                ))
            }
            MetricsListen::Unix(p) => socket_fits("metrics.listen", p)?,
            _ => {}
        }
        let health_interval = secs(
            "health.interval_secs",
            ov.health_interval_secs
                .or(file.health.interval_secs)
                .unwrap_or(5.0),
            0.05,
            3600.0,
        )?;
        let probe_timeout = secs(
            "health.probe_timeout_secs",
            file.health.probe_timeout_secs.unwrap_or(2.0),
            0.01,
            600.0,
        )?;
        let stuck_secs = file.health.stuck_request_secs.unwrap_or(30);
        if !(1..=3600).contains(&stuck_secs) {
            return Err(invalid(
                "health.stuck_request_secs",
                format!("{stuck_secs} is outside 1..=3600"),
            ));
        }
        let ready_timeout = secs(
            "ready_timeout_secs",
            file.ready_timeout_secs.unwrap_or(30.0),
            0.1,
            3600.0,
        )?;
        let kernel_connections = file.kernel.connections.unwrap_or(1);
        if !(1..=rootfork_kernel::attach::MAX_CONNECTIONS).contains(&kernel_connections) {
            return Err(invalid(
                "kernel.connections",
                format!(
                    "{kernel_connections} is outside 1..={}",
                    rootfork_kernel::attach::MAX_CONNECTIONS
                ),
            ));
        }
        let kernel_request_timeout = secs(
            "kernel.request_timeout_secs",
            file.kernel.request_timeout_secs.unwrap_or(30.0),
            1.0,
            3600.0,
        )?;
        let dead_conn_secs = file
            .kernel
            .dead_conn_timeout_secs
            .unwrap_or(DEFAULT_DEAD_CONN_TIMEOUT_SECS);
        if dead_conn_secs > 3600 {
            return Err(invalid(
                "kernel.dead_conn_timeout_secs",
                format!("{dead_conn_secs} is outside 0..=3600 (0 turns it off)"),
            ));
        }
        if dead_conn_secs != 0 && Duration::from_secs(dead_conn_secs) <= health_interval {
            return Err(invalid(
                "kernel.dead_conn_timeout_secs",
                format!(
                    "{dead_conn_secs} s is not longer than health.interval_secs ({} s): I/O would fail before a health round could reconnect; raise it or set 0 (off)",
                    health_interval.as_secs_f64()
                ),
            ));
        }
        let reconnect_secs = file
            .vmm
            .nbd_reconnect_delay_secs
            .unwrap_or(DEFAULT_NBD_RECONNECT_DELAY_SECS);
        if reconnect_secs > 3600 {
            return Err(invalid(
                "vmm.nbd_reconnect_delay_secs",
                format!("{reconnect_secs} is outside 0..=3600 (0 turns it off)"),
            ));
        }
        let kernel_warm_slots = file.kernel.warm_slots.unwrap_or(0);
        if kernel_warm_slots > MAX_WARM_SLOTS {
            return Err(invalid(
                "kernel.warm_slots",
                format!("{kernel_warm_slots} is outside 0..={MAX_WARM_SLOTS}"),
            ));
        }
        let store_max_layers = file.store.max_layers.unwrap_or(DEFAULT_STORE_LAYERS);
        if !(1..=MAX_STORE_LAYERS).contains(&store_max_layers) {
            return Err(invalid(
                "store.max_layers",
                format!("{store_max_layers} is outside 1..={MAX_STORE_LAYERS}"),
            ));
        }
        let store_url = ov
            .store
            .or(file.store.url)
            .filter(|u| !u.is_empty())
            .map(|u| {
                crate::daemon::remote::StoreUrl::parse(&u).map_err(|e| invalid("store.url", e))
            })
            .transpose()?;
        let store_cache_bytes = file.store.cache_bytes.unwrap_or(DEFAULT_STORE_CACHE_BYTES);
        if store_cache_bytes < 64 << 20 {
            return Err(invalid(
                "store.cache_bytes",
                format!("{store_cache_bytes} is below 64 MiB"),
            ));
        }
        let store_gc_interval = match file.store.gc_interval_secs.unwrap_or(0) {
            0 => None,
            s if s < 60 => {
                return Err(invalid(
                    "store.gc_interval_secs",
                    format!("{s} is below 60 (0 turns it off)"),
                ))
            }
            s => Some(Duration::from_secs(s)),
        };
        let store_gc_min_age = Duration::from_secs(file.store.gc_min_age_secs.unwrap_or(3600));
        let tcp_import_dirs = file.templates.import_dirs.unwrap_or_default();
        if let Some(d) = tcp_import_dirs.iter().find(|d| !d.is_absolute()) {
            return Err(invalid(
                "templates.import_dirs",
                format!("{} is not an absolute path", d.display()),
            ));
        }
        let max_sandboxes = file.limits.max_sandboxes.unwrap_or(DEFAULT_MAX_SANDBOXES);
        if !(1..=1 << 20).contains(&max_sandboxes) {
            return Err(invalid(
                "limits.max_sandboxes",
                format!("{max_sandboxes} is outside 1..=1048576"),
            ));
        }
        for (key, v) in [
            ("limits.max_connections", file.limits.max_connections),
            (
                "limits.max_connections_per_export",
                file.limits.max_connections_per_export,
            ),
        ] {
            if v.is_some_and(|n| !(1..=1 << 20).contains(&n)) {
                return Err(invalid(
                    key,
                    format!("{} is outside 1..=1048576", v.unwrap_or(0)),
                ));
            }
        }
        let disk_overcommit = file
            .limits
            .disk_overcommit
            .unwrap_or(DEFAULT_DISK_OVERCOMMIT);
        if !(disk_overcommit.is_finite() && (0.01..=1e6).contains(&disk_overcommit)) {
            return Err(invalid(
                "limits.disk_overcommit",
                format!("{disk_overcommit} is outside 0.01..=1000000"),
            ));
        }
        let max_inflight_bytes = file
            .limits
            .max_inflight_bytes
            .unwrap_or(DEFAULT_MAX_INFLIGHT_BYTES);
        if !((64 << 20)..=(1 << 40)).contains(&max_inflight_bytes) {
            return Err(invalid(
                "limits.max_inflight_bytes",
                format!("{max_inflight_bytes} is outside 64 MiB..=1 TiB"),
            ));
        }
        Ok(Config {
            max_inflight_bytes,
            disk_overcommit,
            max_connections: file.limits.max_connections,
            max_connections_per_export: file
                .limits
                .max_connections_per_export
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_EXPORT),
            import_block_devices: file.templates.allow_block_devices.unwrap_or(false),
            tcp_import_dirs,
            max_sandboxes,
            api_socket,
            api_tcp,
            token_file,
            metrics,
            log_format: ov.log_format.or(file.log_format).unwrap_or_default(),
            demo_template: !ov.no_demo && file.demo_template.unwrap_or(true),
            delete_on_exit: ov.delete_on_exit || file.delete_on_exit.unwrap_or(false),
            ready_timeout,
            health_interval,
            probe_timeout,
            stuck_request: Duration::from_secs(stuck_secs),
            nbd_lock_dir: ov
                .nbd_lock_dir
                .or(file.kernel.lock_dir)
                .unwrap_or_else(|| PathBuf::from("/run/rootfork/nbd")),
            firecracker_bin: ov
                .firecracker_bin
                .or(file.vmm.firecracker_bin)
                .unwrap_or_else(|| PathBuf::from("firecracker")),
            kernel_connections,
            kernel_request_timeout,
            kernel_dead_conn_timeout: (dead_conn_secs != 0)
                .then(|| Duration::from_secs(dead_conn_secs)),
            kernel_warm_slots,
            store_max_layers,
            store_url,
            store_cache_bytes,
            store_gc_interval,
            store_gc_min_age,
            vmm_nbd_reconnect_delay: (reconnect_secs != 0).then_some(reconnect_secs),
            seams: Seams::default(),
            fault_injection: file.debug.fault_injection.unwrap_or(false),
            state_dir,
        })
    }

    /// A configuration with every default, state in `state_dir` (for tests and embedding).
    pub fn with_state_dir(state_dir: impl Into<PathBuf>) -> Result<Config, ConfigError> {
        Config::resolve(
            FileConfig::default(),
            Overrides {
                state_dir: Some(state_dir.into()),
                ..Overrides::default()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn import_and_limit_keys_are_validated() {
        let c = Config::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert!(!c.import_block_devices);
        assert!(c.tcp_import_dirs.is_empty());
        assert_eq!(c.max_sandboxes, DEFAULT_MAX_SANDBOXES);
        let c = Config::resolve(
            file("[templates]\nallow_block_devices = true\nimport_dirs = [\"/srv/images\"]\n[limits]\nmax_sandboxes = 3").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert!(c.import_block_devices);
        assert_eq!(c.tcp_import_dirs, vec![PathBuf::from("/srv/images")]);
        assert_eq!(c.max_sandboxes, 3);
        for (text, key) in [
            (
                "[templates]\nimport_dirs = [\"rel\"]",
                "templates.import_dirs",
            ),
            ("[limits]\nmax_sandboxes = 0", "limits.max_sandboxes"),
        ] {
            let e = Config::resolve(file(text).unwrap(), Overrides::default()).unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn defaults_work() {
        let c = Config::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert!(c.state_dir.is_absolute());
        assert_eq!(c.api_socket, c.state_dir.join("api.sock"));
        assert_eq!(c.api_tcp, None);
        assert_eq!(c.metrics, MetricsListen::Off);
        assert!(c.demo_template);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(!c.fault_injection);
        let c = Config::resolve(
            file("[debug]\nfault_injection = true").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert!(c.fault_injection);
    }

    #[test]
    fn overrides_beat_the_file_which_beats_defaults() {
        let f = file(
            "state_dir = \"/tmp/from-file\"\nlog_format = \"json\"\n[metrics]\nlisten = \"127.0.0.1:9000\"\n[health]\ninterval_secs = 7\n",
        )
        .unwrap();
        let c = Config::resolve(
            f,
            Overrides {
                state_dir: Some("/tmp/from-flag".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/tmp/from-flag"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.metrics,
            MetricsListen::Tcp("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(c.health_interval, Duration::from_secs(7));
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = file("state_dir = 3").unwrap_err().to_string();
        assert!(e.contains("state_dir"), "{e}");
        let e = file("bogus = 1").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::resolve(
            file("[metrics]\nlisten = \"0.0.0.0:9\"").unwrap(),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("metrics.listen") && e.contains("loopback"),
            "{e}"
        );
        let e = Config::resolve(
            file("[health]\ninterval_secs = -1").unwrap(),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("health.interval_secs"), "{e}");
        for bad in ["0", "3601"] {
            let e = Config::resolve(
                file(&format!("[health]\nstuck_request_secs = {bad}")).unwrap(),
                Overrides::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("health.stuck_request_secs"), "{e}");
        }
        let c = Config::resolve(
            file("state_dir = \"/tmp/x\"\n[health]\nstuck_request_secs = 3600").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.stuck_request, Duration::from_secs(3600));
        let e = Config::resolve(
            FileConfig::default(),
            Overrides {
                state_dir: Some(PathBuf::from(format!("/{}", "d".repeat(100)))),
                ..Overrides::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("state_dir") && e.contains("107"), "{e}");
        let e = Config::resolve(
            file("[kernel]\nconnections = 0").unwrap(),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("kernel.connections"), "{e}");
        for bad in ["3601", "5", "2"] {
            let e = Config::resolve(
                file(&format!("[kernel]\ndead_conn_timeout_secs = {bad}")).unwrap(),
                Overrides::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("kernel.dead_conn_timeout_secs"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_firecracker_binary_comes_from_the_flag_then_the_file_then_path() {
        let c = Config::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.firecracker_bin, PathBuf::from("firecracker"));
        let from_file = || file("[vmm]\nfirecracker_bin = \"/opt/fc/firecracker\"").unwrap();
        let c = Config::resolve(from_file(), Overrides::default()).unwrap();
        assert_eq!(c.firecracker_bin, PathBuf::from("/opt/fc/firecracker"));
        let c = Config::resolve(
            from_file(),
            Overrides {
                firecracker_bin: Some(PathBuf::from("/usr/local/bin/fc")),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(c.firecracker_bin, PathBuf::from("/usr/local/bin/fc"));
        assert!(
            file("[vmm]\nqemu = \"x\"").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn nbd_reconnect_delay_defaults_on_is_bounded_and_zero_turns_it_off() {
        let c = Config::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(
            c.vmm_nbd_reconnect_delay,
            Some(DEFAULT_NBD_RECONNECT_DELAY_SECS)
        );
        let c = Config::resolve(
            file("[vmm]\nnbd_reconnect_delay_secs = 0").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.vmm_nbd_reconnect_delay, None);
        let e = Config::resolve(
            file("[vmm]\nnbd_reconnect_delay_secs = 3601").unwrap(),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("vmm.nbd_reconnect_delay_secs"), "{e}");
    }

    #[test]
    fn warm_slots_default_off_and_are_bounded() {
        let c = Config::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.kernel_warm_slots, 0);
        let c = Config::resolve(
            file("[kernel]\nwarm_slots = 2").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.kernel_warm_slots, 2);
        let e = Config::resolve(
            file("[kernel]\nwarm_slots = 9").unwrap(),
            Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("kernel.warm_slots"), "{e}");
    }

    #[test]
    fn dead_conn_timeout_defaults_on_and_zero_turns_it_off() {
        let c = Config::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(
            c.kernel_dead_conn_timeout,
            Some(Duration::from_secs(DEFAULT_DEAD_CONN_TIMEOUT_SECS))
        );
        let c = Config::resolve(
            file("[kernel]\ndead_conn_timeout_secs = 0").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.kernel_dead_conn_timeout, None);
        let c = Config::resolve(
            file("[health]\ninterval_secs = 1\n[kernel]\ndead_conn_timeout_secs = 2").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.kernel_dead_conn_timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn tcp_gets_a_token_file() {
        let c = Config::resolve(
            file("state_dir = \"/tmp/s\"\n[api]\ntcp = \"127.0.0.1:7070\"").unwrap(),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.token_file, Some(PathBuf::from("/tmp/s/api.token")));
    }
}
