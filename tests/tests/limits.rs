//! Bad input gets a clear answer and nothing else breaks: each protocol violation
//! or oversized message closes only its own connection, with the RFC 6455 close code, and
//! closes that connection's backend leg; a well-behaved client of the same relay and backend
//! keeps working throughout.

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use wsrelay_testkit::{
    RawClient, TestBackend, TestRelay, connect, next_data, raw_exchange, round_trip, status_of,
    upgrade_request, wait_until,
};

const KIB: usize = 1024;

/// One route over `BACKENDS` with the given `[limits]` lines.
fn config(limits: &str) -> String {
    format!(
        r#"
[limits]
{limits}

[[route]]
path = "/"
upstream = "main"

[upstream.main]
backends = BACKENDS
"#
    )
}

const SMALL_MESSAGES: &str = "max_message_size = \"64KiB\"";
const SMALL_FRAMES: &str = "max_frame_size = \"16KiB\"";

/// A frame as `RawClient::send_frame` takes it: first byte, payload, masked.
struct Frame {
    first_byte: u8,
    payload: Vec<u8>,
    masked: bool,
}

fn frame(first_byte: u8, payload: impl Into<Vec<u8>>) -> Frame {
    Frame {
        first_byte,
        payload: payload.into(),
        masked: true,
    }
}

/// Sends `frames` from a raw client next to a well-behaved bystander and checks that the
/// raw client alone is closed with `expected`, its backend leg is closed with 1001, nothing
/// of the offending message reached the backend, and the bystander still gets echoes.
async fn assert_violation_closes_only_the_sender(limits: &str, frames: &[Frame], expected: u16) {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::start(&config(limits), &[&backend]).await;
    let mut bystander = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut bystander, "before").await, "before");
    let mut raw = RawClient::connect(relay.addr(), "/").await;
    wait_until("both backend legs to open", || backend.open() == 2).await;

    for f in frames {
        raw.send_frame(f.first_byte, &f.payload, f.masked).await;
    }
    let code = raw.close_code().await;
    assert_eq!(code, Some(expected));
    // Completes the close handshake so the relay finishes at once.
    raw.send_frame(0x88, &expected.to_be_bytes(), true).await;

    wait_until("the offender's backend leg to close", || {
        backend.open() == 1
    })
    .await;
    assert_eq!(backend.close_codes(), [Some(1001)]);
    assert_eq!(round_trip(&mut bystander, "after").await, "after");
    assert_eq!(backend.texts(), ["before", "after"]);
    wait_until("the offender's session to end", || {
        relay.handle.open_sessions() == 1
    })
    .await;
}

#[tokio::test]
async fn a_single_frame_message_over_max_message_size_closes_the_sender_with_1009() {
    let payload = vec![b'x'; 64 * KIB + 1];
    assert_violation_closes_only_the_sender(SMALL_MESSAGES, &[frame(0x82, payload)], 1009).await;
}

#[tokio::test]
async fn fragments_summing_over_max_message_size_close_the_sender_with_1009() {
    let part = vec![b'x'; 40 * KIB];
    assert_violation_closes_only_the_sender(
        SMALL_MESSAGES,
        &[frame(0x02, part.clone()), frame(0x80, part)],
        1009,
    )
    .await;
}

