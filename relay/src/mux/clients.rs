//! Mux clients: a client that connects to a mux route offering the `wsrelay.mux` subprotocol
//! (the SDK's `MuxClient`) opens many logical streams, each with its own URL path, over one
//! socket. The relay is the accepting end of that link and routes every stream by its path, to
//! any route (per-client or mux), exactly as if it were a WebSocket of its own.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::WebSocketStream;
use tracing::{Instrument, debug, info, warn};
use tungstenite::protocol::Role;
use wsrelay_protocol::{IncomingStream, Link, LinkConfig, LinkRole, max_message_len};

use super::pool::link_config;
use crate::Shared;
use crate::leg::StreamLeg;
use crate::listener::prepare_session;
use crate::session::{self, ClientStart};

/// Streams one mux client may have open at once; more are rejected with 503.
const MAX_STREAMS_PER_CLIENT: usize = 1024;

/// Runs a mux client's link until it ends, routing each stream it opens.
pub(crate) async fn serve_mux_client(
    shared: Arc<Shared>,
    on_upgrade: OnUpgrade,
    peer: SocketAddr,
    scheme: &'static str,
    _slot: Option<OwnedSemaphorePermit>,
) {
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    let routing = shared.routing();
    let config = LinkConfig {
        max_streams: MAX_STREAMS_PER_CLIENT,
        ..link_config(&routing)
    };
    let mut socket_config = routing.client_ws;
    let largest = max_message_len(config.max_frame);
    socket_config.max_message_size = Some(largest);
    socket_config.max_frame_size = Some(largest);
    let socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(socket_config))
            .await;
    let (link, driver) = match Link::establish(socket, LinkRole::Acceptor, config).await {
        Ok(established) => established,
        Err(error) => {
            debug!(%peer, %error, "mux client link failed to start");
            return;
        }
    };
    info!(%peer, "mux client link up");
    tokio::pin!(driver);
    let window = u64::from(link.params().send_initial_window);
    let ended = loop {
        tokio::select! {
            ended = &mut driver => break ended,
            incoming = link.accept() => {
                let Some(incoming) = incoming else { continue };
                let task = route_stream(shared.clone(), incoming, window, peer, scheme);
                shared.tasks.spawn(task);
            }
            () = shared.shutdown.drain.cancelled() => {
                link.go_away("relay shutting down");
                tokio::select! {
                    ended = &mut driver => break ended,
                    () = shared.shutdown.abort.cancelled() => return,
                }
            }
        }
    };
    info!(%peer, reason = %ended, "mux client link ended");
}

/// Routes one stream like a client of its own: refuse it, or accept it with the backend's
/// subprotocol and run its session.
async fn route_stream(
    shared: Arc<Shared>,
    incoming: IncomingStream,
    window: u64,
    peer: SocketAddr,
    scheme: &'static str,
) {
    let routing = shared.routing();
    let target = if incoming.query.is_empty() {
        incoming.path.clone()
    } else {
        format!("{}?{}", incoming.path, incoming.query)
    };
    let Ok(uri) = target.parse::<Uri>() else {
        incoming.reject(400, "invalid path");
        return;
    };
    let Some(route) = routing.routes.find(uri.path()) else {
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
    match prepare_session(&shared, &routing, route, &uri, &headers, peer, scheme).await {
        Ok((span, pending)) => {
            let protocol = pending
                .protocol
                .as_ref()
                .and_then(|p| p.to_str().ok())
                .map(str::to_owned);
            let stream = StreamLeg::new(incoming.accept(protocol), window);
            let start = pending.with_client(ClientStart::Stream(stream), None);
            session::run(start).instrument(span).await;
        }
        Err(response) => {
            let status = response.status().as_u16();
            let body = match response.into_body().collect().await {
                Ok(collected) => String::from_utf8_lossy(&collected.to_bytes())
                    .trim()
                    .to_owned(),
                Err(_) => String::new(),
            };
            warn!(%peer, path = %uri.path(), status, "mux client stream refused");
            incoming.reject(status, &body);
        }
    }
}
