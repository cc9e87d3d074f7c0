//! Metadata contexts: `base:allocation` and rootfork's own `rootfork:overlay`, their negotiation
//! names and ids, and how block status descriptors are computed from a device's block status
//! ([`BlockDevice::block_status`], which looks through every layer of the device).

use rootfork_block::{BlockDevice, Contents, RangeStatus};

use crate::consts::{STATE_HOLE, STATE_ZERO};

/// Name of the standard allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Name of rootfork's context: which ranges may differ from the base template and which read
/// exactly as the template does.
pub const ROOTFORK_OVERLAY: &str = "rootfork:overlay";
/// `rootfork:overlay` status flag: the range may differ from the base template — it was written,
/// zeroed or trimmed in the sandbox's overlay or in any layer between it and the template (the
/// paused diff under a resumed sandbox). Clear means it reads exactly as the template does.
pub const STATE_OVERLAY_WRITTEN: u32 = 1 << 0;

/// A metadata context the server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`.
    BaseAllocation,
    /// `rootfork:overlay`.
    RootforkOverlay,
}

impl MetaContext {
    /// Every context, in id order.
    pub const ALL: [MetaContext; 2] = [MetaContext::BaseAllocation, MetaContext::RootforkOverlay];

    /// Its name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => BASE_ALLOCATION,
            MetaContext::RootforkOverlay => ROOTFORK_OVERLAY,
        }
    }

    /// The id the server assigns to it.
    pub fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 1,
            MetaContext::RootforkOverlay => 2,
        }
    }

    /// The context with this exact name.
    pub fn by_name(name: &str) -> Option<MetaContext> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Contexts a `LIST_META_CONTEXT` query matches: an exact name, or a namespace with an empty
    /// leaf (`base:`, `rootfork:`).
    pub fn matching(query: &str) -> Vec<MetaContext> {
        Self::ALL
            .into_iter()
            .filter(|c| c.name() == query || (query.ends_with(':') && c.name().starts_with(query)))
            .collect()
    }

    /// Descriptors (length, flags) for `len` bytes at `offset` of `dev`, covering at least the
    /// first byte, at most `max` descriptors, adjacent equal flags merged.
    ///
    /// Both contexts come from [`BlockDevice::block_status`], which sees through every layer of
    /// the device (a resumed sandbox's overlay, the paused diff under it, the template).
    pub fn describe(
        self,
        dev: &dyn BlockDevice,
        offset: u64,
        len: u64,
        max: usize,
    ) -> rootfork_block::Result<Vec<(u64, u32)>> {
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut left = len;
        for s in dev.block_status(offset, len)? {
            if left == 0 {
                break;
            }
            let n = s.len.min(left);
            if n == 0 {
                continue;
            }
            if !push(&mut out, n, self.flags(&s), max) {
                break;
            }
            left -= n;
        }
        if out.is_empty() {
            // A device that reported nothing: describe the range as data so the reply is valid.
            out.push((len, 0));
        }
        Ok(out)
    }

    /// This context's flags for one run.
    pub fn flags(self, s: &RangeStatus) -> u32 {
        match self {
            MetaContext::BaseAllocation => match s.contents {
                Contents::Data => 0,
                Contents::Zeroes => STATE_ZERO,
                Contents::Hole => STATE_HOLE | STATE_ZERO,
            },
            MetaContext::RootforkOverlay => {
                if s.changed {
                    STATE_OVERLAY_WRITTEN
                } else {
                    0
                }
            }
        }
    }
}

/// Appends a descriptor, merging with the last one; false when `max` is reached.
fn push(out: &mut Vec<(u64, u32)>, len: u64, flags: u32, max: usize) -> bool {
    if let Some(last) = out.last_mut() {
        if last.1 == flags {
            last.0 += len;
            return true;
        }
    }
    if out.len() >= max {
        return false;
    }
    out.push((len, flags));
    true
}