#[tokio::test]
async fn a_frame_over_max_frame_size_closes_the_sender_with_1009() {
    let payload = vec![b'x'; 16 * KIB + 1];
    assert_violation_closes_only_the_sender(SMALL_FRAMES, &[frame(0x82, payload)], 1009).await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_message_closes_the_sender_with_1007() {
    assert_violation_closes_only_the_sender("", &[frame(0x81, [0xC3, 0x28])], 1007).await;
}

#[tokio::test]
async fn invalid_utf8_split_across_fragments_closes_the_sender_with_1007() {
    // Each fragment alone could be the start or end of a valid sequence; together they are not.
    assert_violation_closes_only_the_sender(
        "",
        &[frame(0x01, [b'a', 0xC3]), frame(0x80, [0x28, b'b'])],
        1007,
    )
    .await;
}

#[tokio::test]
async fn an_unmasked_client_frame_closes_the_sender_with_1002() {
    let unmasked = Frame {
        first_byte: 0x81,
        payload: b"hello".to_vec(),
        masked: false,
    };
    assert_violation_closes_only_the_sender("", &[unmasked], 1002).await;
}

#[tokio::test]
async fn a_reserved_data_opcode_closes_the_sender_with_1002() {
    assert_violation_closes_only_the_sender("", &[frame(0x83, *b"x")], 1002).await;
}

#[tokio::test]
async fn a_reserved_control_opcode_closes_the_sender_with_1002() {
    assert_violation_closes_only_the_sender("", &[frame(0x8B, *b"x")], 1002).await;
}

#[tokio::test]
async fn an_rsv1_bit_without_an_extension_closes_the_sender_with_1002() {
    assert_violation_closes_only_the_sender("", &[frame(0xC1, *b"hello")], 1002).await;
}

#[tokio::test]
async fn a_fragmented_ping_closes_the_sender_with_1002() {
    assert_violation_closes_only_the_sender("", &[frame(0x09, *b"ping")], 1002).await;
}

#[tokio::test]
async fn a_ping_with_a_126_byte_payload_closes_the_sender_with_1002() {
    assert_violation_closes_only_the_sender("", &[frame(0x89, vec![b'p'; 126])], 1002).await;
}

#[tokio::test]
async fn a_continuation_without_a_start_closes_the_sender_with_1002() {
    assert_violation_closes_only_the_sender("", &[frame(0x80, *b"orphan")], 1002).await;
}

#[tokio::test]
async fn a_backend_message_over_max_message_size_closes_the_client_with_1014() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::start(&config(SMALL_MESSAGES), &[&backend]).await;
    // Raw, because tungstenite's client turns a received 1014 (which it does not know) into
    // 1002 before the application sees it; the wire is what this contract is about.
    let mut raw = RawClient::connect(relay.addr(), "/").await;
    wait_until("the backend leg to open", || backend.open() == 1).await;

    backend
        .push_to_all(Message::binary(vec![0u8; 64 * KIB + 1]))
        .await;

    assert_eq!(raw.close_code().await, Some(1014));
    raw.send_frame(0x88, &1014u16.to_be_bytes(), true).await;
    wait_until("the backend leg to close", || backend.open() == 0).await;
    assert_eq!(backend.close_codes(), [Some(1009)]);

    let mut next = connect(&relay.url("/")).await;
    assert_eq!(
        round_trip(&mut next, "still serving").await,
        "still serving"
    );
}

#[tokio::test]
async fn garbage_instead_of_an_http_request_is_refused_and_the_relay_serves_the_next_client() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::simple(&[&backend]).await;

    let response = raw_exchange(relay.addr(), &[0xFF; 1024], Duration::from_secs(5)).await;
    assert!(
        response.is_empty() || status_of(&response) == 400,
        "{:?}",
        String::from_utf8_lossy(&response)
    );

    let mut client = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut client, "hello").await, "hello");
    assert_eq!(backend.connections().len(), 1);
}

#[tokio::test]
async fn a_message_exactly_at_the_default_limit_arrives_whole_with_its_type() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let mut client = connect(&relay.url("/")).await;
    let limit = 1 << 20;

    let binary: Vec<u8> = (0..limit).map(|i| (i % 251) as u8).collect();
    client.send(Message::binary(binary.clone())).await.unwrap();
    match next_data(&mut client).await {
        Message::Binary(echo) => assert!(echo == binary, "binary echo differs"),
        other => panic!("binary came back as another kind of {} bytes", other.len()),
    }

    // Two-byte characters: the relay's reads split some of them, and must still validate.
    let text = "é".repeat(limit / 2);
    assert_eq!(text.len(), limit);
    client.send(Message::text(text.clone())).await.unwrap();
    match next_data(&mut client).await {
        Message::Text(echo) => assert!(echo.as_str() == text, "text echo differs"),
        other => panic!("text came back as another kind of {} bytes", other.len()),
    }

    let seen = backend.messages();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].is_binary() && seen[0].len() == limit);
    assert!(seen[1].is_text() && seen[1].len() == limit);
}

/// Sends an upgrade from `local` (a loopback address standing in for a client host) and reads
/// the answer's head; the socket stays open with the connection it holds.
async fn upgrade_from(
    local: &str,
    relay: std::net::SocketAddr,
) -> (u16, String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(relay).await.unwrap();
    tcp.write_all(&upgrade_request("/", "")).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = wsrelay_testkit::within("an answer", tcp.read(&mut byte)).await;
        if read.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    // A refusal's body follows its head; a short read is enough to see its reason.
    let mut body = vec![0u8; 512];
    let mut text = String::from_utf8_lossy(&head).into_owned();
    if status_of(&head) != 101 {
        let read = wsrelay_testkit::within("a body", tcp.read(&mut body)).await;
        text.push_str(&String::from_utf8_lossy(&body[..read.unwrap_or(0)]));
    }
    (status_of(&head), text, tcp)
}

