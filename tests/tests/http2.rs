//! WebSockets over HTTP/2 (RFC 8441, `[server] http2 = true`): extended CONNECTs on one
//! connection, each stream a session of its own, over h2c and over TLS with ALPN; and a relay
//! with HTTP/2 off refusing the preface.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsrelay_client::MuxClient;
use wsrelay_protocol::{LINK_SUBPROTOCOL, Link, LinkConfig, LinkRole};
use wsrelay_testkit::*;
use wsrelay_tests::MuxBackend;

/// The HTTP/2 connection preface a client sends first (RFC 9113 section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A relay with HTTP/2 on, an admin listener, `extra` `[server]` lines, and routes `/a`, `/b`,
/// `/c` to the backends `a`, `b`, `c` (no route serves `/`).
async fn three_route_relay(
    extra: &str,
    a: &TestBackend,
    b: &TestBackend,
    c: &TestBackend,
) -> TestRelay {
    let toml = format!(
        r#"
[server]
http2 = true
admin = "127.0.0.1:0"
{extra}

[limits]
max_message_size = "64KiB"

[[route]]
path = "/a"
upstream = "a"

[[route]]
path = "/b"
upstream = "b"

[[route]]
path = "/c"
upstream = "c"

[upstream.a]
backends = ["{}"]

[upstream.b]
backends = ["{}"]

[upstream.c]
backends = ["{}"]
"#,
        a.url(),
        b.url(),
        c.url()
    );
    TestRelay::start(&toml, &[]).await
}

async fn backends() -> (TestBackend, TestBackend, TestBackend) {
    (
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    )
}

/// `GET path` on the admin listener over HTTP/1.1: status and body.
async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within("the admin answer", tcp.read_to_end(&mut response))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status_of(&response), body)
}

/// A masked client frame with a payload under 126 bytes.
fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![first_byte, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn three_websockets_share_one_connection_each_to_its_own_backend() {
    let (a, b, c) = backends().await;
    let relay = three_route_relay("", &a, &b, &c).await;
    let mut connection = H2Connection::connect(relay.addr()).await.unwrap();
    let mut sockets = Vec::new();
    for path in ["/a/room?n=1", "/b", "/c/x"] {
        sockets.push((path, connection.open(path).await));
    }
    // Interleaved on purpose: every stream carries its own conversation.
    for round in 0..5 {
        for (path, socket) in &mut sockets {
            let text = format!("{path} {round}");
            assert_eq!(round_trip(socket, &text).await, text);
        }
    }
    for ((_, socket), name) in sockets.iter_mut().zip(["a", "b", "c"]) {
        assert_eq!(round_trip(socket, "whoami").await, name);
        socket
            .send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .unwrap();
        assert_eq!(
            next_data(socket).await,
            Message::binary(vec![0u8, 1, 2, 255])
        );
    }
    // Each backend saw an ordinary HTTP/1.1 WebSocket with its path and the proxy headers.
    let port = relay.addr().port();
    let mut ids = Vec::new();
    for (backend, target) in [(&a, "/a/room?n=1"), (&b, "/b"), (&c, "/c/x")] {
        let seen = &backend.connections()[0];
        assert_eq!(seen.target, target);
        assert_eq!(seen.header("host").unwrap(), format!("127.0.0.1:{port}"));
        assert_eq!(
            seen.header("x-forwarded-host").unwrap(),
            format!("127.0.0.1:{port}")
        );
        assert_eq!(seen.header("x-forwarded-proto").unwrap(), "http");
        assert_eq!(seen.header("x-forwarded-for").unwrap(), "127.0.0.1");
        ids.push(seen.header("x-relay-conn-id").unwrap());
    }
    let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "each stream is a session of its own: {ids:?}"
    );
    assert_eq!(relay.handle.open_sessions(), 3);

    // A path no route serves is refused 404; the others live on.
    let refused = connection.websocket("/nowhere", &[]).await.err().unwrap();
    assert_eq!(refused.status, 404);
    assert!(
        refused.body.contains("no route serves /nowhere"),
        "{}",
        refused.body
    );
    for (path, socket) in &mut sockets {
        assert_eq!(
            round_trip(socket, "still here").await,
            "still here",
            "{path}"
        );
    }

    // Closing one stream's WebSocket leaves the others.
    let (_, mut closing) = sockets.remove(0);
    closing.close(None).await.unwrap();
    expect_close(&mut closing).await;
    wait_until("a's backend leg to close", || a.open() == 0).await;
    wait_until("its session to end", || relay.handle.open_sessions() == 2).await;
    for (path, socket) in &mut sockets {
        assert_eq!(round_trip(socket, "after").await, "after", "{path}");
    }
    // And the connection takes new WebSockets.
    let mut again = connection.open("/a/again").await;
    assert_eq!(round_trip(&mut again, "whoami").await, "a");
}

