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

use tokio::time::MissedTickBehavior;
use tracing::{info, warn};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::Shared;
use crate::dial::{BackendRequest, DialError, dial};
use crate::routing::Routing;

/// Starts the checkers of every upstream of `routing` that configures them.
pub(crate) fn spawn_checks(shared: &Arc<Shared>, routing: &Arc<Routing>) {
    for upstream in routing.routes.upstreams() {
        let Some(check) = upstream.health_check.clone() else {
            continue;
        };
        let shared = shared.clone();
        let routing = routing.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(check.interval.0);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let request = BackendRequest::health_probe();
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = routing.retired.cancelled() => return,
                    () = shared.shutdown.drain.cancelled() => return,
                }
                for backend in &upstream.backends {
                    let result = dial(backend, &request, routing.backend_ws, check.timeout.0).await;
                    let succeeded = match result {
                        Ok(mut leg) => {
                            let bye = CloseFrame {
                                code: CloseCode::Normal,
                                reason: "health check".into(),
                            };
                            let _ =
                                tokio::time::timeout(check.timeout.0, leg.socket.close(Some(bye)))
                                    .await;
                            true
                        }
                        Err(DialError::Refused { status, .. }) => status.as_u16() < 500,
                        Err(DialError::Unreachable { .. }) => false,
                    };
                    let Some(state) = routing.backends.get(&backend.original) else {
                        continue;
                    };
                    if let Some(healthy) = state.record(succeeded, upstream.health_thresholds()) {
                        shared
                            .metrics
                            .set_backend_healthy(&backend.original, healthy);
                        if healthy {
                            info!(backend = %backend, "backend healthy again; back in the ranking");
                        } else {
                            warn!(backend = %backend, "backend unhealthy; out of the ranking");
                        }
                    }
                }
            }
        });
    }
}
