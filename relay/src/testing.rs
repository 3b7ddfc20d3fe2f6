//! Helpers the unit tests share.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Wake, Waker};

/// A waker that counts its wakes, for tests that poll a future by hand and check who woke it.
#[derive(Default)]
pub(crate) struct CountingWaker(AtomicUsize);

impl CountingWaker {
    /// A counter and a waker that adds to it.
    pub(crate) fn new() -> (Arc<CountingWaker>, Waker) {
        let wakes = Arc::new(CountingWaker::default());
        let waker = Waker::from(wakes.clone());
        (wakes, waker)
    }

    /// How many times it was woken.
    pub(crate) fn wakes(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
