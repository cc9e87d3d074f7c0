//! The transmission-phase engine shared by kernel mode and socket mode.
//!
//! Per connection the calling thread is the **reader**. It parses every request from a large
//! receive buffer, validates it and always consumes its payload (so the stream stays in sync even
//! for rejected requests). It admits requests through a bounded in-flight [`Window`] (count and
//! buffer bytes: write payloads, read reply buffers); a request's slot is released only once its
//! reply is on the wire.
//!
//! **Panics.** Device code runs inside `catch_unwind` ([`Shared::run`]): a panic fails only its
//! request (`EIO`). A panic escaping the engine itself aborts the connection
//! ([`Shared::abort`]), so [`serve`] always returns once device operations do.
//!
//! While the device is fast (the last operation took less than [`JobQueue::STALL`]), the reader
//! runs short requests itself — reads up to 128 KiB, writes/trims/zeroes without FUA, block
//! status, rejections — and writes their replies with `MSG_DONTWAIT`, the replies of one receive
//! together in one `sendmsg` (`reader.rs`). A thread hand-off costs a futex wake and two context
//! switches, more than a page-cache read, so this halves the CPU per request. The reader still
//! never waits on the reply path: when the socket is full it parks the unsent bytes and hands
//! the writing to a worker. Long or possibly slow requests (FLUSH, FUA, CACHE, big reads) and
//! everything after a slow operation go to a small pool of **workers** in batches; workers are
//! woken adaptively (see [`JobQueue`]).
//!
//! Replies go out in completion order. One thread at a time writes (`OutState::sending`); others
//! queue their reply and return, and the writer sends everything queued with vectored `sendmsg`
//! calls, so under load one system call carries many replies.
//!
//! **Request ages.** For health checks, [`Shared::oldest_request_age`] says how long the oldest
//! request that is *waiting for the server* has been waiting: one received and admitted, queued
//! for a worker or being executed (device operation included), whose reply is not yet queued for
//! sending. Each executor (slot 0 the reader, slot `i + 1` worker `i`) keeps a "busy since"
//! [`AtomicU64`] (nanoseconds since the connection's start, 0 when idle) that it sets before a
//! request executes and clears when the reply is handed to the reply path: two atomic stores per
//! request, no lock, no allocation. Queued jobs are found by walking the job queue under its lock,
//! which only the observer pays. A request whose reply waits on a client that stops reading is
//! not counted (that is the client's stall, bounded by the window, not the server's). A request
//! is invisible for the few instructions between leaving the queue and its executor's mark; a
//! stuck request stays stuck, so the next observation sees it.

mod reader;

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rootfork_block::BlockDevice;

use crate::buf::{Buf, BufPool};
use crate::consts::{EIO, ESHUTDOWN};
use crate::exec::{bytes_of, execute, op_of, ExecContext};
use crate::fence::{modified_range, FenceGuard, Fenced, WriteFence};
use crate::meta::MetaContext;
use crate::opts::ServeOptions;
use crate::queue::{JobQueue, Window};
use crate::reply::{encode, Encoded, Framing, Outcome};
use crate::request::{Command, Limits};
use crate::sock::{advance, Sock};
use crate::stats::{ConnectionStats, Op, Stats};
use reader::{read_loop, INLINE_READ_MAX};

/// Send buffer asked for on every connection's socket.
const SEND_BUF: usize = 2 << 20;

/// What a connection serves and how, fixed when the transmission phase starts.
pub(crate) struct Transmission {
    pub device: Arc<dyn BlockDevice>,
    pub limits: Limits,
    pub framing: Framing,
    pub contexts: Vec<MetaContext>,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the stream between requests.
    Closed,
    /// The stream ended or failed in the middle of a request.
    Truncated,
    /// The client sent something that is not a request header.
    OutOfSync,
    /// The socket failed.
    Io(String),
    /// The server shut the connection down.
    Shutdown,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::Disconnect => write!(f, "client sent NBD_CMD_DISC"),
            EndReason::Closed => write!(f, "client closed the connection"),
            EndReason::Truncated => write!(f, "connection lost mid-request"),
            EndReason::OutOfSync => write!(f, "protocol error (bad request magic)"),
            EndReason::Io(e) => write!(f, "socket error: {e}"),
            EndReason::Shutdown => write!(f, "server shut the connection down"),
        }
    }
}

