//! Graceful drain: the signals every task watches, and how closes are spread over the grace
//! period so a fleet of clients does not reconnect all at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

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
}