#[tokio::test]
async fn headers_reach_the_backend_as_over_http1_and_refusals_keep_their_status() {
    let backend = TestBackend::with_behavior("b", BackendBehavior::picking("chat.v2")).await;
    let refusing = TestBackend::with_behavior("r", BackendBehavior::refusing(401)).await;
    let toml = format!(
        r#"
[server]
http2 = true

[limits]
allowed_origins = ["https://chat.example"]

[[route]]
path = "/"
upstream = "main"

[[route]]
path = "/private"
upstream = "private"

[upstream.main]
backends = ["{}"]

[upstream.private]
backends = ["{}"]
"#,
        backend.url(),
        refusing.url()
    );
    let relay = TestRelay::start(&toml, &[]).await;
    let mut connection = H2Connection::connect(relay.addr()).await.unwrap();
    let origin = ("origin", "https://chat.example");
    let mut socket = connection
        .websocket(
            "/room",
            &[
                origin,
                ("cookie", "session=s1"),
                ("cookie", "theme=dark"),
                ("authorization", "Bearer t"),
                ("sec-websocket-protocol", "chat.v1, chat.v2"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(round_trip(&mut socket, "hi").await, "hi");
    let seen = &backend.connections()[0];
    assert_eq!(seen.header("cookie").unwrap(), "session=s1; theme=dark");
    assert_eq!(seen.header("authorization").unwrap(), "Bearer t");
    assert_eq!(seen.header("origin").unwrap(), "https://chat.example");
    assert_eq!(
        seen.header("sec-websocket-protocol").unwrap(),
        "chat.v1, chat.v2"
    );

    // The subprotocol the backend picked is the one the client gets, on a 200.
    let mut offered = connection
        .websocket("/room", &[origin, ("sec-websocket-protocol", "chat.v2")])
        .await
        .unwrap();
    assert_eq!(round_trip(&mut offered, "picked").await, "picked");

    let refused = connection
        .websocket("/private", &[origin])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 401, "the backend's own status");
    let foreign = connection
        .websocket("/room", &[("origin", "https://evil.example")])
        .await
        .err()
        .unwrap();
    assert_eq!(foreign.status, 403);
    let old = connection
        .websocket("/room", &[origin, ("sec-websocket-version", "8")])
        .await
        .err()
        .unwrap();
    assert_eq!(old.status, 426);
    assert_eq!(old.headers["sec-websocket-version"], "13");
    // Plain requests: /healthz answers, anything else is told how to ask for a WebSocket.
    let health = connection.plain(Method::GET, "/healthz").await;
    assert_eq!(
        (health.status.as_u16(), health.body.as_str()),
        (200, "ok\n")
    );
    let page = connection.plain(Method::GET, "/room").await;
    assert_eq!(page.status, 426);
    assert!(page.body.contains("extended CONNECT"), "{}", page.body);
    // The WebSockets opened before all this are still there.
    assert_eq!(round_trip(&mut socket, "still").await, "still");
}

#[tokio::test]
async fn limits_close_only_the_stream_that_broke_them() {
    let (a, b, c) = backends().await;
    let relay = three_route_relay("", &a, &b, &c).await;
    let mut connection = H2Connection::connect(relay.addr()).await.unwrap();
    let mut bystander = connection.open("/c").await;
    let mut too_big = connection.open("/a").await;
    let mut invalid = connection.websocket_stream("/b", &[]).await.unwrap();
    wait_until("three backend legs", || a.open() + b.open() + c.open() == 3).await;

    too_big
        .send(Message::text("x".repeat(65 * 1024)))
        .await
        .unwrap();
    let frame = expect_close(&mut too_big).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Size);

    // A text frame that is not UTF-8, by hand.
    invalid
        .write_all(&masked_frame(0x81, &[0xff, 0xfe, 0xfd]))
        .await
        .unwrap();
    let mut read = Vec::new();
    let code = within("a close frame", async {
        loop {
            let mut buffer = [0u8; 1024];
            let n = invalid.read(&mut buffer).await.unwrap();
            assert!(n > 0, "the stream ended without a close frame: {read:?}");
            read.extend_from_slice(&buffer[..n]);
            if let Some(code) = find_close_code(&read) {
                return code;
            }
        }
    })
    .await;
    assert_eq!(code, 1007);

    wait_until("both offenders' backend legs to close", || {
        a.open() == 0 && b.open() == 0
    })
    .await;
    assert!(a.messages().is_empty() && b.messages().is_empty());
    assert_eq!(round_trip(&mut bystander, "unharmed").await, "unharmed");
    assert_eq!(c.open(), 1);
}

#[tokio::test]
async fn h2_by_alpn_under_tls_and_http1_on_the_same_listener() {
    let certificate = TestCertificate::new();
    let backend = TestBackend::start("b").await;
    let toml = format!(
        "[server]\nhttp2 = true\n{}{SIMPLE}",
        certificate.server_lines()
    );
    let relay = TestRelay::start(&toml, &[&backend]).await;
    let mut connection = H2Connection::connect_tls(relay.addr(), &certificate)
        .await
        .unwrap();
    let mut first = connection.open("/one").await;
    let mut second = connection.open("/two").await;
    assert_eq!(round_trip(&mut first, "secure 1").await, "secure 1");
    assert_eq!(round_trip(&mut second, "secure 2").await, "secure 2");
    let seen = backend.connections();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|c| c.header("x-forwarded-proto").as_deref() == Some("https"))
    );
    assert_eq!(
        seen[0].header("host").unwrap(),
        format!("localhost:{}", relay.addr().port())
    );

    // A wss:// client without ALPN still gets HTTP/1.1 and its 101.
    let tcp = TcpStream::connect(relay.addr()).await.unwrap();
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(certificate.der()).unwrap();
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/three", relay.addr().port());
    let (mut http1, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(round_trip(&mut http1, "plain old").await, "plain old");
}