enum Work {
    Exec(Command, Option<Buf>),
    Reject(u32),
    /// Finish writing replies the reader could not write without blocking.
    ContinueSending,
}

struct Job {
    cookie: u64,
    offset: u64,
    work: Work,
    bytes: usize,
    received: Instant,
}

impl Job {
    /// A large transfer (another worker may overlap its copies with this one's).
    fn heavy(&self) -> bool {
        matches!(self.work, Work::Exec(Command::Read { len, .. } | Command::Write { len, .. }, _)
            if len > INLINE_READ_MAX)
    }

    fn continue_sending() -> Job {
        Job {
            cookie: 0,
            offset: 0,
            work: Work::ContinueSending,
            bytes: 0,
            received: Instant::now(),
        }
    }
}

/// A framed reply and the window bytes it releases once written.
struct Outgoing {
    reply: Encoded,
    window_bytes: usize,
}

/// The reply path: replies waiting to be written, and who is writing.
///
/// At most one thread writes at a time (`sending`); others only queue. The writer takes every
/// queued reply and writes them with vectored `sendmsg` calls. The reader writes without blocking
/// (`MSG_DONTWAIT`): if the socket is full it parks the unsent rest in `partial` and hands the
/// writing over to a worker, so the reader never waits on replies. A reply's window slot is
/// released only once it is on the wire, so a client that stops reading replies stops the reader
/// by the window, not by an unbounded queue.
#[derive(Default)]
struct OutState {
    pending: Vec<Outgoing>,
    sending: bool,
    partial: Option<(Vec<Outgoing>, usize)>,
}

/// State shared by a connection's reader, workers and control handle.
pub(crate) struct Shared {
    sock: Sock,
    tx: Transmission,
    opts: ServeOptions,
    queue: JobQueue<Job>,
    window: Window,
    out: Mutex<OutState>,
    broken: AtomicBool,
    pool: Arc<BufPool>,
    draining: AtomicBool,
    closing: AtomicBool,
    /// A panic escaped the engine itself (outside device code): the connection is being torn
    /// down without waiting for replies (see [`Shared::abort`]).
    aborted: AtomicBool,
    stats: Stats,
    server_stats: Option<Arc<Stats>>,
    /// Origin of the `busy` timestamps.
    epoch: Instant,
    /// Per executor (slot 0 the reader, `i + 1` worker `i`): when the request it is executing
    /// was received, in nanoseconds since `epoch` plus one; 0 when idle.
    busy: Box<[AtomicU64]>,
    /// Kernel mode: the device's write fence and this connection's id in it (see `fence.rs`).
    fence: OnceLock<(Arc<WriteFence>, u64)>,
}

impl Shared {
    pub(crate) fn new(
        sock: Sock,
        tx: Transmission,
        opts: ServeOptions,
        pool: Arc<BufPool>,
        server_stats: Option<Arc<Stats>>,
    ) -> Arc<Shared> {
        let busy = (0..=opts.workers.max(1))
            .map(|_| AtomicU64::new(0))
            .collect();
        // Room for a 1 MiB read reply in one `sendmsg`, so a worker sending it does not sleep
        // and wake several times while the client drains the socket.
        sock.grow_send_buffer(SEND_BUF);
        Arc::new(Shared {
            window: Window::new(
                opts.max_in_flight,
                opts.max_in_flight_bytes,
                opts.byte_budget.clone(),
            ),
            queue: JobQueue::new(opts.workers.max(1)),
            sock,
            tx,
            opts,
            out: Mutex::new(OutState::default()),
            broken: AtomicBool::new(false),
            pool,
            draining: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            stats: Stats::default(),
            server_stats,
            epoch: Instant::now(),
            busy,
            fence: OnceLock::new(),
        })
    }

