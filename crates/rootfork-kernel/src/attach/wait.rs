//! Waiting on sysfs without spinning: a bounded exponential backoff (1 ms doubling to 50 ms), and
//! a one-shot yield that marks each attach stage as a cancellation point.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some`, sleeping with backoff, for at most `limit`; `None` on
/// timeout. The first check is immediate.
pub(crate) async fn until<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A future that is pending exactly once (waking itself), so the task can be cancelled between
/// two stages of an attach.
pub(crate) struct YieldOnce(bool);

pub(crate) fn stage_boundary() -> YieldOnce {
    YieldOnce(false)
}

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}
