//! A future polled only after one of its own wakers fired.
//!
//! A session's task wakes for every message, but what ends it from outside (the end of the
//! grace period, its turn to close in a drain) happens once in its life. Polling those futures
//! at every wakeup cost a mutex or two each time (`CancellationToken` checks its waiter under a
//! lock; a timer re-registers): about 2.5% of the relay's CPU at 64-byte messages. [`WhenWoken`]
//! gives the inner future a waker of its own, which marks it woken before it wakes the task;
//! the task's other wakeups skip it for an atomic load and a waker comparison. It costs a
//! session one small allocation per wrapped future. (The stops raised on a session's registry
//! entry need no wrapper: they are a flag already.)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// What the inner future's waker and the wrapper share.
#[derive(Debug)]
struct Signal {
    /// The inner future asked to be polled; set at the start, so it is polled once.
    woken: AtomicBool,
    /// The task to wake on its behalf.
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

pin_project_lite::pin_project! {
    /// `inner`, polled with a waker of its own and only when that waker fired (and once at
    /// the start); every other poll returns `Pending` at once.
    #[must_use = "futures do nothing unless polled"]
    pub struct WhenWoken<F> {
        #[pin]
        inner: F,
        signal: Arc<Signal>,
        // The task waker last given to `signal`, to see without an atomic that it is current.
        registered: Option<Waker>,
    }
}

impl<F: Future> WhenWoken<F> {
    /// Wraps `inner`; it is polled at the first poll.
    pub fn new(inner: F) -> Self {
        WhenWoken {
            inner,
            signal: Arc::new(Signal {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
            registered: None,
        }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let current = this
            .registered
            .as_ref()
            .is_some_and(|registered| registered.will_wake(cx.waker()));
        // The common case, a wakeup for something else: a load and a pointer comparison. A
        // wake after the load finds the task's waker in `signal` and wakes it again.
        if current && !this.signal.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        // A wake takes the task's waker out of `signal`: it is given again before the inner
        // future is polled (which may wake it again), and whenever the task's waker changed.
        this.signal.task.register(cx.waker());
        if !current {
            *this.registered = Some(cx.waker().clone());
        }
        // Read after registering: a wake in between is seen now or wakes the task again.
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        // Made when needed rather than kept: every client's session holds one of these.
        let waker = Waker::from(this.signal.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// Counts the polls of a future that is ready once `ready` is set and its waker woken.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = &'static str;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<&'static str> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready("stopped");
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_inner_future_is_polled_at_the_start_and_after_its_waker_fired_only() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let inner_waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut future = Box::pin(WhenWoken::new(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: inner_waker.clone(),
        }));
        let task = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);

        assert!(future.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled at the start");
        for _ in 0..10 {
            assert!(future.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "other wakeups skip it");

        ready.store(true, Ordering::SeqCst);
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "its waker wakes the task");
        assert_eq!(future.as_mut().poll(&mut cx), Poll::Ready("stopped"));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cancellation_reaches_a_task_that_is_busy_with_other_wakeups() {
        let token = tokio_util::sync::CancellationToken::new();
        let stop = WhenWoken::new(token.clone().cancelled_owned());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let worker = tokio::spawn(async move {
            tokio::pin!(stop);
            let mut received = 0;
            loop {
                tokio::select! {
                    biased;
                    () = &mut stop => return received,
                    Some(_) = rx.recv() => received += 1,
                }
            }
        });
        for n in 0..100 {
            tx.send(n).await.unwrap();
        }
        token.cancel();
        let received = worker.await.unwrap();
        assert!(
            received >= 99,
            "it kept receiving until cancelled: {received}"
        );
    }
}
