//! Opening a WebSocket to one backend: TCP connect, the client side of the opening handshake,
//! and the backend's refusal (status, headers, body) when it answers with something else.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tungstenite::protocol::WebSocketConfig;

pub(crate) use super::handshake::Dialed;
use super::handshake::{self, Failure, Refusal};
use super::request::BackendRequest;
use super::tls::BackendTls;
use crate::config::BackendUrl;
use crate::headers;
use crate::pump::BackendStream;

/// Why a backend did not become a client's backend leg.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect, TLS (an untrusted, expired or misnamed certificate, a client certificate
    /// the backend wants) or the WebSocket handshake failed; the next backend in rank may do
    /// better.
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
        /// Its body, decoded from its HTTP framing: at most 64 KiB, and what arrived within
        /// 500 ms (or the dial timeout) if it was slow or cut.
        body: Bytes,
    },
}

/// Opens a WebSocket to `backend` within `timeout` (connect, TLS for `wss://` with `tls`,
/// and the handshake).
pub async fn dial(
    backend: &BackendUrl,
    tls: Option<&BackendTls>,
    request: &BackendRequest,
    config: WebSocketConfig,
    timeout: Duration,
) -> Result<Dialed, DialError> {
    let unreachable = |reason: String| DialError::Unreachable {
        url: backend.original.to_string(),
        reason,
    };
    let http_request = request.for_backend(backend).map_err(unreachable)?;
    let too_late = || unreachable(format!("no handshake within {timeout:?}"));
    let deadline = Instant::now() + timeout;
    let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(&backend.authority))
        .await
        .map_err(|_| too_late())?
        .map_err(|e| unreachable(format!("connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let stream = match (backend.secure, tls) {
        (false, _) => BackendStream::Left(tcp),
        (true, Some(tls)) => tokio::time::timeout_at(deadline, tls.connect(tcp, backend))
            .await
            .map_err(|_| too_late())?
            .map(|tls| BackendStream::Right(Box::new(tls)))
            .map_err(unreachable)?,
        // Loading the configuration builds the settings of every upstream with a wss://
        // backend, so this is a bug, said rather than dialed in clear text.
        (true, None) => {
            return Err(unreachable(
                "no TLS settings for this wss:// backend".to_owned(),
            ));
        }
    };
    // Boxed: the handshake's buffers would otherwise live in every session's future.
    Box::pin(handshake::open(stream, http_request, config, deadline))
        .await
        .map_err(|failure| match failure {
            Failure::TimedOut => too_late(),
            Failure::Broken(reason) => unreachable(reason),
            Failure::Refused(Refusal {
                status,
                mut headers,
                body,
            }) => {
                strip_for_client(&mut headers);
                DialError::Refused {
                    url: backend.original.to_string(),
                    status,
                    headers,
                    body,
                }
            }
        })
}

/// Removes what must not travel from a backend's refusal to the client.
fn strip_for_client(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            headers::is_hop_by_hop(name, headers)
                || name.as_str().starts_with("sec-websocket-")
                || *name == header::CONTENT_LENGTH
        })
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}
