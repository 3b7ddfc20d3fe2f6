//! HTTP/2 on the client listener (`[server] http2`, RFC 8441): which HTTP versions a connection
//! speaks, the HTTP/2 settings hyper serves with, the executor that keeps hyper's stream tasks
//! on the relay's task tracker, and the count of a connection's open streams that tells when an
//! HTTP/2 connection has gone idle.
//!
//! An HTTP/1.1 connection ends once it upgrades; an HTTP/2 connection carries its WebSockets as
//! streams and lives as long as they do, so it is closed (GOAWAY) only after it has carried
//! nothing for `handshake_timeout`, or when the relay drains.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tls::ALPN_H2;

/// Which HTTP versions one client connection is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocols {
    /// HTTP/1.1 alone: `http2` is off, or TLS agreed on `http/1.1`.
    Http1,
    /// Either, by the connection preface (h2c with prior knowledge, or TLS without ALPN).
    Detect,
    /// HTTP/2 alone: TLS agreed on `h2`.
    Http2,
}

impl Protocols {
    /// The versions for a connection, from `[server] http2` and the protocol TLS agreed on
    /// by ALPN (none for plain TCP).
    pub fn for_connection(http2: bool, alpn: Option<&[u8]>) -> Protocols {
        match (http2, alpn) {
            (false, _) => Protocols::Http1,
            (true, Some(ALPN_H2)) => Protocols::Http2,
            (true, Some(_)) => Protocols::Http1,
            (true, None) => Protocols::Detect,
        }
    }
}

/// Streams one HTTP/2 connection may have open at once (RFC 9113 asks for at least 100); a
/// client beyond it is refused the stream and may open another connection.
const MAX_CONCURRENT_STREAMS: u32 = 100;

/// Each stream's receive window: what a stalled WebSocket may leave buffered in the relay.
const STREAM_WINDOW: u32 = 64 * 1024;

/// The connection's receive window: enough that every stream can fill its own window at
/// once, so a few stalled WebSockets never stall the others on the same connection.
const CONNECTION_WINDOW: u32 = STREAM_WINDOW * MAX_CONCURRENT_STREAMS;

// RFC 9113 section 6.9.1: a window is at most 2^31 - 1.
const _: () = assert!(CONNECTION_WINDOW < 1 << 31);

/// Applies the relay's HTTP/2 settings: extended CONNECT on
/// (`SETTINGS_ENABLE_CONNECT_PROTOCOL = 1`), bounded streams, windows and request heads.
pub(super) fn configure(builder: &mut auto::Builder<TrackedExecutor>, max_request_head: usize) {
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(u32::try_from(max_request_head).unwrap_or(u32::MAX));
}

/// Runs the tasks hyper spawns for an HTTP/2 connection (one per request, one per upgraded
/// stream's sending side) on the relay's task tracker, so a shutdown waits for them, and ends
/// them when the grace period is over.
#[derive(Clone)]
pub(super) struct TrackedExecutor {
    /// The tracker of connection and session tasks.
    pub tasks: TaskTracker,
    /// Cancelled at the end of the grace period.
    pub abort: CancellationToken,
}

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        let abort = self.abort.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = future => {}
                () = abort.cancelled() => {}
            }
        });
    }
}

/// The requests of a client connection in flight and the WebSockets they became, counted.
#[derive(Clone)]
pub(super) struct OpenStreams(Arc<watch::Sender<usize>>);

/// One open stream of a connection, counted until dropped.
pub(super) struct StreamGuard(Arc<watch::Sender<usize>>);

impl OpenStreams {
    /// A connection with nothing open.
    pub fn new() -> OpenStreams {
        OpenStreams(Arc::new(watch::Sender::new(0)))
    }

    /// Counts one more open stream until the guard is dropped.
    pub fn open(&self) -> StreamGuard {
        self.0.send_modify(|open| *open += 1);
        StreamGuard(self.0.clone())
    }

    /// Completes once nothing has been open for `limit` in a row.
    pub async fn idle_for(&self, limit: Duration) {
        let mut open = self.0.subscribe();
        loop {
            if open.wait_for(|count| *count == 0).await.is_err() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(limit) => return,
                changed = open.changed() => if changed.is_err() { return },
            }
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.send_modify(|open| *open -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_and_the_key_choose_the_versions() {
        assert_eq!(Protocols::for_connection(false, None), Protocols::Http1);
        assert_eq!(
            Protocols::for_connection(false, Some(b"h2")),
            Protocols::Http1,
            "off means off"
        );
        assert_eq!(Protocols::for_connection(true, None), Protocols::Detect);
        assert_eq!(
            Protocols::for_connection(true, Some(b"h2")),
            Protocols::Http2
        );
        assert_eq!(
            Protocols::for_connection(true, Some(b"http/1.1")),
            Protocols::Http1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_stream_closing() {
        let streams = OpenStreams::new();
        let guard = streams.open();
        let idle = streams.idle_for(Duration::from_secs(10));
        tokio::pin!(idle);
        // Paused time jumps ahead while everything waits: a stream open for an hour is no idle.
        tokio::select! {
            () = &mut idle => panic!("idle while a stream is open"),
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
        let closed_at = tokio::time::Instant::now();
        drop(guard);
        idle.await;
        assert_eq!(closed_at.elapsed(), Duration::from_secs(10));
    }
}