#[tokio::test]
async fn with_http2_off_the_preface_is_refused_and_http1_goes_on() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let mut tcp = TcpStream::connect(relay.addr()).await.unwrap();
    tcp.write_all(PREFACE).await.unwrap();
    let mut answer = Vec::new();
    within(
        "the relay to close the connection",
        tcp.read_to_end(&mut answer),
    )
    .await
    .unwrap();
    assert!(
        answer.is_empty(),
        "nothing is said to an HTTP/2 client: {answer:?}"
    );
    let mut client = connect(&relay.url("/")).await;
    assert_eq!(
        round_trip(&mut client, "still http/1.1").await,
        "still http/1.1"
    );
}

#[tokio::test]
async fn with_http2_on_the_server_settings_enable_extended_connect() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&format!("[server]\nhttp2 = true\n{SIMPLE}"), &[&backend]).await;
    let mut tcp = TcpStream::connect(relay.addr()).await.unwrap();
    // The preface, then an empty SETTINGS frame.
    tcp.write_all(PREFACE).await.unwrap();
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut head = [0u8; 9];
    within("the server's SETTINGS", tcp.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(head[3], 0x4, "the server's preface is a SETTINGS frame");
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; length];
    within("its settings", tcp.read_exact(&mut payload))
        .await
        .unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect();
    // SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 section 3) is 0x8.
    assert!(settings.contains(&(0x8, 1)), "{settings:?}");
    // And HTTP/1.1 is served beside it.
    let mut client = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut client, "http/1.1").await, "http/1.1");
}

#[tokio::test]
async fn the_connections_api_names_the_http_version() {
    let (a, b, c) = backends().await;
    let relay = three_route_relay("", &a, &b, &c).await;
    let mut connection = H2Connection::connect(relay.addr()).await.unwrap();
    let mut over_h2 = connection.open("/a/h2").await;
    assert_eq!(round_trip(&mut over_h2, "hi").await, "hi");
    let mut over_h1 = connect(&relay.url("/b/h1")).await;
    assert_eq!(round_trip(&mut over_h1, "hi").await, "hi");
    let admin = relay.handle.admin_addr().unwrap();
    let (status, body) = admin_get(admin, "/api/connections").await;
    assert_eq!(status, 200);
    let rows: serde_json::Value = serde_json::from_str(&body).unwrap();
    let http_of = |path: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|row| row["path"] == path)
            .unwrap_or_else(|| panic!("no row for {path}: {body}"))["http"]
            .clone()
    };
    assert_eq!(http_of("/a/h2"), "2");
    assert_eq!(http_of("/b/h1"), "1.1");
}

#[tokio::test]
async fn max_connections_counts_each_websocket_of_an_h2_connection() {
    let (a, b, c) = backends().await;
    let relay = three_route_relay("max_connections = 2", &a, &b, &c).await;
    let mut connection = H2Connection::connect(relay.addr()).await.unwrap();
    let mut first = connection.open("/a").await;
    let mut second = connection.open("/b").await;
    let refused = connection.websocket("/c", &[]).await.err().unwrap();
    assert_eq!(refused.status, 503);
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(refused.body.contains("max_connections"), "{}", refused.body);
    assert_eq!(c.open(), 0, "no backend leg for a refused stream");
    assert_eq!(round_trip(&mut first, "one").await, "one");
    assert_eq!(round_trip(&mut second, "two").await, "two");
    // A closed WebSocket gives its slot back to the next stream.
    first.close(None).await.unwrap();
    expect_close(&mut first).await;
    wait_until("the first session to end", || {
        relay.handle.open_sessions() == 1
    })
    .await;
    let mut third = connection.open("/c").await;
    assert_eq!(round_trip(&mut third, "three").await, "three");
}

