//! Bounded waits: a condition polled until it holds, a future given a deadline.

use std::time::Duration;

/// Upper bound for any single wait in a test; generous because the machine is shared.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `check` every 10 ms until it holds, failing the test after [`WAIT`] with `what`.
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `future`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for {what}"))
}

/// Runs `attempt` until it succeeds, 20 ms apart, and returns its value; fails the test with
/// `what` and the last error once [`WAIT`] has passed (e.g. while a link is still coming up).
pub async fn retry<T, E, F>(what: &str, mut attempt: impl FnMut() -> F) -> T
where
    E: std::fmt::Display,
    F: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) => {
                assert!(tokio::time::Instant::now() < deadline, "{what}: {error}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
