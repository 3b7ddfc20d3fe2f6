//! The client handshake end to end (docs/operations.md, "What a client sees"): what a client is refused with, what
//! the backend is sent, and how the relay picks a backend that answers.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsrelay_testkit::{
    BackendBehavior, Client, SIMPLE, SeenConnection, TestBackend, TestRelay, WAIT, connect,
    connect_request, expect_close, raw_exchange, refused_status, request_as, round_trip, status_of,
    unused_addr, upgrade_request, user_ranked_first,
};

/// The key every raw request below sends; the backend must get a different one.
const CLIENT_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// An HTTP response read off a raw socket.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn describe(&self) -> String {
        format!(
            "{} {:?} {:?}",
            self.status,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

/// Sends `request` on a fresh connection and reads one response.
async fn exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // The relay may answer and close before it has read everything (431), so a failed
    // write is not the test's verdict: the response is.
    let _ = tcp.write_all(request).await;
    read_response(&mut tcp).await
}

/// Reads one response head and, unless it is a 101, its `Content-Length` body. Reading by
/// length rather than "until quiet" keeps the test independent of how busy the machine is.
async fn read_response(tcp: &mut TcpStream) -> RawResponse {
    let deadline = Instant::now() + WAIT;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut chunk))
            .await
            .expect("no response in time")
            .unwrap_or(0);
        assert!(
            n > 0,
            "connection ended before a response head: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut response = RawResponse {
        status,
        headers,
        body: bytes[head_end..].to_vec(),
    };
    if status == 101 {
        response.body.clear();
        return response;
    }
    let length: usize = response
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while response.body.len() < length {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut chunk))
            .await
            .expect("no body in time")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        response.body.extend_from_slice(&chunk[..n]);
    }
    response
}

/// A plain (non-upgrade) request.
fn plain_request(method: &str, path: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 0\r\n\r\n")
        .into_bytes()
}

/// A `ws://` URL nothing listens on: bound, then released.
fn dead_url() -> String {
    format!("ws://{}", unused_addr())
}

/// Retries while the relay answers 503, since a slot is freed only once the closed session's
/// task has finished.
async fn connect_when_admitted(url: &str) -> Client {
    let deadline = Instant::now() + WAIT;
    loop {
        match connect_request(url.into_client_request().unwrap()).await {
            Ok(client) => return client,
            Err(WsError::Http(response))
                if response.status() == StatusCode::SERVICE_UNAVAILABLE
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("expected to be admitted again, got {other}"),
        }
    }
}

const CHAT_ONLY: &str = r#"
[[route]]
path = "/chat"
upstream = "main"

[upstream.main]
backends = BACKENDS
"#;

#[tokio::test]
async fn plain_get_gets_426_and_healthz_gets_200_ok() {
    let backend = TestBackend::start("a").await;
    let relay = TestRelay::simple(&[&backend]).await;

    let plain = exchange(relay.addr(), &plain_request("GET", "/")).await;
    assert_eq!(plain.status, 426, "{}", plain.describe());

    let health = exchange(relay.addr(), &plain_request("GET", "/healthz")).await;
    assert_eq!(health.status, 200, "{}", health.describe());
    assert_eq!(String::from_utf8_lossy(&health.body).trim(), "ok");
}

#[tokio::test]
async fn malformed_upgrades_get_400() {
    let backend = TestBackend::start("a").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let valid = String::from_utf8(upgrade_request("/", "")).unwrap();
    let cases = [
        ("POST upgrade", valid.replacen("GET", "POST", 1)),
        (
            "no Connection: Upgrade",
            valid.replace("Connection: Upgrade\r\n", ""),
        ),
        ("short key", valid.replace(CLIENT_KEY, "c2hvcnQ=")),
        (
            "key not base64",
            valid.replace(CLIENT_KEY, "not base64 at all!!"),
        ),
        (
            "no key",
            valid.replace(&format!("Sec-WebSocket-Key: {CLIENT_KEY}\r\n"), ""),
        ),
    ];
    for (what, request) in cases {
        let response = exchange(relay.addr(), request.as_bytes()).await;
        assert_eq!(response.status, 400, "{what}: {}", response.describe());
    }
    assert!(
        backend.connections().is_empty(),
        "a refused client must not reach the backend"
    );
}

#[tokio::test]
async fn websocket_version_8_gets_426_naming_version_13() {
    let backend = TestBackend::start("a").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let request = String::from_utf8(upgrade_request("/", ""))
        .unwrap()
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let response = exchange(relay.addr(), request.as_bytes()).await;
    assert_eq!(response.status, 426, "{}", response.describe());
    assert_eq!(
        response.header("sec-websocket-version"),
        Some("13"),
        "{}",
        response.describe()
    );
}

