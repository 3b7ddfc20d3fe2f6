//! The client-facing listener: accept, limit, read the HTTP/1.1 request (hyper), answer or
//! upgrade. The backend leg is opened before the client gets its `101`, so the client sees the
//! backend's own refusal, and the subprotocol the backend picked.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Shared;
use crate::config::Mode;
use crate::dial::{BackendRequest, DialError, dial};
use crate::handshake::{self, Refusal};
use crate::leg::BackendLeg;
use crate::mux::{LINK_SUBPROTOCOL, serve_mux_client};
use crate::mux::{Opened, open_stream};
use crate::route::Route;
use crate::route::Upstream;
use crate::route::client_hash_key;
use crate::routing::Routing;
use crate::session::{self, ClientStart, PendingSession};

/// Largest request head hyper buffers; beyond it the client gets 431.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Accepts until the relay stops accepting.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let stop = shared.shutdown.stop_accepting.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Usually EMFILE: back off briefly instead of spinning on the error.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let permit = shared.connection_slots.clone().try_acquire_owned().ok();
        let conn_shared = shared.clone();
        shared
            .tasks
            .spawn(serve_connection(conn_shared, tcp, peer, permit));
    }
}

/// The connection slot of a client connection, handed to its session once it upgrades.
type Slot = Arc<Mutex<Option<OwnedSemaphorePermit>>>;

async fn serve_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
) {
    let timeout = shared.routing().config.server.handshake_timeout.0;
    let Some(tls) = shared.tls.clone() else {
        return serve_http(shared, tcp, peer, permit, "http").await;
    };
    // The TLS handshake is part of the client handshake and shares its deadline.
    let started = tokio::time::Instant::now();
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(timeout, tls.accept(tcp)) => accepted,
        () = shared.shutdown.drain.cancelled() => return,
    };
    match accepted {
        Ok(Ok(stream)) => {
            let left = timeout.saturating_sub(started.elapsed());
            serve_http_within(shared, stream, peer, permit, "https", left).await;
        }
        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => debug!(%peer, ?timeout, "TLS handshake timed out"),
    }
}

async fn serve_http<I>(
    shared: Arc<Shared>,
    io: I,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
    scheme: &'static str,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = shared.routing().config.server.handshake_timeout.0;
    serve_http_within(shared, io, peer, permit, scheme, timeout).await;
}

