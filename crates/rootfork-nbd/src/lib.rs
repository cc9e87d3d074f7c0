//! The NBD protocol for rootfork: wire format, request dispatcher and socket server.
//!
//! One dispatcher (the transmission engine in `conn/`) serves any
//! [`BlockDevice`](rootfork_block::BlockDevice) in two modes:
//!
//! * **Kernel mode** ([`kernel::KernelConnection`]): the transmission phase only, on an
//!   already-connected `UnixStream` (one end of a socketpair whose other end goes to the Linux
//!   `nbd` driver over netlink). Compact requests, simple replies, exactly as the kernel speaks.
//!   Tell the kernel [`kernel::transmission_flags`].
//! * **Socket mode** ([`Server`]): the fixed-newstyle handshake (see [`handshake`]) followed by
//!   transmission with structured replies, extended headers and metadata contexts
//!   (`base:allocation` and [`meta::ROOTFORK_OVERLAY`]), over Unix sockets (created 0600) and,
//!   when asked, TCP.
//!
//! Per connection a reader thread parses and validates requests and never waits on replies; a
//! bounded window caps requests and bytes in flight; short requests on a fast device run on the
//! reader itself with non-blocking replies, everything else on a few worker threads in parallel;
//! replies go out in completion order with vectored writes (see the engine's docs in `conn/mod.rs`
//! and `docs/nbd.md`). Every request gets an answer: invalid ones get the errno the protocol
//! names, their payload is consumed so the stream stays in sync; a panic in device code answers
//! its request `EIO` and the connection keeps serving (see `docs/nbd.md`, *Faults*).
//!
//! Socket mode in a few lines:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(dev: Arc<dyn rootfork_block::BlockDevice>) -> Result<(), rootfork_nbd::ServerError> {
//! use rootfork_nbd::{Export, ServeOptions, Server};
//! let server = Server::new(ServeOptions::default());
//! server.add_export(Export { name: "sbx-1".into(), description: String::new(), device: dev })?;
//! server.listen_unix(std::path::Path::new("/run/rootfork/sbx-1.sock"))?; // created 0600
//! // ... later:
//! let stats = server.stats(); // per-command counts, bytes, latency histograms
//! server.shutdown(std::time::Duration::from_secs(10)); // drain, close, remove the socket
//! # let _ = stats; Ok(()) }
//! ```
//!
//! [`request::parse_header`], [`request::classify`] and [`handshake::negotiate`] are pure
//! functions over bytes; the `fuzz/` crate at the repository root fuzzes them.
//!
//! The `test-utils` feature adds the test doubles (`testing`: an in-memory device, a gated one)
//! and the fuzz entry points (`fuzzing`); the workspace's tests and `fuzz/` turn it on, nothing
//! that ships does.

mod budget;
pub mod buf;
mod conn;
pub mod consts;
mod exec;
pub mod fence;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzzing;
pub mod handshake;
pub mod kernel;
pub mod meta;
pub mod options;
mod opts;
mod queue;
pub mod reply;
pub mod request;
mod server;
mod sock;
pub mod stats;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use budget::{fd_usage, ByteBudget, ConnectionBudget, Permit, Shortage};
pub use conn::EndReason;
pub use handshake::{Export, ExportSet, Session};
pub use opts::{
    ServeOptions, BLOCK_STATUS_MAX_DESCRIPTORS, BLOCK_STATUS_MAX_LEN, MAX_CONNECTIONS, MAX_PAYLOAD,
    MAX_WRITE_PAYLOAD,
};
pub use server::{Server, ServerError, SHUTDOWN_JOIN};
pub use stats::{ConnectionStats, Op, OpStats, StatsSnapshot};