#[tokio::test]
async fn a_drain_closes_every_stream_1001_then_ends_the_connection() {
    let (a, b, c) = backends().await;
    let relay = three_route_relay("", &a, &b, &c).await;
    let mut connection = H2Connection::connect(relay.addr()).await.unwrap();
    let mut sockets = Vec::new();
    for path in ["/a", "/b", "/c"] {
        let mut socket = connection.open(path).await;
        assert_eq!(round_trip(&mut socket, "hi").await, "hi");
        sockets.push(socket);
    }
    let report = tokio::spawn(relay.handle.shutdown());
    for socket in &mut sockets {
        let frame = expect_close(socket).await.expect("a close frame");
        assert_eq!(frame.code, CloseCode::Away);
    }
    drop(sockets);
    connection.closed().await.expect("a graceful end (GOAWAY)");
    let report = within("the shutdown", report).await.unwrap();
    assert_eq!(report.sessions_at_drain, 3);
    assert_eq!(report.sessions_aborted, 0);
    for backend in [&a, &b, &c] {
        assert_eq!(
            backend.close_codes(),
            [Some(1001)],
            "{}'s leg closed going away",
            backend.name
        );
    }
}

#[tokio::test]
async fn the_sdk_mux_client_works_over_an_h2_stream() {
    let plain = TestBackend::start("plain").await;
    let muxed = MuxBackend::start("muxed").await;
    let toml = format!(
        r#"
[server]
http2 = true

[[route]]
path = "/"
upstream = "muxed"
mode = "mux"

[[route]]
path = "/a"
upstream = "plain"

[upstream.plain]
backends = ["{}"]

[upstream.muxed]
backends = ["{}"]
"#,
        plain.url(),
        muxed.url()
    );
    let relay = TestRelay::start(&toml, &[]).await;
    wait_until("the relay's mux links", || muxed.links_open() == 2).await;
    let mut connection = H2Connection::connect(relay.addr()).await.unwrap();
    let socket = connection
        .websocket("/", &[("sec-websocket-protocol", LINK_SUBPROTOCOL)])
        .await
        .unwrap();
    let (link, driver) = Link::establish(socket, LinkRole::Initiator, LinkConfig::default())
        .await
        .unwrap();
    tokio::spawn(driver);
    let client = MuxClient::from_link(&relay.url("/"), link);
    // A plain WebSocket beside the link, on the same HTTP/2 connection.
    let mut beside = connection.open("/a/beside").await;
    for (path, expected) in [("/a/x", "plain"), ("/rooms/1", "muxed")] {
        let mut stream = client.open(path, Vec::new()).await.unwrap();
        stream.send(Message::text("whoami")).await.unwrap();
        let reply = within("a reply", stream.next()).await.unwrap().unwrap();
        assert_eq!(reply.to_text().unwrap(), expected, "{path}");
    }
    assert_eq!(round_trip(&mut beside, "whoami").await, "plain");
    let targets: Vec<String> = plain
        .connections()
        .iter()
        .map(|c| c.target.clone())
        .collect();
    assert_eq!(targets, ["/a/beside", "/a/x"]);
}

#[tokio::test]
async fn an_h2_connection_outlives_its_handshake_while_it_carries_streams_then_closes_idle() {
    let backend = TestBackend::start("b").await;
    let toml = format!("[server]\nhttp2 = true\nhandshake_timeout = \"1s\"\n{SIMPLE}");
    let relay = TestRelay::start(&toml, &[&backend]).await;
    let mut connection = H2Connection::connect(relay.addr()).await.unwrap();
    let mut socket = connection.open("/long").await;
    // Past the handshake deadline (and its grace), which ends an HTTP/1.1 connection that has
    // not upgraded: this one carries a WebSocket.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(round_trip(&mut socket, "later").await, "later");
    let mut another = connection.open("/another").await;
    assert_eq!(round_trip(&mut another, "new").await, "new");
    for mut socket in [socket, another] {
        socket.close(None).await.unwrap();
        expect_close(&mut socket).await;
    }
    // With nothing open for handshake_timeout the relay ends it (GOAWAY).
    connection.closed().await.expect("a graceful end");
}
