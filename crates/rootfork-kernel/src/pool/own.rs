//! "My instance's devices": what a restarted daemon needs to adopt the devices it attached
//! before (in this boot), with their sandbox ids.

use super::{DevicePool, PoolError};
use crate::identity::BackendId;
use crate::sysfs::vanishing;

/// A device of this pool's instance, as sysfs and the claim lock show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OwnDevice {
    /// The slot.
    pub index: u32,
    /// The sandbox in its backend identifier.
    pub sandbox: String,
    /// Its backend identifier.
    pub backend: String,
    /// Nobody holds its claim: its attaching process is gone, and this instance may adopt it
    /// (claim it and serve it again) or reclaim it.
    pub orphaned: bool,
}

impl DevicePool {
    /// The connected devices whose backend identifier names this pool's boot and instance.
    pub fn own_devices(&self) -> Result<Vec<OwnDevice>, PoolError> {
        let me = &self.shared.cfg.identity;
        let mut out = Vec::new();
        for index in self.slots()? {
            let st = match self.shared.sysfs.slot(index) {
                Ok(s) => s,
                Err(e) if vanishing(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            let Some(raw) = st.backend else { continue };
            let Some(b) = BackendId::parse(&raw).filter(|b| me.owns(b)) else {
                continue;
            };
            let orphaned = !self.shared.local.lock().contains_key(&index)
                && self.shared.locks.try_lock(index)?.is_some();
            out.push(OwnDevice {
                index,
                sandbox: b.sandbox,
                backend: raw,
                orphaned,
            });
        }
        Ok(out)
    }
}
