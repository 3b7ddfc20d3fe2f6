//! Keepalive on both legs (DESIGN 3 `[keepalive]`, 4.5): pings keep quiet but live peers
//! connected, silent peers are detected and their other leg is closed, client pings stay
//! between the client and the relay, and idle connections are closed when configured.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsrelay::hashing::Ranking;
use wsrelay_tests::{
    Client, RawClient, TestBackend, TestRelay, WAIT, connect, connect_request, expect_close,
    round_trip, wait_until,
};

/// Fast keepalive so a dead peer is found within half a second.
const FAST_PINGS: &str = r#"
[keepalive]
ping_interval = "200ms"
pong_timeout = "300ms"

[[route]]
path = "/"
upstream = "main"

[upstream.main]
backends = BACKENDS
"#;

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

/// Close codes the backend has received from the relay so far.
fn close_codes(backend: &TestBackend) -> Vec<Option<u16>> {
    backend
        .log
        .closes
        .lock()
        .unwrap()
        .iter()
        .map(|frame| frame.as_ref().map(|f| u16::from(f.code)))
        .collect()
}

/// A backend that completes the WebSocket handshake and then never touches the socket
/// again: no reads (so no pongs), no writes, no close.
struct SilentBackend {
    url: String,
    /// Handshakes completed.
    accepted: Arc<AtomicUsize>,
    /// Holds the sockets open; aborted with the test's runtime.
    _task: JoinHandle<()>,
}

async fn silent_backend() -> SilentBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        let mut held: Vec<WebSocketStream<TcpStream>> = Vec::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            if let Ok(socket) = tokio_tungstenite::accept_async(tcp).await {
                held.push(socket);
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    SilentBackend {
        url,
        accepted,
        _task: task,
    }
}

#[tokio::test]
async fn a_quiet_client_that_answers_pings_stays_connected_and_both_legs_are_pinged() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::start(FAST_PINGS, &[&backend]).await;
    let mut client = connect(&relay.url("/")).await;

    // Ten ping intervals with no data in either direction.
    let pings = stay_quiet_for(&mut client, Duration::from_millis(2200)).await;

    assert!(pings > 0, "the relay never pinged the quiet client");
    assert!(
        backend.log.pings.load(Ordering::SeqCst) > 0,
        "the relay never pinged the quiet backend leg"
    );
    assert_eq!(round_trip(&mut client, "still here").await, "still here");
    assert!(
        close_codes(&backend).is_empty(),
        "{:?}",
        close_codes(&backend)
    );
    assert_eq!(relay.handle.open_sessions(), 1);
}

/// An echoing backend that records the payload of every ping it receives. The relay may
/// ping a backend for its own reasons (keepalive, delivery acks); only the payloads tell
/// whether a client's ping was forwarded.
async fn ping_recording_backend() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let pings = Arc::new(Mutex::new(Vec::new()));
    let seen = pings.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Ping(payload) = &message {
                seen.lock().unwrap().push(payload.to_vec());
            } else if (message.is_text() || message.is_binary())
                && socket.send(message).await.is_err()
            {
                break;
            }
        }
    });
    (url, pings)
}

#[tokio::test]
async fn client_pings_are_answered_by_the_relay_and_not_forwarded() {
    let (url, backend_pings) = ping_recording_backend().await;
    let relay = TestRelay::start(
        &FAST_PINGS.replace("BACKENDS", &format!("[\"{url}\"]")),
        &[],
    )
    .await;
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
    let forwarded: Vec<_> = backend_pings
        .lock()
        .unwrap()
        .iter()
        .filter(|payload| payload.starts_with(b"hello"))
        .cloned()
        .collect();
    assert!(
        forwarded.is_empty(),
        "client pings reached the backend: {forwarded:?}"
    );
}

#[tokio::test]
async fn a_half_open_client_is_dropped_and_its_backend_leg_closed_with_1001() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::start(FAST_PINGS, &[&backend]).await;
    // Handshake done, then nothing: the socket stays open but no pong ever comes back.
    let mut raw = RawClient::connect(relay.addr(), "/").await;
    backend
        .wait_for("the backend leg to open", |log| {
            log.open.load(Ordering::SeqCst) == 1
        })
        .await;

    backend
        .wait_for("the relay to close the backend leg", |log| {
            log.open.load(Ordering::SeqCst) == 0 && !log.closes.lock().unwrap().is_empty()
        })
        .await;
    assert_eq!(close_codes(&backend), [Some(1001)]);
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
    let silent = silent_backend().await;
    let config = format!(
        "{}on_backend_loss = \"close\"\n",
        FAST_PINGS.replace("BACKENDS", &format!("[\"{}\"]", silent.url))
    );
    let relay = TestRelay::start(&config, &[]).await;
    let mut client = connect(&relay.url("/")).await;

    let frame = expect_close(&mut client)
        .await
        .expect("the relay closed without a close frame");
    assert_eq!(frame.code, CloseCode::Restart, "{frame:?}");
    assert_eq!(silent.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_dead_backend_is_replaced_without_dropping_the_client_when_on_backend_loss_is_reconnect()
{
    let silent = silent_backend().await;
    let healthy = TestBackend::start("healthy").await;
    let urls = [silent.url.clone(), healthy.url()];
    let ranking = Ranking::new(urls.iter().map(|u| (u.as_str(), 1.0)));
    let user = (0..1000)
        .map(|i| format!("user-{i}"))
        .find(|key| ranking.rank(key.as_bytes())[0] == 0)
        .expect("some key ranks the silent backend first");
    let config = format!(
        "{}on_backend_loss = \"reconnect\"\n",
        FAST_PINGS
            .replace("BACKENDS", &format!("[\"{}\", \"{}\"]", urls[0], urls[1]))
            .replace(
                "upstream = \"main\"",
                "upstream = \"main\"\nhash_key = \"header:X-User\""
            )
    );
    let relay = TestRelay::start(&config, &[]).await;
    let mut request = relay.url("/").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-user", user.parse().unwrap());
    let mut client = connect_request(request).await.unwrap();
    assert_eq!(
        silent.accepted.load(Ordering::SeqCst),
        1,
        "{user} should have been sent to the silent backend first"
    );

    wait_reading(&mut client, "re-origination to the healthy backend", || {
        healthy.log.open.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(round_trip(&mut client, "whoami").await, "healthy");
    assert_eq!(relay.handle.open_sessions(), 1);
}

#[tokio::test]
async fn an_idle_connection_is_closed_with_1000_on_both_legs_despite_answered_pings() {
    let config = FAST_PINGS.replace(
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
    backend
        .wait_for("the backend leg to close", |log| {
            log.open.load(Ordering::SeqCst) == 0
        })
        .await;
    assert_eq!(close_codes(&backend), [Some(1000)]);
}
