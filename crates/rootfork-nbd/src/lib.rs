//! The NBD protocol for rootfork: wire format, request dispatcher and socket server.
//!
//! One dispatcher ([`conn`](crate::kernel) engine) serves any
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
//! bounded window caps requests and bytes in flight; a few worker threads run device operations
//! in parallel; replies go out in completion order with vectored writes (see the engine's docs
//! in `conn.rs`). Every request gets an answer: invalid ones get the errno the protocol names,
//! their payload is consumed so the stream stays in sync.
//!
//! [`request::parse_header`], [`request::classify`] and [`handshake::negotiate`] are pure
//! functions over bytes; the `fuzz/` crate at the repository root fuzzes them.

pub mod buf;
mod conn;
pub mod consts;
mod exec;
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
pub mod testing;

pub use conn::EndReason;
pub use handshake::{Export, ExportSet, Session};
pub use opts::{ServeOptions, MAX_PAYLOAD};
pub use server::{Server, ServerError};
pub use stats::{ConnectionStats, Op, OpStats, StatsSnapshot};
