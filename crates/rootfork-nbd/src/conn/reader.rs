//! The reader side of a connection: the receive buffer, the request loop with its inline fast
//! path, and the coalescing of the inline requests' replies (see the parent module's docs).
//!
//! The reader parses every request from a large receive buffer, validates it and always consumes
//! its payload (so the stream stays in sync even for rejected requests), admits it through the
//! window, then either runs it itself (short requests while the device is fast) or queues it for
//! the workers in batches. It never waits on the reply path: replies are written with
//! `MSG_DONTWAIT` and a full socket is handed to a worker.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{EndReason, Job, Outgoing, Shared, Work};
use crate::consts::ESHUTDOWN;
use crate::exec::CACHE_CHUNK;
use crate::request::{classify, parse_header, payload_len, Command};
use crate::sock::Sock;

/// Receive buffer size of the reader.
const RECV_BUF: usize = 256 << 10;
/// Jobs queued at once by the reader.
const BATCH: usize = 32;

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
        self.compact();
        let n = self.sock.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Reads whatever bytes are already waiting, without blocking: `Ok(None)` when there are
    /// none, else how many (0 at end of stream).
    fn fill_nonblocking(&mut self) -> io::Result<Option<usize>> {
        self.compact();
        let n = self.sock.read_nonblocking(&mut self.buf[self.end..])?;
        if let Some(n) = n {
            self.end += n;
        }
        Ok(n)
    }

    /// Moves the unparsed bytes to the front of the buffer.
    fn compact(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
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

pub(super) fn read_loop(shared: &Arc<Shared>) -> EndReason {
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
                flush_jobs(&mut batch);
                // While more requests are already waiting in the socket, keep the replies: the
                // client gets them in one piece when it stops sending (see `Replies`).
                let got = if replies.is_empty() {
                    None
                } else {
                    match rd.fill_nonblocking() {
                        Ok(got) => got,
                        Err(e) => break EndReason::Io(e.to_string()),
                    }
                };
                let got = match got {
                    Some(n) => Ok(n),
                    None => {
                        replies.flush(shared);
                        rd.fill()
                    }
                };
                match got {
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
            Err(inv) => {
                if inv.too_large {
                    shared.record_too_large();
                }
                (Work::Reject(inv.errno), inv.payload)
            }
        };
        let bytes = match &work {
            Work::Exec(cmd, _) => buffer_bytes(cmd),
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
/// They are sent together when the socket has no further request waiting (a non-blocking
/// receive finds nothing) or the reader is about to block (see `flush` in [`read_loop`]), or
/// once [`Replies::MAX_COUNT`] replies or [`Replies::MAX_BYTES`] bytes have gathered. A client
/// that sends requests one at a time as it reaps replies (fio, libnbd) then gets a burst of
/// replies per wake-up and answers with a burst of requests, so one vectored `sendmsg` (one
/// socket buffer allocation, one wake-up of the client) carries many replies instead of the
/// two sides ping-ponging single requests.
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

    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    fn flush(&mut self, shared: &Shared) {
        self.wire_bytes = 0;
        shared.send(&mut self.list, true);
    }
}

/// Largest read the reader runs itself: a bigger reply cannot go out without blocking anyway
/// (socket buffers are a few hundred KiB), so a worker sends it.
pub(super) const INLINE_READ_MAX: u32 = 128 << 10;

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

/// Bytes of buffers a request holds until its reply is on the wire, counted in the window's
/// byte budget: a write's payload, a read's reply buffer, a cache's scratch buffer. A read is
/// admitted (and its buffer allocated) only once the budget has room, so a client pipelining
/// big reads without reading the replies pins at most the budget.
fn buffer_bytes(cmd: &Command) -> usize {
    match *cmd {
        Command::Write { len, .. } | Command::Read { len, .. } => len as usize,
        Command::Cache { len, .. } => len.min(CACHE_CHUNK) as usize,
        _ => 0,
    }
}

fn truncated(e: io::Error) -> EndReason {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        EndReason::Truncated
    } else {
        EndReason::Io(e.to_string())
    }
}
