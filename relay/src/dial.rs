//! Re-originating a client's conversation: the request the backend sees (DESIGN 4.3) and the
//! walk down the client's backend ranking until one answers.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tungstenite::handshake::client::{generate_key, generate_request};
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::config::BackendUrl;
use crate::handshake::header_has_token;

/// The backend leg of a session.
pub type BackendSocket = WebSocketStream<TcpStream>;

/// Everything needed to open (and re-open) a client's backend leg.
#[derive(Debug, Clone)]
pub struct BackendRequest {
    /// Path and query exactly as the client sent them.
    pub path_and_query: String,
    /// The client's `Host`, sent on when `preserve_host` is set.
    pub client_host: Option<HeaderValue>,
    /// End-to-end headers to send, `X-Forwarded-*` and `X-Relay-Conn-Id` included.
    pub headers: HeaderMap,
    /// Send the client's Host rather than the backend's authority.
    pub preserve_host: bool,
}

/// Headers that describe one hop only; they are not forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authenticate",
];

fn is_hop_by_hop(name: &HeaderName, connection_tokens: &HeaderMap) -> bool {
    let name = name.as_str();
    HOP_BY_HOP.contains(&name)
        || name.starts_with("proxy-")
        || header_has_token(connection_tokens, &header::CONNECTION, name)
}

