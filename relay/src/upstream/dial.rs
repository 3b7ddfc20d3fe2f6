//! Opening a WebSocket to one backend: TCP connect, the client side of the opening handshake,
//! and the backend's refusal (status, headers, body) when it answers with something else.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tungstenite::handshake::client::generate_request;
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::{Role, WebSocketConfig};

use super::request::BackendRequest;
use crate::config::BackendUrl;
use crate::headers::{self, has_token as header_has_token};

/// The backend leg of a session.
pub type BackendSocket = WebSocketStream<TcpStream>;

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
            headers::is_hop_by_hop(name, &HeaderMap::new())
                || name.as_str().starts_with("sec-websocket-")
                || *name == header::CONTENT_LENGTH
        })
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}
