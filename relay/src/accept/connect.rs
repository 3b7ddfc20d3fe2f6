//! Routing one client to its backend, the same for an HTTP upgrade and for a stream a mux
//! client opened: hash key, ranking, the walk that opens the backend leg.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, Uri};
use tokio::time::Instant;

use super::Acceptor;
use super::outcome::{Answer, backend_timed_out, no_backend_reachable, no_healthy_backend};
use crate::generation::Generation;
use crate::route::{Route, client_hash_key};
use crate::session::PendingSession;
use crate::upstream::{BackendRequest, Walked};

/// What a client asked for, as routing needs it.
pub(super) struct ClientRequest<'a> {
    /// Path and query.
    pub uri: &'a Uri,
    /// Its headers.
    pub headers: &'a HeaderMap,
    /// Its address.
    pub peer: SocketAddr,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub scheme: &'static str,
    /// The HTTP version that carries it: `1.1` or `2`.
    pub http: &'static str,
    /// When its handshake must be answered.
    pub deadline: Instant,
}

/// Routes one client (an HTTP upgrade, or a stream a mux client opened) to its backend: hash
/// key, ranking, the backend leg. Returns the session to start once the client side is known,
/// or the answer for the client, before its deadline.
pub(super) async fn route_client(
    acceptor: &Acceptor,
    generation: &Arc<Generation>,
    route: &Arc<Route>,
    client: ClientRequest<'_>,
) -> Result<PendingSession, Answer> {
    let ClientRequest {
        uri,
        headers,
        peer,
        scheme,
        http,
        deadline,
    } = client;
    let conn_id = acceptor
        .next_conn_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = uri.path();
    let hash_key = client_hash_key(&route.hash_key, headers, path, uri.query(), peer);
    let request =
        BackendRequest::from_client(uri, headers, peer, conn_id, route.preserve_host, scheme);
    let upstream = &route.upstream;
    let ranked = upstream.ranking.rank(&hash_key);
    let walk = generation.walk(
        upstream,
        route.mode,
        &request,
        peer,
        conn_id,
        Some(deadline),
    );
    let walked = walk.run(&ranked, None).await;
    let (backend_index, backend, protocol) = match walked {
        Walked::Connected {
            index,
            leg,
            protocol,
        } => (index, leg, protocol),
        Walked::Refused { refusal } => return Err(Answer::from_backend(refusal)),
        Walked::NoCandidate => return Err(no_healthy_backend(upstream)),
        Walked::Unreachable => return Err(no_backend_reachable(upstream)),
        Walked::TimedOut => return Err(backend_timed_out(upstream)),
    };
    let pending = PendingSession {
        generation: generation.clone(),
        route: route.clone(),
        conn_id,
        peer,
        http,
        path: path.to_owned(),
        hash_key,
        backend_index,
        backend,
        protocol,
        request,
    };
    Ok(pending)
}