#[tokio::test]
async fn only_allowed_origins_are_upgraded() {
    let backend = TestBackend::start("a").await;
    let config = format!("[limits]\nallowed_origins = [\"https://ok.example\"]\n{SIMPLE}");
    let relay = TestRelay::start(&config, &[&backend]).await;

    let mut evil = relay.url("/").into_client_request().unwrap();
    evil.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    match connect_request(evil).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), StatusCode::FORBIDDEN),
        Err(other) => panic!("expected 403, got {other}"),
        Ok(_) => panic!("expected 403, got a WebSocket"),
    }

    let mut ok = relay.url("/").into_client_request().unwrap();
    ok.headers_mut()
        .insert("origin", "https://ok.example".parse().unwrap());
    let mut client = connect_request(ok).await.expect("allowed origin refused");
    assert_eq!(round_trip(&mut client, "hi").await, "hi");
}

#[tokio::test]
async fn a_path_no_route_serves_gets_404() {
    let backend = TestBackend::start("a").await;
    let relay = TestRelay::start(CHAT_ONLY, &[&backend]).await;
    assert_eq!(
        refused_status(&relay.url("/other")).await,
        StatusCode::NOT_FOUND
    );
    // Prefixes match whole segments, so this is not /chat either.
    assert_eq!(
        refused_status(&relay.url("/chatter")).await,
        StatusCode::NOT_FOUND
    );
    let mut client = connect(&relay.url("/chat/room")).await;
    assert_eq!(round_trip(&mut client, "hi").await, "hi");
}

#[tokio::test]
async fn over_max_connections_gets_503_until_a_slot_frees() {
    let backend = TestBackend::start("a").await;
    let config = format!("[server]\nmax_connections = 2\n{SIMPLE}");
    let relay = TestRelay::start(&config, &[&backend]).await;
    let url = relay.url("/");

    let mut first = connect(&url).await;
    let mut second = connect(&url).await;
    assert_eq!(round_trip(&mut first, "1").await, "1");
    assert_eq!(round_trip(&mut second, "2").await, "2");
    assert_eq!(refused_status(&url).await, StatusCode::SERVICE_UNAVAILABLE);

    first.close(None).await.unwrap();
    expect_close(&mut first).await;
    let mut third = connect_when_admitted(&url).await;
    assert_eq!(round_trip(&mut third, "3").await, "3");
    assert_eq!(round_trip(&mut second, "still here").await, "still here");
}

#[tokio::test]
async fn oversized_request_headers_get_431_and_others_are_still_served() {
    let backend = TestBackend::start("a").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let big = format!("X-Big: {}\r\n", "a".repeat(40 * 1024));
    let response = exchange(relay.addr(), &upgrade_request("/", &big)).await;
    assert_eq!(response.status, 431, "{}", response.describe());

    let mut client = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut client, "fine").await, "fine");
}

#[tokio::test]
async fn a_backend_refusal_reaches_the_client_with_its_status_and_headers() {
    for status in [401u16, 403, 404] {
        let backend =
            TestBackend::with_behavior("refuser", BackendBehavior::refusing(status)).await;
        let status = StatusCode::from_u16(status).unwrap();
        let relay = TestRelay::simple(&[&backend]).await;
        match connect_request(relay.url("/").into_client_request().unwrap()).await {
            Err(WsError::Http(response)) => {
                assert_eq!(response.status(), status);
                assert_eq!(
                    response
                        .headers()
                        .get("x-backend-reason")
                        .map(|v| v.as_bytes()),
                    Some(&b"test"[..]),
                    "{status}: {:?}",
                    response.headers()
                );
            }
            Err(other) => panic!("{status}: expected an HTTP refusal, got {other}"),
            Ok(_) => panic!("{status}: expected an HTTP refusal, got a WebSocket"),
        }
    }
}

#[tokio::test]
async fn the_client_gets_the_subprotocol_the_backend_picked() {
    let backend = TestBackend::with_behavior("picky", BackendBehavior::picking("superchat")).await;
    let relay = TestRelay::simple(&[&backend]).await;
    let mut request = relay.url("/").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "chat, superchat".parse().unwrap());
    let (mut client, response) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect timed out")
            .expect("handshake failed");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"superchat"[..])
    );
    assert_eq!(round_trip(&mut client, "hi").await, "hi");
}

