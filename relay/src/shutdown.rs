//! Graceful drain: the signals every task watches, and how closes are spread over the grace
//! period so a fleet of clients does not reconnect all at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio_util::sync::CancellationToken;

/// The three stages of stopping, each a token that tasks watch.
#[derive(Debug, Default)]
pub struct Shutdown {
    /// Stop accepting new connections.
    pub stop_accepting: CancellationToken,
    /// Close established sessions with 1001, spread over the grace period.
    pub drain: CancellationToken,
    /// The grace period is over: drop whatever is left.
    pub abort: CancellationToken,
    /// [`Shutdown::abort`] as a flag, which every session reads at each wakeup (a token's
    /// state is behind a lock every session would share).
    aborted: AtomicBool,
}

impl Shutdown {
    /// Ends the grace period: cancels [`Shutdown::abort`]. The sessions themselves are woken
    /// by whoever holds them (the registry's walk), as they wait on no token.
    pub fn abort_now(&self) {
        self.aborted.store(true, Ordering::Release);
        self.abort.cancel();
    }

    /// True once [`Shutdown::abort_now`] ran.
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }
}

/// Runs `work` to its end, or forever once the grace period is over: for the rare steps of a
/// session (its start, a move, its closing) that wait outside its pump, whose wakeup the abort
/// must not miss. [`UntilAborted`] around the session then drops it.
pub async fn or_aborted<F: Future>(work: F, shutdown: &Shutdown) -> F::Output {
    tokio::select! {
        output = work => output,
        () = shutdown.abort.cancelled() => std::future::pending().await,
    }
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
    /// `work` run until it ends or the grace period is over, holding `held` (a connection's
    /// slot, its count of open streams) until then. A struct rather than an `async fn`: an
    /// async function keeps its arguments beside the future it awaits, so wrapping a session
    /// that way would double the memory every client holds for as long as it stays.
    ///
    /// It waits on no token: it reads [`Shutdown::is_aborted`] whenever the task wakes, and
    /// `work` sees to the wakeup (a session's pump through its registry entry, its rarer steps
    /// through [`or_aborted`]).
    #[must_use = "futures do nothing unless polled"]
    pub struct UntilAborted<F, H> {
        #[pin]
        work: F,
        shutdown: Arc<Shutdown>,
        held: H,
    }
}

/// Runs `work` until it ends or `shutdown` aborts, and drops `held` then.
pub fn until_aborted<F: Future<Output = ()>, H>(
    work: F,
    shutdown: Arc<Shutdown>,
    held: H,
) -> UntilAborted<F, H> {
    UntilAborted {
        work,
        shutdown,
        held,
    }
}

impl<F: Future<Output = ()>, H> Future for UntilAborted<F, H> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.shutdown.is_aborted() {
            tracing::debug!("dropped at the end of the grace period");
            return Poll::Ready(());
        }
        if this.work.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // Read again once `work` waits: an abort that came meanwhile may have woken nobody
        // (its walk of the registry came before `work` registered there).
        if this.shutdown.is_aborted() {
            tracing::debug!("dropped at the end of the grace period");
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::CountingWaker;

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

    /// Work waiting in one of a session's rare steps is woken by the abort, and the session
    /// then ends and lets go of what it held.
    #[tokio::test]
    async fn aborted_work_is_woken_stops_and_lets_go_of_what_it_held() {
        let shutdown = Arc::new(Shutdown::default());
        let held = Arc::new(());
        let waiting = shutdown.clone();
        let work = async move { or_aborted(std::future::pending::<()>(), &waiting).await };
        let mut until = Box::pin(until_aborted(work, shutdown.clone(), held.clone()));
        let (wakes, waker) = CountingWaker::new();
        let mut cx = Context::from_waker(&waker);
        assert!(until.as_mut().poll(&mut cx).is_pending());
        shutdown.abort_now();
        assert_eq!(wakes.wakes(), 1, "the abort woke nobody");
        assert!(until.as_mut().poll(&mut cx).is_ready());
        drop(until);
        assert_eq!(Arc::strong_count(&held), 1, "still held");
    }

    #[test]
    fn an_abort_that_came_while_the_work_ran_ends_it_without_a_wakeup() {
        let shutdown = Arc::new(Shutdown::default());
        let aborting = shutdown.clone();
        // The work registers nowhere: only the read after it ran can see the abort.
        let work = std::future::poll_fn(move |_| {
            aborting.abort_now();
            Poll::<()>::Pending
        });
        let mut until = std::pin::pin!(until_aborted(work, shutdown, ()));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(until.as_mut().poll(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn work_that_ends_ends_the_future() {
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let work = async move { flag.store(true, Ordering::Relaxed) };
        until_aborted(work, Arc::new(Shutdown::default()), ()).await;
        assert!(ran.load(Ordering::Relaxed));
    }
}
