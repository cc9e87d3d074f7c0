//! Block status through a whole stack of devices: what a range reads as, whether storage backs
//! it, and whether it may differ from the template at the bottom of the stack.
//!
//! [`BlockDevice::extents`] describes one device's own layer (absent ranges are the layer
//! below's business); [`BlockDevice::block_status`] answers for the device as a client sees it,
//! asking the backing device about absent ranges. This is what the NBD metadata contexts report:
//! `base:allocation` from [`Contents`], `rootfork:overlay` from [`RangeStatus::changed`].
//!
//! The default walk ([`stacked`]) suits every device whose extents are truthful: its own data
//! and zero ranges are changes relative to its backing device (so a device without one — a
//! template — changes nothing), and absent ranges inherit the backing device's status. The
//! overlay overrides it only to report blocks zeroed in place (`NO_HOLE`) as allocated zeroes.

use crate::device::{BlockDevice, BlockState};
use crate::error::Result;

/// What a range reads as and how it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Contents {
    /// Stored data, contents unknown without reading them.
    Data,
    /// Reads as zeroes, and storage is allocated for it (zeroes written with NBD's `NO_HOLE`).
    Zeroes,
    /// Reads as zeroes, and nothing is allocated for it (a hole, a punched or trimmed range, a
    /// diff's zero run).
    Hole,
}

/// A run of bytes sharing one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeStatus {
    /// Length of the run in bytes.
    pub len: u64,
    /// What it reads as and how it is stored.
    pub contents: Contents,
    /// Whether the run may differ from the template at the bottom of the stack: it was written,
    /// zeroed or trimmed in some layer above the template (an overlay, or the diff of a paused
    /// sandbox below a resumed one). Clear means it reads exactly as the template does.
    pub changed: bool,
}

/// Appends a run to `out`, merging it with the last one when both have the same status.
pub(crate) fn push(out: &mut Vec<RangeStatus>, len: u64, contents: Contents, changed: bool) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.contents == contents && last.changed == changed => last.len += len,
        _ => out.push(RangeStatus {
            len,
            contents,
            changed,
        }),
    }
}

/// Appends the status of `len` bytes at `offset` of `below` (the device an absent range is read
/// from) to `out` and returns how many bytes it described: all of them, or a prefix when the
/// device described less (which the trait allows). Bytes past the end of a shorter device read
/// as zeroes and count as changed.
pub(crate) fn inherit(
    below: &dyn BlockDevice,
    offset: u64,
    len: u64,
    out: &mut Vec<RangeStatus>,
) -> Result<u64> {
    let inside = len.min(below.size().saturating_sub(offset));
    let mut covered = 0;
    if inside > 0 {
        for s in below.block_status(offset, inside)? {
            let n = s.len.min(inside - covered);
            push(out, n, s.contents, s.changed);
            covered += n;
            if covered == inside {
                break;
            }
        }
    }
    if covered == inside && inside < len {
        push(out, len - inside, Contents::Hole, true);
        covered = len;
    }
    Ok(covered)
}

/// The default [`BlockDevice::block_status`]: `dev`'s own extents, with absent ranges described
/// by its backing device (recursively) or, without one, as unchanged holes. Own data and zero
/// ranges count as changed when there is a backing device; a device without one is the bottom
/// of its stack, the template itself, so nothing in it is changed.
pub fn stacked<D: BlockDevice + ?Sized>(
    dev: &D,
    offset: u64,
    len: u64,
) -> Result<Vec<RangeStatus>> {
    let backing = dev.backing();
    let layered = backing.is_some();
    let mut out = Vec::new();
    let mut at = offset;
    let end = offset.saturating_add(len);
    for e in dev.extents(offset, len)? {
        if at >= end {
            break;
        }
        let n = e.len.min(end - at);
        match (e.state, backing) {
            (BlockState::Data, _) => push(&mut out, n, Contents::Data, layered),
            (BlockState::Zero, _) => push(&mut out, n, Contents::Hole, layered),
            (BlockState::Absent, None) => push(&mut out, n, Contents::Hole, false),
            (BlockState::Absent, Some(below)) => {
                if inherit(below, at, n, &mut out)? < n {
                    break;
                }
            }
        }
        at += n;
    }
    Ok(out)
}
