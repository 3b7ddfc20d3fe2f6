//! Shared pieces of the end-to-end tests: configurable backends, a relay started from a TOML
//! snippet, WebSocket and raw-TCP clients. Everything listens on 127.0.0.1 port 0.

// tungstenite's handshake callback fixes its (large) error type.
#![allow(clippy::result_large_err)]

pub mod mux;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsrelay::config::Config;
use wsrelay::{Relay, RelayHandle};

/// A WebSocket client connection as the tests use it.
pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Upper bound for any single wait in a test; generous because the machine is shared.
pub const WAIT: Duration = Duration::from_secs(10);

/// Turns on logs when `RUST_LOG` is set; harmless to call many times.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// How a [`TestBackend`] behaves.
#[derive(Clone)]
pub struct BackendBehavior {
    /// Answer the handshake with this status instead of accepting.
    pub refuse: Option<StatusCode>,
    /// Pick this subprotocol if the client offered it.
    pub protocol: Option<String>,
    /// Echo messages (and answer `whoami`, `headers?`).
    pub echo: bool,
}

impl Default for BackendBehavior {
    fn default() -> Self {
        BackendBehavior {
            refuse: None,
            protocol: None,
            echo: true,
        }
    }
}

/// What a backend saw of one connection.
#[derive(Debug, Clone)]
pub struct SeenConnection {
    /// The request target (path and query).
    pub target: String,
    /// The handshake request headers.
    pub headers: HeaderMap,
}

/// Everything a backend observed, shared with the test.
#[derive(Default)]
pub struct BackendLog {
    /// Handshakes accepted, in order.
    pub connections: Mutex<Vec<SeenConnection>>,
    /// Close frames received from the relay, in order.
    pub closes: Mutex<Vec<Option<CloseFrame>>>,
    /// Data messages received.
    pub messages: Mutex<Vec<Message>>,
    /// Pings received (the relay's own keepalive pings).
    pub pings: AtomicUsize,
    /// Connections currently open.
    pub open: AtomicUsize,
}

/// A real WebSocket backend on 127.0.0.1: echoes, answers `whoami` with its name, records what
/// it sees, and can be told to refuse handshakes, drop every connection, or push to a client.
pub struct TestBackend {
    /// The answer to `whoami`.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub log: Arc<BackendLog>,
    behavior: watch::Sender<BackendBehavior>,
    kill: watch::Sender<u64>,
    pushers: Arc<Mutex<Vec<mpsc::Sender<Message>>>>,
    task: JoinHandle<()>,
}

impl TestBackend {
    /// Starts an echoing backend.
    pub async fn start(name: &str) -> TestBackend {
        Self::with_behavior(name, BackendBehavior::default()).await
    }

