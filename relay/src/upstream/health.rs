//! Active health checks (`health_check = { interval, timeout, unhealthy_after, healthy_after }`
//! on an upstream): every `interval`, each backend gets a WebSocket handshake to `/` with
//! `User-Agent: wsrelay-health-check`, closed at once with 1000. A 101, or an HTTP refusal below
//! 500 (the backend is up and answering, e.g. a 401 for a probe without credentials), is a
//! success; a connect failure, timeout or 5xx is a failure. `unhealthy_after` failures in a row
//! take a backend out of every ranking, so only its own clients move (rendezvous property);
//! `healthy_after` successes bring it back. Client dials count as passive results too.
//!
//! Checkers belong to one configuration generation and stop when a reload retires it.

use std::sync::Arc;

use futures_util::SinkExt;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};

use super::Upstream;
use super::book::BackendBook;
use super::dial::{DialError, dial};
use super::request::BackendRequest;

/// Starts the checkers of every upstream in `upstreams` that configures them; they record into
/// `book` and stop when `stop` is cancelled (a reload retired their generation, or the relay
/// drains).
pub(crate) fn spawn_checks(
    tasks: &TaskTracker,
    upstreams: &[Arc<Upstream>],
    book: &Arc<BackendBook>,
    socket: WebSocketConfig,
    stop: &CancellationToken,
) {
    for upstream in upstreams {
        if upstream.health_check.is_some() {
            tasks.spawn(check_upstream(
                upstream.clone(),
                book.clone(),
                socket,
                stop.clone(),
            ));
        }
    }
}

async fn check_upstream(
    upstream: Arc<Upstream>,
    book: Arc<BackendBook>,
    socket: WebSocketConfig,
    stop: CancellationToken,
) {
    let Some(check) = upstream.health_check.clone() else {
        return;
    };
    let mut ticker = tokio::time::interval(check.interval.0);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let request = BackendRequest::health_probe();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        for backend in &upstream.backends {
            let succeeded = match dial(
                backend,
                upstream.tls.as_deref(),
                &request,
                socket,
                check.timeout.0,
            )
            .await
            {
                Ok(dialed) => {
                    let bye = CloseFrame {
                        code: CloseCode::Normal,
                        reason: "health check".into(),
                    };
                    let mut socket = dialed.websocket();
                    let close = socket.send(Message::Close(Some(bye)));
                    let _ = tokio::time::timeout(check.timeout.0, close).await;
                    true
                }
                Err(DialError::Refused { status, .. }) => status.as_u16() < 500,
                Err(DialError::Unreachable { .. }) => false,
            };
            book.record(&backend.original, succeeded, upstream.health_thresholds());
        }
    }
}
