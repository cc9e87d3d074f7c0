//! Helpers shared by the block layer's integration tests: in-memory and failing base devices,
//! template files, and a byte-level model of an overlay.

#![allow(dead_code)]

use std::io::Write;
use std::sync::Arc;

use rootfork_block::{
    BlockDevice, BlockError, BlockState, Contents, Extent, RangeStatus, Result, TemplateFile,
    TemplatePath,
};

/// A cheap deterministic byte generator (xorshift64*), fast even in debug builds.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    for b in chunks.into_remainder() {
        *b = x as u8 | 1;
    }
}

/// Template contents of `size` bytes: pseudo-random data with a few all-zero stretches.
pub fn template_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    fill_pattern(&mut v, seed);
    let quarter = size / 4;
    v[quarter..quarter + quarter / 2].fill(0);
    v
}

/// A template file with `bytes` (holes where `bytes` has aligned zero pages) and its device.
pub fn template_file(bytes: &[u8]) -> (tempfile::NamedTempFile, Arc<TemplateFile>) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    let t = TemplateFile::open(&TemplatePath::new(f.path())).unwrap();
    (f, Arc::new(t))
}

/// An in-memory read-only device, optionally failing reads that touch one byte range with EIO.
pub struct MemDevice {
    pub bytes: Vec<u8>,
    pub bad: Option<(u64, u64)>,
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        BlockError::check_range(offset, buf.len() as u64, self.size())?;
        let end = offset + buf.len() as u64;
        if let Some((a, b)) = self.bad {
            if offset < b && end > a && !buf.is_empty() {
                return Err(BlockError::errno_io("fake bad sector", libc::EIO));
            }
        }
        buf.copy_from_slice(&self.bytes[offset as usize..end as usize]);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn extents(&self, _: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent {
            len,
            state: BlockState::Data,
        }])
    }
}

/// What an overlay should hold: its bytes and the state of each block.
#[derive(Clone)]
pub struct Model {
    pub data: Vec<u8>,
    pub states: Vec<BlockState>,
    /// Data blocks wholly zeroed in place (write-zeroes without punching): allocated zeroes.
    pub zeroed: Vec<bool>,
    pub bs: u64,
    pub written: u64,
}

impl Model {
    pub fn new(template: &[u8], bs: u32) -> Model {
        let bs = u64::from(bs);
        Model {
            data: template.to_vec(),
            states: vec![BlockState::Absent; (template.len() as u64).div_ceil(bs) as usize],
            zeroed: vec![false; (template.len() as u64).div_ceil(bs) as usize],
            bs,
            written: 0,
        }
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn block_range(&self, b: usize) -> std::ops::Range<usize> {
        let start = b as u64 * self.bs;
        start as usize..((start + self.bs).min(self.size())) as usize
    }

    /// Blocks touched by `len` bytes at `off` get data or zero state by their new contents,
    /// or data regardless (`force_data`, for write-zeroes without punching).
    fn restate(&mut self, off: u64, len: u64, force_data: bool) {
        if len == 0 {
            return;
        }
        let first = (off / self.bs) as usize;
        let last = ((off + len - 1) / self.bs) as usize;
        for b in first..=last {
            let r = self.block_range(b);
            let whole = r.start as u64 >= off && r.end as u64 <= off + len;
            self.zeroed[b] = force_data && whole;
            self.states[b] = if !force_data && self.data[r].iter().all(|&x| x == 0) {
                BlockState::Zero
            } else {
                BlockState::Data
            };
        }
    }

    pub fn write(&mut self, off: u64, buf: &[u8]) {
        self.data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        self.restate(off, buf.len() as u64, false);
        self.written += buf.len() as u64;
    }

    pub fn zero(&mut self, off: u64, len: u64, punch: bool) {
        self.data[off as usize..(off + len) as usize].fill(0);
        self.restate(off, len, !punch);
    }

    pub fn read(&self, off: u64, len: u64) -> &[u8] {
        &self.data[off as usize..(off + len) as usize]
    }

    /// The extents the overlay should report for `len` bytes at `off`.
    pub fn extents(&self, off: u64, len: u64) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let b = (pos / self.bs) as usize;
            let stop = ((b as u64 + 1) * self.bs).min(end);
            let state = self.states[b];
            match out.last_mut() {
                Some(e) if e.state == state => e.len += stop - pos,
                _ => out.push(Extent {
                    len: stop - pos,
                    state,
                }),
            }
            pos = stop;
        }
        out
    }

    /// The block status the overlay should report for `len` bytes at `off`, given the status
    /// of its base (`base(off, len)`, for absent blocks).
    pub fn status(
        &self,
        off: u64,
        len: u64,
        base: impl Fn(u64, u64) -> Vec<RangeStatus>,
    ) -> Vec<RangeStatus> {
        let mut out: Vec<RangeStatus> = Vec::new();
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let b = (pos / self.bs) as usize;
            let stop = ((b as u64 + 1) * self.bs).min(end);
            let own = |contents| {
                vec![RangeStatus {
                    len: stop - pos,
                    contents,
                    changed: true,
                }]
            };
            let runs = match self.states[b] {
                BlockState::Absent => base(pos, stop - pos),
                BlockState::Data if self.zeroed[b] => own(Contents::Zeroes),
                BlockState::Data => own(Contents::Data),
                BlockState::Zero => own(Contents::Hole),
            };
            for r in runs {
                push_status(&mut out, r);
            }
            pos = stop;
        }
        out
    }

    pub fn count(&self, s: BlockState) -> u64 {
        self.states.iter().filter(|x| **x == s).count() as u64
    }
}

/// Appends `r` to `out`, merging it with an equal last run.
pub fn push_status(out: &mut Vec<RangeStatus>, r: RangeStatus) {
    match out.last_mut() {
        Some(l) if l.contents == r.contents && l.changed == r.changed => l.len += r.len,
        _ if r.len == 0 => {}
        _ => out.push(r),
    }
}

/// Reads all of `dev`.
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    dev.read_at(&mut v, 0).unwrap();
    v
}

/// Asserts two byte slices are equal, reporting the first difference instead of dumping both.
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// A read-only in-memory device whose first read touching one range blocks until released: it
/// holds a request inside the overlay (with its range locks) for as long as a test needs.
pub struct GateDevice {
    pub bytes: Vec<u8>,
    pub gate: (u64, u64),
    state: std::sync::Mutex<GateState>,
    cond: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    used: bool,
    entered: bool,
    released: bool,
}

impl GateDevice {
    pub fn new(bytes: Vec<u8>, gate: (u64, u64)) -> GateDevice {
        GateDevice {
            bytes,
            gate,
            state: Default::default(),
            cond: Default::default(),
        }
    }

    /// Waits until a read is held at the gate.
    pub fn wait_entered(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.entered {
            s = self.cond.wait(s).unwrap();
        }
    }

    /// Lets the held read go on.
    pub fn release(&self) {
        self.state.lock().unwrap().released = true;
        self.cond.notify_all();
    }
}

impl BlockDevice for GateDevice {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        BlockError::check_range(offset, buf.len() as u64, self.size())?;
        let end = offset + buf.len() as u64;
        if offset < self.gate.1 && end > self.gate.0 {
            let mut s = self.state.lock().unwrap();
            if !s.used {
                s.used = true;
                s.entered = true;
                self.cond.notify_all();
                while !s.released {
                    s = self.cond.wait(s).unwrap();
                }
            }
        }
        buf.copy_from_slice(&self.bytes[offset as usize..end as usize]);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn extents(&self, _: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent {
            len,
            state: BlockState::Data,
        }])
    }
}