#[tokio::test]
async fn the_client_gets_no_subprotocol_when_the_backend_picked_none() {
    let backend = TestBackend::start("plain").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let response = exchange(
        relay.addr(),
        &upgrade_request("/", "Sec-WebSocket-Protocol: chat, superchat\r\n"),
    )
    .await;
    assert_eq!(response.status, 101, "{}", response.describe());
    assert_eq!(
        response.header("sec-websocket-protocol"),
        None,
        "{}",
        response.describe()
    );
    let seen = backend.connections();
    assert_eq!(
        seen[0].header("sec-websocket-protocol").as_deref(),
        Some("chat, superchat"),
        "the backend must see the client's offer"
    );
}

#[tokio::test]
async fn an_unreachable_top_ranked_backend_hands_the_client_to_the_next() {
    let live = TestBackend::start("live").await;
    let dead = dead_url();
    let live_url = live.url();
    let user = user_ranked_first(&[dead.clone(), live_url.clone()], 0);
    let config = format!(
        r#"
[[route]]
path = "/"
upstream = "main"
hash_key = "header:X-User"

[upstream.main]
backends = ["{dead}", "{live_url}"]
"#
    );
    let relay = TestRelay::start(&config, &[]).await;

    let mut client = connect_request(request_as(&relay.url("/"), &user))
        .await
        .expect("the next backend in rank should have served the client");
    assert_eq!(round_trip(&mut client, "whoami").await, "live");
    assert_eq!(live.connections().len(), 1);
}

#[tokio::test]
async fn no_reachable_backend_gets_502() {
    let first = dead_url();
    let second = dead_url();
    let config = format!(
        r#"
[[route]]
path = "/"
upstream = "main"

[upstream.main]
backends = ["{first}", "{second}"]
"#
    );
    let relay = TestRelay::start(&config, &[]).await;
    assert_eq!(
        refused_status(&relay.url("/")).await,
        StatusCode::BAD_GATEWAY
    );
}

/// What the forwarded-headers test sends: every kind of header the forwarding rules name.
fn forwarding_request(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\n\
         Host: relay.test:8080\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade, X-Hop\r\n\
         X-Hop: 1\r\n\
         Keep-Alive: timeout=5\r\n\
         Sec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: {CLIENT_KEY}\r\n\
         Sec-WebSocket-Extensions: permessage-deflate\r\n\
         Sec-WebSocket-Protocol: chat, superchat\r\n\
         Cookie: sid=abc\r\n\
         Authorization: Bearer token\r\n\
         Origin: https://app.example\r\n\
         User-Agent: handshake-test/1\r\n\
         X-Custom: kept\r\n\
         X-Forwarded-For: 1.2.3.4\r\n\
         \r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn the_backend_gets_the_forwarded_headers_of_design_4_3() {
    // The backend accepts one of the offered subprotocols so this test does not depend on
    // how the relay treats a backend that picks none (see the test above).
    let backend = TestBackend::with_behavior("a", BackendBehavior::picking("chat")).await;
    let config = r#"
[[route]]
path = "/chat"
upstream = "main"
preserve_host = true

[[route]]
path = "/plain"
upstream = "main"
preserve_host = false

[upstream.main]
backends = BACKENDS
"#;
    let relay = TestRelay::start(config, &[&backend]).await;

    // The relay dials the backend before answering, so after the 101 the backend has
    // recorded the request.
    for path in ["/chat/room?x=1&y=2", "/plain/room?x=1&y=2"] {
        let mut tcp = TcpStream::connect(relay.addr()).await.unwrap();
        tcp.write_all(&forwarding_request(path)).await.unwrap();
        let response = read_response(&mut tcp).await;
        assert_eq!(response.status, 101, "{path}: {}", response.describe());
    }
    let seen = backend.connections();
    assert_eq!(seen.len(), 2);
    let (kept, plain) = (&seen[0], &seen[1]);

    assert_eq!(kept.target, "/chat/room?x=1&y=2");
    assert_eq!(plain.target, "/plain/room?x=1&y=2");
    assert_eq!(kept.header("host").as_deref(), Some("relay.test:8080"));
    assert_eq!(
        plain.header("host"),
        Some(backend.addr.to_string()),
        "preserve_host = false sends the backend's own host:port"
    );
    for conn in [kept, plain] {
        let header = |name| conn.header(name);
        assert_eq!(
            header("x-forwarded-for").as_deref(),
            Some("1.2.3.4, 127.0.0.1")
        );
        assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
        assert_eq!(
            header("x-forwarded-host").as_deref(),
            Some("relay.test:8080")
        );
        assert_eq!(header("x-real-ip").as_deref(), Some("127.0.0.1"));
        assert_eq!(header("cookie").as_deref(), Some("sid=abc"));
        assert_eq!(header("authorization").as_deref(), Some("Bearer token"));
        assert_eq!(header("origin").as_deref(), Some("https://app.example"));
        assert_eq!(header("user-agent").as_deref(), Some("handshake-test/1"));
        assert_eq!(header("x-custom").as_deref(), Some("kept"));
        assert_eq!(
            header("sec-websocket-protocol").as_deref(),
            Some("chat, superchat")
        );
        for gone in ["x-hop", "keep-alive", "sec-websocket-extensions"] {
            assert_eq!(header(gone), None, "{gone} must not be forwarded");
        }
        let key = header("sec-websocket-key").expect("the backend needs a key");
        assert_ne!(key, CLIENT_KEY, "the backend leg needs its own key");
        assert_eq!(
            conn.headers.get_all("connection").iter().count(),
            1,
            "Connection is regenerated, not forwarded"
        );
    }
    let id = |conn: &SeenConnection| conn.header("x-relay-conn-id").expect("X-Relay-Conn-Id");
    assert_ne!(id(kept), id(plain), "each connection has its own id");
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_off_without_disturbing_others() {
    let backend = TestBackend::start("a").await;
    let config = format!("[server]\nhandshake_timeout = \"500ms\"\n{SIMPLE}");
    let relay = TestRelay::start(&config, &[&backend]).await;

    let mut stalled = TcpStream::connect(relay.addr()).await.unwrap();
    stalled
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();

    let mut client = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut client, "before").await, "before");

    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, stalled.read(&mut chunk))
            .await
            .expect("the stalled client was never disconnected")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
    if !received.is_empty() {
        let text = String::from_utf8_lossy(&received);
        assert!(
            text.starts_with("HTTP/1.1 408"),
            "a stalled client gets EOF or a 408, got {text:?}"
        );
    }

    // The session is now older than handshake_timeout: the timeout must cover the
    // handshake only.
    assert_eq!(round_trip(&mut client, "after").await, "after");
}

