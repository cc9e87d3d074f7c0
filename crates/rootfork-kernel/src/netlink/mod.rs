//! Generic netlink: a small codec, a request/answer client with classified errors, and the
//! kernel's `nbd` family on top.

pub mod client;
pub mod codec;
pub mod error;
pub mod nbd;
pub mod transport;

pub use error::{chain, AmbiguousCause, NlError};
pub use nbd::{ConnectRequest, DeviceStatus, NbdControl, NbdNetlink, ReconfigureRequest};
pub use transport::{NetlinkSocket, Transport};
