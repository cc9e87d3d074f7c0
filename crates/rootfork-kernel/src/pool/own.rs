//! "My instance's devices": what a restarted daemon needs to adopt the devices it attached
//! before (in this boot), with their sandbox ids, and the claim it takes on one of them again
//! ([`DevicePool::claim_own`]).

use super::{DevicePool, Lease, PoolError};
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
            let orphaned = {
                let _probe = self.shared.probe.lock();
                !self.shared.local.lock().contains_key(&index)
                    && self.shared.locks.try_lock(index)?.is_some()
            };
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

impl DevicePool {
    /// Claims slot `index` again for `sandbox`, whatever its state: the claim of an orphaned
    /// device of this instance, which the caller adopts (serves again) or disconnects. Unlike
    /// [`DevicePool::claim`] it neither skips a connected slot nor removes the cache file the
    /// dead claim names. [`PoolError::Held`] when a live process (or this one) holds it.
    pub fn claim_own(&self, index: u32, sandbox: &str) -> Result<Lease, PoolError> {
        let _probe = self.shared.probe.lock();
        if self.shared.local.lock().contains_key(&index) {
            return Err(PoolError::Held { index });
        }
        let Some(lock) = self.shared.locks.try_lock(index)? else {
            return Err(PoolError::Held { index });
        };
        self.take_claim(index, lock, sandbox)
    }
}
