//! Kernel attach for rootfork: the generic-netlink `nbd` family, the `/dev/nbdN` pool and
//! attachments.
//!
//! - [`netlink`]: a small netlink codec, a request/answer client whose errors say whether the
//!   kernel got the request (not sent / refused with errno / ambiguous), and the `nbd` family.
//! - [`sysfs`]: a slot's state under `/sys/block/nbdN` and the quiescence rule.
//! - [`pool`]: host-wide `flock` claims, cooldown, rotation, move-only leases, listing, metrics,
//!   events.
//! - [`attach`]: claim → socketpairs → dispatchers → connect → ready → flush → ordered close,
//!   cancellation-safe.
//! - [`reclaim`]: cleaning up after rootfork devices whose owner is gone (the claim lock says), by
//!   who may take them: the same instance at once, others after `dead_conn_timeout`.
//! - [`identity`]: `/dev/nbdN` paths, the boot and instance ids, backend identifiers.

pub mod attach;
pub mod identity;
pub mod netlink;
pub mod pool;
pub mod reclaim;
pub mod sysfs;

pub use attach::peer_gone;
pub use attach::{
    AttachError, AttachOptions, Attacher, Attachment, ConnectionHealth, DeviceNodes, Dispatch,
    Dispatcher, HostNodes, NbdDispatcher, SwitchableDevice, WarmSlot, BLOCK_SIZE,
};
pub use identity::{device_path, BackendId, Identity};
pub use netlink::{NbdControl, NbdNetlink, NlError};
pub use pool::{DevicePool, Lease, PoolConfig, PoolError, PoolEvent, SlotState, SlotStatus};
pub use reclaim::{reclaim, ReclaimOptions, Reclaimed};
