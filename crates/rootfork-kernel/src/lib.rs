//! Kernel attach for rootfork: the generic-netlink `nbd` family, the `/dev/nbdN` pool and attachments.

pub mod attach;
pub mod identity;
pub mod netlink;
pub mod pool;
pub mod sysfs;
