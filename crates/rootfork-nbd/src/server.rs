//! The socket-mode server: named exports, Unix listeners (created 0600) and optional TCP
//! listeners, one thread per connection (handshake, then the transmission engine), graceful
//! shutdown, and server-wide counters.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use nix::unistd::pipe;
use parking_lot::{Mutex, RwLock};

use crate::buf::BufPool;
use crate::conn::{serve, Shared, Transmission};
use crate::handshake::{negotiate, Export, ExportSet};
use crate::opts::ServeOptions;
use crate::sock::Sock;
use crate::stats::{Stats, StatsSnapshot};

/// Errors of the socket server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// An export of this name already exists.
    #[error("export {0:?} already exists")]
    DuplicateExport(String),
    /// The Unix socket path is taken by a live server or a non-socket file.
    #[error("{0} is in use")]
    AddressInUse(PathBuf),
    /// The server is shutting down.
    #[error("the server is shut down")]
    ShutDown,
    /// Creating or binding a listener failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>, source: impl Into<io::Error>) -> ServerError {
    ServerError::Io {
        context: context.into(),
        source: source.into(),
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

struct ListenerHandle {
    wake: OwnedFd,
    thread: JoinHandle<()>,
    path: Option<PathBuf>,
}

struct ConnEntry {
    /// A handle to the socket (to end a connection still in its handshake).
    sock: Sock,
    /// The engine, once in the transmission phase.
    shared: Option<Arc<Shared>>,
}

struct Inner {
    opts: ServeOptions,
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    stats: Arc<Stats>,
    pool: Arc<BufPool>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
    draining: AtomicBool,
    stopped: AtomicBool,
    connections_total: AtomicU64,
}

/// An NBD server with named exports, serving socket clients (fixed newstyle).
///
/// Cheap to clone (all clones are the same server). Every method is blocking-safe to call from
/// any thread; nothing here needs an async runtime.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
    listeners: Arc<Mutex<Vec<ListenerHandle>>>,
}