#[tokio::test]
async fn an_address_over_max_connections_per_ip_gets_503_and_others_are_untouched() {
    let backend = TestBackend::start("b").await;
    let limits = "max_connections_per_ip = 2\n\n[server]\nadmin = \"127.0.0.1:0\"";
    let relay = TestRelay::start(&config(limits), &[&backend]).await;
    let addr = relay.addr();
    let (first, _, held) = upgrade_from("127.0.0.1", addr).await;
    let (second, _, _also_held) = upgrade_from("127.0.0.1", addr).await;
    assert_eq!((first, second), (101, 101));
    let (third, text, _) = upgrade_from("127.0.0.1", addr).await;
    assert_eq!(third, 503, "{text}");
    assert!(text.contains("max_connections_per_ip"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );
    // Another host is not limited by this one's connections.
    let (elsewhere, text, _elsewhere_held) = upgrade_from("127.0.0.2", addr).await;
    assert_eq!(elsewhere, 101, "{text}");
    assert_eq!(handshakes(&relay, "over_ip_limit").await, 1.0);
    // A connection that ends gives its share back.
    drop(held);
    wait_until("the closed connection to free its share", || {
        relay.handle.open_sessions() == 2
    })
    .await;
    let mut admitted = None;
    for _ in 0..100 {
        let (status, _, tcp) = upgrade_from("127.0.0.1", addr).await;
        if status == 101 {
            admitted = Some(tcp);
            break;
        }
    }
    assert!(admitted.is_some(), "the address never got its share back");
}

#[tokio::test]
async fn handshakes_over_max_handshakes_per_second_get_503() {
    let backend = TestBackend::start("b").await;
    let limits = "max_handshakes_per_second = 1\n\n[server]\nadmin = \"127.0.0.1:0\"";
    let relay = TestRelay::start(&config(limits), &[&backend]).await;
    let addr = relay.addr();
    // Twenty at once against a pace of one a second: however slow this machine, most wait.
    let attempts = (0..20).map(|_| upgrade_from("127.0.0.1", addr));
    let answers = futures_util::future::join_all(attempts).await;
    let refused: Vec<&String> = answers
        .iter()
        .filter(|(status, _, _)| *status == 503)
        .map(|(_, text, _)| text)
        .collect();
    assert!(!refused.is_empty(), "none refused");
    assert!(
        answers.iter().any(|(status, _, _)| *status == 101),
        "none admitted"
    );
    assert!(
        refused
            .iter()
            .all(|text| text.contains("max_handshakes_per_second")),
        "{refused:?}"
    );
    let counted = handshakes(&relay, "over_handshake_rate").await;
    assert_eq!(counted, refused.len() as f64);
}

/// `wsrelay_handshakes_total{outcome=OUTCOME,status="503"}` on the relay's admin listener.
async fn handshakes(relay: &TestRelay, outcome: &str) -> f64 {
    relay
        .metric(&format!(
            "wsrelay_handshakes_total{{outcome=\"{outcome}\",status=\"503\"}}"
        ))
        .await
}

#[tokio::test]
async fn a_new_message_inside_a_fragmented_one_closes_the_sender_with_1002() {
    // A text message starts, and a binary one starts before it is finished.
    let interleaved = [frame(0x01, *b"part one "), frame(0x82, *b"intruder")];
    assert_violation_closes_only_the_sender("", &interleaved, 1002).await;
}

#[tokio::test]
async fn ten_thousand_one_byte_fragments_arrive_as_one_message() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::start(&config(""), &[&backend]).await;
    let mut raw = RawClient::connect(relay.addr(), "/").await;
    wait_until("the backend leg to open", || backend.open() == 1).await;
    raw.send_frame(0x01, b"a", true).await;
    for _ in 0..9_998 {
        raw.send_frame(0x00, b"a", true).await;
    }
    raw.send_frame(0x80, b"a", true).await;
    wait_until("the whole message at the backend", || {
        backend.messages().iter().any(|m| m.len() == 10_000)
    })
    .await;
    let messages = backend.messages();
    assert_eq!(messages.len(), 1, "one message, not 10,000");
    assert!(messages[0].is_text());
}

#[tokio::test]
async fn a_ping_flood_from_a_client_that_never_reads_disturbs_nobody() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::start(&config(""), &[&backend]).await;
    let mut bystander = connect(&relay.url("/")).await;
    let mut flooder = RawClient::connect(relay.addr(), "/").await;
    // Pings the relay answers and the client never reads (tungstenite keeps one pending pong,
    // not one per ping): the flooder's own message still crosses, and others are unaffected.
    for n in 0..20_000u32 {
        flooder.send_frame(0x89, &n.to_be_bytes(), true).await;
    }
    flooder.send_frame(0x81, b"after the flood", true).await;
    wait_until("the flooder's message at the backend", || {
        backend
            .messages()
            .iter()
            .any(|m| m.to_text().is_ok_and(|t| t == "after the flood"))
    })
    .await;
    assert_eq!(round_trip(&mut bystander, "fine").await, "fine");
}
