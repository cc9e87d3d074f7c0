//! The job queue between a connection's reader and its workers, and the in-flight window that
//! bounds how much the reader may admit.
//!
//! Both are a mutex plus condvar; wake-ups are issued only when a thread actually sleeps, so a
//! busy connection pays no futex calls for hand-offs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::budget::ByteBudget;

#[derive(Debug)]
struct QueueState<T> {
    jobs: VecDeque<(Instant, T)>,
    sleeping: usize,
    closed: bool,
}

/// A multi-consumer FIFO of jobs with an adaptive wake-up policy.
///
/// Waking a worker costs a futex call and two context switches, more than a fast device
/// operation, so workers are woken only when needed: one when none is running, and another
/// whenever the oldest queued job has waited longer than [`JobQueue::STALL`] (checked when jobs
/// are queued and whenever a worker takes one). A fast device is therefore served by one busy
/// worker, while slow operations (a lazily fetched template) bring every worker in within about
/// one operation's latency.
///
/// Waiting alone is not proof of a slow device: on an overloaded host jobs also wait because the
/// running worker is preempted, and waking more threads then only adds context switches. So an
/// extra worker is woken only while the device is slow (the last finished job took longer than
/// [`JobQueue::STALL`]) and the queue is stalled, or when a worker that just finished a slow job
/// finds more work queued.
#[derive(Debug)]
pub struct JobQueue<T> {
    state: Mutex<QueueState<T>>,
    cond: Condvar,
    workers: usize,
    /// The last job finished took longer than [`JobQueue::STALL`].
    slow: AtomicBool,
}

impl<T> JobQueue<T> {
    /// How long the oldest job may wait before another worker is woken.
    pub const STALL: Duration = Duration::from_micros(200);

    /// An empty, open queue served by `workers` threads.
    pub fn new(workers: usize) -> Self {
        JobQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                sleeping: 0,
                closed: false,
            }),
            slow: AtomicBool::new(false),
            cond: Condvar::new(),
            workers: workers.max(1),
        }
    }

    fn stalled(st: &QueueState<T>, now: Instant) -> bool {
        st.jobs
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > Self::STALL)
    }

    /// Adds jobs, waking a worker if none is running or the queue is stalled. `heavy` jobs
    /// (large transfers, whose copy and send can overlap on another core) always wake a
    /// sleeping worker.
    pub fn push_all(&self, jobs: impl IntoIterator<Item = T>, heavy: bool) {
        let now = Instant::now();
        let mut st = self.state.lock();
        st.jobs.extend(jobs.into_iter().map(|j| (now, j)));
        let wake = st.sleeping > 0
            && !st.jobs.is_empty()
            && (heavy
                || st.sleeping >= self.workers
                || (self.is_slow() && Self::stalled(&st, now)));
        if wake {
            st.sleeping -= 1;
        }
        drop(st);
        if wake {
            self.cond.notify_one();
        }
    }

    /// Takes the next job, sleeping while the queue is empty; `None` once closed and empty.
    /// `last` is how long the caller's previous job took (`None` for its first call).
    pub fn pop(&self, last: Option<Duration>) -> Option<T> {
        if let Some(d) = last {
            self.note(d);
        }
        let mut st = self.state.lock();
        loop {
            if let Some((_, j)) = st.jobs.pop_front() {
                let wake = st.sleeping > 0 && !st.jobs.is_empty() && self.is_slow();
                if wake {
                    st.sleeping -= 1;
                }
                drop(st);
                if wake {
                    self.cond.notify_one();
                }
                return Some(j);
            }
            if st.closed {
                return None;
            }
            st.sleeping += 1;
            // Whoever wakes us takes us off the sleeping count.
            self.cond.wait(&mut st);
        }
    }

    /// Records how long a job took (the device counts as slow after a slow job).
    pub fn note(&self, took: Duration) {
        self.slow.store(took > Self::STALL, Ordering::Relaxed);
    }

    /// Whether the last job finished was slow.
    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    /// The smallest `key` over the queued jobs (jobs whose key is `None` are skipped). Takes the
    /// queue lock and walks the queue (at most the window's size): for rare observers such as a
    /// health check, not for the request path.
    pub fn min_key<K: Ord>(&self, key: impl Fn(&T) -> Option<K>) -> Option<K> {
        self.state
            .lock()
            .jobs
            .iter()
            .filter_map(|(_, j)| key(j))
            .min()
    }

    /// Lets workers finish the queued jobs, then exit.
    pub fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        st.sleeping = 0;
        drop(st);
        self.cond.notify_all();
    }
}

