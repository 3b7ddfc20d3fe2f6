//! The server side of the WebSocket opening handshake, as pure checks over a parsed HTTP
//! request: an HTTP/1.1 `Upgrade` (RFC 6455 section 4.2) or an HTTP/2 extended CONNECT with
//! `:protocol = websocket` (RFC 8441 section 5). What to refuse and with which status is the same
//! for both; the answer is `101 Switching Protocols` for one, `200` for the other.

use base64::Engine;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Version};
use hyper::ext::Protocol;
use tungstenite::handshake::derive_accept_key;

use crate::headers::has_token as header_has_token;

/// Why a client's request does not become a WebSocket, and the HTTP answer it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The status to answer with.
    pub status: StatusCode,
    /// Why, in words; also the response body.
    pub reason: String,
    /// Headers the answer must carry (e.g. `Sec-WebSocket-Version: 13` with a 426).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl Refusal {
    /// A refusal with no extra headers.
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
            headers: Vec::new(),
        }
    }
}

/// A valid WebSocket request, in the form it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeRequest {
    /// An HTTP/1.1 `GET` with `Upgrade: websocket`, answered `101`.
    Http1 {
        /// The client's `Sec-WebSocket-Key`, needed for the `Sec-WebSocket-Accept` answer.
        key: HeaderValue,
    },
    /// An HTTP/2 extended CONNECT, answered `200`; RFC 8441 uses no key.
    Http2,
}

/// True when the request asks for a WebSocket at all: `Upgrade: websocket` over HTTP/1.1, a
/// CONNECT with `:protocol = websocket` over HTTP/2.
pub fn wants_websocket<B>(request: &Request<B>) -> bool {
    if request.version() == Version::HTTP_2 {
        request.method() == Method::CONNECT
            && request
                .extensions()
                .get::<Protocol>()
                .is_some_and(|protocol| protocol.as_str().eq_ignore_ascii_case("websocket"))
    } else {
        header_has_token(request.headers(), &header::UPGRADE, "websocket")
    }
}

/// Checks a request that asked for a WebSocket: 426 for a request that does not ask for one or
/// names a version other than 13 (with `Sec-WebSocket-Version: 13`), 400 for a malformed
/// upgrade.
pub fn check_upgrade<B>(request: &Request<B>) -> Result<UpgradeRequest, Refusal> {
    if !wants_websocket(request) {
        return Err(not_a_websocket(request.version()));
    }
    let headers = request.headers();
    if request.version() == Version::HTTP_2 {
        // Method, `:protocol`, `:scheme` and `:path` are checked above and by the HTTP/2 layer.
        check_version(headers)?;
        return Ok(UpgradeRequest::Http2);
    }
    if request.method() != Method::GET {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("a WebSocket upgrade must use GET, not {}", request.method()),
        ));
    }
    if request.version() < Version::HTTP_11 {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade needs HTTP/1.1",
        ));
    }
    if !header_has_token(headers, &header::CONNECTION, "upgrade") {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "missing \"Connection: Upgrade\" in a WebSocket upgrade",
        ));
    }
    check_version(headers)?;
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) => key.clone(),
        (None, _) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "missing Sec-WebSocket-Key",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "more than one Sec-WebSocket-Key",
            ));
        }
    };
    let decoded = base64::engine::general_purpose::STANDARD.decode(key.as_bytes());
    if !matches!(decoded, Ok(ref bytes) if bytes.len() == 16) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }
    Ok(UpgradeRequest::Http1 { key })
}

/// The 426 for a request to a WebSocket endpoint that is no WebSocket request, saying what
/// to send in the client's own HTTP version.
fn not_a_websocket(version: Version) -> Refusal {
    if version == Version::HTTP_2 {
        // Upgrade and Connection are HTTP/1.1's own: an HTTP/2 answer must not carry them.
        return Refusal::new(
            StatusCode::UPGRADE_REQUIRED,
            "this is a WebSocket endpoint: send an extended CONNECT with :protocol websocket (RFC 8441)",
        );
    }
    Refusal {
        status: StatusCode::UPGRADE_REQUIRED,
        reason: "this is a WebSocket endpoint: send an HTTP/1.1 Upgrade: websocket request".into(),
        headers: vec![
            (header::UPGRADE, HeaderValue::from_static("websocket")),
            (header::CONNECTION, HeaderValue::from_static("Upgrade")),
        ],
    }
}

