//! [`MemDevice`]: an in-memory [`BlockDevice`] with per-block states, for tests and fuzzing.
//!
//! It models an overlay: blocks start [`BlockState::Absent`] (reading from an optional backing
//! device, else zeroes), become `Data` when written and `Zero` when zeroed with `punch` or
//! trimmed. It can also be told to fail or to go slow, to exercise error and concurrency paths.
//!
//! [`GatedDevice`] wraps any device and holds its reads at a gate until released, to make a
//! request hang on purpose (request-age and health-check tests). [`PanicDevice`] wraps any
//! device and panics on the Nth call of one operation (panic-handling tests).
//! [`FragmentedDevice`] is a huge device of alternating data and zero blocks that keeps no
//! data and counts the extents it reports (block-status work bounds). [`StallingWrites`] holds
//! one marked write back past a kernel timeout (write-fence tests).

mod stall;
pub use stall::StallingWrites;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use rootfork_block::{BlockDevice, BlockError, BlockState, Extent, RangeStatus, Result};

/// An in-memory device.
pub struct MemDevice {
    size: u64,
    block: u32,
    read_only: bool,
    data: Mutex<Vec<u8>>,
    states: Mutex<Vec<BlockState>>,
    backing: Option<Arc<dyn BlockDevice>>,
    fail: AtomicBool,
    delay_us: AtomicU64,
    flushes: AtomicU64,
}

