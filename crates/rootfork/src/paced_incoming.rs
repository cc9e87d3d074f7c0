//! Accept loops that pause after a failed accept. A listener whose accept fails for want of
//! file descriptors (`EMFILE`, `ENFILE`) stays readable with the connection still queued, so an
//! accept loop that retries at once spins a core and floods the log, and takes the CPU the
//! daemon needs to free descriptors. [`PacedIncoming`] wraps a stream of accepted connections
//! (the API's and the metrics endpoint's): after a failure it waits, doubling from
//! [`PAUSE_MIN`] to [`PAUSE_MAX`], and logs at most once a second.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio_stream::Stream;

/// The first pause after a failed accept.
pub const PAUSE_MIN: Duration = Duration::from_millis(10);
/// The longest pause after failed accepts.
pub const PAUSE_MAX: Duration = Duration::from_secs(1);

/// A stream of accepted connections that never yields an accept error: it logs it, pauses, and
/// accepts again.
pub struct PacedIncoming<S> {
    inner: S,
    what: &'static str,
    pause: Duration,
    sleeping: Option<Pin<Box<tokio::time::Sleep>>>,
    last_log: Option<Instant>,
    failures: u64,
}

impl<S> PacedIncoming<S> {
    /// Paces `inner`, the listener of `what` (named in the log).
    pub fn new(what: &'static str, inner: S) -> PacedIncoming<S> {
        PacedIncoming {
            inner,
            what,
            pause: Duration::ZERO,
            sleeping: None,
            last_log: None,
            failures: 0,
        }
    }

    /// Accept failures so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    fn failed(&mut self, e: &io::Error) -> Duration {
        self.failures += 1;
        self.pause = (self.pause * 2).clamp(PAUSE_MIN, PAUSE_MAX);
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last_log = Some(Instant::now());
            tracing::warn!(
                listener = self.what,
                pause = ?self.pause,
                failures = self.failures,
                "accept failed: {e}; pausing accepts"
            );
        }
        self.pause
    }
}

impl<S, T> Stream for PacedIncoming<S>
where
    S: Stream<Item = io::Result<T>> + Unpin,
{
    type Item = io::Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(sleep) = &mut this.sleeping {
                ready!(sleep.as_mut().poll(cx));
                this.sleeping = None;
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(conn)) => {
                    this.pause = Duration::ZERO;
                    return Poll::Ready(Some(Ok(conn)));
                }
                Some(Err(e)) => {
                    let pause = this.failed(&e);
                    this.sleeping = Some(Box::pin(tokio::time::sleep(pause)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    #[tokio::test]
    async fn errors_are_not_yielded_and_each_one_pauses_longer() {
        let items = vec![Err(emfile()), Err(emfile()), Err(emfile()), Ok(7), Ok(8)];
        let mut s = PacedIncoming::new("test", tokio_stream::iter(items));
        let t = Instant::now();
        assert_eq!(s.next().await.unwrap().unwrap(), 7);
        // 10 + 20 + 40 ms of pauses before the first connection.
        assert!(
            t.elapsed() >= Duration::from_millis(70),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(s.failures(), 3);
        // A success resets the pause.
        assert_eq!(s.pause, Duration::ZERO);
        assert_eq!(s.next().await.unwrap().unwrap(), 8);
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn the_pause_stops_growing_at_its_maximum() {
        let mut s = PacedIncoming::new("test", tokio_stream::iter(Vec::<io::Result<u8>>::new()));
        for _ in 0..20 {
            s.failed(&emfile());
        }
        assert_eq!(s.pause, PAUSE_MAX);
    }
}
