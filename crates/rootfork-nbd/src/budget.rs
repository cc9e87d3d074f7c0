//! Budgets shared by several servers (a daemon's per-sandbox exports): [`ConnectionBudget`], at
//! most `limit` connections open across all of them (a connection holds a [`Permit`] for its
//! life; dropping it gives the place back), and [`ByteBudget`], at most `limit` buffer bytes in
//! flight across all their connections (each connection's window charges it).
//!
//! A [`ConnectionBudget`] may also keep file descriptors free
//! ([`ConnectionBudget::keeping_fds_free`]): a connection is refused while fewer than that many
//! descriptors are left under the process's `RLIMIT_NOFILE`, whatever the count, so that clients
//! cannot take the descriptors the rest of the process (an API, its files) needs, even when the
//! count was sized for fewer sandboxes than the process serves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// At most `limit` connections across every server that shares it.
#[derive(Debug)]
pub struct ConnectionBudget {
    limit: usize,
    used: AtomicUsize,
    keep_free: Option<u64>,
}

/// Why a [`ConnectionBudget`] gave no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    /// Every place is taken.
    Places,
    /// Fewer file descriptors than the budget keeps free are left.
    FileDescriptors,
}

impl Shortage {
    /// The limit reached, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Shortage::Places => "the shared connection budget",
            Shortage::FileDescriptors => "the file descriptors kept free",
        }
    }
}

/// One connection's place in a [`ConnectionBudget`].
#[derive(Debug)]
pub struct Permit(Arc<ConnectionBudget>);

impl ConnectionBudget {
    /// A budget of `limit` connections.
    pub fn new(limit: usize) -> Arc<ConnectionBudget> {
        Arc::new(ConnectionBudget {
            limit,
            used: AtomicUsize::new(0),
            keep_free: None,
        })
    }

    /// A budget of `limit` connections that also refuses while fewer than `keep_free` file
    /// descriptors are left in this process (see the module doc).
    pub fn keeping_fds_free(limit: usize, keep_free: u64) -> Arc<ConnectionBudget> {
        Arc::new(ConnectionBudget {
            limit,
            used: AtomicUsize::new(0),
            keep_free: Some(keep_free),
        })
    }

    /// A place, if one is left (and, with [`ConnectionBudget::keeping_fds_free`], enough file
    /// descriptors are).
    pub fn try_take(self: &Arc<Self>) -> Result<Permit, Shortage> {
        if let Some(keep) = self.keep_free {
            let (open, limit) = fd_usage();
            if open.saturating_add(keep) > limit {
                return Err(Shortage::FileDescriptors);
            }
        }
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .map(|_| Permit(Arc::clone(self)))
            .map_err(|_| Shortage::Places)
    }

    /// Places taken.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// File descriptors open in this process (counted in `/proc/self/fd`, the directory's own
/// descriptor excluded) and the soft `RLIMIT_NOFILE`. Unknown values read as none open and no
/// limit, so a process without `/proc` is never refused for descriptors.
pub fn fd_usage() -> (u64, u64) {
    let open =
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| (d.count() as u64).saturating_sub(1));
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(u64::MAX, |(soft, _)| soft);
    (open, limit)
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// At most `limit` buffer bytes (write payloads, read replies) in flight across every
/// connection that shares it. A connection with nothing in flight may always take one request,
/// whatever its size, so no connection starves forever and the budget can be passed by at most
/// one request per connection.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ByteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Takes `bytes` if they fit.
    pub(crate) fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n.saturating_add(bytes) <= self.limit).then_some(n + bytes)
            })
            .is_ok()
    }

    /// Takes `bytes` whether or not they fit (a connection's only request).
    pub(crate) fn force_take(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Gives `bytes` back.
    pub(crate) fn give(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes in flight.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_taken_up_to_the_limit_and_given_back_on_drop() {
        let b = ConnectionBudget::new(2);
        let p1 = b.try_take().unwrap();
        let p2 = b.try_take().unwrap();
        assert_eq!(b.try_take().unwrap_err(), Shortage::Places);
        assert_eq!(b.used(), 2);
        drop(p1);
        let _p3 = b.try_take().unwrap();
        drop(p2);
        assert_eq!(b.used(), 1);
    }

    #[test]
    fn a_budget_keeping_fds_free_refuses_when_too_few_are_left() {
        let (open, limit) = fd_usage();
        assert!(open > 0 && open < limit, "{open} of {limit}");
        // More kept free than the limit allows: refused whatever the count, nothing taken.
        let b = ConnectionBudget::keeping_fds_free(10, limit);
        assert_eq!(b.try_take().unwrap_err(), Shortage::FileDescriptors);
        assert_eq!(b.used(), 0);
        // Room for what is kept free: the count decides.
        let b = ConnectionBudget::keeping_fds_free(1, limit - open - 1);
        let _p = b.try_take().unwrap();
        assert_eq!(b.try_take().unwrap_err(), Shortage::Places);
    }

    #[test]
    fn fd_usage_counts_a_newly_opened_file() {
        let before = fd_usage().0;
        let files: Vec<_> = (0..8)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        // Other test threads open and close their own descriptors too, never these eight.
        let (open, limit) = fd_usage();
        assert!(
            open >= 8 + 3 && open <= limit,
            "{open} of {limit} (before: {before})"
        );
        drop(files);
    }

    #[test]
    fn bytes_are_taken_up_to_the_limit_unless_forced() {
        let b = ByteBudget::new(100);
        assert!(b.try_take(60));
        assert!(!b.try_take(50));
        b.force_take(50);
        assert_eq!(b.used(), 110);
        b.give(110);
        assert!(b.try_take(100));
    }
}
