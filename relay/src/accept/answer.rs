//! What one client request gets: `/healthz`, a refusal (with the [`Outcome`] that names it),
//! or a `101` with a session behind it. The backend leg is opened before the client gets its
//! `101`, so the client sees the backend's own refusal, and the subprotocol the backend picked.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use tracing::{Instrument, Span, debug, info_span, warn};

use super::upgrade::{self, Refusal};
use super::{Acceptor, Slot, mux_client};
use crate::config::Mode;
use crate::generation::Generation;
use crate::headers;
use crate::observe::Metrics;
use crate::route::{Route, client_hash_key};
use crate::session::{ClientStart, PendingSession};
use crate::upstream::{BackendRefusal, BackendRequest, LINK_SUBPROTOCOL, Upstream, Walked};

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
    /// No backend of the upstream may take clients (unhealthy or draining).
    NoHealthyBackend,
    /// None of those that may could be reached.
    NoBackend,
    /// The backend answered with a status of its own, passed on.
    BackendRefused,
    /// Not a handshake (`/healthz`): not counted.
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
            Outcome::NoHealthyBackend => "no_healthy_backend",
            Outcome::NoBackend => "no_backend",
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
    fn new(outcome: Outcome, response: Response<Full<Bytes>>) -> Answer {
        Answer { outcome, response }
    }

    /// The relay's own refusal.
    fn refusal(outcome: Outcome, refusal: Refusal) -> Answer {
        debug!(status = %refusal.status, reason = %refusal.reason, "refused a request");
        let mut response = text_response(refusal.status, refusal.reason + "\n");
        response.headers_mut().extend(refusal.headers);
        Answer::new(outcome, response)
    }

    /// The backend's refusal, as it answered.
    fn from_backend(refusal: BackendRefusal) -> Answer {
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

/// Answers one HTTP request.
pub(super) async fn answer(
    acceptor: &Arc<Acceptor>,
    peer: SocketAddr,
    scheme: &'static str,
    slot: &Slot,
    mut request: Request<Incoming>,
) -> Answer {
    let headers = request.headers();
    if !upgrade::wants_websocket(headers) && request.uri().path() == "/healthz" {
        let method = request.method();
        return Answer::new(
            Outcome::NotAHandshake,
            if method == http::Method::GET || method == http::Method::HEAD {
                text_response(StatusCode::OK, "ok\n".into())
            } else {
                text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET /healthz\n".into())
            },
        );
    }
    if slot.lock().expect("slot lock").is_none() {
        let mut refusal = Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections (max_connections)",
        );
        refusal.headers = vec![
            (header::CONNECTION, HeaderValue::from_static("close")),
            (header::RETRY_AFTER, HeaderValue::from_static("1")),
        ];
        return Answer::refusal(Outcome::OverCapacity, refusal);
    }
    let upgrade = match upgrade::check_upgrade(&request) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return Answer::refusal(Outcome::Refused, refusal),
    };
    let generation = acceptor.sessions.generations.current();
    let path = request.uri().path();
    let Some(route) = generation.routes.find(path) else {
        let refusal = Refusal::new(StatusCode::NOT_FOUND, format!("no route serves {path}"));
        return Answer::refusal(Outcome::Refused, refusal);
    };
    if let Err(refusal) = upgrade::check_origin(headers, &generation.config.limits.allowed_origins)
    {
        return Answer::refusal(Outcome::Refused, refusal);
    }
    if route.mode == Mode::Mux
        && headers::has_token(headers, &header::SEC_WEBSOCKET_PROTOCOL, LINK_SUBPROTOCOL)
    {
        // A mux client: the relay is the other end of its link, and routes each stream.
        let response = upgrade::switching_protocols(
            &upgrade,
            Some(HeaderValue::from_static(LINK_SUBPROTOCOL)),
        );
        let on_upgrade = hyper::upgrade::on(&mut request);
        let permit = slot.lock().expect("slot lock").take();
        let link = mux_client::serve(acceptor.clone(), on_upgrade, peer, scheme, permit);
        acceptor.tasks.spawn(link);
        return Answer::new(Outcome::MuxClient, response);
    }
    let client = ClientStart::Upgrade(hyper::upgrade::on(&mut request));
    let (span, pending) = match route_client(
        acceptor,
        &generation,
        route,
        request.uri(),
        request.headers(),
        peer,
        scheme,
    )
    .await
    {
        Ok(prepared) => prepared,
        Err(answer) => return answer,
    };
    let response = upgrade::switching_protocols(&upgrade, pending.protocol.clone());
    let slot = slot.lock().expect("slot lock").take();
    let session = pending.run(acceptor.sessions.clone(), client, slot);
    acceptor.tasks.spawn(session.instrument(span));
    Answer::new(Outcome::Upgraded, response)
}

/// Routes one client (an HTTP upgrade, or a stream a mux client opened) to its backend: hash
/// key, ranking, the backend leg. Returns the session to start once the client side is known,
/// in the span of its connection id, or the answer for the client.
pub(super) async fn route_client(
    acceptor: &Acceptor,
    generation: &Arc<Generation>,
    route: &Arc<Route>,
    uri: &Uri,
    headers: &HeaderMap,
    peer: SocketAddr,
    scheme: &'static str,
) -> Result<(Span, PendingSession), Answer> {
    let conn_id = acceptor
        .next_conn_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let span = info_span!("conn", id = conn_id);
    let path = uri.path();
    let hash_key = client_hash_key(&route.hash_key, headers, path, uri.query(), peer);
    let request =
        BackendRequest::from_client(uri, headers, peer, conn_id, route.preserve_host, scheme);
    let upstream = &route.upstream;
    let ranked = upstream.ranking.rank(&hash_key);
    let walk = generation.walk(upstream, route.mode, &request, peer);
    let walked = walk.run(&ranked, None).instrument(span.clone()).await;
    let (backend_index, backend, protocol) = match walked {
        Walked::Connected {
            index,
            leg,
            protocol,
        } => (index, leg, protocol),
        Walked::Refused { refusal } => return Err(Answer::from_backend(refusal)),
        Walked::NoCandidate => return Err(no_healthy_backend(upstream)),
        Walked::Unreachable => return Err(no_backend_reachable(upstream)),
    };
    let pending = PendingSession {
        generation: generation.clone(),
        route: route.clone(),
        conn_id,
        peer,
        path: path.to_owned(),
        hash_key,
        backend_index,
        backend,
        protocol,
        request,
    };
    Ok((span, pending))
}

/// 503 with `Retry-After`: no backend may take clients (unhealthy, draining), so clients
/// should retry rather than give up.
fn no_healthy_backend(upstream: &Upstream) -> Answer {
    warn!(upstream = %upstream.name, "no healthy backend");
    let mut refusal = Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "no backend of upstream {:?} is healthy; retry later",
            upstream.name
        ),
    );
    refusal.headers = vec![(header::RETRY_AFTER, HeaderValue::from_static("5"))];
    Answer::refusal(Outcome::NoHealthyBackend, refusal)
}

/// 502: the backends that may take clients could not be reached.
fn no_backend_reachable(upstream: &Upstream) -> Answer {
    warn!(upstream = %upstream.name, "no backend reachable");
    Answer::refusal(
        Outcome::NoBackend,
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            format!("no backend of upstream {:?} is reachable", upstream.name),
        ),
    )
}

fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