impl Server {
    /// A server with no exports and no listeners.
    pub fn new(opts: ServeOptions) -> Server {
        Server {
            inner: Arc::new(Inner {
                opts,
                exports: RwLock::new(BTreeMap::new()),
                stats: Arc::new(Stats::default()),
                pool: Arc::new(BufPool::new()),
                conns: Mutex::new(HashMap::new()),
                threads: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(1),
                draining: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                connections_total: AtomicU64::new(0),
            }),
            listeners: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Adds an export; clients can reach it from now on.
    pub fn add_export(&self, export: Export) -> Result<(), ServerError> {
        let mut ex = self.inner.exports.write();
        if ex.contains_key(&export.name) {
            return Err(ServerError::DuplicateExport(export.name));
        }
        ex.insert(export.name.clone(), Arc::new(export));
        Ok(())
    }

    /// Removes an export from the list new clients see; connected clients keep using it.
    pub fn remove_export(&self, name: &str) -> Option<Arc<Export>> {
        self.inner.exports.write().remove(name)
    }

    /// Names of the exports.
    pub fn export_names(&self) -> Vec<String> {
        self.inner.exports.read().keys().cloned().collect()
    }

    /// Listens on a Unix socket at `path`, created with mode 0600 before it accepts anyone. A
    /// stale socket file (nobody listening) is replaced; a live one is [`ServerError::AddressInUse`].
    pub fn listen_unix(&self, path: &Path) -> Result<(), ServerError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() || UnixStream::connect(path).is_ok() {
                return Err(ServerError::AddressInUse(path.to_owned()));
            }
            std::fs::remove_file(path)
                .map_err(|e| io_err(format!("remove {}", path.display()), e))?;
        }
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| io_err("socket", e))?;
        let addr = UnixAddr::new(path).map_err(|e| io_err(format!("{}", path.display()), e))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| io_err(format!("bind {}", path.display()), e))?;
        // Nobody can connect before listen(): restrict the mode first.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err(format!("chmod {}", path.display()), e))?;
        listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| io_err(format!("listen {}", path.display()), e))?;
        let l = UnixListener::from(fd);
        self.start_listener(Listener::Unix(l, path.to_owned()), Some(path.to_owned()))
    }

    /// Listens on TCP `addr` (use a loopback address unless remote clients are intended);
    /// returns the bound address (useful with port 0).
    pub fn listen_tcp(&self, addr: SocketAddr) -> Result<SocketAddr, ServerError> {
        let l = TcpListener::bind(addr).map_err(|e| io_err(format!("bind {addr}"), e))?;
        let local = l.local_addr().map_err(|e| io_err("local_addr", e))?;
        self.start_listener(Listener::Tcp(l), None)?;
        Ok(local)
    }

    fn start_listener(&self, l: Listener, path: Option<PathBuf>) -> Result<(), ServerError> {
        if self.inner.stopped.load(Ordering::SeqCst) {
            return Err(ServerError::ShutDown);
        }
        let (r, w) = pipe().map_err(|e| io_err("pipe", e))?;
        let inner = Arc::clone(&self.inner);
        let thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(inner, l, r))
            .map_err(|e| io_err("spawn", e))?;
        self.listeners.lock().push(ListenerHandle {
            wake: w,
            thread,
            path,
        });
        Ok(())
    }

    /// Server-wide counters (all connections, past and present).
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.inner.stats.snapshot();
        s.buffer_bytes = self.inner.pool.in_use() as u64;
        s.buffer_bytes_peak = self.inner.pool.peak() as u64;
        s
    }

    /// Connections currently open (including those still in the handshake).
    pub fn connections(&self) -> usize {
        self.inner.conns.lock().len()
    }

    /// Connections accepted since the start.
    pub fn connections_total(&self) -> u64 {
        self.inner.connections_total.load(Ordering::Relaxed)
    }

    /// Requests in flight over all connections.
    pub fn in_flight(&self) -> usize {
        self.inner
            .conns
            .lock()
            .values()
            .filter_map(|c| c.shared.as_ref())
            .map(|s| s.in_flight())
            .sum()
    }

    /// The oldest request waiting for the server over all connections (queued or executing,
    /// reply not yet queued): how long it has waited, `None` when none is. For health checks.
    pub fn oldest_request_age(&self) -> Option<Duration> {
        self.inner
            .conns
            .lock()
            .values()
            .filter_map(|c| c.shared.as_ref())
            .filter_map(|s| s.oldest_request_age())
            .max()
    }

    /// Stops taking new work on every connection (new requests get `ESHUTDOWN`).
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        for c in self.inner.conns.lock().values() {
            if let Some(s) = &c.shared {
                s.drain();
            }
        }
    }

    /// Stops serving for a hand-over to another server process (a daemon restart): stops the
    /// listeners (removing Unix socket files) and stops reading requests on every connection
    /// (the read half is shut down, so a client's next request fails to send and it reconnects),
    /// answers every request already read, then closes the connections; after `grace` the
    /// connections still open are closed as by [`Server::shutdown`]. Unlike a shutdown, no
    /// request is answered `ESHUTDOWN`: a request the client sent but this server did not read
    /// stays unanswered for the client to send again after reconnecting.
    pub fn hand_over(&self, grace: Duration) {
        self.stop_listening();
        for c in self.inner.conns.lock().values() {
            c.sock.shutdown(std::net::Shutdown::Read);
        }
        let deadline = Instant::now() + grace;
        while self.connections() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.shutdown(Duration::ZERO);
    }

    /// Marks the server stopped, wakes and joins every listener thread and removes the Unix
    /// socket files: no new connection is accepted from here on.
    fn stop_listening(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        for l in self.listeners.lock().drain(..) {
            let _ = nix::unistd::write(&l.wake, &[1u8]);
            let _ = l.thread.join();
            if let Some(p) = l.path {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// Graceful shutdown: stops the listeners (removing Unix socket files), drains every
    /// connection, waits up to `grace` for in-flight requests to finish, closes the connections
    /// and joins their threads.
    pub fn shutdown(&self, grace: Duration) {
        self.stop_listening();
        self.drain();
        let deadline = Instant::now() + grace;
        while self.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        for c in self.inner.conns.lock().values() {
            match &c.shared {
                Some(s) => s.shutdown(),
                None => c.sock.shutdown(std::net::Shutdown::Both),
            }
        }
        let threads: Vec<_> = self.inner.threads.lock().drain(..).collect();
        join_bounded(threads, Instant::now() + SHUTDOWN_JOIN);
    }
}

/// How long a shutdown waits, after the grace period and closing every connection, for their
/// threads to end.
pub const SHUTDOWN_JOIN: Duration = Duration::from_secs(5);

/// Joins `threads` that end by `deadline`; the others (stuck in a device call that does not
/// return) are left to end on their own, with an error logged, so a shutdown is bounded.
fn join_bounded(threads: Vec<JoinHandle<()>>, deadline: Instant) {
    let mut pending = threads;
    while !pending.is_empty() && Instant::now() < deadline {
        let (done, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|t| t.is_finished());
        for t in done {
            let _ = t.join();
        }
        pending = rest;
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if !pending.is_empty() {
        tracing::error!(
            threads = pending.len(),
            "nbd shutdown: connection threads still in device calls after the deadline; left running"
        );
    }
}

/// Closes a connection refused at a limit; counts it, and logs at most once a second.
fn refuse(inner: &Inner, last_log: &mut Option<Instant>, peer: &str, limit: &str) {
    inner.stats.record_refused_connection();
    if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
        *last_log = Some(Instant::now());
        tracing::warn!(
            peer,
            limit,
            "nbd connection refused at a limit (closed at once)"
        );
    }
}

/// The longest pause after failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// The first pause after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// Waits for the listener (or the wake pipe) to be readable, at most `timeout`; `false` when
/// the loop must end.
fn wait_readable(lfd: BorrowedFd<'_>, wake: BorrowedFd<'_>, timeout: PollTimeout) -> Option<bool> {
    let mut fds = [
        PollFd::new(lfd, PollFlags::POLLIN),
        PollFd::new(wake, PollFlags::POLLIN),
    ];
    match poll(&mut fds, timeout) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Some(false),
        Err(e) => {
            tracing::error!("nbd listener poll failed: {e}");
            return None;
        }
    }
    if fds[1].revents().is_some_and(|r| !r.is_empty()) {
        return None;
    }
    Some(
        fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN)),
    )
}

