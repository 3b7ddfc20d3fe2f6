//! The SDK's `Client` with `permessage-deflate` (`ClientBuilder::deflate`): against a route with
//! `compression = "client"` it negotiates, its messages (text and binary, small and larger
//! than 64 KiB) round trip through the relay to a real echo backend and back, and the relay's
//! metrics show they were compressed; against a route with compression off it works
//! uncompressed; after the relay closes it 1012 it reconnects compressed again; a server whose
//! answer names a parameter or extension the client did not offer fails the dial with
//! `ConnectError::Extension`; bytes a server sends right behind its 101 are not lost; the offer
//! is a browser's, and without `deflate` the request has none; a close the client starts is
//! one Close frame on the wire; a mux-mode route compresses the client leg too; and chat
//! traffic's bytes on the wire, plain and compressed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use wsrelay_client::{
    Client, CloseReason, ConnectError, Connected, Deflate, Event, ExtensionError, Heartbeat,
    Message, Reconnect,
};
use wsrelay_testkit::{
    CountedStream, TestBackend, TestCertificate, TestRelay, WireCount, chat_message, within,
};

/// One route over `BACKENDS` with `compression` as given, an admin listener, and backend
/// loss closing the client (1012).
fn config(compression: &str) -> String {
    format!(
        r#"
[server]
admin = "127.0.0.1:0"

[[route]]
path = "/"
upstream = "main"
compression = "{compression}"

[upstream.main]
backends = BACKENDS
on_backend_loss = "close"
"#
    )
}

