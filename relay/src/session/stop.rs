//! What stops a session's pump from outside: the relay's drain, its backend drained or
//! removed (after the grace period), the admin closing it. All three arrive as bits in the
//! session's registry entry ([`StopRequest`]), so waiting for them costs a session one word
//! of its future, not a waiter in three queues.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

use crate::observe::{SessionEntry, StopListener, StopRequest};
use crate::pump::PumpEnd;

/// Completes with the [`PumpEnd`] of the first stop raised on `entry`; a drained backend's
/// after `grace`. Polled at every wakeup of the pump, it costs a load and a waker comparison
/// while nothing is raised.
///
/// Either way it keeps the pump's waker in the entry, which is how the end of the grace
/// period ([`StopRequest::Abort`]) reaches a session in its pump.
pub(super) struct StopRequested {
    entry: Arc<SessionEntry>,
    listener: StopListener,
    waiting: Waiting,
}

/// What a [`StopRequested`] ends the pump for.
enum Waiting {
    /// Any stop raised on the entry; a drained backend's after `grace`, timed by `grace_over`
    /// once the drain is seen (boxed, as most sessions never need it).
    Requests {
        grace: Duration,
        grace_over: Option<Pin<Box<Sleep>>>,
    },
    /// This session's turn to close in a drain, and nothing else: it is closing already.
    DrainTurn(Pin<Box<Sleep>>),
}

impl StopRequested {
    /// Watches `entry`'s stop requests.
    pub fn new(entry: Arc<SessionEntry>, grace: Duration) -> StopRequested {
        StopRequested {
            entry,
            listener: StopListener::default(),
            waiting: Waiting::Requests {
                grace,
                grace_over: None,
            },
        }
    }

    /// Ends the pump with [`PumpEnd::Drain`] after `delay`, the session's turn in a drain.
    pub fn drain_turn(entry: Arc<SessionEntry>, delay: Duration) -> StopRequested {
        StopRequested {
            entry,
            listener: StopListener::default(),
            waiting: Waiting::DrainTurn(Box::pin(tokio::time::sleep(delay))),
        }
    }
}

impl Future for StopRequested {
    type Output = PumpEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PumpEnd> {
        let this = self.get_mut();
        let stops = this.entry.poll_stops(cx, &mut this.listener);
        let (grace, grace_over) = match &mut this.waiting {
            Waiting::DrainTurn(turn) => return turn.as_mut().poll(cx).map(|()| PumpEnd::Drain),
            Waiting::Requests { grace, grace_over } => (*grace, grace_over),
        };
        if stops.has(StopRequest::Drain) {
            return Poll::Ready(PumpEnd::Drain);
        }
        if stops.has(StopRequest::Close)
            && let Some((code, reason)) = this.entry.close_request()
        {
            return Poll::Ready(PumpEnd::ClosedByAdmin(code, reason));
        }
        if stops.has(StopRequest::BackendDrained) {
            let grace_over = grace_over.get_or_insert_with(|| Box::pin(tokio::time::sleep(grace)));
            if grace_over.as_mut().poll(cx).is_ready() {
                return Poll::Ready(PumpEnd::BackendDrained);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::CountingWaker;

    fn entry() -> Arc<SessionEntry> {
        Arc::new(SessionEntry::new(
            7,
            "127.0.0.1:1".parse().unwrap(),
            "1.1",
            "/".into(),
            "/".into(),
            crate::config::Mode::PerClient,
            "ws://a".into(),
        ))
    }

    fn poll_once(stop: &mut StopRequested) -> Poll<PumpEnd> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(stop).poll(&mut cx)
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_ends_the_pump_with_its_reason() {
        let session = entry();
        let mut stop = StopRequested::new(session.clone(), Duration::from_secs(5));
        assert!(poll_once(&mut stop).is_pending());
        session.request_close(4000, "bye".into());
        assert!(matches!(
            poll_once(&mut stop),
            Poll::Ready(PumpEnd::ClosedByAdmin(4000, ref reason)) if reason == "bye"
        ));
        session.raise(StopRequest::Drain);
        assert!(matches!(poll_once(&mut stop), Poll::Ready(PumpEnd::Drain)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drained_backend_stops_the_pump_after_the_grace_period() {
        let session = entry();
        let grace = Duration::from_secs(5);
        session.backend_drained("ws://other");
        let mut stop = StopRequested::new(session.clone(), grace);
        assert!(poll_once(&mut stop).is_pending(), "another backend's drain");
        session.backend_drained("ws://a");
        let started = tokio::time::Instant::now();
        assert!(matches!(stop.await, PumpEnd::BackendDrained));
        assert!(started.elapsed() >= grace, "ended before the grace");
    }

    #[test]
    fn a_move_clears_the_old_backends_drain() {
        let session = entry();
        session.backend_drained("ws://a");
        session.set_backend("ws://b".into());
        let mut stop = StopRequested::new(session.clone(), Duration::from_secs(5));
        assert!(poll_once(&mut stop).is_pending());
    }

    /// A drain after a drained backend must not wait out the backend's grace: the first raise
    /// took the waker to wake the pump, and the pump has to give it again.
    #[tokio::test(start_paused = true)]
    async fn a_drain_during_a_drained_backends_grace_wakes_the_pump() {
        let session = entry();
        let (wakes, waker) = CountingWaker::new();
        let mut cx = Context::from_waker(&waker);
        let mut stop = StopRequested::new(session.clone(), Duration::from_secs(3_600));
        assert!(Pin::new(&mut stop).poll(&mut cx).is_pending());
        session.backend_drained("ws://a");
        assert_eq!(wakes.wakes(), 1);
        assert!(
            Pin::new(&mut stop).poll(&mut cx).is_pending(),
            "in the grace"
        );
        session.raise(StopRequest::Drain);
        assert_eq!(wakes.wakes(), 2, "the drain woke nobody");
        assert!(matches!(
            Pin::new(&mut stop).poll(&mut cx),
            Poll::Ready(PumpEnd::Drain)
        ));
    }

    /// A session waiting for its turn in a drain ends at its turn, ignores the other requests
    /// (it is closing already), and is still woken by a raise: the abort at the grace period's
    /// end reaches it that way.
    #[tokio::test(start_paused = true)]
    async fn a_drains_turn_ends_the_pump_at_the_turn_and_keeps_the_waker() {
        let session = entry();
        let (wakes, waker) = CountingWaker::new();
        let mut cx = Context::from_waker(&waker);
        let turn = Duration::from_secs(2);
        let started = tokio::time::Instant::now();
        let mut stop = StopRequested::drain_turn(session.clone(), turn);
        assert!(Pin::new(&mut stop).poll(&mut cx).is_pending());
        session.request_close(4000, "bye".into());
        assert_eq!(wakes.wakes(), 1);
        assert!(
            Pin::new(&mut stop).poll(&mut cx).is_pending(),
            "an admin close during the turn"
        );
        session.raise(StopRequest::Abort);
        assert_eq!(wakes.wakes(), 2, "the abort woke nobody");
        assert!(matches!(stop.await, PumpEnd::Drain));
        assert!(started.elapsed() >= turn, "ended before its turn");
    }

    #[tokio::test]
    async fn a_raise_wakes_the_waiting_pump() {
        let session = entry();
        let stop = StopRequested::new(session.clone(), Duration::from_secs(5));
        let waiting = tokio::spawn(stop);
        tokio::task::yield_now().await;
        session.raise(StopRequest::Drain);
        let end = tokio::time::timeout(Duration::from_secs(10), waiting).await;
        assert!(matches!(end, Ok(Ok(PumpEnd::Drain))));
    }
}