impl MemDevice {
    /// A zero-filled writable device of `size` bytes with `block`-byte state granularity.
    pub fn new(size: u64, block: u32) -> MemDevice {
        MemDevice {
            size,
            block,
            read_only: false,
            data: Mutex::new(vec![0; size as usize]),
            states: Mutex::new(vec![
                BlockState::Absent;
                size.div_ceil(u64::from(block)) as usize
            ]),
            backing: None,
            fail: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    /// A read-only device holding `data`, every block `Data`.
    pub fn read_only(data: Vec<u8>, block: u32) -> MemDevice {
        let mut d = MemDevice::new(data.len() as u64, block);
        d.read_only = true;
        d.states.get_mut().fill(BlockState::Data);
        *d.data.get_mut() = data;
        d
    }

    /// An overlay-like device over `backing` (absent blocks read from it).
    pub fn over(backing: Arc<dyn BlockDevice>, block: u32) -> MemDevice {
        let mut d = MemDevice::new(backing.size(), block);
        d.backing = Some(backing);
        d
    }

    /// Makes every later operation fail with `EIO` (or succeed again).
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    /// Delays every data operation by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.delay_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Flushes so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let us = self.delay_us.load(Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
        if self.fail.load(Ordering::Relaxed) {
            return Err(BlockError::io(
                "mem device",
                std::io::Error::from_raw_os_error(5),
            ));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(BlockError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.check(offset, len)
    }

    fn blocks(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let b = u64::from(self.block);
        (offset / b) as usize..(offset + len).div_ceil(b) as usize
    }

    /// Marks whole blocks of a range; partial blocks become `Data` (materialised).
    fn mark(&self, offset: u64, len: u64, state: BlockState) {
        let b = u64::from(self.block);
        let mut states = self.states.lock();
        let mut data = self.data.lock();
        for i in self.blocks(offset, len) {
            let (s, e) = (i as u64 * b, ((i as u64 + 1) * b).min(self.size));
            let whole = s >= offset && e <= offset + len;
            let st = if whole { state } else { BlockState::Data };
            if states[i] == BlockState::Absent && !whole {
                // Materialise the template's bytes of a partially covered block.
                if let Some(bk) = &self.backing {
                    let _ = bk.read_at(&mut data[s as usize..e as usize], s);
                }
            }
            if states[i] == BlockState::Absent || whole || st == BlockState::Data {
                states[i] = st;
            }
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        self.block
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let b = u64::from(self.block);
        let states = self.states.lock();
        let data = self.data.lock();
        // Byte-granular for simplicity: tests use small devices.
        for (at, byte) in (offset..).zip(buf.iter_mut()) {
            let st = states[(at / b) as usize];
            *byte = match (st, &self.backing) {
                (BlockState::Absent, Some(bk)) => {
                    let mut x = [0u8];
                    bk.read_at(&mut x, at)?;
                    x[0]
                }
                (BlockState::Absent, None) | (BlockState::Zero, _) => 0,
                (BlockState::Data, _) => data[at as usize],
            };
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.mark(offset, buf.len() as u64, BlockState::Data);
        let mut data = self.data.lock();
        data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        self.check_write(offset, len)?;
        self.mark(
            offset,
            len,
            if punch {
                BlockState::Zero
            } else {
                BlockState::Data
            },
        );
        let mut data = self.data.lock();
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.check(0, 0)?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(offset, len)?;
        let b = u64::from(self.block);
        let states = self.states.lock();
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let i = (at / b) as usize;
            let n = ((i as u64 + 1) * b).min(end) - at;
            match out.last_mut() {
                Some(l) if l.state == states[i] => l.len += n,
                _ => out.push(Extent {
                    len: n,
                    state: states[i],
                }),
            }
            at += n;
        }
        Ok(out)
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref()
    }
}

/// Wraps a device; while the gate is closed, reads wait until it opens again.
pub struct GatedDevice {
    inner: Arc<dyn BlockDevice>,
    closed: Mutex<bool>,
    cond: Condvar,
    waiting: AtomicU64,
}

impl GatedDevice {
    /// `inner` behind an open gate.
    pub fn new(inner: Arc<dyn BlockDevice>) -> GatedDevice {
        GatedDevice {
            inner,
            closed: Mutex::new(false),
            cond: Condvar::new(),
            waiting: AtomicU64::new(0),
        }
    }

    /// Closes the gate: later reads wait.
    pub fn close(&self) {
        *self.closed.lock() = true;
    }

    /// Opens the gate, letting waiting reads through.
    pub fn open(&self) {
        *self.closed.lock() = false;
        self.cond.notify_all();
    }

    /// Reads waiting at the gate now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::SeqCst)
    }
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut closed = self.closed.lock();
        if *closed {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            while *closed {
                self.cond.wait(&mut closed);
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        drop(closed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        self.inner.write_zeroes(offset, len, punch)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.trim(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.inner.backing()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<RangeStatus>> {
        self.inner.block_status(offset, len)
    }
}

/// A [`BlockDevice`] operation, for [`PanicDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceOp {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `flush`.
    Flush,
    /// `trim`.
    Trim,
    /// `write_zeroes`.
    WriteZeroes,
    /// `extents`.
    Extents,
}

/// Wraps a device; the `nth` call (1-based) of operation `op` panics, every other call goes
/// through.
pub struct PanicDevice {
    inner: Arc<dyn BlockDevice>,
    op: DeviceOp,
    nth: u64,
    calls: AtomicU64,
    thread: Mutex<Option<String>>,
}

impl PanicDevice {
    /// `inner`, panicking on the `nth` call of `op`.
    pub fn new(inner: Arc<dyn BlockDevice>, op: DeviceOp, nth: u64) -> PanicDevice {
        PanicDevice {
            inner,
            op,
            nth,
            calls: AtomicU64::new(0),
            thread: Mutex::new(None),
        }
    }

    /// The name of the thread the panic happened on, once it has.
    pub fn panicked_on(&self) -> Option<String> {
        self.thread.lock().clone()
    }

    /// Calls of the chosen operation so far (the panicking one included).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn hit(&self, op: DeviceOp) {
        if op == self.op && self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.nth {
            let name = std::thread::current().name().unwrap_or("?").to_owned();
            *self.thread.lock() = Some(name);
            panic!("PanicDevice: {op:?} call {} panics (test)", self.nth);
        }
    }
}

impl BlockDevice for PanicDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.hit(DeviceOp::Read);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.hit(DeviceOp::Write);
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        self.hit(DeviceOp::WriteZeroes);
        self.inner.write_zeroes(offset, len, punch)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.hit(DeviceOp::Trim);
        self.inner.trim(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.hit(DeviceOp::Flush);
        self.inner.flush()
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.hit(DeviceOp::Extents);
        self.inner.extents(offset, len)
    }
    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.inner.backing()
    }
}

/// A read-only device of `size` bytes whose `block`-byte blocks alternate data and zero (block
/// 0 data), computed on the fly: any size costs no memory. Reads return zeroes. It counts the
/// extents it reports and the longest range it was asked about.
pub struct FragmentedDevice {
    size: u64,
    block: u32,
    extents: AtomicU64,
    longest: AtomicU64,
}

impl FragmentedDevice {
    /// A device of `size` bytes fragmented every `block` bytes.
    pub fn new(size: u64, block: u32) -> FragmentedDevice {
        FragmentedDevice {
            size,
            block,
            extents: AtomicU64::new(0),
            longest: AtomicU64::new(0),
        }
    }

    /// Extents reported so far, over every call.
    pub fn extents_reported(&self) -> u64 {
        self.extents.load(Ordering::SeqCst)
    }

    /// The longest range `extents` was asked about.
    pub fn longest_query(&self) -> u64 {
        self.longest.load(Ordering::SeqCst)
    }
}

impl BlockDevice for FragmentedDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        self.block
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(BlockError::OutOfRange {
                offset,
                len: buf.len() as u64,
                size: self.size,
            });
        }
        buf.fill(0);
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        true
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
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.longest.fetch_max(len, Ordering::SeqCst);
        let b = u64::from(self.block);
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let i = at / b;
            let next = ((i + 1) * b).min(end);
            let state = if i.is_multiple_of(2) {
                BlockState::Data
            } else {
                BlockState::Zero
            };
            out.push(Extent {
                len: next - at,
                state,
            });
            at = next;
        }
        self.extents.fetch_add(out.len() as u64, Ordering::SeqCst);
        Ok(out)
    }
}
