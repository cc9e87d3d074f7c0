//! Running a validated [`Command`] against the device and turning the result into an
//! [`Outcome`].

use rootfork_block::{BlockDevice, BlockError, BlockState};

use crate::buf::BufPool;
use crate::consts::wire_errno;
use crate::meta::MetaContext;
use crate::reply::{Outcome, ReadRun};
use crate::request::Command;
use crate::stats::Op;
use std::sync::Arc;

/// Chunk size of `CACHE` read-ahead.
pub(crate) const CACHE_CHUNK: u64 = 1 << 20;

/// What [`execute`] needs besides the command.
pub struct ExecContext<'a> {
    /// The device.
    pub device: &'a dyn BlockDevice,
    /// Buffer pool for reads.
    pub pool: &'a Arc<BufPool>,
    /// Whether structured replies are in use (reads may carry holes).
    pub structured: bool,
    /// Reads at least this long look for zero ranges to send as holes.
    pub hole_detect_min_len: u32,
    /// Selected meta contexts.
    pub contexts: &'a [MetaContext],
    /// Most bytes one block status request looks at.
    pub block_status_max_len: u64,
    /// Most descriptors per context in one block status reply.
    pub block_status_max_descriptors: usize,
}

fn errno(e: &BlockError) -> u32 {
    wire_errno(e.errno())
}

fn done(r: rootfork_block::Result<()>) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(e) => {
            tracing::debug!("nbd request failed: {e}");
            Outcome::Err(errno(&e))
        }
    }
}

/// The stats class of a command.
pub fn op_of(cmd: &Command) -> Op {
    match cmd {
        Command::Read { .. } => Op::Read,
        Command::Write { .. } => Op::Write,
        Command::Flush | Command::Disc => Op::Flush,
        Command::Trim { .. } => Op::Trim,
        Command::Cache { .. } => Op::Cache,
        Command::WriteZeroes { .. } => Op::WriteZeroes,
        Command::BlockStatus { .. } => Op::BlockStatus,
    }
}

/// Bytes a command moves or covers (for stats).
pub fn bytes_of(cmd: &Command) -> u64 {
    match *cmd {
        Command::Read { len, .. } | Command::Write { len, .. } => u64::from(len),
        Command::Trim { len, .. }
        | Command::Cache { len, .. }
        | Command::WriteZeroes { len, .. }
        | Command::BlockStatus { len, .. } => len,
        Command::Flush | Command::Disc => 0,
    }
}

/// Runs `cmd`; `payload` is the data of a write (a pool buffer, or the reader's receive buffer
/// when it runs the write itself).
pub fn execute(cx: &ExecContext<'_>, cmd: Command, payload: Option<&[u8]>) -> Outcome {
    let dev = cx.device;
    match cmd {
        Command::Read { offset, len, df } => read(cx, offset, len, df),
        Command::Write { offset, fua, .. } => {
            let Some(data) = payload else {
                return Outcome::Err(crate::consts::EIO);
            };
            let r = dev.write_at(data, offset);
            done(r.and_then(|()| if fua { dev.flush() } else { Ok(()) }))
        }
        Command::Flush | Command::Disc => done(dev.flush()),
        Command::Trim { offset, len, fua } => {
            done(
                dev.trim(offset, len)
                    .and_then(|()| if fua { dev.flush() } else { Ok(()) }),
            )
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast: _,
        } => {
            // `FAST_ZERO` is always honoured, with or without `NO_HOLE`: every writable device
            // rootfork serves zeroes without moving data through the request (the overlay marks
            // whole blocks zero in its map, or with `NO_HOLE` zeroes its cache with
            // `FALLOC_FL_ZERO_RANGE`, a metadata operation; only on a file system without it does
            // it write zeroes, server-side, which is still faster than the same `WRITE`).
            // `BlockDevice` has no way to say it cannot zero fast; `ENOTSUP` would need one.
            let r = dev.write_zeroes(offset, len, !no_hole);
            done(r.and_then(|()| if fua { dev.flush() } else { Ok(()) }))
        }
        Command::Cache { offset, len } => {
            let mut at = offset;
            let end = offset + len;
            let mut buf = cx.pool.get(CACHE_CHUNK.min(len) as usize);
            while at < end {
                let n = (end - at).min(CACHE_CHUNK) as usize;
                if let Err(e) = dev.read_at(&mut buf[..n], at) {
                    return Outcome::Err(errno(&e));
                }
                at += n as u64;
            }
            Outcome::Ok
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let max = if req_one {
                1
            } else {
                cx.block_status_max_descriptors.max(1)
            };
            let len = len.min(cx.block_status_max_len.max(1));
            let mut out = Vec::with_capacity(cx.contexts.len());
            for &c in cx.contexts {
                match block_status(dev, c, offset, len, max) {
                    Ok(d) => out.push((c.id(), d)),
                    Err(e) => return Outcome::Err(errno(&e)),
                }
            }
            Outcome::BlockStatus(out)
        }
    }
}

