//! [`ServeOptions`]: the tunables shared by kernel mode and socket mode.

use std::time::Duration;

/// Largest payload a request may carry (and largest read), as the design caps it.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Tunables of a served connection.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Worker threads per connection running backend operations.
    pub workers: usize,
    /// Most requests in flight (received, not yet answered) per connection; the reader stops
    /// reading the socket while the window is full.
    pub max_in_flight: usize,
    /// Most payload bytes in flight per connection (a single larger request is still admitted
    /// when nothing else is in flight).
    pub max_in_flight_bytes: usize,
    /// Largest request payload / read length (advertised as the maximum block size).
    pub max_payload: u32,
    /// Minimum block size advertised; offsets and lengths must be multiples of it.
    pub min_block_size: u32,
    /// Preferred block size advertised.
    pub preferred_block_size: u32,
    /// How long a socket client may take to finish the handshake.
    pub handshake_timeout: Duration,
    /// Answer structured reads of zero ranges with `OFFSET_HOLE` chunks (reads at least this
    /// long ask the device for extents first; `u32::MAX` disables it).
    pub hole_detect_min_len: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            workers: 4,
            max_in_flight: 128,
            max_in_flight_bytes: 64 << 20,
            max_payload: MAX_PAYLOAD,
            min_block_size: 1,
            preferred_block_size: 4096,
            handshake_timeout: Duration::from_secs(30),
            hole_detect_min_len: 4096,
        }
    }
}
