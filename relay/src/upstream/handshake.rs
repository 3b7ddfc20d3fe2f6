//! The client side of the opening handshake with a backend (RFC 6455 section 4.1), spoken over
//! hyper's HTTP/1.1 client connection so that a refusal's body arrives whole however the
//! backend frames it (sized, chunked or close-delimited).
//!
//! Done here rather than by tungstenite's client because a relay must accept what that client
//! refuses: a backend may pick none of the offered subprotocols, and its refusal (status,
//! headers, body) goes back to the client as it was.

use std::future::Future;
use std::pin::{Pin, pin};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Duration, Instant};
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::{Role, WebSocketConfig};

use super::tls;
use crate::headers::has_token as header_has_token;
use crate::pump::BackendStream;
use crate::websocket::WebSocket;

/// A backend connection whose handshake is done, and what the backend agreed to.
pub(crate) struct Dialed<S = BackendStream> {
    /// The upgraded connection.
    io: S,
    /// What the backend sent right behind its `101` (its first frames), read with it.
    read_ahead: Bytes,
    /// The limits and write batch the WebSocket gets.
    config: WebSocketConfig,
    /// The subprotocol the backend picked, if any.
    pub protocol: Option<HeaderValue>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Dialed<S> {
    /// The connection as the relay's own WebSocket: a leg of a session, or a mux link.
    pub fn websocket(self) -> WebSocket<S> {
        WebSocket::new(self.io, Role::Client, &self.config, &self.read_ahead)
    }
}

/// Largest backend response head (status line and headers) accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Most header lines accepted in a backend response head.
const MAX_RESPONSE_HEADERS: usize = 64;
/// Largest refusal body passed on to the client.
const MAX_REFUSAL_BODY: usize = 64 * 1024;
/// Longest wait for a refusal's body once its head has arrived: the client is waiting for an
/// answer, and a refusal is worth passing on even without all of its body.
const REFUSAL_BODY_WAIT: Duration = Duration::from_millis(500);

/// Why a handshake did not give a backend leg.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The deadline passed before the backend's answer (or the upgrade) was complete.
    TimedOut,
    /// The backend broke the protocol or the connection; says what failed.
    Broken(String),
    /// The backend answered with a status other than `101`.
    Refused(Refusal),
}

/// A backend's non-`101` answer, as received (headers not yet filtered for the client).
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The backend's status.
    pub(crate) status: StatusCode,
    /// The backend's response headers, all of them.
    pub(crate) headers: HeaderMap,
    /// The body, decoded from its HTTP framing; at most [`MAX_REFUSAL_BODY`] bytes of it, and
    /// what arrived in time if it was slow or cut.
    pub(crate) body: Bytes,
}

/// Performs the handshake of `request` over `io`, the dialed stream (TCP, or TLS over it; for
/// the fuzz target, bytes in memory). `request` goes out as it is: origin-form URI, `Host` and
/// `Sec-WebSocket-Key` set, headers in the order to send ([`BackendRequest::for_backend`]).
/// The head and the upgrade must arrive before `deadline`; a refusal's body is read until the
/// deadline or [`REFUSAL_BODY_WAIT`], whichever comes first, so a dial never outlasts its
/// deadline.
///
/// [`BackendRequest::for_backend`]: super::request::BackendRequest::for_backend
pub(crate) async fn open<S>(
    io: S,
    request: Request<()>,
    config: WebSocketConfig,
    deadline: Instant,
) -> Result<Dialed<S>, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let key = request
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Failure::Broken("the handshake request has no Sec-WebSocket-Key".into()))?
        .to_owned();
    let offered = offered_protocols(request.headers());
    let request = request.map(|()| Empty::<Bytes>::new());

    let (mut sender, connection) = http1::Builder::new()
        .max_header_size(MAX_RESPONSE_HEAD)
        .max_headers(MAX_RESPONSE_HEADERS)
        // Some backends still match the handshake's header names case-sensitively.
        .title_case_headers(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| Failure::Broken(describe("start the HTTP connection", &e)))?;
    let mut connection = Driven::new(connection.with_upgrades());

    let mut response =
        tokio::time::timeout_at(deadline, connection.run(sender.send_request(request)))
            .await
            .map_err(|_| Failure::TimedOut)?
            .map_err(|e| Failure::Broken(describe("read the handshake answer", &e)))?;
    let status = response.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let until = deadline.min(Instant::now() + REFUSAL_BODY_WAIT);
        let headers = std::mem::take(response.headers_mut());
        let body = read_body(&mut connection, response.into_body(), until).await;
        return Err(Failure::Refused(Refusal {
            status,
            headers,
            body,
        }));
    }
    let protocol = check_switching_protocols(status, response.headers(), &key, &offered)
        .map_err(Failure::Broken)?;

    let upgraded = tokio::time::timeout_at(deadline, connection.run(hyper::upgrade::on(response)))
        .await
        .map_err(|_| Failure::TimedOut)?
        .map_err(|e| Failure::Broken(describe("take over the upgraded connection", &e)))?;
    let parts = upgraded
        .downcast::<TokioIo<S>>()
        .map_err(|_| Failure::Broken("the upgraded connection is not the stream dialed".into()))?;
    Ok(Dialed {
        io: parts.io.into_inner(),
        read_ahead: parts.read_buf,
        config,
        protocol,
    })
}