#[derive(Debug, Default)]
struct WindowState {
    count: usize,
    bytes: usize,
    waiters: usize,
    closed: bool,
}

/// Bounds requests and buffer bytes (write payloads, read reply buffers) in flight on one
/// connection, and charges the bytes to a [`ByteBudget`] shared with other connections when
/// there is one.
#[derive(Debug)]
pub struct Window {
    max_count: usize,
    max_bytes: usize,
    shared: Option<Arc<ByteBudget>>,
    state: Mutex<WindowState>,
    cond: Condvar,
}

/// How often a request waiting only for the shared budget looks again (other connections'
/// releases do not wake this window).
const SHARED_RETRY: Duration = Duration::from_millis(2);

impl Window {
    /// A window of `max_count` requests and `max_bytes` buffer bytes, charging `shared` too.
    pub fn new(max_count: usize, max_bytes: usize, shared: Option<Arc<ByteBudget>>) -> Self {
        Window {
            max_count: max_count.max(1),
            max_bytes,
            shared,
            state: Mutex::new(WindowState::default()),
            cond: Condvar::new(),
        }
    }

    /// Whether this window has room for one request of `bytes`.
    fn has_room(&self, st: &WindowState, bytes: usize) -> bool {
        st.count < self.max_count && (st.count == 0 || st.bytes + bytes <= self.max_bytes)
    }

    /// Charges the shared budget for a request this window admits: always when it is the
    /// window's only request (so every connection can make progress), else if it fits.
    fn charge_shared(&self, st: &WindowState, bytes: usize) -> bool {
        match &self.shared {
            None => true,
            Some(b) if st.count == 0 => {
                b.force_take(bytes);
                true
            }
            Some(b) => b.try_take(bytes),
        }
    }

    /// Admits one request of `bytes`, waiting for room; false once the window is closed.
    pub fn acquire(&self, bytes: usize) -> bool {
        let mut st = self.state.lock();
        loop {
            if st.closed {
                return false;
            }
            if self.has_room(&st, bytes) {
                if self.charge_shared(&st, bytes) {
                    break;
                }
                // Room here, none in the shared budget: look again shortly.
                st.waiters += 1;
                self.cond.wait_for(&mut st, SHARED_RETRY);
                st.waiters -= 1;
                continue;
            }
            st.waiters += 1;
            self.cond.wait(&mut st);
            st.waiters -= 1;
        }
        st.count += 1;
        st.bytes += bytes;
        true
    }

    /// Admits one request of `bytes` if there is room right now.
    pub fn try_acquire(&self, bytes: usize) -> bool {
        let mut st = self.state.lock();
        if st.closed || !self.has_room(&st, bytes) || !self.charge_shared(&st, bytes) {
            return false;
        }
        st.count += 1;
        st.bytes += bytes;
        true
    }

    /// Releases one request of `bytes`.
    pub fn release(&self, bytes: usize) {
        if let Some(b) = &self.shared {
            b.give(bytes);
        }
        let mut st = self.state.lock();
        st.count -= 1;
        st.bytes -= bytes;
        let wake = st.waiters > 0;
        drop(st);
        if wake {
            self.cond.notify_all();
        }
    }

    /// Releases `n` requests of `bytes` in total.
    pub fn release_many(&self, n: usize, bytes: usize) {
        if n == 0 {
            return;
        }
        if let Some(b) = &self.shared {
            b.give(bytes);
        }
        let mut st = self.state.lock();
        st.count -= n;
        st.bytes -= bytes;
        let wake = st.waiters > 0;
        drop(st);
        if wake {
            self.cond.notify_all();
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.state.lock().count
    }

    /// Waits until nothing is in flight, or the window is closed.
    pub fn wait_idle(&self) {
        let mut st = self.state.lock();
        while st.count > 0 && !st.closed {
            st.waiters += 1;
            self.cond.wait(&mut st);
            st.waiters -= 1;
        }
    }

    /// Wakes and refuses anyone waiting to acquire (the connection is going away).
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.cond.notify_all();
    }
}