/// Descriptors of `c` for `len` bytes at `offset`, at most `max`, adjacent equal flags merged.
///
/// The device is asked in steps of `max` blocks, so one step yields about `max` extents at
/// most, and the walk stops as soon as the reply is full or a step is described only in part:
/// the work is bounded by the descriptors answered, not by the range or its fragmentation. The
/// reply may cover only a prefix of the range, which the protocol allows.
fn block_status(
    dev: &dyn BlockDevice,
    c: MetaContext,
    offset: u64,
    len: u64,
    max: usize,
) -> rootfork_block::Result<Vec<(u64, u32)>> {
    let block = u64::from(dev.block_size().max(1));
    let step = (max as u64).saturating_mul(block).max(block);
    let end = offset + len;
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut at = offset;
    'walk: while at < end {
        let n = (end - at).min(step);
        let mut got = 0;
        for (l, flags) in c.describe(dev, at, n, max)? {
            got += l;
            if let Some(last) = out.last_mut().filter(|last| last.1 == flags) {
                last.0 += l;
            } else if out.len() >= max {
                break 'walk;
            } else {
                out.push((l, flags));
            }
        }
        if got < n {
            break;
        }
        at += n;
    }
    Ok(out)
}

fn read(cx: &ExecContext<'_>, offset: u64, len: u32, df: bool) -> Outcome {
    let dev = cx.device;
    let mut buf = cx.pool.get(len as usize);
    let runs = if cx.structured && !df && len >= cx.hole_detect_min_len {
        match zero_runs(dev, offset, len) {
            Ok(r) => r,
            Err(e) => return Outcome::Err(errno(&e)),
        }
    } else {
        vec![ReadRun {
            rel: 0,
            len,
            hole: false,
        }]
    };
    if runs.len() == 1 && !runs[0].hole {
        return match dev.read_at(&mut buf, offset) {
            Ok(()) => Outcome::Read {
                buf: Some(buf),
                runs,
            },
            Err(e) => Outcome::Err(errno(&e)),
        };
    }
    for r in runs.iter().filter(|r| !r.hole) {
        let (a, b) = (r.rel as usize, (r.rel + r.len) as usize);
        if let Err(e) = dev.read_at(&mut buf[a..b], offset + u64::from(r.rel)) {
            return Outcome::Err(errno(&e));
        }
    }
    Outcome::Read {
        buf: Some(buf),
        runs,
    }
}

/// Splits a read into data runs and runs the device knows read as zeroes (cheap: only the top
/// device's own extents, no recursion into the template).
fn zero_runs(dev: &dyn BlockDevice, offset: u64, len: u32) -> rootfork_block::Result<Vec<ReadRun>> {
    let no_backing = dev.backing().is_none();
    let mut runs: Vec<ReadRun> = Vec::new();
    let mut rel: u32 = 0;
    for e in dev.extents(offset, u64::from(len))? {
        if rel >= len {
            break;
        }
        let n = e.len.min(u64::from(len - rel)) as u32;
        if n == 0 {
            continue;
        }
        let hole = match e.state {
            BlockState::Zero => true,
            BlockState::Absent => no_backing,
            BlockState::Data => false,
        };
        match runs.last_mut() {
            Some(last) if last.hole == hole => last.len += n,
            _ => runs.push(ReadRun { rel, len: n, hole }),
        }
        rel += n;
    }
    if rel < len {
        match runs.last_mut() {
            Some(last) if !last.hole => last.len += len - rel,
            _ => runs.push(ReadRun {
                rel,
                len: len - rel,
                hole: false,
            }),
        }
    }
    Ok(runs)
}
