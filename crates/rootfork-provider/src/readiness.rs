//! The readiness of a provider's device, shared between the background attach and `path()`.
//!
//! `start()` returns at once and leaves a background task to attach the device; that task
//! publishes the outcome here. [`Readiness::wait`] is what every `path()` is built on: it returns
//! as soon as the device is ready, the attach fails, the provider closes, the timeout passes or
//! the caller's cancel future completes — whichever comes first — and is itself cancel-safe
//! (dropping it has no effect on the attach).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{ProviderError, Result};

/// Where a device is in its life.
#[derive(Debug, Clone)]
pub enum State<D> {
    /// `start()` has not been called.
    Idle,
    /// The background attach is running.
    Attaching,
    /// The device is ready.
    Ready(D),
    /// The attach failed.
    Failed(Arc<ProviderError>),
    /// The provider has been closed.
    Closed,
}

/// A watch over a device's [`State`].
#[derive(Debug)]
pub struct Readiness<D> {
    tx: watch::Sender<State<D>>,
}

impl<D: Clone + Send + Sync + 'static> Default for Readiness<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: Clone + Send + Sync + 'static> Readiness<D> {
    /// A new watch in [`State::Idle`].
    pub fn new() -> Self {
        Readiness {
            tx: watch::channel(State::Idle).0,
        }
    }

    /// Begins a close: cancels an attach still in flight (the attach is cancellation-safe, so
    /// aborting it unwinds whatever it had set up), waits for it to stop and publishes `Closed`.
    /// Returns `false` when the provider was already closed and there is nothing left to do.
    pub async fn close_attach(&self, task: &mut Option<tokio::task::JoinHandle<()>>) -> bool {
        if matches!(self.current(), State::Closed) {
            return false;
        }
        if let Some(task) = task.take() {
            task.abort();
            let _ = task.await;
        }
        self.set(State::Closed);
        true
    }

    /// Publishes a new state.
    pub fn set(&self, state: State<D>) {
        self.tx.send_replace(state);
    }

    /// Publishes `Attaching` if idle; fails if the provider was already started or closed.
    pub fn begin(&self) -> Result<()> {
        let mut err = None;
        self.tx.send_if_modified(|s| match s {
            State::Idle => {
                *s = State::Attaching;
                true
            }
            State::Closed => {
                err = Some(ProviderError::Closed);
                false
            }
            _ => {
                err = Some(ProviderError::AlreadyStarted);
                false
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// The current state.
    pub fn current(&self) -> State<D> {
        self.tx.borrow().clone()
    }

    /// The ready device right now, or why there is none.
    pub fn ready_now(&self) -> Result<D> {
        match self.current() {
            State::Ready(d) => Ok(d),
            State::Idle => Err(ProviderError::NotStarted),
            State::Attaching => Err(ProviderError::NotReady),
            State::Failed(e) => Err(ProviderError::AttachFailed(e)),
            State::Closed => Err(ProviderError::Closed),
        }
    }

    /// Waits until the device is ready, up to `timeout`, or until `cancel` completes.
    pub async fn wait<C>(&self, timeout: Duration, cancel: C) -> Result<D>
    where
        C: Future<Output = ()> + Send,
    {
        let mut rx = self.tx.subscribe();
        let settled = async {
            loop {
                match &*rx.borrow_and_update() {
                    State::Ready(d) => return Ok(d.clone()),
                    State::Idle => return Err(ProviderError::NotStarted),
                    State::Failed(e) => return Err(ProviderError::AttachFailed(e.clone())),
                    State::Closed => return Err(ProviderError::Closed),
                    State::Attaching => {}
                }
                if rx.changed().await.is_err() {
                    return Err(ProviderError::Closed);
                }
            }
        };
        tokio::select! {
            biased;
            r = settled => r,
            () = cancel => Err(ProviderError::Cancelled),
            () = tokio::time::sleep(timeout) => Err(ProviderError::Timeout(timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_ready() {
        let r = Arc::new(Readiness::<u32>::new());
        r.begin().unwrap();
        let r2 = r.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            r2.set(State::Ready(7));
        });
        assert_eq!(
            r.wait(Duration::from_secs(10), std::future::pending())
                .await
                .unwrap(),
            7
        );
    }

    #[tokio::test]
    async fn times_out_and_cancels() {
        let r = Readiness::<u32>::new();
        r.begin().unwrap();
        assert!(matches!(
            r.wait(Duration::from_millis(10), std::future::pending())
                .await,
            Err(ProviderError::Timeout(_))
        ));
        assert!(matches!(
            r.wait(Duration::from_secs(10), async {}).await,
            Err(ProviderError::Cancelled)
        ));
    }

    #[tokio::test]
    async fn begin_twice_and_after_close_fail() {
        let r = Readiness::<u32>::new();
        assert!(matches!(
            r.wait(Duration::from_secs(1), std::future::pending()).await,
            Err(ProviderError::NotStarted)
        ));
        r.begin().unwrap();
        assert!(matches!(r.begin(), Err(ProviderError::AlreadyStarted)));
        r.set(State::Closed);
        assert!(matches!(r.begin(), Err(ProviderError::Closed)));
        assert!(matches!(
            r.wait(Duration::from_secs(1), std::future::pending()).await,
            Err(ProviderError::Closed)
        ));
    }

    #[tokio::test]
    async fn failure_reaches_every_waiter() {
        let r = Arc::new(Readiness::<u32>::new());
        r.begin().unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move {
                    r.wait(Duration::from_secs(10), std::future::pending())
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        r.set(State::Failed(Arc::new(ProviderError::NotStarted)));
        for w in waiters {
            assert!(matches!(
                w.await.unwrap(),
                Err(ProviderError::AttachFailed(_))
            ));
        }
    }
}
