//! The client side of the WebSocket opening handshake (RFC 6455 section 4.2), as pure checks
//! over a parsed HTTP request: what to refuse and with which status, and the 101 answer.

use base64::Engine;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Version};
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

/// What a valid upgrade request asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The client's `Sec-WebSocket-Key`, needed for the `Sec-WebSocket-Accept` answer.
    pub key: HeaderValue,
}

/// True when the request asks for a WebSocket at all (`Upgrade: websocket`).
pub fn wants_websocket(headers: &HeaderMap) -> bool {
    header_has_token(headers, &header::UPGRADE, "websocket")
}

/// Checks a request that asked for a WebSocket: 426 without `Upgrade: websocket` or with a
/// version other than 13 (with `Sec-WebSocket-Version: 13`), 400 for a malformed upgrade.
pub fn check_upgrade<B>(request: &Request<B>) -> Result<UpgradeRequest, Refusal> {
    let headers = request.headers();
    if !wants_websocket(headers) {
        return Err(Refusal {
            status: StatusCode::UPGRADE_REQUIRED,
            reason: "this is a WebSocket endpoint: send an HTTP/1.1 Upgrade: websocket request"
                .into(),
            headers: vec![
                (header::UPGRADE, HeaderValue::from_static("websocket")),
                (header::CONNECTION, HeaderValue::from_static("Upgrade")),
            ],
        });
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
    if headers
        .get_all(header::SEC_WEBSOCKET_VERSION)
        .iter()
        .count()
        != 1
        || headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
    {
        let got = headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_else(|| "none".into());
        return Err(Refusal {
            status: StatusCode::UPGRADE_REQUIRED,
            reason: format!("unsupported Sec-WebSocket-Version {got:?}: this server speaks 13"),
            headers: vec![(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            )],
        });
    }
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
    Ok(UpgradeRequest { key })
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
pub fn accept_value(upgrade: &UpgradeRequest) -> HeaderValue {
    HeaderValue::from_str(&derive_accept_key(upgrade.key.as_bytes()))
        .expect("base64 is a valid header value")
}

/// The `101 Switching Protocols` answer to a valid upgrade, with `protocol` as the agreed
/// subprotocol.
pub fn switching_protocols<B: Default>(
    upgrade: &UpgradeRequest,
    protocol: Option<HeaderValue>,
) -> http::Response<B> {
    let mut response = http::Response::new(B::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept_value(upgrade));
    if let Some(protocol) = protocol {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
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

    #[test]
    fn accepts_the_rfc_example() {
        let upgrade = check_upgrade(&request(|_| {})).unwrap();
        assert_eq!(accept_value(&upgrade), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
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
                Ok(upgrade) => prop_assert!(!accept_value(&upgrade).is_empty()),
                Err(refusal) => prop_assert!(refusal.status.is_client_error()),
            }
            let _ = check_origin(request.headers(), &["https://a.example".to_owned()]);
        }
    }
}
