//! The transmission-phase engine shared by kernel mode and socket mode.
//!
//! Per connection the calling thread is the **reader**. It parses every request from a large
//! receive buffer, validates it and always consumes its payload (so the stream stays in sync even
//! for rejected requests). It admits requests through a bounded in-flight [`Window`] (count and
//! payload bytes); a request's slot is released only once its reply is on the wire.
//!
//! While the device is fast (the last operation took less than [`JobQueue::STALL`]), the reader
//! runs short requests itself — reads up to 128 KiB, writes/trims/zeroes without FUA, block
//! status, rejections — and writes their replies with `MSG_DONTWAIT`. A thread hand-off costs a
//! futex wake and two context switches, more than a page-cache read, so this halves the CPU per
//! request. The reader still never waits on the reply path: when the socket is full it parks the
//! unsent bytes and hands the writing to a worker. Long or possibly slow requests (FLUSH, FUA,
//! CACHE, big reads) and everything after a slow operation go to a small pool of **workers** in
//! batches; workers are woken adaptively (see [`JobQueue`]).
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

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rootfork_block::BlockDevice;

use crate::buf::{Buf, BufPool};
use crate::consts::ESHUTDOWN;
use crate::exec::{bytes_of, execute, op_of, ExecContext};
use crate::meta::MetaContext;
use crate::opts::ServeOptions;
use crate::queue::{JobQueue, Window};
use crate::reply::{encode, Encoded, Framing, Outcome};
use crate::request::{classify, parse_header, payload_len, Command, Limits};
use crate::sock::{advance, Sock};
use crate::stats::{ConnectionStats, Op, Stats};

/// Receive buffer size of the reader.
const RECV_BUF: usize = 256 << 10;
/// Jobs queued at once by the reader.
const BATCH: usize = 32;

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
    stats: Stats,
    server_stats: Option<Arc<Stats>>,
    /// Origin of the `busy` timestamps.
    epoch: Instant,
    /// Per executor (slot 0 the reader, `i + 1` worker `i`): when the request it is executing
    /// was received, in nanoseconds since `epoch` plus one; 0 when idle.
    busy: Box<[AtomicU64]>,
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
        Arc::new(Shared {
            window: Window::new(opts.max_in_flight, opts.max_in_flight_bytes),
            queue: JobQueue::new(opts.workers.max(1)),
            sock,
            tx,
            opts,
            out: Mutex::new(OutState::default()),
            broken: AtomicBool::new(false),
            pool,
            draining: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            stats: Stats::default(),
            server_stats,
            epoch: Instant::now(),
            busy,
        })
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

    pub(crate) fn stats(&self) -> ConnectionStats {
        self.stats.snapshot()
    }

    fn record(&self, op: Op, ok: bool, bytes: u64, lat: Duration) {
        self.stats.record(op, ok, bytes, lat);
        if let Some(s) = &self.server_stats {
            s.record(op, ok, bytes, lat);
        }
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
                (op_of(&cmd), bytes_of(&cmd), execute(cx, cmd, data))
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
        }
    }
}