impl BackendRequest {
    /// Builds the backend request of DESIGN 4.3 from the client's request.
    pub fn from_client(
        uri: &Uri,
        client_headers: &HeaderMap,
        client_addr: SocketAddr,
        conn_id: u64,
        preserve_host: bool,
        scheme: &str,
    ) -> BackendRequest {
        let mut headers = HeaderMap::with_capacity(client_headers.len() + 5);
        for (name, value) in client_headers {
            let websocket_own = matches!(
                name.as_str(),
                "sec-websocket-key"
                    | "sec-websocket-accept"
                    | "sec-websocket-extensions"
                    | "sec-websocket-version"
            );
            if websocket_own
                || name == header::HOST
                || name.as_str() == "x-forwarded-for"
                || is_hop_by_hop(name, client_headers)
            {
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        let client_ip = client_addr.ip().to_string();
        let forwarded_for = client_headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .chain(std::iter::once(client_ip.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let insert = |headers: &mut HeaderMap, name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        insert(&mut headers, "x-forwarded-for", &forwarded_for);
        insert(&mut headers, "x-forwarded-proto", scheme);
        if let Some(host) = client_headers.get(header::HOST) {
            headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
        }
        insert(&mut headers, "x-real-ip", &client_ip);
        insert(&mut headers, "x-relay-conn-id", &conn_id.to_string());
        BackendRequest {
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
            client_host: client_headers.get(header::HOST).cloned(),
            headers,
            preserve_host,
        }
    }

    /// The request of an active health check: `/` with `User-Agent: wsrelay-health-check`.
    pub fn health_probe() -> BackendRequest {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("wsrelay-health-check"),
        );
        BackendRequest {
            path_and_query: "/".into(),
            client_host: None,
            headers,
            preserve_host: false,
        }
    }

    /// The HTTP request for one backend, with a fresh `Sec-WebSocket-Key`.
    fn for_backend(&self, backend: &BackendUrl) -> Result<Request<()>, String> {
        let uri = format!(
            "ws://{}{}{}",
            backend.authority, backend.base_path, self.path_and_query
        );
        let mut request = Request::get(&uri)
            .body(())
            .map_err(|e| format!("bad backend URI {uri:?}: {e}"))?;
        let host = match (&self.client_host, self.preserve_host) {
            (Some(host), true) => host.clone(),
            _ => HeaderValue::from_str(&backend.authority)
                .map_err(|e| format!("bad backend authority: {e}"))?,
        };
        let headers = request.headers_mut();
        headers.clone_from(&self.headers);
        headers.insert(header::HOST, host);
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_str(&generate_key()).expect("base64 key"),
        );
        Ok(request)
    }
}

/// Why a backend did not become a client's backend leg.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect or the WebSocket handshake failed; the next backend in rank may do better.
    #[error("{url}: {reason}")]
    Unreachable {
        /// The backend tried.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The backend answered the handshake with an HTTP status: the client gets the same answer.
    #[error("{url}: answered the handshake with HTTP {status}")]
    Refused {
        /// The backend that answered.
        url: String,
        /// Its status.
        status: StatusCode,
        /// Its end-to-end headers.
        headers: HeaderMap,
        /// Its body, as far as it arrived with the headers.
        body: Vec<u8>,
    },
}

/// A backend leg that is open, and what the backend agreed to.
pub struct Dialed {
    /// The open WebSocket to the backend.
    pub socket: BackendSocket,
    /// The subprotocol the backend picked, if any.
    pub protocol: Option<HeaderValue>,
}

/// Opens a WebSocket to `backend` within `timeout` (connect plus handshake).
pub async fn dial(
    backend: &BackendUrl,
    request: &BackendRequest,
    config: WebSocketConfig,
    timeout: Duration,
) -> Result<Dialed, DialError> {
    let unreachable = |reason: String| DialError::Unreachable {
        url: backend.original.clone(),
        reason,
    };
    let http_request = request.for_backend(backend).map_err(unreachable)?;
    let attempt = async {
        let tcp = TcpStream::connect(&backend.authority)
            .await
            .map_err(|e| unreachable(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        // Boxed: the handshake's buffers would otherwise live in every session's future.
        Box::pin(client_handshake(
            tcp,
            http_request,
            config,
            &backend.original,
        ))
        .await
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| unreachable(format!("no handshake within {timeout:?}")))?
}

/// Largest backend response head (status line and headers) accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Largest refusal body passed on to the client.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// The client side of the opening handshake (RFC 6455 section 4.1), done here rather than by
/// tungstenite because a relay must accept what tungstenite's client refuses: a backend may
/// pick none of the offered subprotocols, and its refusal (status, headers, body) goes back to
/// the client as it was.
async fn client_handshake(
    mut tcp: TcpStream,
    request: Request<()>,
    config: WebSocketConfig,
    url: &str,
) -> Result<Dialed, DialError> {
    let unreachable = |reason: String| DialError::Unreachable {
        url: url.to_owned(),
        reason,
    };
    let offered: Vec<String> = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let (bytes, key) = generate_request(request)
        .map_err(|e| unreachable(format!("build the handshake request: {e}")))?;
    tcp.write_all(&bytes)
        .await
        .map_err(|e| unreachable(format!("send the handshake: {e}")))?;

    let mut buffer = Vec::with_capacity(1024);
    let (head_len, status, headers) = loop {
        let mut chunk = vec![0u8; 4096];
        let read = tcp
            .read(&mut chunk)
            .await
            .map_err(|e| unreachable(format!("read the handshake answer: {e}")))?;
        if read == 0 {
            return Err(unreachable(
                "closed the connection during the handshake".into(),
            ));
        }
        buffer.extend_from_slice(&chunk[..read]);
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut slots);
        match response.parse(&buffer) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response
                    .code
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .ok_or_else(|| unreachable("answered with an invalid status".into()))?;
                let mut headers = HeaderMap::new();
                for parsed in response.headers.iter() {
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(parsed.name.as_bytes()),
                        HeaderValue::from_bytes(parsed.value),
                    ) {
                        headers.append(name, value);
                    }
                }
                break (head_len, status, headers);
            }
            Ok(httparse::Status::Partial) if buffer.len() < MAX_RESPONSE_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(unreachable(
                    "answered with an oversized response head".into(),
                ));
            }
            Err(e) => return Err(unreachable(format!("answered with malformed HTTP: {e}"))),
        }
    };
    let leftover = buffer.split_off(head_len);

    if status != StatusCode::SWITCHING_PROTOCOLS {
        let body = read_refusal_body(&mut tcp, leftover, &headers).await;
        let mut headers = headers;
        strip_for_client(&mut headers);
        return Err(DialError::Refused {
            url: url.to_owned(),
            status,
            headers,
            body,
        });
    }
    if !header_has_token(&headers, &header::UPGRADE, "websocket")
        || !header_has_token(&headers, &header::CONNECTION, "upgrade")
    {
        return Err(unreachable(
            "answered 101 without Upgrade: websocket".into(),
        ));
    }
    let expected_accept = derive_accept_key(key.as_bytes());
    if headers
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(HeaderValue::as_bytes)
        != Some(expected_accept.as_bytes())
    {
        return Err(unreachable(
            "answered with a wrong Sec-WebSocket-Accept".into(),
        ));
    }
    if headers.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        return Err(unreachable("negotiated an extension nobody offered".into()));
    }
    let protocol = headers.get(header::SEC_WEBSOCKET_PROTOCOL).cloned();
    if let Some(picked) = &protocol {
        let picked = picked.to_str().unwrap_or_default();
        if !offered.iter().any(|o| o == picked) {
            return Err(unreachable(format!(
                "picked subprotocol {picked:?}, which the client did not offer"
            )));
        }
    }
    let socket =
        WebSocketStream::from_partially_read(tcp, leftover, Role::Client, Some(config)).await;
    Ok(Dialed { socket, protocol })
}

