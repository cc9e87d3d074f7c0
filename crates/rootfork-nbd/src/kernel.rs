//! Kernel mode: the transmission phase only, on an already-connected stream, exactly as the Linux
//! `nbd` driver speaks it.
//!
//! The kernel never negotiates: it is told the export size, block size and transmission flags
//! over netlink (`NBD_ATTR_SIZE_BYTES`, `NBD_ATTR_BLOCK_SIZE_BYTES`, `NBD_ATTR_SERVER_FLAGS`) and
//! then sends compact request headers and expects simple replies only. Hand one end of a
//! `socketpair` to the kernel and the other to [`KernelConnection::spawn`]; tell the kernel the
//! flags from [`transmission_flags`].
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(dev: Arc<dyn rootfork_block::BlockDevice>) -> std::io::Result<()> {
//! use rootfork_nbd::{kernel::{transmission_flags, KernelConnection}, ServeOptions};
//! let (ours, kernels) = std::os::unix::net::UnixStream::pair()?;
//! let flags = transmission_flags(&*dev); // -> NBD_ATTR_SERVER_FLAGS
//! let conn = KernelConnection::spawn(ours, dev, ServeOptions::default())?;
//! // ... give `kernels` to the kernel with NBD_CMD_CONNECT, use /dev/nbdN ...
//! conn.drain();                 // new requests now get ESHUTDOWN
//! conn.shutdown();              // or wait for the kernel to send NBD_CMD_DISC
//! let stats = conn.wait();      // blocks until the reader and workers are done
//! # let _ = (flags, kernels, stats); Ok(()) }
//! ```

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rootfork_block::BlockDevice;

use crate::buf::BufPool;
use crate::conn::{serve, EndReason, Shared, Transmission};
use crate::consts::*;
use crate::fence::WriteFence;
use crate::opts::ServeOptions;
use crate::reply::Framing;
use crate::request::Limits;
use crate::sock::Sock;
use crate::stats::{ConnectionStats, Stats};

/// The transmission flags to tell the kernel (`NBD_ATTR_SERVER_FLAGS`) for `device`: flush, FUA,
/// trim and write-zeroes on writable devices, `READ_ONLY` otherwise, and `CAN_MULTI_CONN`
/// because every connection shares the one device and a flush on any connection makes every
/// completed write durable.
pub fn transmission_flags(device: &dyn BlockDevice) -> u16 {
    base_flags(device.is_read_only())
}

/// Transmission flags before per-session additions (`SEND_DF` needs structured replies).
pub(crate) fn base_flags(read_only: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    f
}

/// A kernel-mode connection: a reader thread plus workers serving one socket.
pub struct KernelConnection {
    shared: Arc<Shared>,
    thread: JoinHandle<(EndReason, ConnectionStats)>,
}

impl KernelConnection {
    /// Starts serving `stream` (transmission phase only, compact requests, simple replies).
    ///
    /// Requests must respect `opts.min_block_size` alignment (the kernel's block size is at least
    /// 512, so the default of 1 accepts everything it sends) and `opts.max_payload`.
    pub fn spawn(
        stream: UnixStream,
        device: Arc<dyn BlockDevice>,
        opts: ServeOptions,
    ) -> io::Result<KernelConnection> {
        Self::start(stream, device, opts, None, None)
    }

    /// Like [`KernelConnection::spawn`], also counting every answered request in `shared`
    /// (besides this connection's own counters, [`KernelConnection::stats`]). One `Stats` shared
    /// by all connections of a device keeps its totals across connections that end and are
    /// replaced.
    pub fn spawn_with_stats(
        stream: UnixStream,
        device: Arc<dyn BlockDevice>,
        opts: ServeOptions,
        shared: Arc<Stats>,
    ) -> io::Result<KernelConnection> {
        Self::start(stream, device, opts, Some(shared), None)
    }

    /// Like [`KernelConnection::spawn_with_stats`], behind the device's write `fence`, shared by
    /// every connection of the device (replacements included): a write, trim or write-zeroes is
    /// applied only after overlapping ones of the other connections, and never once this socket
    /// is dead — the kernel requeues a timed-out request on another connection right after it
    /// shuts the socket down (see [`crate::fence`]). Use it for every connection of a device
    /// attached with a timeout or with more than one connection.
    pub fn spawn_fenced(
        stream: UnixStream,
        device: Arc<dyn BlockDevice>,
        opts: ServeOptions,
        shared: Arc<Stats>,
        fence: Arc<WriteFence>,
    ) -> io::Result<KernelConnection> {
        Self::start(stream, device, opts, Some(shared), Some(fence))
    }

    fn start(
        stream: UnixStream,
        device: Arc<dyn BlockDevice>,
        opts: ServeOptions,
        device_stats: Option<Arc<Stats>>,
        fence: Option<Arc<WriteFence>>,
    ) -> io::Result<KernelConnection> {
        let limits = Limits {
            size: device.size(),
            min_block: opts.min_block_size,
            max_payload: opts.max_payload,
            max_write: opts.write_limit(),
            read_only: device.is_read_only(),
            structured: false,
            extended: false,
            has_meta: false,
        };
        let tx = Transmission {
            device,
            limits,
            framing: Framing::default(),
            contexts: Vec::new(),
        };
        let shared = Shared::new(
            Sock::Unix(stream),
            tx,
            opts,
            Arc::new(BufPool::new()),
            device_stats,
        );
        if let Some(fence) = fence {
            shared.join_fence(fence);
        }
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("nbd-kernel-reader".into())
            // A panic in device code (on the reader or a worker) fails only its request
            // (`EIO`); one escaping the engine is caught inside `serve`, which shuts the socket
            // down (the kernel reads EOF and marks its socket dead at once) and joins the
            // workers without waiting for replies, so `wait` always returns.
            .spawn(move || serve(&s))?;
        Ok(KernelConnection { shared, thread })
    }

    /// Stops taking new work: requests read from now on are answered `ESHUTDOWN`; requests
    /// already in flight finish normally. Returns immediately.
    pub fn drain(&self) {
        self.shared.drain();
    }

    /// Shuts the socket down; the reader stops, in-flight requests finish (their replies are
    /// dropped), except that on a fenced connection a write, trim or write-zeroes not yet
    /// applied is refused (the socket shows `POLLHUP`). Returns immediately; use
    /// [`KernelConnection::wait`] to join.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }

    /// Requests received and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// How long the oldest request waiting for this server (queued or executing, reply not yet
    /// queued) has been waiting; `None` when there is none. For "request stuck" health checks.
    pub fn oldest_request_age(&self) -> Option<Duration> {
        self.shared.oldest_request_age()
    }

    /// Counters so far.
    pub fn stats(&self) -> ConnectionStats {
        self.shared.stats()
    }

    /// Whether the connection has ended (the kernel disconnected or the socket closed).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Blocks until the connection ends (the kernel sends `NBD_CMD_DISC`, closes its end, or
    /// [`KernelConnection::shutdown`] was called) and every in-flight request has finished;
    /// returns what the connection did.
    pub fn wait(self) -> ConnectionStats {
        self.wait_reason().1
    }

    /// Like [`KernelConnection::wait`], also saying why the connection ended.
    pub fn wait_reason(self) -> (EndReason, ConnectionStats) {
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => (
                EndReason::Io("reader thread panicked".into()),
                self.shared.stats(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::request::{encode_header, RequestHeader};
    use crate::stats::Op;
    use crate::testing::MemDevice;

    /// Sends one FLUSH on `kernel` and reads its simple reply.
    fn flush(kernel: &mut UnixStream, cookie: u64) {
        let h = RequestHeader {
            flags: 0,
            kind: CMD_FLUSH,
            cookie,
            offset: 0,
            length: 0,
        };
        kernel.write_all(&encode_header(&h, false)).unwrap();
        let mut b = [0u8; 16];
        kernel.read_exact(&mut b).unwrap();
        assert_eq!(
            u32::from_be_bytes(b[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(u32::from_be_bytes(b[4..8].try_into().unwrap()), 0);
        assert_eq!(u64::from_be_bytes(b[8..16].try_into().unwrap()), cookie);
    }

    #[test]
    fn shared_stats_count_every_connection_and_outlive_them() {
        let dev = Arc::new(MemDevice::new(1 << 20, 4096));
        let stats = Arc::new(Stats::default());
        let mut conns = Vec::new();
        for n in 1..=2u64 {
            let (ours, mut kernel) = UnixStream::pair().unwrap();
            let c = KernelConnection::spawn_with_stats(
                ours,
                dev.clone(),
                ServeOptions::default(),
                stats.clone(),
            )
            .unwrap();
            for cookie in 0..n {
                flush(&mut kernel, cookie);
            }
            assert_eq!(c.stats().op(Op::Flush).count, n);
            conns.push((kernel, c));
        }
        // The first connection ends (its kernel end closes); its requests stay counted.
        let (kernel, first) = conns.remove(0);
        drop(kernel);
        assert_eq!(first.wait().op(Op::Flush).count, 1);
        assert_eq!(stats.snapshot().op(Op::Flush).count, 3);
        let (kernel, second) = conns.remove(0);
        drop(kernel);
        second.wait();
        assert_eq!(stats.snapshot().total_requests(), 3);
    }
}