    /// Starts a backend with the given behavior.
    pub async fn with_behavior(name: &str, behavior: BackendBehavior) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on_listener(name, behavior, listener)
    }

    /// Starts a backend on an existing listener (to restart one on the same port).
    pub fn on_listener(
        name: &str,
        behavior: BackendBehavior,
        listener: TcpListener,
    ) -> TestBackend {
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(BackendLog::default());
        let (behavior_tx, behavior_rx) = watch::channel(behavior);
        let (kill_tx, kill_rx) = watch::channel(0u64);
        let pushers = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(serve(
            listener,
            name.to_owned(),
            log.clone(),
            behavior_rx,
            kill_rx,
            pushers.clone(),
        ));
        TestBackend {
            name: name.to_owned(),
            addr,
            log,
            behavior: behavior_tx,
            kill: kill_tx,
            pushers,
            task,
        }
    }

    /// `ws://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Changes how new connections are treated.
    pub fn set_behavior(&self, behavior: BackendBehavior) {
        self.behavior.send_replace(behavior);
    }

    /// Drops every open connection abruptly (no close frame), like a crashed process.
    pub fn kill_connections(&self) {
        self.kill.send_modify(|generation| *generation += 1);
    }

    /// Stops listening and drops every connection: the backend is gone.
    pub fn stop(self) -> SocketAddr {
        self.kill_connections();
        self.task.abort();
        self.addr
    }

    /// Sends a message from the backend to each open connection.
    pub async fn push_to_all(&self, message: Message) {
        let pushers: Vec<_> = self.pushers.lock().unwrap().clone();
        for pusher in pushers {
            let _ = pusher.send(message.clone()).await;
        }
    }

    /// Handshakes seen so far.
    pub fn connections(&self) -> Vec<SeenConnection> {
        self.log.connections.lock().unwrap().clone()
    }

    /// Waits until `check` holds for the log.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&BackendLog) -> bool) {
        wait_until(what, || check(&self.log)).await;
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    name: String,
    log: Arc<BackendLog>,
    behavior: watch::Receiver<BackendBehavior>,
    kill: watch::Receiver<u64>,
    pushers: Arc<Mutex<Vec<mpsc::Sender<Message>>>>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let current = behavior.borrow().clone();
                connections.spawn(serve_one(tcp, name.clone(), log.clone(), current, kill.clone(), pushers.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_one(
    tcp: TcpStream,
    name: String,
    log: Arc<BackendLog>,
    behavior: BackendBehavior,
    mut kill: watch::Receiver<u64>,
    pushers: Arc<Mutex<Vec<mpsc::Sender<Message>>>>,
) {
    kill.borrow_and_update();
    let seen_log = log.clone();
    let accept_behavior = behavior.clone();
    let callback =
        move |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
            if let Some(status) = accept_behavior.refuse {
                let mut refusal =
                    ErrorResponse::new(Some(format!("refused by test backend: {status}")));
                *refusal.status_mut() = status;
                refusal
                    .headers_mut()
                    .insert("x-backend-reason", "test".parse().unwrap());
                return Err(refusal);
            }
            seen_log.connections.lock().unwrap().push(SeenConnection {
                target: request
                    .uri()
                    .path_and_query()
                    .map(|pq| pq.as_str().to_owned())
                    .unwrap_or_default(),
                headers: request.headers().clone(),
            });
            if let Some(wanted) = &accept_behavior.protocol {
                let offered = request
                    .headers()
                    .get_all("sec-websocket-protocol")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .any(|p| p.trim() == wanted);
                if offered {
                    response
                        .headers_mut()
                        .insert("sec-websocket-protocol", wanted.parse().unwrap());
                }
            }
            Ok(response)
        };
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(512 << 20))
        .max_frame_size(Some(512 << 20));
    let Ok(mut socket) =
        tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await
    else {
        return;
    };
    log.open.fetch_add(1, Ordering::SeqCst);
    let (push_tx, mut push_rx) = mpsc::channel::<Message>(16);
    pushers.lock().unwrap().push(push_tx);
    loop {
        tokio::select! {
            _ = kill.changed() => break,
            Some(message) = push_rx.recv() => {
                if socket.send(message).await.is_err() { break; }
            }
            incoming = socket.next() => {
                let Some(Ok(message)) = incoming else { break };
                match message {
                    Message::Ping(_) => { log.pings.fetch_add(1, Ordering::SeqCst); }
                    Message::Close(frame) => {
                        log.closes.lock().unwrap().push(frame);
                        // Let tungstenite finish the close handshake.
                        let _ = socket.close(None).await;
                        break;
                    }
                    Message::Text(ref text) if behavior.echo => {
                        log.messages.lock().unwrap().push(message.clone());
                        let reply = match text.as_str() {
                            "whoami" => Message::text(name.clone()),
                            _ => message.clone(),
                        };
                        if socket.send(reply).await.is_err() { break; }
                    }
                    Message::Binary(_) if behavior.echo => {
                        log.messages.lock().unwrap().push(message.clone());
                        if socket.send(message).await.is_err() { break; }
                    }
                    other => log.messages.lock().unwrap().push(other),
                }
            }
        }
    }
    log.open.fetch_sub(1, Ordering::SeqCst);
}

/// A relay running in this process, plus its config.
pub struct TestRelay {
    /// The running relay.
    pub handle: RelayHandle,
}

impl TestRelay {
    /// Starts a relay from a TOML snippet. The snippet may omit `[server] listen` (port 0 is
    /// used) and may write `BACKENDS` where the backend list goes.
    pub async fn start(toml: &str, backends: &[&TestBackend]) -> TestRelay {
        Self::start_with(toml, backends, |builder| builder).await
    }

    /// Like [`TestRelay::start`], letting the test configure the builder (e.g. register
    /// inspectors of its own).
    pub async fn start_with(
        toml: &str,
        backends: &[&TestBackend],
        configure: impl FnOnce(wsrelay::RelayBuilder) -> wsrelay::RelayBuilder,
    ) -> TestRelay {
        init_logs();
        let list = backends
            .iter()
            .map(|b| format!("\"{}\"", b.url()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut source = toml.replace("BACKENDS", &format!("[{list}]"));
        if !source.contains("listen") {
            source = if source.contains("[server]") {
                source.replace("[server]", "[server]\nlisten = \"127.0.0.1:0\"")
            } else {
                format!("[server]\nlisten = \"127.0.0.1:0\"\n{source}")
            };
        }
        // Inspector names are checked when the builder binds, so custom ones may be used here.
        let config: Config = toml::from_str(&source).unwrap_or_else(|e| panic!("{e}"));
        TestRelay {
            handle: configure(Relay::builder(config)).bind().await.unwrap(),
        }
    }

    /// A relay with one route `/` in per-client mode over `backends`, default settings.
    pub async fn simple(backends: &[&TestBackend]) -> TestRelay {
        Self::start(SIMPLE, backends).await
    }

    /// `ws://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.handle.local_addr())
    }

    /// The relay's address.
    pub fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }
}

