//! The job queue between a connection's reader and its workers, and the in-flight window that
//! bounds how much the reader may admit.
//!
//! Both are a mutex plus condvar; wake-ups are issued only when a thread actually sleeps, so a
//! busy connection pays no futex calls for hand-offs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

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
/// connection.
#[derive(Debug)]
pub struct Window {
    max_count: usize,
    max_bytes: usize,
    state: Mutex<WindowState>,
    cond: Condvar,
}

impl Window {
    /// A window of `max_count` requests and `max_bytes` buffer bytes.
    pub fn new(max_count: usize, max_bytes: usize) -> Self {
        Window {
            max_count: max_count.max(1),
            max_bytes,
            state: Mutex::new(WindowState::default()),
            cond: Condvar::new(),
        }
    }

    /// Admits one request of `bytes`, waiting for room; false once the window is closed.
    pub fn acquire(&self, bytes: usize) -> bool {
        let mut st = self.state.lock();
        while !st.closed
            && (st.count >= self.max_count || (st.count > 0 && st.bytes + bytes > self.max_bytes))
        {
            st.waiters += 1;
            self.cond.wait(&mut st);
            st.waiters -= 1;
        }
        if st.closed {
            return false;
        }
        st.count += 1;
        st.bytes += bytes;
        true
    }

    /// Admits one request of `bytes` if there is room right now.
    pub fn try_acquire(&self, bytes: usize) -> bool {
        let mut st = self.state.lock();
        if st.closed
            || st.count >= self.max_count
            || (st.count > 0 && st.bytes + bytes > self.max_bytes)
        {
            return false;
        }
        st.count += 1;
        st.bytes += bytes;
        true
    }

    /// Releases one request of `bytes`.
    pub fn release(&self, bytes: usize) {
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
