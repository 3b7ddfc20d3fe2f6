//! [`spawn_isolated`]: a piece of a test that runs apart from the test's own tasks, as a
//! separate process would.

use tokio::sync::oneshot;

/// A future running on a thread and runtime of its own (see [`spawn_isolated`]). Dropping it
/// stops that runtime, and with it every task the future spawned.
pub struct Isolated {
    _stop: oneshot::Sender<()>,
}

/// Runs the future `make` builds on a new thread with a single-threaded tokio runtime of its
/// own, until the future ends or the returned [`Isolated`] is dropped. Its work does not queue
/// behind the test's tasks (thousands of clients, say), as a server in another process
/// wouldn't; `make` runs on that thread, so the future need not be `Send`.
pub fn spawn_isolated<F>(make: impl FnOnce() -> F + Send + 'static) -> Isolated
where
    F: Future<Output = ()> + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            tokio::select! {
                () = make() => {}
                _ = stopped => {}
            }
        });
    });
    Isolated { _stop: stop }
}
