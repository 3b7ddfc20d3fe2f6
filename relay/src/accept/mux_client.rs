//! Mux clients: a client that connects to a mux route offering the `wsrelay.mux` subprotocol
//! (the SDK's `MuxClient`) opens many logical streams, each with its own URL path, over one
//! socket. The relay is the accepting end of that link and routes every stream by its path, to
//! any route (per-client or mux), exactly as if it were a WebSocket of its own.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn};
use tungstenite::protocol::Role;
use wsrelay_protocol::{IncomingStream, Link, LinkConfig, LinkRole};

use super::Acceptor;
use super::connect::{ClientRequest, route_client};
use crate::admission::ConnectionSlot;
use crate::pump::StreamLeg;
use crate::session::ClientStart;
use crate::upstream::link_socket_config;
use crate::websocket::WebSocket;

/// Streams one mux client may have open at once; more are rejected with 503.
const MAX_STREAMS_PER_CLIENT: usize = 1024;

/// Runs a mux client's link until it ends, routing each stream it opens. `_slot` is the
/// client's connection slot, held for the link's life; `http` is the HTTP version that
/// carries the link (`1.1`, or `2` for a link on an HTTP/2 stream).
pub(super) async fn serve(
    acceptor: Arc<Acceptor>,
    on_upgrade: OnUpgrade,
    peer: SocketAddr,
    scheme: &'static str,
    http: &'static str,
    _slot: Option<ConnectionSlot>,
) {
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    let generation = acceptor.sessions.generations.current();
    let config = LinkConfig {
        max_streams: MAX_STREAMS_PER_CLIENT,
        ..generation.mux.link_config().clone()
    };
    let socket_config = link_socket_config(generation.socket, &config);
    let socket = WebSocket::new(TokioIo::new(upgraded), Role::Server, &socket_config, &[]);
    let (link, driver) = match Link::establish(socket, LinkRole::Acceptor, config).await {
        Ok(established) => established,
        Err(error) => {
            debug!(%peer, %error, "mux client link failed to start");
            return;
        }
    };
    info!(%peer, "mux client link up");
    tokio::pin!(driver);
    let shutdown = acceptor.sessions.shutdown.clone();
    let ended = loop {
        tokio::select! {
            ended = &mut driver => break ended,
            incoming = link.accept() => {
                let Some(incoming) = incoming else { continue };
                let task = route_stream(acceptor.clone(), incoming, peer, scheme, http);
                acceptor.tasks.spawn(task);
            }
            () = shutdown.drain.cancelled() => {
                link.go_away("relay shutting down");
                tokio::select! {
                    ended = &mut driver => break ended,
                    () = shutdown.abort.cancelled() => return,
                }
            }
        }
    };
    info!(%peer, reason = %ended, "mux client link ended");
}

/// Routes one stream like a client of its own: refuse it, or accept it with the backend's
/// subprotocol and run its session.
async fn route_stream(
    acceptor: Arc<Acceptor>,
    incoming: IncomingStream,
    peer: SocketAddr,
    scheme: &'static str,
    http: &'static str,
) {
    let generation = acceptor.sessions.generations.current();
    let target = if incoming.query.is_empty() {
        incoming.path.clone()
    } else {
        format!("{}?{}", incoming.path, incoming.query)
    };
    let Ok(uri) = target.parse::<Uri>() else {
        incoming.reject(400, "invalid path");
        return;
    };
    let Some(route) = generation.routes.find(uri.path()) else {
        incoming.reject(404, &format!("no route serves {}", uri.path()));
        return;
    };
    let mut headers = HeaderMap::with_capacity(incoming.headers.len());
    for (name, value) in &incoming.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let deadline =
        tokio::time::Instant::now() + generation.config.server.handshake_timeout.get_ref().0;
    let request = ClientRequest {
        uri: &uri,
        headers: &headers,
        peer,
        scheme,
        http,
        deadline,
    };
    match route_client(&acceptor, &generation, route, request).await {
        Ok(pending) => {
            let protocol = pending
                .protocol
                .as_ref()
                .and_then(|p| p.to_str().ok())
                .map(str::to_owned);
            let stream = StreamLeg::new(incoming.accept(protocol));
            let session = pending.run(acceptor.sessions.clone(), ClientStart::Stream(stream), ());
            session.await;
        }
        Err(answer) => {
            let (status, body) = answer.into_status_and_text();
            warn!(%peer, path = %uri.path(), status, "mux client stream refused");
            incoming.reject(status, &body);
        }
    }
}