fn accept_loop(inner: Arc<Inner>, l: Listener, wake: OwnedFd) {
    let lfd = match &l {
        Listener::Unix(u, _) => u.as_fd(),
        Listener::Tcp(t) => t.as_fd(),
    };
    let mut backoff = Duration::ZERO;
    let mut last_refusal_log: Option<Instant> = None;
    loop {
        match wait_readable(lfd, wake.as_fd(), PollTimeout::NONE) {
            None => return,
            Some(false) => continue,
            Some(true) => {}
        }
        if inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        let accepted = match &l {
            Listener::Unix(u, path) => u
                .accept()
                .map(|(s, _)| (Sock::Unix(s), format!("unix:{}", path.display()))),
            Listener::Tcp(t) => t.accept().map(|(s, a)| {
                let _ = s.set_nodelay(true);
                (Sock::Tcp(s), format!("tcp:{a}"))
            }),
        };
        let (sock, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::ZERO;
                x
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: the connection stays in the backlog and the listener
                // stays readable; pause (waking for shutdown) instead of spinning.
                inner.stats.record_accept_error();
                backoff = (backoff * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
                tracing::warn!(backoff = ?backoff, "nbd accept failed: {e}; pausing accepts");
                let ms = u16::try_from(backoff.as_millis()).unwrap_or(u16::MAX);
                let mut fds = [PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
                if let Ok(n) = poll(&mut fds, PollTimeout::from(ms)) {
                    if n > 0 {
                        return;
                    }
                }
                continue;
            }
        };
        // Past a limit the connection is closed at once: the client sees end-of-file rather
        // than a handshake that never comes.
        let permit = match &inner.opts.connection_budget {
            Some(b) => match b.try_take() {
                Some(p) => Some(p),
                None => {
                    refuse(
                        &inner,
                        &mut last_refusal_log,
                        &peer,
                        "the shared connection budget",
                    );
                    continue;
                }
            },
            None => None,
        };
        if inner.conns.lock().len() >= inner.opts.max_connections {
            refuse(&inner, &mut last_refusal_log, &peer, "max_connections");
            continue;
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = match sock.try_clone() {
            Ok(h) => h,
            Err(e) => {
                inner.stats.record_accept_error();
                tracing::warn!(
                    peer,
                    "nbd connection dropped: cannot duplicate its socket: {e}"
                );
                continue;
            }
        };
        inner.conns.lock().insert(
            id,
            ConnEntry {
                sock: handle,
                shared: None,
            },
        );
        inner.connections_total.fetch_add(1, Ordering::Relaxed);
        let inner2 = Arc::clone(&inner);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let _permit = permit;
                // The engine catches device panics itself; this catches one in the handshake
                // (device code answering size or flags), so the connection is still forgotten.
                let inner3 = Arc::clone(&inner2);
                let run = AssertUnwindSafe(|| connection(inner2, id, sock, peer));
                if panic::catch_unwind(run).is_err() {
                    tracing::error!(conn = id, "nbd connection thread panicked");
                    inner3.stats.record_panic();
                    inner3.conns.lock().remove(&id);
                }
            });
        match spawned {
            Ok(t) => {
                let mut threads = inner.threads.lock();
                threads.retain(|t| !t.is_finished());
                threads.push(t);
            }
            Err(e) => {
                tracing::warn!("nbd: cannot spawn a connection thread: {e}");
                inner.conns.lock().remove(&id);
            }
        }
    }
}