/// The reader's receive buffer.
struct Reader<'a> {
    sock: &'a Sock,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Reader<'_> {
    fn available(&self) -> usize {
        self.end - self.start
    }

    /// Reads more bytes (blocking); returns how many (0 at end of stream).
    fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.sock.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Fills `dst` from the buffer, then straight from the socket.
    fn payload(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let n = self.available().min(dst.len());
        dst[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        let mut done = n;
        while done < dst.len() {
            let k = self.sock.read(&mut dst[done..])?;
            if k == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += k;
        }
        Ok(())
    }

    /// Skips `n` bytes of the stream.
    fn discard(&mut self, mut n: u64) -> io::Result<()> {
        loop {
            let k = (self.available() as u64).min(n);
            self.start += k as usize;
            n -= k;
            if n == 0 {
                return Ok(());
            }
            if self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// Runs the transmission phase on the calling thread until the connection ends.
pub(crate) fn serve(shared: &Arc<Shared>) -> (EndReason, ConnectionStats) {
    let workers: Vec<_> = (0..shared.opts.workers.max(1))
        .map(|i| {
            let s = Arc::clone(shared);
            thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn(move || s.worker(i + 1))
        })
        .collect();
    let mut end = None;
    if workers.iter().any(|w| w.is_err()) {
        end = Some(EndReason::Io("cannot spawn worker threads".into()));
    }
    let reason = match end {
        Some(r) => r,
        None => read_loop(shared),
    };
    shared.window.wait_idle();
    shared.queue.close();
    for w in workers.into_iter().flatten() {
        let _ = w.join();
    }
    shared.sock.shutdown(Shutdown::Both);
    let reason = if shared.closing.load(Ordering::SeqCst) {
        EndReason::Shutdown
    } else {
        reason
    };
    (reason, shared.stats.snapshot())
}

fn read_loop(shared: &Arc<Shared>) -> EndReason {
    let mut rd = Reader {
        sock: &shared.sock,
        buf: vec![0u8; RECV_BUF],
        start: 0,
        end: 0,
    };
    let limits = shared.tx.limits;
    let extended = limits.extended;
    let mut batch: Vec<Job> = Vec::with_capacity(BATCH);
    let mut replies = Replies::default();
    let cx = shared.exec_context();
    let flush_jobs = |batch: &mut Vec<Job>| {
        if !batch.is_empty() {
            let heavy = batch.iter().any(|j| j.heavy());
            shared.queue.push_all(batch.drain(..), heavy);
        }
    };
    // Before anything that may block the reader: hand queued jobs to the workers and the
    // replies of inline requests to the reply path (they hold window slots).
    let flush = |batch: &mut Vec<Job>, replies: &mut Replies| {
        flush_jobs(batch);
        replies.flush(shared);
    };
    let reason = loop {
        let header = match parse_header(&rd.buf[rd.start..rd.end], extended) {
            Ok(Some((h, n))) => {
                rd.start += n;
                h
            }
            Ok(None) => {
                flush(&mut batch, &mut replies);
                match rd.fill() {
                    Ok(0) if rd.available() == 0 => break EndReason::Closed,
                    Ok(0) => break EndReason::Truncated,
                    Ok(_) => continue,
                    Err(e) => break EndReason::Io(e.to_string()),
                }
            }
            Err(_) => break EndReason::OutOfSync,
        };
        let received = Instant::now();
        let (work, discard) = match classify(&header, &limits) {
            Ok(Command::Disc) => break EndReason::Disconnect,
            Ok(_) if shared.draining.load(Ordering::Relaxed) => {
                (Work::Reject(ESHUTDOWN), payload_len(&header, extended))
            }
            Ok(cmd) => (Work::Exec(cmd, None), 0),
            Err(inv) => (Work::Reject(inv.errno), inv.payload),
        };
        let bytes = match &work {
            Work::Exec(Command::Write { len, .. }, _) => *len as usize,
            _ => 0,
        };
        // When the device operation can start (later than `received` only if the reader had
        // to wait for room in the window or for the payload).
        let mut started = received;
        if !shared.window.try_acquire(bytes) {
            flush(&mut batch, &mut replies);
            if !shared.window.acquire(bytes) {
                break EndReason::Shutdown;
            }
            started = Instant::now();
        }
        let work = match work {
            Work::Exec(cmd @ Command::Write { len, fua, .. }, _)
                if !fua && rd.available() >= len as usize && !shared.queue.is_slow() =>
            {
                // Run it here straight from the receive buffer: no copy into a pool buffer.
                flush_jobs(&mut batch);
                let job = Job {
                    cookie: header.cookie,
                    offset: header.offset,
                    work: Work::Exec(cmd, None),
                    bytes,
                    received,
                };
                let data = &rd.buf[rd.start..rd.start + len as usize];
                let ran = shared.run(&cx, job, Some(data), 0);
                rd.start += len as usize;
                replies.ran(ran, started, shared);
                continue;
            }
            Work::Exec(cmd @ Command::Write { len, .. }, _) => {
                let mut buf = shared.pool.get(len as usize);
                if rd.available() < len as usize {
                    flush(&mut batch, &mut replies);
                    started = Instant::now();
                }
                if let Err(e) = rd.payload(&mut buf) {
                    shared.window.release(bytes);
                    break truncated(e);
                }
                Work::Exec(cmd, Some(buf))
            }
            w => {
                if discard > 0 {
                    if (rd.available() as u64) < discard {
                        flush(&mut batch, &mut replies);
                    }
                    if let Err(e) = rd.discard(discard) {
                        shared.window.release(bytes);
                        break truncated(e);
                    }
                }
                w
            }
        };
        let job = Job {
            cookie: header.cookie,
            offset: header.offset,
            work,
            bytes,
            received,
        };
        if inline_ok(&job.work) && !shared.queue.is_slow() {
            // Fast device: run it here, saving two thread hand-offs. The reply waits for the
            // end of what the reader has buffered, so one `sendmsg` carries the replies of a
            // whole receive; it is written without blocking, so the reader still never waits
            // on the reply path.
            flush_jobs(&mut batch);
            let ran = shared.run(&cx, job, None, 0);
            replies.ran(ran, started, shared);
            continue;
        }
        batch.push(job);
        if batch.len() >= BATCH {
            flush_jobs(&mut batch);
        }
    };
    flush(&mut batch, &mut replies);
    reason
}

/// Replies of requests the reader ran itself, not yet handed to the reply path.
///
/// They are sent together when the reader runs out of buffered requests or is about to block
/// (see `flush` in [`read_loop`]), or once [`Replies::MAX_COUNT`] replies or
/// [`Replies::MAX_BYTES`] bytes have gathered, so one vectored `sendmsg` (one socket buffer
/// allocation, one wake-up of the client) carries the replies of a whole receive.
#[derive(Default)]
struct Replies {
    list: Vec<Outgoing>,
    wire_bytes: usize,
}

impl Replies {
    /// Most replies held back.
    const MAX_COUNT: usize = 32;
    /// Most reply bytes held back.
    const MAX_BYTES: usize = 256 << 10;

    /// Takes the outcome of [`Shared::run`] for a request the reader ran (its device
    /// operation started at `started`) and tells the queue how long it took.
    fn ran(&mut self, ran: Option<(Outgoing, Instant)>, started: Instant, shared: &Shared) {
        if let Some((o, done)) = ran {
            shared.queue.note(done.saturating_duration_since(started));
            self.push(o, shared);
        }
    }

    fn push(&mut self, o: Outgoing, shared: &Shared) {
        self.wire_bytes += o.reply.wire_len();
        self.list.push(o);
        if self.list.len() >= Self::MAX_COUNT || self.wire_bytes >= Self::MAX_BYTES {
            self.flush(shared);
        }
    }

    fn flush(&mut self, shared: &Shared) {
        self.wire_bytes = 0;
        shared.send(&mut self.list, true);
    }
}

/// Largest read the reader runs itself: a bigger reply cannot go out without blocking anyway
/// (socket buffers are a few hundred KiB), so a worker sends it.
const INLINE_READ_MAX: u32 = 128 << 10;

/// Requests the reader may run itself while the device is fast: short data operations without
/// a flush (FLUSH, FUA and CACHE can take long on any device) and rejections.
fn inline_ok(work: &Work) -> bool {
    match work {
        Work::Reject(_) => true,
        Work::Exec(cmd, _) => match *cmd {
            Command::Read { len, .. } => len <= INLINE_READ_MAX,
            Command::BlockStatus { .. } => true,
            Command::Write { fua, .. }
            | Command::Trim { fua, .. }
            | Command::WriteZeroes { fua, .. } => !fua,
            Command::Flush | Command::Disc | Command::Cache { .. } => false,
        },
        Work::ContinueSending => false,
    }
}

fn truncated(e: io::Error) -> EndReason {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        EndReason::Truncated
    } else {
        EndReason::Io(e.to_string())
    }
}
