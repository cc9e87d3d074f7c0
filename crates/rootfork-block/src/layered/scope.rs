//! [`RequestScope`]: when the request being served on this thread started.
//!
//! A block request can reach a lazily fetched template several times (an overlay reads each run
//! of absent blocks separately; a template reads each mapping run separately), and a remote data
//! source must answer the *request* before the kernel's I/O timeout, not each piece. The
//! outermost scope on a thread records the start instant; nested scopes reuse it; sources read it
//! with [`RequestScope::started`] and measure their deadline from it.
//!
//! [`LayeredTemplate`](super::LayeredTemplate) enters a scope on every read, so one template read
//! is one request at least. A request dispatcher (the NBD layer) should enter one scope per
//! request so that everything the request does shares one deadline.

use std::cell::Cell;
use std::time::Instant;

thread_local! {
    static STARTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// A guard marking the request being served on this thread; see the module docs.
#[derive(Debug)]
#[must_use = "the scope ends when the guard is dropped"]
pub struct RequestScope {
    outermost: bool,
}

impl RequestScope {
    /// Enters a request scope (a no-op if one is already active on this thread).
    pub fn enter() -> Self {
        let outermost = STARTED.with(|s| {
            if s.get().is_none() {
                s.set(Some(Instant::now()));
                true
            } else {
                false
            }
        });
        RequestScope { outermost }
    }

    /// When the active request on this thread started, if any.
    pub fn started() -> Option<Instant> {
        STARTED.with(Cell::get)
    }
}

impl Drop for RequestScope {
    fn drop(&mut self) {
        if self.outermost {
            STARTED.with(|s| s.set(None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_scopes_share_the_outer_start() {
        assert!(RequestScope::started().is_none());
        let outer = RequestScope::enter();
        let t0 = RequestScope::started().unwrap();
        {
            let _inner = RequestScope::enter();
            std::thread::sleep(std::time::Duration::from_millis(2));
            assert_eq!(RequestScope::started(), Some(t0));
        }
        assert_eq!(RequestScope::started(), Some(t0));
        drop(outer);
        assert!(RequestScope::started().is_none());
        // Other threads have their own.
        let _s = RequestScope::enter();
        std::thread::spawn(|| assert!(RequestScope::started().is_none()))
            .join()
            .unwrap();
    }
}
