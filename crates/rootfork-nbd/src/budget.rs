//! Budgets shared by several servers (a daemon's per-sandbox exports): [`ConnectionBudget`], at
//! most `limit` connections open across all of them (a connection holds a [`Permit`] for its
//! life; dropping it gives the place back), and [`ByteBudget`], at most `limit` buffer bytes in
//! flight across all their connections (each connection's window charges it).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// At most `limit` connections across every server that shares it.
#[derive(Debug)]
pub struct ConnectionBudget {
    limit: usize,
    used: AtomicUsize,
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
        })
    }

    /// A place, if one is left.
    pub fn try_take(self: &Arc<Self>) -> Option<Permit> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(Arc::clone(self)))
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
        assert!(b.try_take().is_none());
        assert_eq!(b.used(), 2);
        drop(p1);
        let _p3 = b.try_take().unwrap();
        drop(p2);
        assert_eq!(b.used(), 1);
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
