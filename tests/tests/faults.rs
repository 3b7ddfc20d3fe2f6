//! A catalog of faults on the backend side, each with the answer it gets: a backend that
//! breaks the protocol after its `101`, or that refuses the upgrade and is then sent a second
//! request on the same client socket. Each fault closes or refuses only its own connection;
//! a bystander keeps talking. (Client-side faults: `limits.rs`; faults under load:
//! `faults_under_load.rs`; handshake faults: `handshake.rs`; half-open peers: `keepalive.rs`.)

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use wsrelay_testkit::{
    RawClient, TestBackend, TestRelay, WAIT, connect, read_until_quiet, round_trip, status_of,
    upgrade_request, within,
};

/// What a [`raw_backend`] does once it has read a request.
#[derive(Clone)]
enum Misbehavior {
    /// Completes the upgrade, then writes these bytes as if they were frames.
    AfterUpgrade(Vec<u8>),
    /// Answers the upgrade with this whole HTTP response and keeps the connection.
    Answer(&'static str),
}

/// A backend speaking raw bytes: every connection's request heads are recorded in `heads`.
async fn raw_backend(misbehavior: Misbehavior) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let heads: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp, misbehavior.clone(), seen.clone()));
        }
    });
    (url, heads)
}

async fn serve(mut tcp: TcpStream, misbehavior: Misbehavior, heads: Arc<Mutex<Vec<String>>>) {
    let mut request = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        let end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&request[..end]).into_owned();
        request.drain(..end);
        heads.lock().unwrap().push(head.clone());
        let answer = match &misbehavior {
            Misbehavior::Answer(response) => response.as_bytes().to_vec(),
            Misbehavior::AfterUpgrade(bytes) => {
                let key = head
                    .lines()
                    .filter_map(|line| line.split_once(':'))
                    .find(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-key"))
                    .map(|(_, value)| value.trim().to_owned())
                    .unwrap_or_default();
                let mut answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    derive_accept_key(key.as_bytes())
                )
                .into_bytes();
                answer.extend_from_slice(bytes);
                answer
            }
        };
        if tcp.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// A relay with route `/bad` to `url` and route `/` to a well-behaved echo backend.
async fn relay_beside(url: &str, good: &TestBackend) -> TestRelay {
    let config = format!(
        r#"
[[route]]
path = "/bad"
upstream = "bad"

[[route]]
path = "/"
upstream = "good"

[upstream.bad]
backends = ["{url}"]
on_backend_loss = "close"

[upstream.good]
backends = ["{}"]
"#,
        good.url()
    );
    TestRelay::start(&config, &[]).await
}

/// A backend that breaks the protocol after its `101` gets its close code, its client 1014,
/// and a client of another backend is not disturbed.
async fn assert_backend_fault_closes_its_client_1014(bytes: Vec<u8>, what: &str) {
    let good = TestBackend::start("good").await;
    let (url, _) = raw_backend(Misbehavior::AfterUpgrade(bytes)).await;
    let relay = relay_beside(&url, &good).await;
    let mut bystander = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut bystander, "before").await, "before");
    // Read raw: tungstenite's client turns a received 1014 (registered after RFC 6455) into
    // 1002, browsers show it as it is.
    let mut client = RawClient::connect(relay.addr(), "/bad").await;
    assert_eq!(client.close_code().await, Some(1014), "{what}");
    assert_eq!(round_trip(&mut bystander, "after").await, "after", "{what}");
}

#[tokio::test]
async fn a_masked_frame_from_a_backend_closes_its_client_1014() {
    // A text frame "hi", masked: servers must not mask (RFC 6455 section 5.1).
    let masked = vec![0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
    assert_backend_fault_closes_its_client_1014(masked, "masked frame").await;
}

#[tokio::test]
async fn garbage_after_a_backends_101_closes_its_client_1014() {
    // Reserved opcode 0x3 with RSV bits set, then noise.
    let garbage = vec![0xF3, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00, 0xff, 0xff, 0xff];
    assert_backend_fault_closes_its_client_1014(garbage, "garbage").await;
}

#[tokio::test]
async fn a_second_request_after_a_refused_upgrade_is_never_tunnelled() {
    let good = TestBackend::start("good").await;
    // The backend says 200 to an upgrade and keeps the connection, hoping to be handed the
    // client's next bytes raw (request smuggling through a failed upgrade).
    let (url, heads) = raw_backend(Misbehavior::Answer(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ))
    .await;
    let relay = relay_beside(&url, &good).await;
    let mut tcp = TcpStream::connect(relay.addr()).await.unwrap();
    tcp.write_all(&upgrade_request("/bad", "")).await.unwrap();
    let mut first = vec![0u8; 4096];
    let read = within("the refusal", tcp.read(&mut first)).await.unwrap();
    assert_eq!(
        status_of(&first[..read]),
        200,
        "the backend's answer is passed on"
    );
    // A plain GET on the same socket is the relay's to answer, as a new request.
    tcp.write_all(b"GET /bad/secret HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let second = read_until_quiet(&mut tcp, WAIT).await;
    assert_eq!(
        status_of(&second),
        426,
        "{}",
        String::from_utf8_lossy(&second)
    );
    let seen = heads.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "the backend saw only the upgrade: {seen:?}");
    assert!(seen[0].starts_with("GET /bad "), "{seen:?}");
}
