//! The admin listener (`[server] admin`): health, readiness, Prometheus metrics, the
//! connections and backends API, backend drains, and the live tap. Bound to loopback unless a
//! bearer token (`admin_token`) protects it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

mod tap;

use crate::control::Shared;
use crate::observe::Figures;
use crate::route::query_value;

/// Serves the admin API until the grace period of a shutdown is over (it answers `/readyz`
/// with 503 during the drain).
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let stop = shared.shutdown().abort.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let shared = shared.clone();
        let tasks = shared.control.clone();
        tasks.spawn(async move {
            let service_shared = shared.clone();
            let service = service_fn(move |request| {
                let shared = service_shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, peer, request).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let connection = builder
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::select! {
                served = connection => if let Err(error) = served {
                    debug!(%peer, %error, "admin connection failed");
                },
                () = shared.shutdown().abort.cancelled() => {}
            }
        });
    }
}

async fn route(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let generation = shared.generations.current();
    if let Some(token) = &generation.config.server.admin_token {
        let expected = format!("Bearer {}", token.get_ref());
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if given != Some(expected.as_bytes()) {
            let mut response = text(StatusCode::UNAUTHORIZED, "admin token required\n");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    match (request.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readiness(shared),
        (&Method::GET, "/metrics") => {
            let mut response = text(StatusCode::OK, "");
            *response.body_mut() = Full::new(Bytes::from(metrics(shared)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (&Method::GET, "/api/connections") => {
            json(StatusCode::OK, &shared.observe().sessions.snapshot())
        }
        (&Method::GET, "/api/backends") => json(StatusCode::OK, &backends(shared)),
        (&Method::POST, "/api/backends/drain") => drain_backend(shared, &query),
        (&Method::POST, "/api/reload") => match shared.reload_from_file().await {
            Ok(report) => json(StatusCode::OK, &report),
            Err(error) => {
                warn!(%error, "reload refused; keeping the running configuration");
                let status = match error {
                    crate::control::ReloadError::NoFile => StatusCode::CONFLICT,
                    _ => StatusCode::BAD_REQUEST,
                };
                text(status, &format!("{error}\n"))
            }
        },
        (&Method::GET, "/api/tap") => tap::open(shared, peer, request, &query),
        (
            _,
            "/healthz" | "/readyz" | "/metrics" | "/api/connections" | "/api/backends" | "/api/tap",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        (_, "/api/backends/drain" | "/api/reload") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n")
        }
        (method, path) if path.starts_with("/api/connections/") => {
            let id = &path["/api/connections/".len()..];
            if method == Method::DELETE {
                close_connection(shared, id, &query)
            } else {
                text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "use DELETE to close a connection\n",
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "no such admin path\n"),
    }
}

fn readiness(shared: &Shared) -> Response<Full<Bytes>> {
    if shared.shutdown().drain.is_cancelled() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if !shared.generations.current().backends.any_ready() {
        text(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend\n")
    } else {
        text(StatusCode::OK, "ready\n")
    }
}

/// One row of `GET /api/backends`.
#[derive(Debug, Serialize)]
struct BackendRow {
    url: String,
    upstream: String,
    healthy: bool,
    draining: bool,
    connections: usize,
    links: usize,
}

fn backends(shared: &Shared) -> Vec<BackendRow> {
    let generation = shared.generations.current();
    // One walk of the registry for all rows, not one per backend.
    let census = shared.observe().sessions.census();
    let on = |url: &str| -> usize {
        let count: i64 = census
            .by_route
            .iter()
            .filter(|((_, backend), _)| &**backend == url)
            .map(|(_, n)| n)
            .sum();
        usize::try_from(count).unwrap_or(0)
    };
    generation
        .backends
        .iter()
        .map(|(url, state)| BackendRow {
            url: url.to_owned(),
            upstream: state.upstream.clone(),
            healthy: state.healthy(),
            draining: state.draining(),
            connections: on(url),
            links: generation.mux.live_links(&generation.upstreams, url),
        })
        .collect()
}

/// The Prometheus exposition: event counters as counted, and the state figures derived now
/// from the session registry and the current generation.
fn metrics(shared: &Shared) -> String {
    let observe = shared.observe();
    let generation = shared.generations.current();
    let census = observe.sessions.census();
    let mut connections = census.by_route;
    for route in generation.routes.iter() {
        for backend in &route.upstream.backends {
            let key = (route.path.clone(), backend.original.clone());
            connections.entry(key).or_insert(0);
        }
    }
    let mut mux_streams = census.mux_streams;
    let mut mux_links = Vec::new();
    for upstream in generation.routes.mux_upstreams() {
        for backend in &upstream.backends {
            let url = &backend.original;
            mux_streams.entry(url.clone()).or_insert(0);
            let live = generation.mux.live_links(&generation.upstreams, url);
            mux_links.push((url.to_string(), live as i64));
        }
    }
    let figures = Figures {
        connections: connections
            .into_iter()
            .map(|((route, backend), n)| (route.to_string(), backend.to_string(), n))
            .collect(),
        traffic: census.traffic,
        backend_healthy: generation
            .backends
            .iter()
            .map(|(url, state)| (url.to_owned(), state.healthy()))
            .collect(),
        mux_links,
        mux_streams: mux_streams
            .into_iter()
            .map(|(url, n)| (url.to_string(), n))
            .collect(),
        discovered: generation
            .discovered
            .iter()
            .map(|(upstream, backends)| (upstream.clone(), backends.len() as i64))
            .collect(),
    };
    observe.metrics.render(&figures)
}

/// `DELETE /api/connections/ID?code=4000&reason=...`: closes one connection, its client with
/// `code` (default 1000) and `reason`, its backend leg with 1001.
fn close_connection(shared: &Shared, id: &str, query: &str) -> Response<Full<Bytes>> {
    let Ok(id) = id.parse::<u64>() else {
        return text(
            StatusCode::BAD_REQUEST,
            "the connection id must be a number\n",
        );
    };
    let code = match query_value(query, "code").map(str::parse::<u16>) {
        None => 1000,
        Some(Ok(code)) if sendable_close_code(code) => code,
        Some(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "code must be a close code an endpoint may send: 1000-1003, 1007-1013 or 3000-4999\n",
            );
        }
    };
    let reason = query_value(query, "reason")
        .map(percent_decode)
        .unwrap_or_default();
    if reason.len() > 123 {
        return text(
            StatusCode::BAD_REQUEST,
            "reason must fit a close frame: at most 123 bytes\n",
        );
    }
    if shared.observe().sessions.close(id, code, reason.clone()) {
        info!(conn = id, code, %reason, "closing a connection for the admin");
        text(StatusCode::OK, "closing\n")
    } else {
        text(
            StatusCode::NOT_FOUND,
            "no open connection has that id; GET /api/connections lists them\n",
        )
    }
}

/// Close codes an endpoint may put in a Close frame (RFC 6455 section 7.4), as far as the
/// relay's WebSocket library sends and receives them.
fn sendable_close_code(code: u16) -> bool {
    tungstenite::protocol::frame::coding::CloseCode::from(code).is_allowed()
}

fn drain_backend(shared: &Shared, query: &str) -> Response<Full<Bytes>> {
    let Some(url) = query_value(query, "url").map(percent_decode) else {
        return text(
            StatusCode::BAD_REQUEST,
            "give the backend as ?url=ws://...\n",
        );
    };
    if shared.generations.current().backends.drain(&url) {
        shared.observe().sessions.backend_drained(&url);
        info!(backend = %url, grace = ?shared.generations.shutdown_grace(), "backend draining: no new clients; existing ones move after the grace period");
        text(StatusCode::OK, "draining\n")
    } else {
        text(StatusCode::NOT_FOUND, "no such backend\n")
    }
}

pub(super) fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).expect("admin rows serialize");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Decodes `%XX` escapes (query values such as `ws%3A%2F%2Fhost%3A1`); invalid escapes stay.
pub(super) fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[index], bytes.get(index + 1), bytes.get(index + 2)) {
            (b'%', Some(&high), Some(&low)) if hex(high).is_some() && hex(low).is_some() => {
                out.push((hex(high).unwrap() * 16 + hex(low).unwrap()) as u8);
                index += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                index += 1;
            }
            (byte, _, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn only_sendable_close_codes_are_taken() {
        for code in [1000, 1001, 1008, 1011, 1012, 3000, 4000, 4999] {
            assert!(super::sendable_close_code(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 2000, 5000] {
            assert!(!super::sendable_close_code(code), "{code}");
        }
    }

    #[test]
    fn decodes_query_values() {
        assert_eq!(
            percent_decode("ws%3A%2F%2F127.0.0.1%3A9001"),
            "ws://127.0.0.1:9001"
        );
        assert_eq!(percent_decode("%2Fchat"), "/chat");
        assert_eq!(percent_decode("50%"), "50%");
    }
}
