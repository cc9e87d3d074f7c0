//! [`StallingWrites`]: a device wrapper that holds one marked write back, to make a request
//! outlive the kernel's `NBD_ATTR_TIMEOUT` on purpose (write-fence tests).
//!
//! The first write whose payload starts with the marker is held until [`StallingWrites::release`]
//! is called, until a write with *other* data has been applied over its range (the guest's next
//! write W2 — so that without a fence the stale write deterministically lands after it), or
//! until `max_stall` has passed. Later marked writes (the kernel's requeued copy) go through.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use std::sync::Arc;

use rootfork_block::{BlockDevice, Extent, RangeStatus, Result};

#[derive(Default)]
struct State {
    /// Writes carrying the marker seen so far (held one included).
    marked: u64,
    /// The held write's range while it is held.
    held: Option<(u64, u64)>,
    /// Set by `release` or by an overlapping write with other data.
    released: bool,
    /// The held write has been applied.
    stalled_applied: bool,
    /// Writes applied over the held range while it was held.
    overtaken: u64,
}

/// Wraps a device; holds back the first write that starts with a marker (see the module docs).
pub struct StallingWrites {
    inner: Arc<dyn BlockDevice>,
    marker: Vec<u8>,
    max_stall: Duration,
    state: Mutex<State>,
    cond: Condvar,
}

impl StallingWrites {
    /// `inner`, holding back the first write whose payload starts with `marker` for at most
    /// `max_stall`.
    pub fn new(inner: Arc<dyn BlockDevice>, marker: &[u8], max_stall: Duration) -> StallingWrites {
        StallingWrites {
            inner,
            marker: marker.to_vec(),
            max_stall,
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
        }
    }

    /// Lets the held write through.
    pub fn release(&self) {
        self.state.lock().released = true;
        self.cond.notify_all();
    }

    /// Whether a write is being held now.
    pub fn holding(&self) -> bool {
        self.state.lock().held.is_some()
    }

    /// How many writes carried the marker (2 once the kernel has requeued the held one).
    pub fn marked_writes(&self) -> u64 {
        self.state.lock().marked
    }

    /// Whether the held write has been applied.
    pub fn stalled_write_applied(&self) -> bool {
        self.state.lock().stalled_applied
    }

    /// How many writes were applied over the held range while it was held (0 with a fence: the
    /// requeued copy waits for the held write).
    pub fn overtaken(&self) -> u64 {
        self.state.lock().overtaken
    }

    /// Waits up to `limit` until a write is held; returns whether one is.
    pub fn wait_holding(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.state.lock();
        while st.held.is_none() && !st.stalled_applied {
            if self.cond.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        st.held.is_some()
    }
}

impl BlockDevice for StallingWrites {
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
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let (start, end) = (offset, offset + buf.len() as u64);
        let mut st = self.state.lock();
        if buf.starts_with(&self.marker) {
            st.marked += 1;
            if st.marked == 1 {
                st.held = Some((start, end));
                self.cond.notify_all();
                let deadline = Instant::now() + self.max_stall;
                while !st.released {
                    if self.cond.wait_until(&mut st, deadline).timed_out() {
                        break;
                    }
                }
                drop(st);
                let r = self.inner.write_at(buf, offset);
                let mut st = self.state.lock();
                st.held = None;
                st.stalled_applied = true;
                self.cond.notify_all();
                return r;
            }
        }
        drop(st);
        let r = self.inner.write_at(buf, offset);
        let mut st = self.state.lock();
        if let Some((s, e)) = st.held {
            if s < end && start < e {
                st.overtaken += 1;
                if !buf.starts_with(&self.marker) {
                    st.released = true;
                }
                self.cond.notify_all();
            }
        }
        r
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