    /// Puts this connection behind `fence` (before it serves anything): every modifying command
    /// is ordered against the other connections' and refused once the socket is dead.
    pub(crate) fn join_fence(&self, fence: Arc<WriteFence>) {
        let id = fence.connection();
        let _ = self.fence.set((fence, id));
    }

    /// Enters the fence for `cmd` if there is one and `cmd` modifies the device.
    fn enter_fence(&self, cmd: &Command) -> Result<Option<FenceGuard<'_>>, Fenced> {
        let (Some((fence, id)), Some((offset, len))) = (self.fence.get(), modified_range(cmd))
        else {
            return Ok(None);
        };
        fence
            .enter(*id, offset, len, || !self.sock.hung_up())
            .map(Some)
    }

    /// How long the oldest request waiting for the server (queued or executing, reply not yet
    /// queued) has been waiting since it was received; `None` when there is none. See the
    /// module docs for exactly what counts.
    pub(crate) fn oldest_request_age(&self) -> Option<Duration> {
        let queued = self.queue.min_key(|j| match j.work {
            Work::ContinueSending => None,
            _ => Some(j.received),
        });
        let executing = self
            .busy
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .filter(|&ns| ns != 0)
            .min()
            .map(|ns| self.epoch + Duration::from_nanos(ns - 1));
        let oldest = match (queued, executing) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(Instant::now().saturating_duration_since(oldest))
    }

    /// Stops taking new work: later requests get `ESHUTDOWN`, in-flight ones finish.
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Ends the connection: the socket is shut down, in-flight requests finish unanswered.
    pub(crate) fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.window.close();
        self.sock.shutdown(Shutdown::Both);
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.window.in_flight()
    }

    /// This connection's counters, with the gauges of the buffer pool it uses.
    pub(crate) fn stats(&self) -> ConnectionStats {
        let mut s = self.stats.snapshot();
        s.buffer_bytes = self.pool.in_use() as u64;
        s.buffer_bytes_peak = self.pool.peak() as u64;
        s
    }

    fn record(&self, op: Op, ok: bool, bytes: u64, lat: Duration) {
        self.stats.record(op, ok, bytes, lat);
        if let Some(s) = &self.server_stats {
            s.record(op, ok, bytes, lat);
        }
    }

    fn record_panic(&self) {
        self.stats.record_panic();
        if let Some(s) = &self.server_stats {
            s.record_panic();
        }
    }

    fn record_too_large(&self) {
        self.stats.record_too_large();
        if let Some(s) = &self.server_stats {
            s.record_too_large();
        }
    }

    /// Ends the connection after a panic escaped the engine itself (device code is caught in
    /// [`Shared::run`]; this is the last resort for a bug in the engine): nothing more is sent,
    /// the socket is shut down so the peer sees the end of the stream at once, the window is
    /// closed so the reader stops waiting for room, and `serve` no longer waits for replies
    /// that may never be sent. Workers still finish the device operations they hold.
    fn abort(&self, who: &str) {
        tracing::error!("nbd {who} thread panicked; closing the connection");
        self.record_panic();
        self.aborted.store(true, Ordering::SeqCst);
        self.broken.store(true, Ordering::SeqCst);
        self.window.close();
        self.sock.shutdown(Shutdown::Both);
    }

    /// Device code panicked while running `cmd`; the request is answered `EIO`.
    fn device_panicked(&self, cmd: &Command, payload: &(dyn std::any::Any + Send)) {
        let msg = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        tracing::error!(command = ?cmd, "nbd device panicked: {msg}; answered EIO");
        self.record_panic();
    }

    /// Queues replies (taking them out of `replies`); if nobody is writing, writes everything
    /// queued (without blocking when `nonblocking`, handing the rest to a worker).
    fn send(&self, replies: &mut Vec<Outgoing>, nonblocking: bool) {
        if replies.is_empty() {
            return;
        }
        let mut st = self.out.lock();
        if self.broken.load(Ordering::Relaxed) {
            drop(st);
            let bytes = replies.iter().map(|o| o.window_bytes).sum();
            self.window.release_many(replies.len(), bytes);
            replies.clear();
            return;
        }
        st.pending.append(replies);
        if st.sending {
            return;
        }
        st.sending = true;
        self.write_queued(st, nonblocking);
    }

    /// Writes queued replies until none is left; the caller owns `sending`.
    fn write_queued<'a>(
        &'a self,
        mut st: parking_lot::MutexGuard<'a, OutState>,
        nonblocking: bool,
    ) {
        loop {
            let (batch, skip) = match st.partial.take() {
                Some(p) => p,
                None if st.pending.is_empty() => {
                    st.sending = false;
                    return;
                }
                None => (std::mem::take(&mut st.pending), 0),
            };
            drop(st);
            let result = self.write_batch(&batch, skip, nonblocking);
            match result {
                Ok(None) => {
                    let mut bytes = 0;
                    let n = batch.len();
                    for o in &batch {
                        bytes += o.window_bytes;
                    }
                    drop(batch);
                    self.window.release_many(n, bytes);
                    st = self.out.lock();
                }
                Ok(Some(sent)) => {
                    // The socket is full: a worker finishes the job in blocking mode.
                    self.out.lock().partial = Some((batch, sent));
                    self.queue
                        .push_all(std::iter::once(Job::continue_sending()), false);
                    return;
                }
                Err(e) => {
                    tracing::debug!("nbd reply send failed: {e}");
                    self.broken.store(true, Ordering::SeqCst);
                    self.sock.shutdown(Shutdown::Both);
                    let mut st = self.out.lock();
                    let mut dropped = batch;
                    dropped.append(&mut st.pending);
                    st.sending = false;
                    drop(st);
                    let bytes = dropped.iter().map(|o| o.window_bytes).sum();
                    self.window.release_many(dropped.len(), bytes);
                    return;
                }
            }
        }
    }

    /// Writes `batch` from byte `skip`; `Ok(Some(n))`: only `n` bytes in total are written
    /// because the socket is full (non-blocking mode).
    fn write_batch(
        &self,
        batch: &[Outgoing],
        skip: usize,
        nonblocking: bool,
    ) -> io::Result<Option<usize>> {
        let mut slices = Vec::with_capacity(batch.iter().map(|o| o.reply.slice_count()).sum());
        for o in batch {
            o.reply.slices(&mut slices);
        }
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        advance(&mut rest, skip);
        let mut sent = skip;
        while !rest.is_empty() {
            let n = self.sock.send_some(rest, nonblocking)?;
            if n == 0 {
                return Ok(Some(sent));
            }
            sent += n;
            advance(&mut rest, n);
        }
        Ok(None)
    }

    fn worker(&self, slot: usize) {
        let cx = self.exec_context();
        let mut last = None;
        let mut out = Vec::with_capacity(1);
        while let Some(job) = self.queue.pop(last) {
            if matches!(job.work, Work::ContinueSending) {
                let st = self.out.lock();
                self.write_queued(st, false);
                continue;
            }
            let started = Instant::now();
            if let Some((o, done)) = self.run(&cx, job, None, slot) {
                out.push(o);
                self.send(&mut out, false);
                last = Some(done.saturating_duration_since(started));
            }
        }
    }

    /// Runs one job on executor `slot` (see `busy`) and returns its framed reply, for the caller
    /// to hand to the reply path, and when it finished (`None` for [`Work::ContinueSending`]).
    /// `data` is the payload of a write the reader runs straight from its receive buffer.
    fn run(
        &self,
        cx: &ExecContext<'_>,
        job: Job,
        data: Option<&[u8]>,
        slot: usize,
    ) -> Option<(Outgoing, Instant)> {
        let since = job.received.saturating_duration_since(self.epoch);
        self.busy[slot].store(since.as_nanos() as u64 + 1, Ordering::Release);
        let (op, bytes, outcome) = match job.work {
            Work::Exec(cmd, payload) => {
                let data = payload.as_deref().or(data);
                // Device code may panic (a bug): the request fails with `EIO`, its slot is
                // released with its reply as for any other answer, and this thread (reader or
                // worker) keeps serving. No lock of the engine is held here. A write the kernel
                // gave up on is refused by the fence (the reply goes nowhere: the socket is dead).
                let outcome = match self.enter_fence(&cmd) {
                    Err(Fenced) => Outcome::Err(ESHUTDOWN),
                    Ok(_applying) => {
                        panic::catch_unwind(AssertUnwindSafe(|| execute(cx, cmd, data)))
                            .unwrap_or_else(|p| {
                                self.device_panicked(&cmd, &*p);
                                Outcome::Err(EIO)
                            })
                    }
                };
                (op_of(&cmd), bytes_of(&cmd), outcome)
            }
            Work::Reject(errno) => (Op::Rejected, 0, Outcome::Err(errno)),
            Work::ContinueSending => return None,
        };
        let ok = !matches!(outcome, Outcome::Err(_)) && op != Op::Rejected;
        let reply = encode(self.tx.framing, job.cookie, job.offset, outcome);
        let done = Instant::now();
        self.record(op, ok, bytes, done.saturating_duration_since(job.received));
        self.busy[slot].store(0, Ordering::Release);
        let out = Outgoing {
            reply,
            window_bytes: job.bytes,
        };
        Some((out, done))
    }

    fn exec_context(&self) -> ExecContext<'_> {
        ExecContext {
            device: &*self.tx.device,
            pool: &self.pool,
            structured: self.tx.framing.structured || self.tx.framing.extended,
            hole_detect_min_len: self.opts.hole_detect_min_len,
            contexts: &self.tx.contexts,
            block_status_max_len: self.opts.block_status_max_len,
            block_status_max_descriptors: self.opts.block_status_max_descriptors,
        }
    }
}

