//! [`ServeOptions`]: the tunables shared by kernel mode and socket mode.

use std::time::Duration;

/// Largest payload a request may carry (and largest read), as the design caps it; advertised as
/// the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Largest `WRITE` accepted by default (see [`ServeOptions::max_write_payload`]).
pub const MAX_WRITE_PAYLOAD: u32 = 64 << 20;

/// Most bytes of the export one `BLOCK_STATUS` looks at by default (see
/// [`ServeOptions::block_status_max_len`]).
pub const BLOCK_STATUS_MAX_LEN: u64 = 1 << 30;

/// Connections one server keeps open at once by default (see
/// [`ServeOptions::max_connections`]).
pub const MAX_CONNECTIONS: usize = 128;

/// Most descriptors per metadata context in one `BLOCK_STATUS` reply by default.
pub const BLOCK_STATUS_MAX_DESCRIPTORS: usize = 8192;

/// Tunables of a served connection.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Connections a [`crate::Server`] keeps open at once (handshakes included); one more is
    /// accepted and closed at once, so its client sees end-of-file instead of waiting in the
    /// backlog. Counted in `StatsSnapshot::refused_connections`.
    pub max_connections: usize,
    /// A budget of connections shared with other servers (e.g. every export of a daemon);
    /// a connection past it is closed as past `max_connections`.
    pub connection_budget: Option<std::sync::Arc<crate::ConnectionBudget>>,
    /// A budget of buffer bytes in flight shared with other connections and servers (e.g.
    /// every export of a daemon), on top of each connection's `max_in_flight_bytes`.
    pub byte_budget: Option<std::sync::Arc<crate::ByteBudget>>,
    /// Worker threads per connection running backend operations.
    pub workers: usize,
    /// Most requests in flight (received, not yet answered) per connection; the reader stops
    /// reading the socket while the window is full.
    pub max_in_flight: usize,
    /// Most bytes of request buffers in flight per connection: write payloads and read reply
    /// buffers (and `CACHE` scratch buffers), each counted from admission until its reply is on
    /// the wire. A read waits for room before its buffer is allocated, so a client that pipelines
    /// big reads without reading the replies pins at most this much. A single larger request is
    /// still admitted when nothing else is in flight.
    pub max_in_flight_bytes: usize,
    /// Largest read length, advertised as the maximum block size (`INFO_BLOCK_SIZE`); a longer
    /// read is answered `EOVERFLOW`.
    pub max_payload: u32,
    /// Largest `WRITE` accepted. Clients that never read the advertised block sizes (nbdkit and
    /// the reference nbd-server accept them) send writes over `max_payload`; writes up to this
    /// bound are served. The effective bound is never below `max_payload` and never above
    /// `max_in_flight_bytes` (a write is admitted within the connection's byte budget); a longer
    /// write gets `EINVAL`, its payload consumed so the stream stays in sync, and is counted in
    /// [`StatsSnapshot::refused_too_large`](crate::StatsSnapshot::refused_too_large).
    pub max_write_payload: u32,
    /// Minimum block size advertised; offsets and lengths must be multiples of it.
    pub min_block_size: u32,
    /// Preferred block size advertised.
    pub preferred_block_size: u32,
    /// How long a socket client may take to finish the handshake.
    pub handshake_timeout: Duration,
    /// Answer structured reads of zero ranges with `OFFSET_HOLE` chunks (reads at least this
    /// long ask the device for extents first; `u32::MAX` disables it).
    pub hole_detect_min_len: u32,
    /// Most bytes of the export one `BLOCK_STATUS` request looks at: a longer request is
    /// answered for a prefix (the protocol allows a shorter reply). The device is asked for
    /// extents in steps of `block_status_max_descriptors` blocks, and the walk stops once the
    /// reply is full, so the work per request is bounded whatever the range and fragmentation.
    pub block_status_max_len: u64,
    /// Most descriptors per metadata context in one `BLOCK_STATUS` reply (`REQ_ONE`: one).
    pub block_status_max_descriptors: usize,
}

impl ServeOptions {
    /// The largest `WRITE` served: [`ServeOptions::max_write_payload`] within the in-flight byte
    /// budget, and never below [`ServeOptions::max_payload`].
    pub fn write_limit(&self) -> u32 {
        let budget = u32::try_from(self.max_in_flight_bytes).unwrap_or(u32::MAX);
        self.max_write_payload.min(budget).max(self.max_payload)
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: MAX_CONNECTIONS,
            connection_budget: None,
            byte_budget: None,
            workers: 4,
            max_in_flight: 128,
            max_in_flight_bytes: 64 << 20,
            max_payload: MAX_PAYLOAD,
            max_write_payload: MAX_WRITE_PAYLOAD,
            min_block_size: 1,
            preferred_block_size: 4096,
            handshake_timeout: Duration::from_secs(30),
            hole_detect_min_len: 4096,
            block_status_max_len: BLOCK_STATUS_MAX_LEN,
            block_status_max_descriptors: BLOCK_STATUS_MAX_DESCRIPTORS,
        }
    }
}
