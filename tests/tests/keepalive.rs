//! Keepalive on both legs (`[keepalive]`): pings keep quiet but live peers
//! connected, silent peers are detected and their other leg is closed, client pings stay
//! between the client and the relay, and idle connections are closed when configured.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsrelay_testkit::{
    BackendBehavior, Client, RawClient, SIMPLE, TestBackend, TestRelay, WAIT, connect, connect_as,
    expect_close, round_trip, simple_hashed, user_ranked_first, wait_until,
};

/// Fast keepalive so a dead peer is found within half a second; goes before a route.
const FAST: &str = r#"
[keepalive]
ping_interval = "200ms"
pong_timeout = "300ms"
"#;

/// [`SIMPLE`] with [`FAST`] keepalive.
fn fast_pings() -> String {
    format!("{FAST}{SIMPLE}")
}

/// Polls `client` for `span`, so tungstenite answers the relay's pings the way a live but
/// quiet application would; returns the pings seen. Any data or close fails the test.
async fn stay_quiet_for(client: &mut Client, span: Duration) -> usize {
    let end = Instant::now() + span;
    let mut pings = 0;
    loop {
        match tokio::time::timeout_at(end, client.next()).await {
            Err(_) => return pings,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Pong(_)))) => {}
            Ok(other) => panic!("a quiet client got {other:?}"),
        }
    }
}

/// Like [`wait_until`], but keeps polling `client` meanwhile: a client that stops reading
/// stops answering pings and would itself be closed as dead.
async fn wait_reading(client: &mut Client, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        match tokio::time::timeout(Duration::from_millis(10), client.next()).await {
            Err(_) | Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("while waiting for {what}, the client got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_quiet_client_that_answers_pings_stays_connected_and_both_legs_are_pinged() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::start(&fast_pings(), &[&backend]).await;
    let mut client = connect(&relay.url("/")).await;

    // Ten ping intervals with no data in either direction.
    let pings = stay_quiet_for(&mut client, Duration::from_millis(2200)).await;

    assert!(pings > 0, "the relay never pinged the quiet client");
    assert!(
        !backend.pings().is_empty(),
        "the relay never pinged the quiet backend leg"
    );
    assert_eq!(round_trip(&mut client, "still here").await, "still here");
    assert!(
        backend.close_codes().is_empty(),
        "{:?}",
        backend.close_codes()
    );
    assert_eq!(relay.handle.open_sessions(), 1);
}

#[tokio::test]
async fn client_pings_are_answered_by_the_relay_and_not_forwarded() {
    // The relay may ping a backend for its own reasons (keepalive, delivery acks); only the
    // payloads the backend records tell whether a client's ping was forwarded.
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::start(&fast_pings(), &[&backend]).await;
    let mut client = connect(&relay.url("/")).await;

    for i in 0..5 {
        let payload = format!("hello {i}");
        client
            .send(Message::Ping(payload.clone().into_bytes().into()))
            .await
            .unwrap();
        let pong = loop {
            match tokio::time::timeout(WAIT, client.next()).await {
                Ok(Some(Ok(Message::Pong(data)))) => break data,
                Ok(Some(Ok(Message::Ping(_)))) => {}
                other => panic!("expected a pong, got {other:?}"),
            }
        };
        assert_eq!(pong, payload.as_bytes());
    }
    // The backend handles its connection in order, so once this echo is back it has seen
    // everything the relay would have forwarded before it.
    assert_eq!(round_trip(&mut client, "barrier").await, "barrier");
    let forwarded: Vec<_> = backend
        .pings()
        .into_iter()
        .filter(|payload| payload.starts_with(b"hello"))
        .collect();
    assert!(
        forwarded.is_empty(),
        "client pings reached the backend: {forwarded:?}"
    );
}

#[tokio::test]
async fn a_half_open_client_is_dropped_and_its_backend_leg_closed_with_1001() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::start(&fast_pings(), &[&backend]).await;
    // Handshake done, then nothing: the socket stays open but no pong ever comes back.
    let mut raw = RawClient::connect(relay.addr(), "/").await;
    wait_until("the backend leg to open", || backend.open() == 1).await;

    wait_until("the relay to close the backend leg", || {
        backend.open() == 0 && !backend.closes().is_empty()
    })
    .await;
    assert_eq!(backend.close_codes(), [Some(1001)]);
    wait_until("the session to end", || relay.handle.open_sessions() == 0).await;

    // What the silent client would have read: the relay's ping, then the end of the stream.
    let mut bytes = Vec::new();
    let ended = tokio::time::timeout(WAIT, raw.tcp.read_to_end(&mut bytes)).await;
    assert!(
        ended.is_ok(),
        "the relay kept the dead client's socket open"
    );
    assert!(
        bytes.first() == Some(&0x89),
        "expected the relay's ping first, got {:02x?}",
        &bytes[..bytes.len().min(16)]
    );
}

#[tokio::test]
async fn a_dead_backend_closes_the_client_with_1012_when_on_backend_loss_is_close() {
    // Completes the handshake, then never touches the socket: no reads (so no pongs).
    let silent = TestBackend::with_behavior("silent", BackendBehavior::silent()).await;
    let config = format!("{}on_backend_loss = \"close\"\n", fast_pings());
    let relay = TestRelay::start(&config, &[&silent]).await;
    let mut client = connect(&relay.url("/")).await;

    let frame = expect_close(&mut client)
        .await
        .expect("the relay closed without a close frame");
    assert_eq!(frame.code, CloseCode::Restart, "{frame:?}");
    assert_eq!(silent.connections().len(), 1);
}

#[tokio::test]
async fn a_dead_backend_is_replaced_without_dropping_the_client_when_on_backend_loss_is_reconnect()
{
    let silent = TestBackend::with_behavior("silent", BackendBehavior::silent()).await;
    let healthy = TestBackend::start("healthy").await;
    let user = user_ranked_first(&[silent.url(), healthy.url()], 0);
    let config = format!(
        "{FAST}{}on_backend_loss = \"reconnect\"\n",
        simple_hashed("header:X-User")
    );
    let relay = TestRelay::start(&config, &[&silent, &healthy]).await;
    let mut client = connect_as(&relay.url("/"), &user).await;
    assert_eq!(
        silent.connections().len(),
        1,
        "{user} should have been sent to the silent backend first"
    );

    wait_reading(&mut client, "re-origination to the healthy backend", || {
        healthy.open() == 1
    })
    .await;
    assert_eq!(round_trip(&mut client, "whoami").await, "healthy");
    assert_eq!(relay.handle.open_sessions(), 1);
}

#[tokio::test]
async fn an_idle_connection_is_closed_with_1000_on_both_legs_despite_answered_pings() {
    let config = fast_pings().replace(
        "pong_timeout = \"300ms\"",
        "pong_timeout = \"300ms\"\nidle_timeout = \"500ms\"",
    );
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::start(&config, &[&backend]).await;
    let mut client = connect(&relay.url("/")).await;

    // expect_close keeps reading, so the relay's pings are answered all along.
    let frame = expect_close(&mut client)
        .await
        .expect("the relay closed without a close frame");
    assert_eq!(frame.code, CloseCode::Normal, "{frame:?}");
    assert_eq!(frame.reason.as_str(), "idle timeout");
    wait_until("the backend leg to close", || backend.open() == 0).await;
    assert_eq!(backend.close_codes(), [Some(1000)]);
}
