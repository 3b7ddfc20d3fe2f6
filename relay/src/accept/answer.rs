//! What one client request gets: `/healthz`, a static file (`static_dir`), a refusal, a mux
//! client's link, or a `101` (HTTP/1.1) or `200` (HTTP/2) with a session behind it. The backend
//! leg is opened before the client gets its answer, so the client sees the backend's own
//! refusal, and the subprotocol the backend picked.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, StatusCode, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::connect::{ClientRequest, route_client};
use super::http2::StreamGuard;
use super::outcome::{Answer, Outcome, text_response};
use super::upgrade::{self, Refusal};
use super::{Acceptor, ClientConnection, mux_client};
use crate::admission::NotAdmitted;
use crate::compress::negotiate;
use crate::config::{Compression, Mode};
use crate::headers;
use crate::session::ClientStart;
use crate::upstream::LINK_SUBPROTOCOL;

/// Answers one HTTP request of `connection`, HTTP/1.1 or HTTP/2 alike.
pub(super) async fn answer(
    acceptor: &Arc<Acceptor>,
    connection: &ClientConnection,
    deadline: Instant,
    mut request: Request<Incoming>,
) -> Answer {
    let http2 = request.version() == Version::HTTP_2;
    if http2 {
        let authority = request.uri().authority().cloned();
        headers::fold_http2_fields(authority.as_ref(), request.headers_mut());
    }
    let websocket = upgrade::wants_websocket(&request);
    if !websocket && request.uri().path() == "/healthz" {
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
    let generation = acceptor.sessions.generations.current();
    let per_ip = *generation.config.limits.max_connections_per_ip.get_ref();
    let peer = connection.peer;
    let claimed =
        connection
            .admission
            .claim(http2, websocket, &acceptor.admission, peer.ip(), per_ip);
    let slot = match claimed {
        Ok(slot) => slot,
        Err(refused) => {
            let (outcome, reason) = match refused {
                NotAdmitted::OverCapacity => (
                    Outcome::OverCapacity,
                    "too many connections (max_connections)",
                ),
                NotAdmitted::OverIpLimit => (
                    Outcome::OverIpLimit,
                    "too many connections from your address (max_connections_per_ip)",
                ),
            };
            // Over HTTP/1.1 every request of the connection would get the same answer; an
            // HTTP/2 connection's other streams may be admitted on their own.
            return Answer::refusal(outcome, retry_soon(reason, !http2));
        }
    };
    if let Some(files) = &acceptor.static_files
        && !websocket
    {
        let page = files
            .answer(request.method(), request.uri().path(), request.headers())
            .await;
        return Answer::new(Outcome::NotAHandshake, page);
    }
    let upgrade = match upgrade::check_upgrade(&request) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return Answer::refusal(Outcome::Refused, refusal),
    };
    let pace = &generation.config.limits.max_handshakes_per_second;
    if !acceptor
        .admission
        .handshake_allowed(*pace.get_ref(), std::time::Instant::now())
    {
        let reason = "too many new connections right now (max_handshakes_per_second)";
        return Answer::refusal(Outcome::OverHandshakeRate, retry_soon(reason, false));
    }
    let path = request.uri().path();
    let Some(route) = generation.routes.find(path) else {
        let refusal = Refusal::new(StatusCode::NOT_FOUND, format!("no route serves {path}"));
        return Answer::refusal(Outcome::Refused, refusal);
    };
    let headers = request.headers();
    if let Err(refusal) = upgrade::check_origin(headers, &generation.config.limits.allowed_origins)
    {
        return Answer::refusal(Outcome::Refused, refusal);
    }
    let (scheme, http) = (connection.scheme, if http2 { "2" } else { "1.1" });
    // An HTTP/2 connection stays open while the WebSocket it carries lives. An HTTP/1.1 one
    // is the WebSocket's own socket from the upgrade on: nothing to count.
    let open = http2.then(|| connection.streams.open());
    if route.mode == Mode::Mux
        && headers::has_token(headers, &header::SEC_WEBSOCKET_PROTOCOL, LINK_SUBPROTOCOL)
    {
        // A mux client: the relay is the other end of its link, and routes each stream.
        let response =
            upgrade::websocket_accepted(&upgrade, Some(HeaderValue::from_static(LINK_SUBPROTOCOL)));
        let on_upgrade = hyper::upgrade::on(&mut request);
        let link = mux_client::serve(acceptor.clone(), on_upgrade, peer, scheme, http, slot);
        acceptor.tasks.spawn(holding(open, link));
        return Answer::new(Outcome::MuxClient, response);
    }
    // The backend leg never sees the client's offer (`Sec-WebSocket-Extensions` is not
    // forwarded): compression is the client leg's alone.
    let agreed = match route.compression {
        Compression::Off => None,
        Compression::Client => negotiate::choose(
            request
                .headers()
                .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .map(HeaderValue::as_bytes),
        )
        .and_then(|agreed| {
            let value = HeaderValue::from_str(&agreed.header_value()).ok()?;
            Some((agreed, value))
        }),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let client = match agreed {
        None => ClientStart::Upgrade(on_upgrade),
        Some((agreed, _)) => ClientStart::Deflate(on_upgrade, agreed),
    };
    let client_request = ClientRequest {
        uri: request.uri(),
        headers: request.headers(),
        peer,
        scheme,
        http,
        deadline,
    };
    let pending = match route_client(acceptor, &generation, route, client_request).await {
        Ok(prepared) => prepared,
        Err(answer) => return answer,
    };
    let mut response = upgrade::websocket_accepted(&upgrade, pending.protocol.clone());
    if let Some((_, value)) = agreed {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_EXTENSIONS, value);
    }
    let session = pending.run(acceptor.sessions.clone(), client, (slot, open));
    // Boxed, as the connection's task: the session's future is the largest the relay spawns.
    let session = Box::pin(session);
    acceptor.tasks.spawn(session);
    Answer::new(Outcome::Upgraded, response)
}

/// Runs `task` with `stream` counted open until it ends.
async fn holding(stream: Option<StreamGuard>, task: impl Future<Output = ()>) {
    task.await;
    drop(stream);
}

/// A 503 that asks the client to retry in a second; `close` also ends the connection, whose
/// every request would get the same answer.
fn retry_soon(reason: &str, close: bool) -> Refusal {
    let mut refusal = Refusal::new(StatusCode::SERVICE_UNAVAILABLE, reason);
    refusal.headers = vec![(header::RETRY_AFTER, HeaderValue::from_static("1"))];
    if close {
        refusal
            .headers
            .push((header::CONNECTION, HeaderValue::from_static("close")));
    }
    refusal
}