/// 426 with `Sec-WebSocket-Version: 13` unless the request names version 13, once.
fn check_version(headers: &HeaderMap) -> Result<(), Refusal> {
    let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(version), None) if version.as_bytes() == b"13" => Ok(()),
        (first, _) => {
            let got = first
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_else(|| "none".into());
            Err(Refusal {
                status: StatusCode::UPGRADE_REQUIRED,
                reason: format!("unsupported Sec-WebSocket-Version {got:?}: this server speaks 13"),
                headers: vec![(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                )],
            })
        }
    }
}

/// Checks the `Origin` header against `allowed` (exact matches; empty allows all).
pub fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), Refusal> {
    if allowed.is_empty() {
        return Ok(());
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match origin {
        Some(origin) if allowed.iter().any(|a| a == origin) => Ok(()),
        Some(origin) => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("Origin {origin:?} is not allowed"),
        )),
        None => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "an Origin header is required here",
        )),
    }
}

/// The `Sec-WebSocket-Accept` value for a client's key.
pub fn accept_value(key: &HeaderValue) -> HeaderValue {
    HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .expect("base64 is a valid header value")
}

/// The answer that makes a valid WebSocket request one, with `protocol` as the agreed
/// subprotocol: `101 Switching Protocols` over HTTP/1.1, `200` over HTTP/2.
pub fn websocket_accepted<B: Default>(
    upgrade: &UpgradeRequest,
    protocol: Option<HeaderValue>,
) -> http::Response<B> {
    let mut response = http::Response::new(B::default());
    let headers = response.headers_mut();
    if let Some(protocol) = protocol {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    match upgrade {
        UpgradeRequest::Http1 { key } => {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept_value(key));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        }
        UpgradeRequest::Http2 => *response.status_mut() = StatusCode::OK,
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(edit: impl FnOnce(&mut http::request::Builder)) -> Request<()> {
        let mut builder = Request::get("/chat")
            .header("Host", "relay")
            .header("Upgrade", "websocket")
            .header("Connection", "keep-alive, Upgrade")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
        edit(&mut builder);
        builder.body(()).unwrap()
    }

    fn status(request: Request<()>) -> StatusCode {
        check_upgrade(&request).unwrap_err().status
    }

    /// An RFC 8441 extended CONNECT, as hyper's HTTP/2 server hands it over.
    fn connect(edit: impl FnOnce(&mut http::request::Builder)) -> Request<()> {
        let mut builder = Request::connect("https://relay/chat")
            .version(Version::HTTP_2)
            .extension(Protocol::from_static("websocket"))
            .header("Sec-WebSocket-Version", "13");
        edit(&mut builder);
        builder.body(()).unwrap()
    }

    #[test]
    fn accepts_the_rfc_example() {
        let upgrade = check_upgrade(&request(|_| {})).unwrap();
        let response: http::Response<()> = websocket_accepted(&upgrade, None);
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            response.headers()["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn accepts_an_extended_connect_with_200() {
        let request = connect(|_| {});
        assert!(wants_websocket(&request));
        let upgrade = check_upgrade(&request).unwrap();
        assert_eq!(upgrade, UpgradeRequest::Http2);
        let chat = HeaderValue::from_static("chat");
        let response: http::Response<()> = websocket_accepted(&upgrade, Some(chat));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
        assert!(
            !response.headers().contains_key("upgrade")
                && !response.headers().contains_key("sec-websocket-accept"),
            "HTTP/1.1's own headers stay out of an HTTP/2 answer"
        );
    }

    #[test]
    fn http2_refusals_match_http1() {
        let version = check_upgrade(&connect(|b| {
            b.headers_mut()
                .unwrap()
                .insert("sec-websocket-version", HeaderValue::from_static("8"));
        }))
        .unwrap_err();
        assert_eq!(version.status, StatusCode::UPGRADE_REQUIRED);
        assert_eq!(
            version.headers,
            [(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13")
            )]
        );
        let no_version = connect(|b| {
            b.headers_mut().unwrap().remove("sec-websocket-version");
        });
        assert_eq!(status(no_version), StatusCode::UPGRADE_REQUIRED);
        // A CONNECT for another protocol, a plain CONNECT, a GET: not WebSockets.
        let other = Request::connect("https://relay/chat")
            .version(Version::HTTP_2)
            .extension(Protocol::from_static("webtransport"))
            .body(())
            .unwrap();
        let plain_connect = Request::connect("relay:443")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        let get = Request::get("https://relay/chat")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        for request in [other, plain_connect, get] {
            assert!(!wants_websocket(&request));
            let refusal = check_upgrade(&request).unwrap_err();
            assert_eq!(refusal.status, StatusCode::UPGRADE_REQUIRED);
            assert!(
                refusal.reason.contains("extended CONNECT"),
                "{}",
                refusal.reason
            );
            assert!(refusal.headers.is_empty(), "no Upgrade header in HTTP/2");
        }
        // `Upgrade: websocket` means nothing in HTTP/2.
        let mut upgrade_header = request(|_| {});
        *upgrade_header.version_mut() = Version::HTTP_2;
        assert!(!wants_websocket(&upgrade_header));
    }

    #[test]
    fn refusals() {
        let plain = Request::get("/").body(()).unwrap();
        assert_eq!(status(plain), StatusCode::UPGRADE_REQUIRED);
        let mut post = request(|_| {});
        *post.method_mut() = Method::POST;
        assert_eq!(status(post), StatusCode::BAD_REQUEST);
        let mut no_connection = request(|_| {});
        no_connection.headers_mut().remove("connection");
        assert_eq!(status(no_connection), StatusCode::BAD_REQUEST);
        let mut version = request(|_| {});
        version
            .headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("8"));
        let refusal = check_upgrade(&version).unwrap_err();
        assert_eq!(refusal.status, StatusCode::UPGRADE_REQUIRED);
        assert_eq!(refusal.headers[0].1, "13");
        let mut bad_key = request(|_| {});
        bad_key
            .headers_mut()
            .insert("sec-websocket-key", HeaderValue::from_static("short"));
        assert_eq!(status(bad_key), StatusCode::BAD_REQUEST);
        let mut no_key = request(|_| {});
        no_key.headers_mut().remove("sec-websocket-key");
        assert_eq!(status(no_key), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn origins() {
        let allowed = vec!["https://chat.example".to_owned()];
        let mut headers = HeaderMap::new();
        assert!(check_origin(&headers, &[]).is_ok());
        assert_eq!(
            check_origin(&headers, &allowed).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        headers.insert("origin", HeaderValue::from_static("https://chat.example"));
        assert!(check_origin(&headers, &allowed).is_ok());
        headers.insert("origin", HeaderValue::from_static("https://evil.example"));
        assert_eq!(
            check_origin(&headers, &allowed).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
    }
}

/// Arbitrary requests never panic the checks.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn arbitrary_upgrade_headers_get_an_answer(
            headers in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("upgrade"), Just("connection"), Just("sec-websocket-version"),
                        Just("sec-websocket-key"), Just("origin"), Just("x-other"),
                    ],
                    proptest::collection::vec(any::<u8>(), 0..40),
                ),
                0..8,
            ),
        ) {
            let mut request = Request::get("/").body(()).unwrap();
            for (name, value) in headers {
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    request.headers_mut().append(name, value);
                }
            }
            match check_upgrade(&request) {
                Ok(upgrade) => {
                    let response: http::Response<()> = websocket_accepted(&upgrade, None);
                    prop_assert!(response.headers().contains_key("sec-websocket-accept"));
                }
                Err(refusal) => prop_assert!(refusal.status.is_client_error()),
            }
            let _ = check_origin(request.headers(), &["https://a.example".to_owned()]);
            // The same headers on an extended CONNECT.
            let (mut parts, ()) = request.into_parts();
            parts.method = Method::CONNECT;
            parts.version = Version::HTTP_2;
            parts.extensions.insert(Protocol::from_static("websocket"));
            let connect = Request::from_parts(parts, ());
            match check_upgrade(&connect) {
                Ok(upgrade) => prop_assert_eq!(upgrade, UpgradeRequest::Http2),
                Err(refusal) => prop_assert!(refusal.status.is_client_error()),
            }
        }
    }
}