fn quick_reconnect() -> Reconnect {
    Reconnect::default().backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// The next event that is not a `Reconnecting`, within the testkit's bound.
async fn next_event(client: &mut Client) -> Event {
    within("an event", async {
        loop {
            match client.next_event().await.expect("the client is alive") {
                Event::Reconnecting { .. } => continue,
                event => return event,
            }
        }
    })
    .await
}

async fn expect_connected(client: &mut Client) -> Connected {
    match next_event(client).await {
        Event::Connected(connected) => connected,
        other => panic!("expected Connected, got {other:?}"),
    }
}

/// The next event, which must be a message.
async fn next_message(client: &mut Client) -> Message {
    match next_event(client).await {
        Event::Message(message) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Sends `message` and waits for its echo.
async fn echo(client: &mut Client, message: Message) {
    client.send(message.clone()).await.unwrap();
    match next_event(client).await {
        Event::Message(back) => assert!(back == message, "the echo differs ({} bytes)", back.len()),
        other => panic!("expected the echo, got {other:?}"),
    }
}

/// Text a little like a log: compressible, and over 64 KiB.
fn big_text() -> String {
    (0..2000)
        .map(|i| format!("line {i}: the quick brown fox jumps over the lazy dog\n"))
        .collect()
}

/// Bytes that deflate can't shrink much (xorshift noise), over 64 KiB.
fn big_binary() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..100_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[tokio::test]
async fn a_compressed_client_round_trips_through_a_compressing_route() {
    let backend = TestBackend::start("echo").await;
    let relay = TestRelay::start(&config("client"), &[&backend]).await;
    let mut client = Client::builder(&relay.url("/"))
        .deflate(Deflate::default())
        .connect()
        .await
        .unwrap();
    let connected = expect_connected(&mut client).await;
    assert!(connected.is_compressed(), "{connected:?}");
    // The relay always answers with both no-context-takeovers.
    let agreed = connected.compression.unwrap();
    assert!(agreed.server_no_context_takeover && agreed.client_no_context_takeover);
    assert_eq!(
        (agreed.server_max_window_bits, agreed.client_max_window_bits),
        (15, 15)
    );

    echo(&mut client, Message::text("hi")).await;
    echo(&mut client, Message::text("")).await;
    echo(&mut client, Message::binary(vec![0u8, 1, 2, 255])).await;
    for i in 0..20 {
        echo(&mut client, Message::text(chat_message(i))).await;
    }
    let text = big_text();
    echo(&mut client, Message::text(text.clone())).await;
    let binary = big_binary();
    echo(&mut client, Message::binary(binary.clone())).await;
    // The backend got every message decompressed, in order.
    let messages = backend.messages();
    assert_eq!(messages.len(), 25);
    assert_eq!(messages[23].to_text().unwrap(), text);
    assert_eq!(&messages[24].clone().into_data()[..], &binary[..]);

    assert_eq!(
        relay.metric("wsrelay_compression_sessions_total").await,
        1.0
    );
    let message_in = relay
        .metric("wsrelay_compression_message_bytes_total{direction=\"in\"}")
        .await;
    let wire_in = relay
        .metric("wsrelay_compression_wire_bytes_total{direction=\"in\"}")
        .await;
    let payload = (2 + 4 + text.len() + binary.len()) as f64
        + (0..20).map(|i| chat_message(i).len() as f64).sum::<f64>();
    assert_eq!(message_in, payload);
    // The text shrinks a lot, the noise hardly grows: far less than the payload on the wire.
    assert!(
        wire_in < binary.len() as f64 + text.len() as f64 / 4.0,
        "{wire_in} bytes on the wire for {message_in} of messages"
    );
    client.close(1000, "bye").await;
    match next_event(&mut client).await {
        Event::Closed(CloseReason::Local { code: 1000, .. }) => {}
        other => panic!("expected a local close, got {other:?}"),
    }
    backend
        .wait_for("the client's close", |_| {
            backend.close_codes() == [Some(1000)]
        })
        .await;
}

#[tokio::test]
async fn against_a_route_without_compression_the_client_works_uncompressed() {
    let backend = TestBackend::start("echo").await;
    let relay = TestRelay::start(&config("off"), &[&backend]).await;
    let mut client = Client::builder(&relay.url("/"))
        .deflate(Deflate::default())
        .connect()
        .await
        .unwrap();
    let connected = expect_connected(&mut client).await;
    assert!(!connected.is_compressed());
    echo(&mut client, Message::text("hi")).await;
    echo(&mut client, Message::text(big_text())).await;
    echo(&mut client, Message::binary(big_binary())).await;
    assert_eq!(
        relay.metric("wsrelay_compression_sessions_total").await,
        0.0
    );
}

#[tokio::test]
async fn after_a_1012_the_client_reconnects_compressed_again() {
    let backend = TestBackend::start("echo").await;
    let relay = TestRelay::start(&config("client"), &[&backend]).await;
    let mut client = Client::builder(&relay.url("/"))
        .deflate(Deflate::default().client_no_context_takeover())
        .reconnect(quick_reconnect())
        .heartbeat(Heartbeat {
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(5),
        })
        .on_connect(|connected| vec![format!("hello {}", connected.connection).into()])
        .connect()
        .await
        .unwrap();
    let first = expect_connected(&mut client).await;
    assert!(first.is_compressed());
    assert_eq!(next_message(&mut client).await, Message::text("hello 1"));
    echo(&mut client, Message::text(chat_message(1))).await;
    // Heartbeat pings are answered on a compressed connection too: it stays up while quiet.
    tokio::time::sleep(Duration::from_millis(700)).await;
    echo(&mut client, Message::text(chat_message(2))).await;

    backend.kill_connections();
    match next_event(&mut client).await {
        Event::Disconnected {
            code: Some(1012), ..
        } => {}
        other => panic!("expected a 1012, got {other:?}"),
    }
    let second = expect_connected(&mut client).await;
    assert_eq!(second.connection, 2);
    assert_eq!(second.compression, first.compression);
    assert_eq!(next_message(&mut client).await, Message::text("hello 2"));
    echo(&mut client, Message::text(big_text())).await;
    assert_eq!(
        relay.metric("wsrelay_compression_sessions_total").await,
        2.0
    );
}

/// A server on 127.0.0.1 that completes each handshake with `extensions` as its
/// `Sec-WebSocket-Extensions` (none when empty) and writes `behind` right after the head, in
/// the same write; then reads until the client leaves. Returns its URL.
async fn handmade_server(extensions: &'static str, behind: &'static [u8]) -> String {
    handmade_server_seeing(extensions, behind).await.0
}

/// [`handmade_server`], also returning the request heads it gets.
async fn handmade_server_seeing(
    extensions: &'static str,
    behind: &'static [u8],
) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&heads);
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") {
                    if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    request.push(byte[0]);
                }
                let request = String::from_utf8_lossy(&request).into_owned();
                seen.lock().unwrap().push(request.clone());
                let key = request
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| value.trim().to_owned())
                    })
                    .expect("a key");
                let mut response = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
                    derive_accept_key(key.as_bytes())
                );
                if !extensions.is_empty() {
                    response.push_str(&format!("Sec-WebSocket-Extensions: {extensions}\r\n"));
                }
                response.push_str("\r\n");
                let mut bytes = response.into_bytes();
                bytes.extend_from_slice(behind);
                let _ = tcp.write_all(&bytes).await;
                let mut sink = [0u8; 1024];
                while tcp.read(&mut sink).await.unwrap_or(0) > 0 {}
            });
        }
    });
    (url, heads)
}

