//! Errors of attaching and detaching, each with the errno that metrics count it under.

use std::io;

use crate::netlink::NlError;
use crate::pool::PoolError;
use crate::sysfs::NotQuiescent;

/// An attach or detach failure.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// No slot could be claimed.
    #[error("claiming an nbd slot")]
    Pool(#[from] PoolError),
    /// Creating a socketpair failed.
    #[error("creating a socketpair")]
    Socket(#[source] io::Error),
    /// Starting the dispatcher failed.
    #[error("starting the NBD dispatcher")]
    Dispatch(#[source] io::Error),
    /// The options are unusable.
    #[error("invalid attach options: {0}")]
    Invalid(&'static str),
    /// `NBD_CMD_CONNECT` failed (classified).
    #[error("connecting /dev/nbd{index}")]
    Connect {
        /// The slot.
        index: u32,
        /// Not sent, refused, or ambiguous.
        #[source]
        source: NlError,
    },
    /// The kernel did not show the device connected in time.
    #[error("/dev/nbd{index} did not come up within {waited_ms} ms")]
    ConnectTimeout {
        /// The slot.
        index: u32,
        /// How long we waited.
        waited_ms: u64,
    },
    /// The kernel shows another size than the one connected.
    #[error("/dev/nbd{index} has {got} bytes, expected {expected}")]
    SizeMismatch {
        /// The slot.
        index: u32,
        /// The export size.
        expected: u64,
        /// What sysfs shows.
        got: u64,
    },
    /// Reading sysfs failed.
    #[error("reading sysfs of /dev/nbd{index}")]
    Sysfs {
        /// The slot.
        index: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Opening the device node failed.
    #[error("opening /dev/nbd{index}")]
    Open {
        /// The slot.
        index: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `fsync`/`BLKFLSBUF` failed: writes may be lost.
    #[error("flushing /dev/nbd{index}")]
    Flush {
        /// The slot.
        index: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `NBD_CMD_DISCONNECT` failed (classified).
    #[error("disconnecting /dev/nbd{index}")]
    Disconnect {
        /// The slot.
        index: u32,
        /// Not sent, refused, or ambiguous.
        #[source]
        source: NlError,
    },
    /// `NBD_CMD_RECONFIGURE` with replacement sockets failed (classified). After a refusal the
    /// new connections were stopped; after an ambiguous answer the ones the kernel took are kept.
    #[error("reconnecting /dev/nbd{index}")]
    Reconfigure {
        /// The slot.
        index: u32,
        /// Not sent, refused, or ambiguous.
        #[source]
        source: NlError,
    },
    /// The kernel kept dropping replacement sockets (it had no dead socket to replace) until
    /// the reconnect's time was up.
    #[error(
        "/dev/nbd{index}: the kernel did not take {missing} replacement socket(s) \
         in {attempts} attempts over {waited_ms} ms"
    )]
    NotReconnected {
        /// The slot.
        index: u32,
        /// Connections still dead.
        missing: usize,
        /// RECONFIGURE requests sent.
        attempts: u32,
        /// How long we tried.
        waited_ms: u64,
    },
    /// Every connection was dead at close: nothing could serve the flush, so writes not yet
    /// flushed are lost; the device was still disconnected and the slot released.
    #[error("/dev/nbd{index}: all {dead} connection(s) dead at close; unflushed writes are lost")]
    ConnectionsDead {
        /// The slot.
        index: u32,
        /// Dead connections.
        dead: usize,
    },
    /// A device could not be bound to a warm slot.
    #[error("binding a device to warm slot /dev/nbd{index}")]
    Bind {
        /// The slot.
        index: u32,
        /// Why.
        #[source]
        source: super::warm::BindError,
    },
    /// The device to adopt is not connected (any more).
    #[error("/dev/nbd{index} is not connected: nothing to adopt")]
    NotConnected {
        /// The slot.
        index: u32,
    },
    /// The device to adopt was connected with another backend identifier (another sandbox,
    /// instance or boot): it is not ours to serve.
    #[error("/dev/nbd{index} has backend identifier {got:?}, expected {expected:?}")]
    BackendMismatch {
        /// The slot.
        index: u32,
        /// The identifier this instance gives the sandbox.
        expected: String,
        /// What sysfs shows.
        got: Option<String>,
    },
    /// The device did not become quiescent after disconnecting; the slot was released but the
    /// pool will not hand it out until it is.
    #[error("/dev/nbd{index} is not quiescent after disconnect: {why}")]
    NotQuiescent {
        /// The slot.
        index: u32,
        /// The rule it still breaks.
        why: NotQuiescent,
    },
}

impl AttachError {
    /// The errno metrics count this failure under.
    pub fn errno(&self) -> i32 {
        match self {
            AttachError::Pool(e) => e.errno(),
            AttachError::Socket(e) | AttachError::Dispatch(e) => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
            AttachError::Invalid(_) => libc::EINVAL,
            AttachError::Connect { source, .. }
            | AttachError::Disconnect { source, .. }
            | AttachError::Reconfigure { source, .. } => source.errno(),
            AttachError::NotReconnected { .. } | AttachError::ConnectionsDead { .. } => {
                libc::ENOTCONN
            }
            AttachError::ConnectTimeout { .. } => libc::ETIMEDOUT,
            AttachError::SizeMismatch { .. } => libc::EIO,
            AttachError::Sysfs { source, .. }
            | AttachError::Open { source, .. }
            | AttachError::Flush { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            AttachError::NotQuiescent { .. } => libc::EBUSY,
            AttachError::Bind { .. } => libc::EINVAL,
            AttachError::NotConnected { .. } => libc::ENOTCONN,
            AttachError::BackendMismatch { .. } => libc::EPERM,
        }
    }
}
