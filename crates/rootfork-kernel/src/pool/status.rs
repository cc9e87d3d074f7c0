//! The status listing: every slot with its state, sandbox, backend identifier and since-when.
//!
//! Claims held by other processes are seen through their lock files: a slot whose lock cannot be
//! taken is claimed, and its record says by whom. Probing a lock takes it for a moment, so a
//! concurrent claim may skip that slot once; it never causes a double claim.

use std::path::PathBuf;

use super::lockfile::RecordState;
use super::{DevicePool, PoolError};
use crate::identity::{device_path, BackendId};
use crate::sysfs::{vanishing, SlotSysfs};

/// A slot's state as the listing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Quiescent and unclaimed: the next claim may take it.
    Free,
    /// Quiescent and unclaimed but released within the cooldown.
    Cooling,
    /// Claimed by a rootfork process, not (yet) connected.
    Claimed,
    /// Claimed and connected.
    Connected,
    /// Connected with a rootfork backend identifier of this boot but nobody holds the claim: its
    /// owner is gone. Its own instance may adopt or reclaim it at once, any other once its
    /// `dead_conn_timeout` has passed (or with `rootfork nbd reclaim --force`).
    Orphaned,
    /// Not quiescent and not claimed by rootfork: another program's device, or a teardown still
    /// in progress. Never touched.
    Busy,
}

/// One row of the listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotStatus {
    /// Slot index.
    pub index: u32,
    /// Device node.
    pub device: PathBuf,
    /// State.
    pub state: SlotState,
    /// The sandbox of the claim (current or last).
    pub sandbox: Option<String>,
    /// The process of the claim.
    pub owner_pid: Option<u32>,
    /// `/sys/block/nbdN/backend`.
    pub backend: Option<String>,
    /// When the state began (ms since the Unix epoch), when known.
    pub since_ms: Option<u64>,
    /// The raw sysfs view.
    pub sysfs: SlotSysfs,
}

impl DevicePool {
    /// Lists every slot of the pool.
    pub fn list(&self) -> Result<Vec<SlotStatus>, PoolError> {
        let mut out = Vec::new();
        for index in self.slots()? {
            let sysfs = match self.shared.sysfs.slot(index) {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // An attribute removed by a teardown while we read it: listed as busy.
                Err(e) if vanishing(&e) => {
                    out.push(SlotStatus {
                        index,
                        device: device_path(index),
                        state: SlotState::Busy,
                        sandbox: None,
                        owner_pid: None,
                        backend: None,
                        since_ms: None,
                        sysfs: SlotSysfs::default(),
                    });
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let local = self.shared.local.lock().get(&index).cloned();
            let mut row = SlotStatus {
                index,
                device: device_path(index),
                state: SlotState::Free,
                sandbox: None,
                owner_pid: None,
                backend: sysfs.backend.clone(),
                since_ms: None,
                sysfs: sysfs.clone(),
            };
            if let Some(l) = local {
                row.state = if sysfs.connected() && l.connected {
                    SlotState::Connected
                } else {
                    SlotState::Claimed
                };
                row.sandbox = Some(l.sandbox);
                row.owner_pid = Some(std::process::id());
                row.since_ms = Some(l.since_ms);
                out.push(row);
                continue;
            }
            let rec = self.shared.locks.read(index);
            if let Some(r) = &rec {
                row.sandbox = Some(r.sandbox.clone());
                row.owner_pid = Some(r.pid);
                row.since_ms = Some(r.since_ms);
            }
            let held_elsewhere = {
                let _probe = self.shared.probe.lock();
                self.shared.locks.try_lock(index)?.is_none()
            };
            row.state = if held_elsewhere {
                if sysfs.connected() {
                    SlotState::Connected
                } else {
                    SlotState::Claimed
                }
            } else if sysfs.check_quiescent().is_ok() {
                if self.cooling(rec.as_ref()) {
                    SlotState::Cooling
                } else {
                    SlotState::Free
                }
            } else if sysfs
                .backend
                .as_deref()
                .and_then(BackendId::parse)
                .is_some_and(|b| b.boot == self.shared.cfg.identity.boot)
            {
                SlotState::Orphaned
            } else {
                SlotState::Busy
            };
            if !held_elsewhere
                && rec
                    .as_ref()
                    .is_some_and(|r| r.state == RecordState::Claimed)
            {
                // The record's owner died without releasing; the pid is informative only.
                row.owner_pid = rec.map(|r| r.pid);
            }
            out.push(row);
        }
        Ok(out)
    }
}