/// The value of header `name` in a request head.
fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

#[tokio::test]
async fn the_offer_is_a_browsers_and_without_deflate_there_is_none() {
    let (url, heads) = handmade_server_seeing("", b"").await;
    let plain = Client::builder(&url).connect().await.unwrap();
    let offering = Client::builder(&url)
        .deflate(Deflate::default())
        .connect()
        .await
        .unwrap();
    let custom = Client::builder(&url)
        .deflate(
            Deflate::default()
                .server_no_context_takeover()
                .server_max_window_bits(12),
        )
        .connect()
        .await
        .unwrap();
    let heads = heads.lock().unwrap().clone();
    let offers: Vec<_> = heads
        .iter()
        .map(|head| header_of(head, "sec-websocket-extensions"))
        .collect();
    assert_eq!(
        offers,
        [
            None,
            Some("permessage-deflate; client_max_window_bits".to_owned()),
            Some(
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=12; client_max_window_bits"
                    .to_owned()
            ),
        ]
    );
    // Apart from the offer (and the key), the requests are the same.
    let strip = |head: &str| -> Vec<String> {
        head.lines()
            .filter(|line| {
                let name = line
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                name != "sec-websocket-key" && name != "sec-websocket-extensions"
            })
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(strip(&heads[0]), strip(&heads[1]));
    drop((plain, offering, custom));
}

#[tokio::test]
async fn an_answer_with_something_unoffered_fails_the_dial_with_a_typed_error() {
    let cases: [(&str, ExtensionError); 3] = [
        (
            "permessage-deflate; server_no_context_takeover; x_window_hint=12",
            ExtensionError::UnknownParameter("x_window_hint".into()),
        ),
        (
            "permessage-deflate; server_max_window_bits=15",
            ExtensionError::ServerWindowTooLarge {
                offered: 10,
                answered: 15,
            },
        ),
        (
            "x-webkit-deflate-frame",
            ExtensionError::NotOffered("x-webkit-deflate-frame".into()),
        ),
    ];
    for (answer, expected) in cases {
        let url = handmade_server(answer, b"").await;
        let error = Client::builder(&url)
            .deflate(Deflate::default().server_max_window_bits(10))
            .connect()
            .await
            .expect_err(answer);
        match &error {
            ConnectError::Extension {
                source, answer: a, ..
            } => {
                assert_eq!(source, &expected, "{answer}");
                assert_eq!(a, answer);
            }
            other => panic!("{answer}: expected ConnectError::Extension, got {other}"),
        }
        assert!(error.is_permanent(), "{error}");
        assert!(error.to_string().contains(answer), "{error}");
    }

    // A reconnecting client stops on it rather than retrying.
    let url = handmade_server("permessage-deflate; mystery", b"").await;
    let mut client = Client::builder(&url)
        .deflate(Deflate::default())
        .reconnect(quick_reconnect())
        .start()
        .unwrap();
    match next_event(&mut client).await {
        Event::Closed(CloseReason::Refused(error)) => {
            assert!(
                matches!(
                    &*error,
                    ConnectError::Extension {
                        source: ExtensionError::UnknownParameter(name),
                        ..
                    } if name == "mystery"
                ),
                "{error}"
            );
        }
        other => panic!("expected Closed(Refused), got {other:?}"),
    }
}

#[tokio::test]
async fn frames_right_behind_the_101_are_read_compressed_or_not() {
    // An uncompressed text frame "hello" (a compressed connection may send one too).
    const HELLO: &[u8] = b"\x81\x05hello";
    for (answer, compressed) in [
        (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            true,
        ),
        ("", false),
    ] {
        let url = handmade_server(answer, HELLO).await;
        let mut client = Client::builder(&url)
            .deflate(Deflate::default())
            .heartbeat(Heartbeat::off())
            .connect()
            .await
            .unwrap();
        assert_eq!(
            expect_connected(&mut client).await.is_compressed(),
            compressed
        );
        assert_eq!(
            next_message(&mut client).await,
            Message::text("hello"),
            "{answer:?}"
        );
    }
}

/// A TCP forwarder to `target` that counts the bytes it carries both ways.
async fn counting_proxy(target: std::net::SocketAddr) -> (String, WireCount) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = WireCount::default();
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let mut server = TcpStream::connect(target).await.unwrap();
            let mut client = CountedStream::new(client, counted.clone());
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (format!("ws://{addr}/"), count)
}