/// How a [`raw_backend`] ends its side after answering.
#[derive(Clone, Copy)]
enum AfterAnswer {
    /// Closes the connection, which ends a close-delimited body (or cuts a sized one).
    Close,
    /// Keeps the connection open until the relay hangs up.
    Linger,
}

/// A backend that answers every request with `parts`, one write each so that chunks can
/// arrive separately, and never upgrades. Returns its `ws://` URL.
async fn raw_backend(parts: Vec<Vec<u8>>, after: AfterAnswer) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let parts = parts.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                // The whole request is read before answering: unread bytes would turn the
                // close below into a reset, which may discard the answer in flight.
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                for part in &parts {
                    if tcp.write_all(part).await.is_err() {
                        return;
                    }
                }
                match after {
                    AfterAnswer::Close => {
                        let _ = tcp.shutdown().await;
                    }
                    AfterAnswer::Linger => while let Ok(1..) = tcp.read(&mut chunk).await {},
                }
            });
        }
    });
    url
}

/// A relay whose only backend is `url`.
async fn relay_to(url: &str) -> TestRelay {
    let config = format!(
        r#"
[[route]]
path = "/"
upstream = "main"

[upstream.main]
backends = ["{url}"]
"#
    );
    TestRelay::start(&config, &[]).await
}

/// What a client of a relay in front of a [`raw_backend`] answering `parts` receives.
async fn refusal_through_relay(parts: &[&[u8]], after: AfterAnswer) -> RawResponse {
    let url = raw_backend(parts.iter().map(|part| part.to_vec()).collect(), after).await;
    let relay = relay_to(&url).await;
    whole_refusal(&relay).await
}

/// Sends an upgrade that asks the relay to close after answering, and reads everything up to
/// that close: the whole response, so any framing left in the body would show.
async fn whole_refusal(relay: &TestRelay) -> RawResponse {
    let request = String::from_utf8(upgrade_request("/", ""))
        .unwrap()
        .replace("Connection: Upgrade", "Connection: Upgrade, close");
    let mut tcp = TcpStream::connect(relay.addr()).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut chunk))
            .await
            .expect("the relay did not close after its answer")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&bytes)))
        + 4;
    let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    RawResponse {
        status,
        headers: lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect(),
        body: bytes[head_end..].to_vec(),
    }
}