/// The subprotocols a request offers, in order.
fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Checks a backend's `101` answer against what was asked; gives the subprotocol it picked.
///
/// The backend must upgrade to WebSocket, prove it read `key`, negotiate no extension (none is
/// offered), and pick either one of `offered` or nothing at all.
pub(crate) fn check_switching_protocols(
    status: StatusCode,
    headers: &HeaderMap,
    key: &str,
    offered: &[String],
) -> Result<Option<HeaderValue>, String> {
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!("answered {status} rather than 101"));
    }
    if !header_has_token(headers, &header::UPGRADE, "websocket")
        || !header_has_token(headers, &header::CONNECTION, "upgrade")
    {
        return Err("answered 101 without Upgrade: websocket".into());
    }
    let expected_accept = derive_accept_key(key.as_bytes());
    let accepts = headers.get_all(header::SEC_WEBSOCKET_ACCEPT);
    let mut accepts = accepts.iter();
    let single_accept = match (accepts.next(), accepts.next()) {
        (Some(accept), None) => Some(accept),
        _ => None,
    };
    if single_accept.map(HeaderValue::as_bytes) != Some(expected_accept.as_bytes()) {
        return Err("answered with a wrong Sec-WebSocket-Accept".into());
    }
    if headers.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        return Err("negotiated an extension nobody offered".into());
    }
    let mut picked = headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter();
    match (picked.next(), picked.next()) {
        (None, _) => Ok(None),
        (Some(protocol), None)
            if protocol
                .to_str()
                .is_ok_and(|p| offered.iter().any(|o| o == p)) =>
        {
            // Copied: the session keeps it, and a clone would hold hyper's read buffer.
            Ok(HeaderValue::from_bytes(protocol.as_bytes()).ok())
        }
        (Some(protocol), _) => Err(format!(
            "picked subprotocol {protocol:?}, which the client did not offer"
        )),
    }
}