#[tokio::test]
async fn chat_traffic_takes_fewer_bytes_on_the_wire_compressed() {
    let backend = TestBackend::start("echo").await;
    let relay = TestRelay::start(&config("client"), &[&backend]).await;
    let history = format!(
        "[{}]",
        (0..20).map(chat_message).collect::<Vec<_>>().join(",")
    );
    // Bytes on the wire (both ways, handshake excluded) for: 200 chat messages echoed one by
    // one, then 20 room histories; uncompressed first.
    let mut chat = Vec::new();
    let mut histories = Vec::new();
    for deflate in [false, true] {
        let (url, count) = counting_proxy(relay.addr()).await;
        let mut builder = Client::builder(&url).heartbeat(Heartbeat::off());
        if deflate {
            builder = builder.deflate(Deflate::default());
        }
        let mut client = builder.connect().await.unwrap();
        assert_eq!(expect_connected(&mut client).await.is_compressed(), deflate);
        let start = count.total();
        for i in 0..200 {
            echo(&mut client, Message::text(chat_message(i))).await;
        }
        let middle = count.total();
        for _ in 0..20 {
            echo(&mut client, Message::text(history.clone())).await;
        }
        chat.push(middle - start);
        histories.push(count.total() - middle);
        client.close(1000, "").await;
    }
    let payload: usize = (0..200).map(|i| 2 * chat_message(i).len()).sum();
    eprintln!(
        "SDK client, 200 chat messages echoed ({payload} payload bytes both ways): {} bytes on \
         the wire uncompressed, {} with permessage-deflate ({:.2}x fewer); 20 room histories of \
         {} bytes echoed: {} uncompressed, {} compressed ({:.2}x fewer)",
        chat[0],
        chat[1],
        chat[0] as f64 / chat[1] as f64,
        history.len(),
        histories[0],
        histories[1],
        histories[0] as f64 / histories[1] as f64,
    );
    // Each message is compressed on its own (the relay answers no context takeover): a short
    // one gains little, a long one a lot.
    assert!(chat[1] * 10 < chat[0] * 9, "{chat:?}");
    assert!(histories[1] * 4 < histories[0], "{histories:?}");
}