/// The client got a 403 whose body is exactly `hello world`, framed by the relay itself.
fn assert_hello_world_refusal(response: &RawResponse, what: &str) {
    let seen = response.describe();
    assert_eq!(response.status, 403, "{what}: {seen}");
    assert_eq!(response.body, b"hello world", "{what}: {seen}");
    assert_eq!(
        response.header("content-length"),
        Some("11"),
        "{what}: {seen}"
    );
    assert_eq!(response.header("transfer-encoding"), None, "{what}: {seen}");
}

#[tokio::test]
async fn a_refusal_with_a_sized_body_reaches_the_client_intact() {
    let response = refusal_through_relay(
        &[
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 11\r\nX-Backend-Reason: sized\r\n\r\n",
            b"hello",
            b" world",
        ],
        AfterAnswer::Linger,
    )
    .await;
    assert_hello_world_refusal(&response, "sized");
    assert_eq!(response.header("x-backend-reason"), Some("sized"));
}

#[tokio::test]
async fn a_refusal_with_a_chunked_body_reaches_the_client_decoded() {
    let response = refusal_through_relay(
        &[
            b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\
              Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
              Sec-WebSocket-Version: 13\r\nX-Backend-Reason: chunked\r\n\r\n",
            b"5\r\nhello\r\n",
            b"6\r\n world\r\n",
            b"0\r\n\r\n",
        ],
        AfterAnswer::Linger,
    )
    .await;
    assert_hello_world_refusal(&response, "chunked");
    assert_eq!(response.header("x-backend-reason"), Some("chunked"));
    for hop in ["x-hop", "keep-alive", "sec-websocket-version"] {
        assert_eq!(response.header(hop), None, "{hop}: {}", response.describe());
    }
}

#[tokio::test]
async fn a_refusal_with_a_close_delimited_body_reaches_the_client_intact() {
    let heads = [
        (
            "HTTP/1.1 with Connection: close",
            "HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n",
        ),
        ("HTTP/1.0", "HTTP/1.0 403 Forbidden\r\n\r\n"),
    ];
    for (what, head) in heads {
        let parts: [&[u8]; 3] = [head.as_bytes(), b"hello", b" world"];
        let response = refusal_through_relay(&parts, AfterAnswer::Close).await;
        assert_hello_world_refusal(&response, what);
    }
}

#[tokio::test]
async fn a_refusal_body_cut_short_or_stalled_passes_what_arrived() {
    for (what, after) in [
        ("cut", AfterAnswer::Close),
        ("stalled", AfterAnswer::Linger),
    ] {
        let answer: &[u8] = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nhello world";
        let response = refusal_through_relay(&[answer], after).await;
        assert_hello_world_refusal(&response, what);
    }
}

#[tokio::test]
async fn an_oversized_refusal_body_is_cut_at_64_kib() {
    let size = 200 * 1024;
    let head = format!("HTTP/1.1 403 Forbidden\r\nContent-Length: {size}\r\n\r\n");
    let body = vec![b'a'; size];
    let response = refusal_through_relay(&[head.as_bytes(), &body], AfterAnswer::Linger).await;
    assert_eq!(response.status, 403);
    assert_eq!(response.body.len(), 64 * 1024);
    assert!(response.body.iter().all(|&b| b == b'a'));
    assert_eq!(response.header("content-length"), Some("65536"));
}

#[tokio::test]
async fn an_oversized_backend_response_head_gets_502() {
    let head = format!(
        "HTTP/1.1 403 Forbidden\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let url = raw_backend(vec![head.into_bytes()], AfterAnswer::Linger).await;
    let relay = relay_to(&url).await;
    assert_eq!(
        refused_status(&relay.url("/")).await,
        StatusCode::BAD_GATEWAY
    );
}

#[tokio::test]
async fn backends_that_never_answer_get_the_client_a_504_within_its_handshake_timeout() {
    // Listening sockets nobody accepts on: the kernel completes every TCP connect, and then
    // nothing is ever answered. Two of them at 5 s each outlast the 1 s handshake.
    let silent: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let urls: Vec<String> = silent
        .iter()
        .map(|listener| format!("\"ws://{}\"", listener.local_addr().unwrap()))
        .collect();
    let config = format!(
        r#"
[server]
handshake_timeout = "1s"

[[route]]
path = "/"
upstream = "main"

[upstream.main]
backends = [{}]
connect_timeout = "5s"
"#,
        urls.join(", ")
    );
    let relay = TestRelay::start(&config, &[]).await;
    let response = raw_exchange(relay.addr(), &upgrade_request("/", ""), WAIT).await;
    let text = String::from_utf8_lossy(&response);
    assert_eq!(status_of(&response), 504, "{text}");
    assert!(text.contains("handshake_timeout"), "says why: {text}");
}