/// The body of a refusal, as far as it arrives promptly: up to its `Content-Length` (at most
/// [`MAX_REFUSAL_BODY`]; without one, what came with the head), reading on for at most 500 ms.
async fn read_refusal_body(tcp: &mut TcpStream, mut body: Vec<u8>, headers: &HeaderMap) -> Vec<u8> {
    let wanted = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(body.len())
        .min(MAX_REFUSAL_BODY);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while body.len() < wanted {
        let mut chunk = vec![0u8; 4096];
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Ok(Ok(read)) if read > 0 => body.extend_from_slice(&chunk[..read]),
            _ => break,
        }
    }
    body.truncate(wanted);
    body
}

/// Removes what must not travel from a backend's refusal to the client.
fn strip_for_client(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            is_hop_by_hop(name, &HeaderMap::new())
                || name.as_str().starts_with("sec-websocket-")
                || *name == header::CONTENT_LENGTH
        })
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers() {
        let mut client = HeaderMap::new();
        client.insert("host", HeaderValue::from_static("chat.example:8080"));
        client.insert(
            "connection",
            HeaderValue::from_static("Upgrade, X-Secret-Hop"),
        );
        client.insert("upgrade", HeaderValue::from_static("websocket"));
        client.insert("x-secret-hop", HeaderValue::from_static("1"));
        client.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        client.insert("proxy-authorization", HeaderValue::from_static("x"));
        client.insert(
            "sec-websocket-key",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        client.insert(
            "sec-websocket-extensions",
            HeaderValue::from_static("permessage-deflate"),
        );
        client.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("chat, superchat"),
        );
        client.insert("cookie", HeaderValue::from_static("sid=1"));
        client.insert("authorization", HeaderValue::from_static("Bearer t"));
        client.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        client.insert("x-custom", HeaderValue::from_static("kept"));
        let uri: Uri = "/chat/room?x=1".parse().unwrap();
        let addr: SocketAddr = "10.0.0.9:4444".parse().unwrap();
        let request = BackendRequest::from_client(&uri, &client, addr, 42, true, "http");
        let backend = BackendUrl::parse("ws://127.0.0.1:9001").unwrap();
        let http = request.for_backend(&backend).unwrap();
        let h = http.headers();
        assert_eq!(http.uri(), "ws://127.0.0.1:9001/chat/room?x=1");
        assert_eq!(h["host"], "chat.example:8080");
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "chat.example:8080");
        assert_eq!(h["x-real-ip"], "10.0.0.9");
        assert_eq!(h["x-relay-conn-id"], "42");
        assert_eq!(h["sec-websocket-protocol"], "chat, superchat");
        assert_eq!(h["cookie"], "sid=1");
        assert_eq!(h["authorization"], "Bearer t");
        assert_eq!(h["x-custom"], "kept");
        assert_eq!(h["connection"], "Upgrade");
        assert_ne!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        for gone in [
            "x-secret-hop",
            "keep-alive",
            "proxy-authorization",
            "sec-websocket-extensions",
        ] {
            assert!(!h.contains_key(gone), "{gone} was forwarded");
        }
        let plain = BackendRequest::from_client(&uri, &client, addr, 42, false, "http");
        let backend = BackendUrl::parse("ws://127.0.0.1:9001/base").unwrap();
        let http = plain.for_backend(&backend).unwrap();
        assert_eq!(http.headers()["host"], "127.0.0.1:9001");
        assert_eq!(http.uri(), "ws://127.0.0.1:9001/base/chat/room?x=1");
    }
}
