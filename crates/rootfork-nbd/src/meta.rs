//! Metadata contexts: `base:allocation` and rootfork's own `rootfork:overlay`, their negotiation
//! names and ids, and how block status descriptors are computed from a device's extents.

use rootfork_block::{BlockDevice, BlockState, Extent};

use crate::consts::{STATE_HOLE, STATE_ZERO};

/// Name of the standard allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Name of rootfork's context: which ranges the overlay holds (written since the fork) and which
/// still come from the template.
pub const ROOTFORK_OVERLAY: &str = "rootfork:overlay";
/// `rootfork:overlay` status flag: the range was written (data or zeroes) in the overlay; clear
/// means it still reads from the template.
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
    pub fn describe(
        self,
        dev: &dyn BlockDevice,
        offset: u64,
        len: u64,
        max: usize,
    ) -> rootfork_block::Result<Vec<(u64, u32)>> {
        let mut out: Vec<(u64, u32)> = Vec::new();
        match self {
            MetaContext::BaseAllocation => {
                allocation(dev, offset, len, max, &mut out)?;
            }
            MetaContext::RootforkOverlay => {
                for e in clip(dev.extents(offset, len)?, len) {
                    let flags = match e.state {
                        BlockState::Absent => 0,
                        BlockState::Data | BlockState::Zero => STATE_OVERLAY_WRITTEN,
                    };
                    if !push(&mut out, e.len, flags, max) {
                        break;
                    }
                }
            }
        }
        if out.is_empty() {
            // A device that reported nothing: describe the range as data so the reply is valid.
            out.push((len, 0));
        }
        Ok(out)
    }
}

/// Keeps extents within `len` and drops empty ones.
fn clip(extents: Vec<Extent>, len: u64) -> impl Iterator<Item = Extent> {
    let mut left = len;
    extents.into_iter().filter_map(move |mut e| {
        if left == 0 || e.len == 0 {
            return None;
        }
        e.len = e.len.min(left);
        left -= e.len;
        Some(e)
    })
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

/// `base:allocation` of a range; absent ranges are asked of the backing device, recursively.
/// Returns false once `max` descriptors are used (the caller stops).
fn allocation(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u64,
    max: usize,
    out: &mut Vec<(u64, u32)>,
) -> rootfork_block::Result<bool> {
    let mut at = offset;
    let mut covered = 0;
    for e in clip(dev.extents(offset, len)?, len) {
        let ok = match e.state {
            BlockState::Data => push(out, e.len, 0, max),
            BlockState::Zero => push(out, e.len, STATE_HOLE | STATE_ZERO, max),
            BlockState::Absent => match dev.backing() {
                Some(b) if at < b.size() => {
                    let inside = e.len.min(b.size() - at);
                    let mut ok = allocation(b, at, inside, max, out)?;
                    if ok && inside < e.len {
                        ok = push(out, e.len - inside, STATE_HOLE | STATE_ZERO, max);
                    }
                    ok
                }
                _ => push(out, e.len, STATE_HOLE | STATE_ZERO, max),
            },
        };
        if !ok {
            return Ok(false);
        }
        at += e.len;
        covered += e.len;
        if covered >= len {
            break;
        }
    }
    // The backing device may have described less than asked: stop there, the reply covers a
    // prefix (which the protocol allows).
    Ok(covered >= len)
}
