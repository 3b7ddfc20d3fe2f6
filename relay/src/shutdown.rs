//! Graceful drain: the signals every task watches, and how closes are spread over the grace
//! period so a fleet of clients does not reconnect all at once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::woken::WhenWoken;

/// The three stages of stopping, each a token that tasks watch.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop accepting new connections.
    pub stop_accepting: CancellationToken,
    /// Close established sessions with 1001, spread over the grace period.
    pub drain: CancellationToken,
    /// The grace period is over: drop whatever is left.
    pub abort: CancellationToken,
}

/// How long after the drain starts this connection is closed: spread over a window that grows
/// with the number of open connections (about 500 closes a second) but never past half the
/// grace period, leaving the other half for close handshakes.
pub fn close_delay(conn_id: u64, open_connections: usize, grace: Duration) -> Duration {
    let window = (Duration::from_millis(2) * open_connections.min(1 << 20) as u32).min(grace / 2);
    // A fixed mix of the id, so neighbours in id order land far apart in the window.
    let position = xxhash_rust::xxh3::xxh3_64(&conn_id.to_le_bytes()) % 1_000;
    window.mul_f64(position as f64 / 1_000.0)
}

pin_project! {
    /// `work` run until it ends or `abort` is cancelled, holding `held` (a connection's slot, its
    /// count of open streams) until then. A struct rather than an `async fn`: an async function
    /// keeps its arguments beside the future it awaits, so wrapping a session that way would
    /// double the memory every client holds for as long as it stays.
    #[must_use = "futures do nothing unless polled"]
    pub struct UntilAborted<F, H> {
        #[pin]
        work: F,
        #[pin]
        abort: WhenWoken<WaitForCancellationFutureOwned>,
        held: H,
    }
}

/// Runs `work` until it ends or `abort` is cancelled, and drops `held` then.
pub fn until_aborted<F: Future<Output = ()>, H>(
    work: F,
    abort: CancellationToken,
    held: H,
) -> UntilAborted<F, H> {
    UntilAborted {
        work,
        abort: WhenWoken::new(abort.cancelled_owned()),
        held,
    }
}

impl<F: Future<Output = ()>, H> Future for UntilAborted<F, H> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.abort.poll(cx).is_ready() {
            tracing::debug!("dropped at the end of the grace period");
            return Poll::Ready(());
        }
        this.work.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_half_the_grace() {
        let grace = Duration::from_secs(30);
        for id in 0..1_000 {
            assert!(close_delay(id, 100_000, grace) <= grace / 2);
        }
        assert!(close_delay(7, 1, grace) <= Duration::from_millis(2));
        let spread: std::collections::BTreeSet<_> = (0..100)
            .map(|id| close_delay(id, 10_000, grace).as_millis() / 1000)
            .collect();
        assert!(spread.len() >= 10, "{spread:?}");
    }

    #[tokio::test]
    async fn aborted_work_stops_and_lets_go_of_what_it_held() {
        let abort = CancellationToken::new();
        let held = std::sync::Arc::new(());
        let work = until_aborted(std::future::pending(), abort.clone(), held.clone());
        let task = tokio::spawn(work);
        abort.cancel();
        task.await.unwrap();
        assert_eq!(std::sync::Arc::strong_count(&held), 1, "still held");
    }

    #[tokio::test]
    async fn work_that_ends_ends_the_future() {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let work = async move { flag.store(true, std::sync::atomic::Ordering::Relaxed) };
        until_aborted(work, CancellationToken::new(), ()).await;
        assert!(ran.load(std::sync::atomic::Ordering::Relaxed));
    }
}
