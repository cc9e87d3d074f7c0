//! [`Bridge`]: runs the async object store client on behalf of synchronous block reads.
//!
//! The store owns a dedicated multi-threaded Tokio runtime. A synchronous caller (an NBD worker
//! thread serving a read) spawns its future onto that runtime and waits on a plain channel for
//! the answer; it never calls `block_on`, so it cannot panic when called from inside another
//! runtime, and the runtime's workers never wait on themselves. (A caller that *is* an async
//! task should still go through `spawn_blocking`: waiting here parks its thread.)
//!
//! A call from one of the store's own runtime threads would park a worker that the fetch itself
//! may need, so it is refused with [`FetchError::StoreThread`] instead of risking a deadlock.
//!
//! On drop the runtime is shut down in the background, which is safe in any context.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::mpsc;

use tokio::runtime::{Builder, Handle, Runtime};

use crate::error::FetchError;

thread_local! {
    /// Set on the store runtime's own worker and blocking threads.
    static ON_STORE_RUNTIME: Cell<bool> = const { Cell::new(false) };
}

/// A dedicated runtime for object store I/O.
#[derive(Debug)]
pub struct Bridge {
    runtime: Option<Runtime>,
}

impl Bridge {
    /// Starts a runtime with `threads` worker threads.
    pub fn new(threads: usize) -> io::Result<Self> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("rootfork-store")
            .on_thread_start(|| ON_STORE_RUNTIME.with(|f| f.set(true)))
            .enable_all()
            .build()?;
        Ok(Bridge {
            runtime: Some(runtime),
        })
    }

    /// A handle to the runtime.
    pub fn handle(&self) -> &Handle {
        self.runtime
            .as_ref()
            .expect("runtime lives until drop")
            .handle()
    }

    /// Runs `fut` on the runtime and waits for its output on the calling thread.
    pub fn run<F>(&self, fut: F) -> Result<F::Output, FetchError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if ON_STORE_RUNTIME.with(Cell::get) {
            return Err(FetchError::StoreThread);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.handle().spawn(async move {
            // The receiver may be gone if the caller's thread died; nothing to do then.
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| FetchError::Shutdown)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_from_plain_and_async_threads() {
        let b = std::sync::Arc::new(Bridge::new(1).unwrap());
        assert_eq!(b.run(async { 41 + 1 }).unwrap(), 42);
        // From inside another runtime's blocking section: no nested block_on panic.
        let other = Builder::new_current_thread().enable_all().build().unwrap();
        let b2 = b.clone();
        let got = other.block_on(async move {
            tokio::task::spawn_blocking(move || b2.run(async { 7 }).unwrap())
                .await
                .unwrap()
        });
        assert_eq!(got, 7);
        // From the store's own runtime: refused, not deadlocked.
        let b3 = b.clone();
        let inner = b
            .run(async move {
                tokio::task::spawn_blocking(move || b3.run(async { 1 }))
                    .await
                    .unwrap()
            })
            .unwrap();
        assert_eq!(inner, Err(FetchError::StoreThread));
        // Dropping the bridge inside an async context does not panic.
        other.block_on(async move { drop(b) });
    }
}