/// One route `/` over `BACKENDS`, per-client mode.
pub const SIMPLE: &str = r#"
[[route]]
path = "/"
upstream = "main"

[upstream.main]
backends = BACKENDS
"#;

/// Connects a WebSocket client.
pub async fn connect(url: &str) -> Client {
    connect_request(url.into_client_request().unwrap())
        .await
        .unwrap()
}

/// Connects with a prepared request; the error carries the HTTP response on refusal.
pub async fn connect_request(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<Client, WsError> {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(512 << 20))
        .max_frame_size(Some(512 << 20));
    tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async_with_config(request, Some(config), true),
    )
    .await
    .expect("connect timed out")
    .map(|(client, _)| client)
}

/// The status a refused handshake got.
pub async fn refused_status(url: &str) -> StatusCode {
    match connect_request(url.into_client_request().unwrap()).await {
        Err(WsError::Http(response)) => response.status(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got a WebSocket"),
    }
}

/// Sends a text message and returns the next data message's text.
pub async fn round_trip(client: &mut Client, text: &str) -> String {
    client.send(Message::text(text)).await.unwrap();
    match next_data(client).await {
        Message::Text(reply) => reply.as_str().to_owned(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// The next text or binary message (skipping pings and pongs).
pub async fn next_data(client: &mut Client) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("no message in time")
            .expect("connection ended")
            .expect("read failed");
        if message.is_text() || message.is_binary() {
            return message;
        }
        if let Message::Close(frame) = message {
            panic!("closed while waiting for data: {frame:?}");
        }
    }
}

/// Reads until the relay closes; returns its close frame (`None` if it closed without one).
pub async fn expect_close(client: &mut Client) -> Option<CloseFrame> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let next = tokio::time::timeout_at(deadline, client.next())
            .await
            .expect("no close in time");
        match next {
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// Polls `check` every 10 ms until it holds, failing the test after [`WAIT`].
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends raw bytes over TCP and returns everything read until the peer closes or `quiet`
/// passes without data.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], quiet: Duration) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    read_until_quiet(&mut tcp, quiet).await
}

/// Reads until EOF, an error, or `quiet` without data.
pub async fn read_until_quiet(tcp: &mut TcpStream, quiet: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(quiet, tcp.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buffer[..n]),
        }
    }
}

/// The status code of a raw HTTP response.
pub fn status_of(response: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(response);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"))
}

/// A valid upgrade request for `path`, with extra header lines.
pub fn upgrade_request(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: relay.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// A raw client: completes the handshake over plain TCP and then lets a test write frames
/// byte by byte (unmasked, reserved opcodes, bad UTF-8 ...) or go silent.
pub struct RawClient {
    /// The socket, after the `101` response.
    pub tcp: TcpStream,
}

impl RawClient {
    /// Connects and completes the handshake.
    pub async fn connect(addr: SocketAddr, path: &str) -> RawClient {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&upgrade_request(path, "")).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, tcp.read(&mut byte))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                n,
                1,
                "closed during handshake: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        assert_eq!(status_of(&head), 101, "{}", String::from_utf8_lossy(&head));
        RawClient { tcp }
    }

    /// Writes one frame. `mask` applies the client masking key 0x01020304.
    pub async fn send_frame(&mut self, first_byte: u8, payload: &[u8], mask: bool) {
        let mut frame = vec![first_byte];
        let mask_bit = if mask { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(mask_bit | n as u8),
            n if n < 65536 => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [1u8, 2, 3, 4];
        if mask {
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        let _ = self.tcp.write_all(&frame).await;
    }

    /// Reads frames until a Close arrives (returns its code) or the connection ends (`None`).
    pub async fn close_code(&mut self) -> Option<u16> {
        let bytes = read_until_quiet(&mut self.tcp, WAIT).await;
        find_close_code(&bytes)
    }
}

/// Finds the first server Close frame in a byte stream of unmasked server frames.
pub fn find_close_code(mut bytes: &[u8]) -> Option<u16> {
    while bytes.len() >= 2 {
        let opcode = bytes[0] & 0x0F;
        let (len, header) = match bytes[1] & 0x7F {
            126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 if bytes.len() >= 10 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n if n < 126 => (n as usize, 2),
            _ => return None,
        };
        let payload = bytes.get(header..header + len)?;
        if opcode == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
        bytes = &bytes[header + len..];
    }
    None
}

/// A flag a test can flip from a spawned task.
pub fn flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// A hash key (for `hash_key = "header:..."` and friends) that rendezvous hashing ranks
/// first onto `urls[wanted]`, given the upstream's backend list in config order.
pub fn user_ranked_first(urls: &[String], wanted: usize) -> String {
    let ranking = wsrelay::hashing::Ranking::new(urls.iter().map(|u| (u.as_str(), 1.0)));
    (0..10_000)
        .map(|n| format!("user-{n}"))
        .find(|user| ranking.rank(user.as_bytes())[0] == wanted)
        .expect("some user ranks first on every backend")
}
