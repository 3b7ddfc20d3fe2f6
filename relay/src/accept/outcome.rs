//! What a client's handshake ended with: the HTTP answer, and the [`Outcome`] that names it
//! for metrics and logs (two 503s for different reasons count apart).

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use tracing::{debug, warn};

use super::upgrade::Refusal;
use crate::observe::Metrics;
use crate::upstream::{BackendRefusal, Upstream};

/// How a client's handshake ended, as metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Upgraded to a session.
    Upgraded,
    /// Upgraded to a mux client's link.
    MuxClient,
    /// The relay refused the request itself (malformed, wrong version, Origin, no route).
    Refused,
    /// `max_connections` reached.
    OverCapacity,
    /// `max_connections_per_ip` reached by the client's address.
    OverIpLimit,
    /// `max_handshakes_per_second` reached.
    OverHandshakeRate,
    /// No backend of the upstream may take clients (unhealthy or draining).
    NoHealthyBackend,
    /// None of those that may could be reached.
    NoBackend,
    /// No backend answered before the client's `handshake_timeout`.
    BackendTimeout,
    /// The backend answered with a status of its own, passed on.
    BackendRefused,
    /// Not a handshake (`/healthz`, a static file): not counted.
    NotAHandshake,
}

impl Outcome {
    /// The `outcome` label of `wsrelay_handshakes_total`.
    pub fn label(self) -> Option<&'static str> {
        Some(match self {
            Outcome::Upgraded => "upgraded",
            Outcome::MuxClient => "mux_client",
            Outcome::Refused => "refused",
            Outcome::OverCapacity => "over_capacity",
            Outcome::OverIpLimit => "over_ip_limit",
            Outcome::OverHandshakeRate => "over_handshake_rate",
            Outcome::NoHealthyBackend => "no_healthy_backend",
            Outcome::NoBackend => "no_backend",
            Outcome::BackendTimeout => "backend_timeout",
            Outcome::BackendRefused => "backend_refused",
            Outcome::NotAHandshake => return None,
        })
    }
}

/// A response and the outcome it stands for.
pub(crate) struct Answer {
    outcome: Outcome,
    response: Response<Full<Bytes>>,
}

impl Answer {
    pub(super) fn new(outcome: Outcome, response: Response<Full<Bytes>>) -> Answer {
        Answer { outcome, response }
    }

    /// The relay's own refusal.
    pub(super) fn refusal(outcome: Outcome, refusal: Refusal) -> Answer {
        debug!(outcome = outcome.label().unwrap_or("none"), status = %refusal.status, reason = %refusal.reason, "refused a request");
        let mut response = text_response(refusal.status, refusal.reason + "\n");
        response.headers_mut().extend(refusal.headers);
        Answer::new(outcome, response)
    }

    /// The backend's refusal, as it answered.
    pub(super) fn from_backend(refusal: BackendRefusal) -> Answer {
        let mut response = Response::new(Full::new(refusal.body));
        *response.status_mut() = refusal.status;
        *response.headers_mut() = refusal.headers;
        Answer::new(Outcome::BackendRefused, response)
    }

    /// The response, counted in the handshake metrics by its outcome.
    pub fn counted(self, metrics: &Metrics) -> Response<Full<Bytes>> {
        if let Some(label) = self.outcome.label() {
            metrics.handshake(label, self.response.status().as_u16());
        }
        self.response
    }

    /// The status and body text, for a mux client's `Reject`.
    pub fn into_status_and_text(self) -> (u16, String) {
        use http_body_util::BodyExt;
        let status = self.response.status().as_u16();
        let body = self.response.into_body();
        // A `Full` body is ready at once.
        let bytes = futures_util::FutureExt::now_or_never(body.collect())
            .and_then(Result::ok)
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&bytes).trim().to_owned())
    }
}

/// 503 with `Retry-After`: no backend may take clients (unhealthy, draining), so clients
/// should retry rather than give up.
pub(super) fn no_healthy_backend(upstream: &Upstream) -> Answer {
    let message = if upstream.backends.is_empty() {
        // Only a `discover` upstream can have none: its name has not resolved yet.
        warn!(upstream = %upstream.name, "no backend discovered yet");
        format!(
            "upstream {:?} has no backends yet: its DNS name has not resolved; retry later",
            upstream.name
        )
    } else {
        warn!(upstream = %upstream.name, "no healthy backend");
        format!(
            "no backend of upstream {:?} is healthy; retry later",
            upstream.name
        )
    };
    let mut refusal = Refusal::new(StatusCode::SERVICE_UNAVAILABLE, message);
    refusal.headers = vec![(header::RETRY_AFTER, HeaderValue::from_static("5"))];
    Answer::refusal(Outcome::NoHealthyBackend, refusal)
}

/// 504: the client's `handshake_timeout` ran out while backends were being tried (they
/// accept connections but answer slowly, or not at all).
pub(super) fn backend_timed_out(upstream: &Upstream) -> Answer {
    warn!(upstream = %upstream.name, "no backend answered within handshake_timeout");
    Answer::refusal(
        Outcome::BackendTimeout,
        Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no backend of upstream {:?} answered within handshake_timeout",
                upstream.name
            ),
        ),
    )
}

/// 502: the backends that may take clients could not be reached.
pub(super) fn no_backend_reachable(upstream: &Upstream) -> Answer {
    warn!(upstream = %upstream.name, "no backend reachable");
    Answer::refusal(
        Outcome::NoBackend,
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            format!("no backend of upstream {:?} is reachable", upstream.name),
        ),
    )
}

pub(super) fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