/// Serves HTTP/1.1 on a client connection until it upgrades or `timeout` passes.
async fn serve_http_within<I>(
    shared: Arc<Shared>,
    io: I,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
    scheme: &'static str,
    timeout: std::time::Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slot: Slot = Arc::new(Mutex::new(permit));
    let service_shared = shared.clone();
    let service = service_fn(move |request| {
        let shared = service_shared.clone();
        let slot = slot.clone();
        async move {
            let response = answer(&shared, peer, scheme, &slot, request).await;
            count_handshake(&shared, &response);
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::select! {
        served = tokio::time::timeout(timeout, connection) => match served {
            Ok(Ok(())) => {}
            Ok(Err(error)) => debug!(%peer, %error, "client HTTP connection failed"),
            Err(_) => debug!(%peer, ?timeout, "client handshake timed out"),
        },
        () = shared.shutdown.drain.cancelled() => {}
    }
}

/// Answers one HTTP request: a refusal, `/healthz`, or a `101` with a session behind it.
async fn answer(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    scheme: &'static str,
    slot: &Slot,
    mut request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let headers = request.headers();
    if !handshake::wants_websocket(headers) && request.uri().path() == "/healthz" {
        return if request.method() == http::Method::GET || request.method() == http::Method::HEAD {
            text_response(StatusCode::OK, "ok\n")
        } else {
            text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET /healthz\n")
        };
    }
    if slot.lock().expect("slot lock").is_none() {
        let mut response = refusal_response(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections (max_connections)",
        ));
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    let upgrade = match handshake::check_upgrade(&request) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return refusal_response(refusal),
    };
    let routing = shared.routing();
    let path = request.uri().path();
    let Some(route) = routing.routes.find(path) else {
        return refusal_response(Refusal::new(
            StatusCode::NOT_FOUND,
            format!("no route serves {path}"),
        ));
    };
    if let Err(refusal) = handshake::check_origin(headers, &routing.config.limits.allowed_origins) {
        return refusal_response(refusal);
    }

    let mux_client = route.mode == Mode::Mux
        && handshake::header_has_token(headers, &header::SEC_WEBSOCKET_PROTOCOL, LINK_SUBPROTOCOL);
    if mux_client {
        // A mux client: the relay is the other end of its link, and routes each stream.
        let mut response = handshake::switching_protocols(
            &upgrade,
            Some(HeaderValue::from_static(LINK_SUBPROTOCOL)),
        );
        let on_upgrade = hyper::upgrade::on(&mut request);
        let permit = slot.lock().expect("slot lock").take();
        let task = serve_mux_client(shared.clone(), on_upgrade, peer, scheme, permit);
        shared.tasks.spawn(task);
        response.extensions_mut().insert(MuxClientLink);
        return response;
    }
    let (span, start) = match prepare_session(
        shared,
        &routing,
        route,
        request.uri(),
        headers,
        peer,
        scheme,
    )
    .await
    {
        Ok(prepared) => prepared,
        Err(response) => return response,
    };
    let response = handshake::switching_protocols(&upgrade, start.protocol.clone());
    let client = ClientStart::Upgrade(hyper::upgrade::on(&mut request));
    let slot = slot.lock().expect("slot lock").take();
    shared
        .tasks
        .spawn(session::run(start.with_client(client, slot)).instrument(span));
    response
}

/// Marks the `101` of a mux client's link, which is not a session of its own.
#[derive(Debug, Clone, Copy)]
struct MuxClientLink;

/// Routes one client (an HTTP upgrade, or a stream a mux client opened) to its backend: hash
/// key, ranking, the backend leg (socket or stream). Returns the session to start once the
/// client side is known, in the span of its connection id, or the refusal for the client.
pub(crate) async fn prepare_session(
    shared: &Arc<Shared>,
    routing: &Arc<Routing>,
    route: &Route,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    peer: SocketAddr,
    scheme: &'static str,
) -> Result<(tracing::Span, PendingSession), Response<Full<Bytes>>> {
    let conn_id = shared
        .next_conn_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let span = info_span!("conn", id = conn_id);
    let path = uri.path();
    let hash_key = client_hash_key(&route.hash_key, headers, path, uri.query(), peer);
    let backend_request =
        BackendRequest::from_client(uri, headers, peer, conn_id, route.preserve_host, scheme);
    let upstream = route.upstream.clone();
    let ranked = upstream.ranking.rank(&hash_key);
    let connected = match route.mode {
        Mode::PerClient => {
            connect_socket(shared, routing, &upstream, &ranked, &backend_request, peer)
                .instrument(span.clone())
                .await
        }
        Mode::Mux => {
            connect_stream(routing, &upstream, &ranked, &backend_request, peer)
                .instrument(span.clone())
                .await
        }
    };
    let (backend_index, backend, protocol) = connected?;
    let pending = PendingSession {
        shared: shared.clone(),
        routing: routing.clone(),
        conn_id,
        peer,
        path: path.to_owned(),
        route_path: route.path.as_str().into(),
        route_inspectors: route.inspectors.clone(),
        route_sensitive: route.sensitive,
        upstream,
        hash_key,
        backend_index,
        backend,
        mode: route.mode,
        protocol,
        backend_request,
    };
    Ok((span, pending))
}

/// A backend leg ready for a session: the backend's index, the leg, the subprotocol it picked.
type Connected = (usize, BackendLeg, Option<HeaderValue>);

/// Per-client mode: dials the client's ranking in order until a backend takes the handshake.
async fn connect_socket(
    shared: &Shared,
    routing: &Routing,
    upstream: &Upstream,
    ranked: &[usize],
    backend_request: &BackendRequest,
    peer: SocketAddr,
) -> Result<Connected, Response<Full<Bytes>>> {
    let mut candidates = 0;
    for &index in ranked {
        let backend = &upstream.backends[index];
        if !routing.backends.accepts_new(&backend.original) {
            continue;
        }
        candidates += 1;
        let result = dial(
            backend,
            backend_request,
            routing.backend_ws,
            upstream.connect_timeout,
        )
        .await;
        // Passive health counts like a probe: an answer below 500 means the backend is up.
        let reached = match &result {
            Ok(_) => true,
            Err(DialError::Refused { status, .. }) => status.as_u16() < 500,
            Err(DialError::Unreachable { .. }) => false,
        };
        if let Some(state) = routing.backends.get(&backend.original)
            && let Some(healthy) = state.record(reached, upstream.health_thresholds())
        {
            shared
                .metrics
                .set_backend_healthy(&backend.original, healthy);
        }
        match result {
            Ok(leg) => return Ok((index, BackendLeg::Socket(leg.socket), leg.protocol)),
            Err(DialError::Refused {
                url,
                status,
                headers,
                body,
            }) => {
                info!(%peer, backend = %url, %status, "backend refused the client");
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                response.extensions_mut().insert(BackendRefusal);
                return Err(response);
            }
            Err(unreachable) => {
                warn!(%peer, error = %unreachable, "backend unreachable; trying the next");
            }
        }
    }
    Err(no_backend(upstream, candidates == 0))
}

/// Mux mode: opens a stream on the client's ranking in order until a backend accepts it.
async fn connect_stream(
    routing: &Routing,
    upstream: &Upstream,
    ranked: &[usize],
    backend_request: &BackendRequest,
    peer: SocketAddr,
) -> Result<Connected, Response<Full<Bytes>>> {
    match open_stream(
        routing,
        upstream,
        ranked,
        backend_request,
        peer,
        false,
        None,
    )
    .await
    {
        Opened::Stream(stream, index) => {
            let protocol = stream
                .protocol()
                .and_then(|p| HeaderValue::from_str(p).ok());
            Ok((index, BackendLeg::Stream(stream), protocol))
        }
        Opened::Rejected {
            index,
            status,
            reason,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            info!(%peer, backend = %upstream.backends[index], %status, "backend refused the client");
            let mut response = text_response(status, "");
            *response.body_mut() = Full::new(Bytes::from(reason + "\n"));
            response.extensions_mut().insert(BackendRefusal);
            Err(response)
        }
        Opened::NoCandidate => Err(no_backend(upstream, true)),
        Opened::Unreachable => Err(no_backend(upstream, false)),
    }
}

/// 503 with `Retry-After` when no backend may take clients (unhealthy, draining); 502 when
/// the ones that may could not be reached.
fn no_backend(upstream: &Upstream, none_healthy: bool) -> Response<Full<Bytes>> {
    if none_healthy {
        warn!(upstream = %upstream.name, "no healthy backend");
        let mut response = refusal_response(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no backend of upstream {:?} is healthy; retry later",
                upstream.name
            ),
        ));
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        response
    } else {
        warn!(upstream = %upstream.name, "no backend reachable");
        refusal_response(Refusal::new(
            StatusCode::BAD_GATEWAY,
            format!("no backend of upstream {:?} is reachable", upstream.name),
        ))
    }
}

/// Marks a response that is a backend's own refusal, for the handshake metrics.
#[derive(Debug, Clone, Copy)]
struct BackendRefusal;

fn count_handshake(shared: &Shared, response: &Response<Full<Bytes>>) {
    let status = response.status();
    if response.extensions().get::<MuxClientLink>().is_some() {
        shared.metrics.handshake("mux_client", status.as_u16());
        return;
    }
    let outcome = match status {
        StatusCode::SWITCHING_PROTOCOLS => "upgraded",
        StatusCode::OK | StatusCode::METHOD_NOT_ALLOWED => return,
        _ if response.extensions().get::<BackendRefusal>().is_some() => "backend_refused",
        StatusCode::BAD_GATEWAY => "no_backend",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "refused",
    };
    shared.metrics.handshake(outcome, status.as_u16());
}

fn text_response(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn refusal_response(refusal: Refusal) -> Response<Full<Bytes>> {
    debug!(status = %refusal.status, reason = %refusal.reason, "refused a request");
    let mut response = Response::new(Full::new(Bytes::from(refusal.reason + "\n")));
    *response.status_mut() = refusal.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    for (name, value) in refusal.headers {
        headers.insert(name, value);
    }
    response
}