fn connection(inner: Arc<Inner>, id: u64, sock: Sock, peer: String) {
    let opts = &inner.opts;
    let _ = sock.set_read_timeout(Some(opts.handshake_timeout));
    let session = {
        let exports = inner.exports.read().clone();
        let mut io = &sock;
        negotiate(&mut io, &exports as &dyn ExportSet, opts)
    };
    let session = match session {
        Ok(Some(s)) => s,
        Ok(None) => {
            tracing::info!(conn = id, peer, "nbd client left during the handshake");
            inner.conns.lock().remove(&id);
            return;
        }
        Err(e) => {
            tracing::info!(conn = id, peer, "nbd handshake failed: {e}");
            inner.conns.lock().remove(&id);
            return;
        }
    };
    let _ = sock.set_read_timeout(None);
    tracing::info!(
        conn = id,
        peer,
        export = session.export.name,
        structured = session.framing.structured,
        extended = session.framing.extended,
        "nbd client connected"
    );
    let tx = Transmission {
        device: Arc::clone(&session.export.device),
        limits: session.limits(opts),
        framing: session.framing,
        contexts: session.contexts.clone(),
    };
    let shared = Shared::new(
        sock,
        tx,
        opts.clone(),
        Arc::clone(&inner.pool),
        Some(Arc::clone(&inner.stats)),
    );
    {
        let mut conns = inner.conns.lock();
        if let Some(c) = conns.get_mut(&id) {
            c.shared = Some(Arc::clone(&shared));
        }
        if inner.draining.load(Ordering::SeqCst) {
            shared.drain();
        }
        if inner.stopped.load(Ordering::SeqCst) && inner.draining.load(Ordering::SeqCst) {
            shared.shutdown();
        }
    }
    let (reason, stats) = serve(&shared);
    inner.conns.lock().remove(&id);
    tracing::info!(
        conn = id,
        peer,
        export = session.export.name,
        requests = stats.total_requests(),
        "nbd client disconnected: {reason}"
    );
}