/// Runs the transmission phase on the calling thread until the connection ends.
///
/// Returns once the reader has stopped and every worker is joined. A panic in device code
/// only fails its request (`EIO`); a panic escaping the engine itself ends the connection
/// ([`Shared::abort`]) without waiting for replies, so neither ever leaves this waiting.
pub(crate) fn serve(shared: &Arc<Shared>) -> (EndReason, ConnectionStats) {
    let workers: Vec<_> = (0..shared.opts.workers.max(1))
        .map(|i| {
            let s = Arc::clone(shared);
            thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn(move || {
                    if panic::catch_unwind(AssertUnwindSafe(|| s.worker(i + 1))).is_err() {
                        s.abort("worker");
                    }
                })
        })
        .collect();
    let mut end = None;
    if workers.iter().any(|w| w.is_err()) {
        end = Some(EndReason::Io("cannot spawn worker threads".into()));
    }
    let reason = match end {
        Some(r) => r,
        None => match panic::catch_unwind(AssertUnwindSafe(|| read_loop(shared))) {
            Ok(r) => r,
            Err(_) => {
                shared.abort("reader");
                EndReason::Io("reader thread panicked".into())
            }
        },
    };
    // Every admitted request is answered (device panics included), so this returns once the
    // replies are out; it returns at once if the connection was shut down or aborted (the
    // window is closed then), and the workers still finish their device operations before
    // they are joined.
    shared.window.wait_idle();
    shared.queue.close();
    for w in workers.into_iter().flatten() {
        let _ = w.join();
    }
    shared.sock.shutdown(Shutdown::Both);
    let aborted = shared.aborted.load(Ordering::SeqCst);
    let reason = if aborted && !matches!(&reason, EndReason::Io(m) if m.contains("panicked")) {
        EndReason::Io("worker thread panicked".into())
    } else if !aborted && shared.closing.load(Ordering::SeqCst) {
        EndReason::Shutdown
    } else {
        reason
    };
    (reason, shared.stats())
}
