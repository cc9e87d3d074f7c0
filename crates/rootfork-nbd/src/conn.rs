//! The transmission-phase engine shared by kernel mode and socket mode.
//!
//! Per connection: the calling thread is the **reader**. It parses every request from a large
//! receive buffer, validates it, always consumes its payload (so the stream stays in sync even
//! for rejected requests), and queues jobs in batches; it never waits on replies, only on the
//! bounded in-flight [`Window`]. A small pool of **workers** runs the device operations in
//! parallel and frames the replies. Replies go out in completion order through a combining
//! sender: a finished reply is queued, and whichever worker holds the send lock writes every
//! queued reply with vectored `sendmsg` calls, so under load one system call carries many replies.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

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
use crate::sock::Sock;
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
            EndReason::Disconnect => write!(f, "client disconnected"),
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
}

struct Job {
    cookie: u64,
    offset: u64,
    work: Work,
    bytes: usize,
    received: Instant,
}

/// Replies waiting for the send lock, and the lock.
struct Output {
    pending: Mutex<Vec<Encoded>>,
    send: Mutex<()>,
    broken: AtomicBool,
}

/// State shared by a connection's reader, workers and control handle.
pub(crate) struct Shared {
    sock: Sock,
    tx: Transmission,
    opts: ServeOptions,
    queue: JobQueue<Job>,
    window: Window,
    out: Output,
    pool: Arc<BufPool>,
    draining: AtomicBool,
    closing: AtomicBool,
    stats: Stats,
    server_stats: Option<Arc<Stats>>,
}

impl Shared {
    pub(crate) fn new(
        sock: Sock,
        tx: Transmission,
        opts: ServeOptions,
        pool: Arc<BufPool>,
        server_stats: Option<Arc<Stats>>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            window: Window::new(opts.max_in_flight, opts.max_in_flight_bytes),
            sock,
            tx,
            opts,
            queue: JobQueue::new(),
            out: Output {
                pending: Mutex::new(Vec::new()),
                send: Mutex::new(()),
                broken: AtomicBool::new(false),
            },
            pool,
            draining: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            stats: Stats::default(),
            server_stats,
        })
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

    fn record(&self, op: Op, ok: bool, bytes: u64, received: Instant) {
        let lat = received.elapsed();
        self.stats.record(op, ok, bytes, lat);
        if let Some(s) = &self.server_stats {
            s.record(op, ok, bytes, lat);
        }
    }

    /// Queues a reply and, if nobody else is sending, sends everything queued.
    fn send(&self, reply: Encoded) {
        if self.out.broken.load(Ordering::Relaxed) {
            return;
        }
        self.out.pending.lock().push(reply);
        let mut local: Vec<Encoded> = Vec::new();
        loop {
            let Some(guard) = self.out.send.try_lock() else {
                return;
            };
            loop {
                std::mem::swap(&mut local, &mut *self.out.pending.lock());
                if local.is_empty() {
                    break;
                }
                if !self.out.broken.load(Ordering::Relaxed) {
                    let mut slices =
                        Vec::with_capacity(local.iter().map(|r| r.slice_count()).sum());
                    for r in &local {
                        r.slices(&mut slices);
                    }
                    if let Err(e) = self.sock.send_all(&mut slices) {
                        tracing::debug!("nbd reply send failed: {e}");
                        self.out.broken.store(true, Ordering::SeqCst);
                        self.sock.shutdown(Shutdown::Both);
                    }
                }
                local.clear();
            }
            drop(guard);
            if self.out.pending.lock().is_empty() {
                return;
            }
        }
    }

    fn worker(&self) {
        let cx = ExecContext {
            device: &*self.tx.device,
            pool: &self.pool,
            structured: self.tx.framing.structured || self.tx.framing.extended,
            hole_detect_min_len: self.opts.hole_detect_min_len,
            contexts: &self.tx.contexts,
        };
        while let Some(job) = self.queue.pop() {
            let (op, bytes, outcome) = match job.work {
                Work::Exec(cmd, payload) => {
                    (op_of(&cmd), bytes_of(&cmd), execute(&cx, cmd, payload))
                }
                Work::Reject(errno) => (Op::Rejected, 0, Outcome::Err(errno)),
            };
            let ok = !matches!(outcome, Outcome::Err(_)) && op != Op::Rejected;
            let reply = encode(self.tx.framing, job.cookie, job.offset, outcome);
            self.record(op, ok, bytes, job.received);
            self.send(reply);
            self.window.release(job.bytes);
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
                .spawn(move || s.worker())
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
    let flush = |batch: &mut Vec<Job>| {
        if !batch.is_empty() {
            shared.queue.push_all(batch.drain(..));
        }
    };
    let reason = loop {
        let header = match parse_header(&rd.buf[rd.start..rd.end], extended) {
            Ok(Some((h, n))) => {
                rd.start += n;
                h
            }
            Ok(None) => {
                flush(&mut batch);
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
        if !shared.window.try_acquire(bytes) {
            flush(&mut batch);
            if !shared.window.acquire(bytes) {
                break EndReason::Shutdown;
            }
        }
        let work = match work {
            Work::Exec(cmd @ Command::Write { len, .. }, _) => {
                let mut buf = shared.pool.get(len as usize);
                if rd.available() < len as usize {
                    flush(&mut batch);
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
                        flush(&mut batch);
                    }
                    if let Err(e) = rd.discard(discard) {
                        shared.window.release(bytes);
                        break truncated(e);
                    }
                }
                w
            }
        };
        batch.push(Job {
            cookie: header.cookie,
            offset: header.offset,
            work,
            bytes,
            received,
        });
        if batch.len() >= BATCH {
            flush(&mut batch);
        }
    };
    flush(&mut batch);
    reason
}

fn truncated(e: io::Error) -> EndReason {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        EndReason::Truncated
    } else {
        EndReason::Io(e.to_string())
    }
}
