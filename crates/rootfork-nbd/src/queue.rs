//! The job queue between a connection's reader and its workers, and the in-flight window that
//! bounds how much the reader may admit.
//!
//! Both are a mutex plus condvar; wake-ups are issued only when a thread actually sleeps, so a
//! busy connection pays no futex calls for hand-offs.

use std::collections::VecDeque;

use parking_lot::{Condvar, Mutex};

#[derive(Debug)]
struct QueueState<T> {
    jobs: VecDeque<T>,
    sleeping: usize,
    closed: bool,
}

/// A multi-consumer FIFO of jobs.
#[derive(Debug)]
pub struct JobQueue<T> {
    state: Mutex<QueueState<T>>,
    cond: Condvar,
}

impl<T> JobQueue<T> {
    /// An empty, open queue.
    pub fn new() -> Self {
        JobQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                sleeping: 0,
                closed: false,
            }),
            cond: Condvar::new(),
        }
    }

    /// Adds jobs, waking at most one sleeping worker per job.
    pub fn push_all(&self, jobs: impl IntoIterator<Item = T>) {
        let mut st = self.state.lock();
        let before = st.jobs.len();
        st.jobs.extend(jobs);
        let added = st.jobs.len() - before;
        let wake = added.min(st.sleeping);
        st.sleeping -= wake;
        drop(st);
        for _ in 0..wake {
            self.cond.notify_one();
        }
    }

    /// Takes the next job, sleeping while the queue is empty; `None` once closed and empty.
    pub fn pop(&self) -> Option<T> {
        let mut st = self.state.lock();
        loop {
            if let Some(j) = st.jobs.pop_front() {
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

    /// Lets workers finish the queued jobs, then exit.
    pub fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        st.sleeping = 0;
        drop(st);
        self.cond.notify_all();
    }
}

impl<T> Default for JobQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Default)]
struct WindowState {
    count: usize,
    bytes: usize,
    waiters: usize,
    closed: bool,
}

/// Bounds requests and payload bytes in flight on one connection.
#[derive(Debug)]
pub struct Window {
    max_count: usize,
    max_bytes: usize,
    state: Mutex<WindowState>,
    cond: Condvar,
}

impl Window {
    /// A window of `max_count` requests and `max_bytes` payload bytes.
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

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.state.lock().count
    }

    /// Waits until nothing is in flight.
    pub fn wait_idle(&self) {
        let mut st = self.state.lock();
        while st.count > 0 {
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
