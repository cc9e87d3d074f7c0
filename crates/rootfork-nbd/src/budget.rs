//! A connection budget shared by several servers (a daemon's per-sandbox exports): at most
//! `limit` connections open across all of them. A connection holds a [`Permit`] for its life;
//! dropping it gives the place back.

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
}