#[tokio::test]
async fn over_wss_a_message_over_the_limit_ends_the_connection_and_the_client_comes_back() {
    let certificate = TestCertificate::new();
    let backend = TestBackend::start("echo").await;
    let toml = config("client").replace(
        "[server]\n",
        &format!("[server]\n{}", certificate.server_lines()),
    );
    let relay = TestRelay::start(&toml, &[&backend]).await;
    let url = format!("wss://localhost:{}/", relay.addr().port());
    let mut client = Client::builder(&url)
        .tls_root_certificates(vec![certificate.der()])
        .deflate(Deflate::default())
        .max_message_size(10_000)
        .reconnect(quick_reconnect())
        .connect()
        .await
        .unwrap();
    assert!(expect_connected(&mut client).await.is_compressed());
    echo(&mut client, Message::text(chat_message(3))).await;
    // Its echo is a few hundred bytes on the wire, but the limit is on the message.
    client
        .send(Message::text("x".repeat(20_000)))
        .await
        .unwrap();
    match next_event(&mut client).await {
        Event::Disconnected { code: None, reason } => {
            assert!(reason.contains("Message too long"), "{reason}");
        }
        other => panic!("expected the connection to end, got {other:?}"),
    }
    let again = expect_connected(&mut client).await;
    assert!(again.is_compressed() && again.connection == 2);
    echo(&mut client, Message::text(chat_message(4))).await;
    assert_eq!(
        relay.metric("wsrelay_compression_sessions_total").await,
        2.0
    );
}

/// A compressed server that echoes the client's Close and counts the Close frames the client
/// sends in all.
async fn close_counting_server() -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let closes = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&closes);
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            assert_eq!(tcp.read(&mut byte).await.unwrap(), 1);
            request.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&request).into_owned();
        let key = header_of(&head, "sec-websocket-key").unwrap();
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n\r\n",
            derive_accept_key(key.as_bytes())
        );
        tcp.write_all(response.as_bytes()).await.unwrap();
        // Masked client frames with short payloads: opcode, length, mask, payload.
        let mut header = [0u8; 2];
        while tcp.read_exact(&mut header).await.is_ok() {
            let len = usize::from(header[1] & 0x7f);
            let mut rest = vec![0u8; 4 + len];
            if tcp.read_exact(&mut rest).await.is_err() {
                break;
            }
            if header[0] & 0x0f == 0x8 && counted.fetch_add(1, Ordering::SeqCst) == 0 {
                tcp.write_all(b"\x88\x02\x03\xe8").await.unwrap();
            }
        }
    });
    (url, closes)
}

#[tokio::test]
async fn a_close_the_client_starts_is_one_close_frame_on_the_wire() {
    let (url, closes) = close_counting_server().await;
    let mut client = Client::builder(&url)
        .deflate(Deflate::default())
        .heartbeat(Heartbeat::off())
        .connect()
        .await
        .unwrap();
    assert!(expect_connected(&mut client).await.is_compressed());
    client.close(1000, "").await;
    match next_event(&mut client).await {
        Event::Closed(CloseReason::Local { code: 1000, .. }) => {}
        other => panic!("expected a local close, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(closes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_compressed_client_works_through_a_mux_route_too() {
    // chat_cli --deflate's case: the client leg is compressed, the mux link behind it is not.
    let backend = wsrelay_tests::MuxBackend::start("m").await;
    let toml = config("client")
        .replace(
            "upstream = \"main\"\n",
            "upstream = \"main\"\nmode = \"mux\"\n",
        )
        .replace("BACKENDS", &format!("[\"{}\"]", backend.url()));
    let relay = TestRelay::start(&toml, &[]).await;
    let mut client = Client::builder(&relay.url("/"))
        .deflate(Deflate::default())
        .connect()
        .await
        .unwrap();
    assert!(expect_connected(&mut client).await.is_compressed());
    client.send("whoami").await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("m"));
    echo(&mut client, Message::text(big_text())).await;
    assert_eq!(
        relay.metric("wsrelay_compression_sessions_total").await,
        1.0
    );
}