/// Reads a refusal's body until its end, [`MAX_REFUSAL_BODY`] bytes, an error, or `until`;
/// keeps what arrived in every case, since a partial explanation beats none.
async fn read_body<C>(connection: &mut Driven<C>, mut body: Incoming, until: Instant) -> Bytes
where
    C: Future<Output = hyper::Result<()>>,
{
    let mut kept = BytesMut::new();
    let read = async {
        while kept.len() < MAX_REFUSAL_BODY {
            let Some(Ok(frame)) = body.frame().await else {
                break;
            };
            if let Ok(data) = frame.into_data() {
                let room = MAX_REFUSAL_BODY - kept.len();
                kept.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
    };
    let _ = tokio::time::timeout_at(until, connection.run(read)).await;
    kept.freeze()
}

/// `what` failed because of `error`, with hyper's underlying cause, which its own message
/// leaves out.
fn describe(what: &str, error: &hyper::Error) -> String {
    // A TLS 1.3 backend judges our certificate after its handshake: its alert arrives here.
    if let Some(tls_error) = tls::rustls_cause(error) {
        return tls::explain(tls_error, "the backend");
    }
    if error.is_parse_too_large() {
        return "answered with an oversized response head".into();
    }
    if error.is_incomplete_message() {
        return "closed the connection during the handshake".into();
    }
    let prefix = if error.is_parse() {
        "answered with malformed HTTP"
    } else {
        what
    };
    match std::error::Error::source(error) {
        Some(cause) => format!("{prefix}: {error}: {cause}"),
        None => format!("{prefix}: {error}"),
    }
}

/// hyper's connection future, which does the socket I/O, polled alongside whatever waits on
/// it (the response, its body, the upgrade), all in the dialing task: spawning it would leave
/// a task behind when the dial is abandoned.
struct Driven<C> {
    /// `None` once it has finished; dropping it then tells anything still waiting that no
    /// more is coming, rather than leaving it pending.
    connection: Option<Pin<Box<C>>>,
}

impl<C: Future<Output = hyper::Result<()>>> Driven<C> {
    fn new(connection: C) -> Self {
        Driven {
            connection: Some(Box::pin(connection)),
        }
    }

    /// Awaits `work` while driving the connection.
    async fn run<W: Future>(&mut self, work: W) -> W::Output {
        let mut work = pin!(work);
        loop {
            let Some(connection) = self.connection.as_mut() else {
                return work.await;
            };
            tokio::select! {
                biased;
                output = &mut work => return output,
                // Its error, if any, also reaches the waiting side, which reports it.
                _ = connection.as_mut() => self.connection = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    /// A valid answer to [`KEY`] (RFC 6455 section 1.3's example).
    fn accepted() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        headers.insert("connection", HeaderValue::from_static("Upgrade"));
        headers.insert(
            "sec-websocket-accept",
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        headers
    }

    fn offered(protocols: &[&str]) -> Vec<String> {
        protocols.iter().map(|p| (*p).to_owned()).collect()
    }

    fn check(headers: &HeaderMap, offer: &[&str]) -> Result<Option<HeaderValue>, String> {
        check_switching_protocols(
            StatusCode::SWITCHING_PROTOCOLS,
            headers,
            KEY,
            &offered(offer),
        )
    }

    #[test]
    fn a_valid_answer_without_a_subprotocol_is_accepted() {
        assert_eq!(check(&accepted(), &[]), Ok(None));
        // A relay passes on a backend that picks none of the client's offers.
        assert_eq!(check(&accepted(), &["chat", "superchat"]), Ok(None));
    }

    #[test]
    fn an_offered_subprotocol_is_accepted_and_returned() {
        let mut headers = accepted();
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("superchat"),
        );
        assert_eq!(
            check(&headers, &["chat", "superchat"]),
            Ok(Some(HeaderValue::from_static("superchat")))
        );
    }

    #[test]
    fn tokens_match_case_insensitively_within_lists() {
        let mut headers = accepted();
        headers.insert("upgrade", HeaderValue::from_static("WebSocket"));
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, UPGRADE"),
        );
        assert_eq!(check(&headers, &[]), Ok(None));
    }

    #[test]
    fn a_subprotocol_not_offered_is_refused() {
        let mut headers = accepted();
        headers.insert("sec-websocket-protocol", HeaderValue::from_static("other"));
        assert!(check(&headers, &["chat"]).is_err());
        assert!(check(&headers, &[]).is_err());
        // A list is not a pick.
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("chat, superchat"),
        );
        assert!(check(&headers, &["chat", "superchat"]).is_err());
        headers.insert("sec-websocket-protocol", HeaderValue::from_static("chat"));
        headers.append("sec-websocket-protocol", HeaderValue::from_static("chat"));
        assert!(check(&headers, &["chat"]).is_err());
    }

    #[test]
    fn missing_upgrade_or_connection_tokens_are_refused() {
        let mut no_upgrade = accepted();
        no_upgrade.remove("upgrade");
        assert!(check(&no_upgrade, &[]).is_err());
        let mut other_upgrade = accepted();
        other_upgrade.insert("upgrade", HeaderValue::from_static("h2c"));
        assert!(check(&other_upgrade, &[]).is_err());
        let mut no_connection = accepted();
        no_connection.insert("connection", HeaderValue::from_static("keep-alive"));
        assert!(check(&no_connection, &[]).is_err());
    }

    #[test]
    fn a_wrong_or_missing_accept_is_refused() {
        let mut wrong = accepted();
        wrong.insert(
            "sec-websocket-accept",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert!(check(&wrong, &[]).is_err());
        let mut missing = accepted();
        missing.remove("sec-websocket-accept");
        assert!(check(&missing, &[]).is_err());
        let mut doubled = accepted();
        doubled.append(
            "sec-websocket-accept",
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        assert!(check(&doubled, &[]).is_err());
    }

    #[test]
    fn a_negotiated_extension_is_refused() {
        let mut headers = accepted();
        headers.insert(
            "sec-websocket-extensions",
            HeaderValue::from_static("permessage-deflate"),
        );
        assert!(check(&headers, &[]).is_err());
    }

    #[test]
    fn a_status_other_than_101_is_refused() {
        let result = check_switching_protocols(StatusCode::OK, &accepted(), KEY, &[]);
        assert!(result.is_err());
    }

    #[test]
    fn offered_protocols_are_split_and_trimmed() {
        let mut headers = HeaderMap::new();
        headers.append(
            "sec-websocket-protocol",
            HeaderValue::from_static("chat, superchat"),
        );
        headers.append("sec-websocket-protocol", HeaderValue::from_static(" v2 ,"));
        assert_eq!(
            offered_protocols(&headers),
            offered(&["chat", "superchat", "v2"])
        );
    }
}

/// Arbitrary backend answers never panic the check, and nothing but a proper `101` passes.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn arbitrary_answers_are_judged_not_panicked_on(
            status in 100u16..600,
            headers in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("upgrade"), Just("connection"), Just("sec-websocket-accept"),
                        Just("sec-websocket-protocol"), Just("sec-websocket-extensions"),
                    ],
                    proptest::collection::vec(any::<u8>(), 0..40),
                ),
                0..8,
            ),
        ) {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    map.append(name, value);
                }
            }
            let status = StatusCode::from_u16(status).unwrap();
            let key = "dGhlIHNhbXBsZSBub25jZQ==";
            let offered = ["chat".to_owned()];
            if check_switching_protocols(status, &map, key, &offered).is_ok() {
                prop_assert_eq!(status, StatusCode::SWITCHING_PROTOCOLS);
                let expected = derive_accept_key(key.as_bytes());
                prop_assert_eq!(
                    map.get(header::SEC_WEBSOCKET_ACCEPT).map(HeaderValue::as_bytes),
                    Some(expected.as_bytes())
                );
            }
        }
    }
}
