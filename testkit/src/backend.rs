//! [`TestBackend`]: one real WebSocket backend for every test suite, configured by
//! [`BackendBehavior`] and recording what it sees in a [`BackendLog`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderMap, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use crate::wait::wait_until;

/// How a [`TestBackend`] treats the connections it accepts from now on. The default echoes.
#[derive(Debug, Clone)]
pub struct BackendBehavior {
    /// Answer the handshake with this status (and `x-backend-reason: test`) instead of
    /// accepting.
    pub refuse: Option<StatusCode>,
    /// With `refuse`: a `Retry-After` header of this many seconds.
    pub retry_after: Option<u64>,
    /// Pick this subprotocol when the client offers it.
    pub protocol: Option<String>,
    /// Echo data messages, answering the text `whoami` with the backend's name. When false,
    /// messages are only recorded.
    pub echo: bool,
    /// Complete the handshake, then never read or write (so no pongs and no close) until the
    /// connection is killed.
    pub silent: bool,
    /// Close each connection with this code and reason when its first data message arrives
    /// (the message is recorded, not echoed).
    pub close_at_first: Option<(u16, String)>,
}

impl Default for BackendBehavior {
    fn default() -> Self {
        BackendBehavior {
            refuse: None,
            retry_after: None,
            protocol: None,
            echo: true,
            silent: false,
            close_at_first: None,
        }
    }
}

impl BackendBehavior {
    /// Refuses every handshake with HTTP `status`.
    pub fn refusing(status: u16) -> BackendBehavior {
        BackendBehavior {
            refuse: Some(StatusCode::from_u16(status).expect("an HTTP status")),
            ..BackendBehavior::default()
        }
    }

    /// Adds a `Retry-After: seconds` header to the refusal.
    pub fn retry_after(self, seconds: u64) -> BackendBehavior {
        BackendBehavior {
            retry_after: Some(seconds),
            ..self
        }
    }

    /// Echoes, and picks `protocol` when the client offers it.
    pub fn picking(protocol: &str) -> BackendBehavior {
        BackendBehavior {
            protocol: Some(protocol.to_owned()),
            ..BackendBehavior::default()
        }
    }

    /// Completes each handshake and then stays silent (see [`BackendBehavior::silent`]).
    pub fn silent() -> BackendBehavior {
        BackendBehavior {
            silent: true,
            ..BackendBehavior::default()
        }
    }

    /// Closes each connection with `code` and `reason` at its first data message.
    pub fn closing(code: u16, reason: &str) -> BackendBehavior {
        BackendBehavior {
            close_at_first: Some((code, reason.to_owned())),
            ..BackendBehavior::default()
        }
    }
}

/// What a backend saw of one handshake.
#[derive(Debug, Clone)]
pub struct SeenConnection {
    /// The request target (path and query).
    pub target: String,
    /// The handshake request headers.
    pub headers: HeaderMap,
}

impl SeenConnection {
    /// A request header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    }
}

/// Everything a backend observed, shared with the test (and kept across a restart).
#[derive(Default)]
pub struct BackendLog {
    /// Handshakes accepted, in order (health-check probes included).
    pub connections: Mutex<Vec<SeenConnection>>,
    /// Close frames received, in order.
    pub closes: Mutex<Vec<Option<CloseFrame>>>,
    /// Data messages received, in order, over all connections.
    pub messages: Mutex<Vec<Message>>,
    /// Payloads of the pings received (the relay's keepalive and delivery pings).
    pub pings: Mutex<Vec<Vec<u8>>>,
    /// Connections open now.
    pub open: AtomicUsize,
}

/// A real WebSocket backend on 127.0.0.1. By default it echoes, answers `whoami` with its
/// name, and closes with `CODE` (reason "test close") when sent the text `close:CODE`; a
/// [`BackendBehavior`] makes it refuse handshakes, pick a subprotocol, only record, go
/// silent or close at once. It records what it sees, can push to its clients, and can drop
/// every connection or stop like a crashed process.
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
    /// Starts an echoing backend named `name` on a free port.
    pub async fn start(name: &str) -> TestBackend {
        Self::with_behavior(name, BackendBehavior::default()).await
    }

    /// Starts a backend with the given behavior on a free port.
    pub async fn with_behavior(name: &str, behavior: BackendBehavior) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on_listener(name, behavior, listener, Arc::default())
    }

    /// Starts a backend on `listener`, recording into `log` (to restart one on its port).
    pub fn on_listener(
        name: &str,
        behavior: BackendBehavior,
        listener: TcpListener,
        log: Arc<BackendLog>,
    ) -> TestBackend {
        let addr = listener.local_addr().unwrap();
        let (behavior_tx, behavior_rx) = watch::channel(behavior);
        let (kill_tx, kill_rx) = watch::channel(0u64);
        let pushers = Arc::new(Mutex::new(Vec::new()));
        let server = Server {
            name: name.to_owned(),
            log: log.clone(),
            pushers: pushers.clone(),
        };
        let task = tokio::spawn(server.serve(listener, behavior_rx, kill_rx));
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

    /// Stops listening and drops every connection: the backend is gone. The returned
    /// [`StoppedBackend`] can bring it back on the same port with the same log.
    pub fn stop(self) -> StoppedBackend {
        self.kill_connections();
        self.task.abort();
        StoppedBackend {
            name: self.name.clone(),
            addr: self.addr,
            log: self.log.clone(),
        }
    }

    /// Sends a message from the backend to each open connection.
    pub async fn push_to_all(&self, message: Message) {
        let pushers: Vec<_> = self.pushers.lock().unwrap().clone();
        for pusher in pushers {
            let _ = pusher.send(message.clone()).await;
        }
    }

    /// Handshakes accepted so far.
    pub fn connections(&self) -> Vec<SeenConnection> {
        self.log.connections.lock().unwrap().clone()
    }

    /// Data messages received so far.
    pub fn messages(&self) -> Vec<Message> {
        self.log.messages.lock().unwrap().clone()
    }

    /// Data messages received so far as text: a text message as itself, any other as its
    /// `Debug` form (so a comparison with a list of texts also catches a stray binary).
    pub fn texts(&self) -> Vec<String> {
        self.log
            .messages
            .lock()
            .unwrap()
            .iter()
            .map(|message| match message {
                Message::Text(text) => text.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// Close frames received so far (`None`: a close without a status).
    pub fn closes(&self) -> Vec<Option<CloseFrame>> {
        self.log.closes.lock().unwrap().clone()
    }

    /// The codes of the close frames received so far (`None`: a close without a status).
    pub fn close_codes(&self) -> Vec<Option<u16>> {
        self.log
            .closes
            .lock()
            .unwrap()
            .iter()
            .map(|frame| frame.as_ref().map(|f| u16::from(f.code)))
            .collect()
    }

    /// Payloads of the pings received so far.
    pub fn pings(&self) -> Vec<Vec<u8>> {
        self.log.pings.lock().unwrap().clone()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.log.open.load(Ordering::SeqCst)
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

/// A [`TestBackend`] after [`TestBackend::stop`]: its port is free and its log kept.
pub struct StoppedBackend {
    /// The stopped backend's name.
    pub name: String,
    /// The port it listened on.
    pub addr: SocketAddr,
    /// What it saw before it stopped.
    pub log: Arc<BackendLog>,
}

impl StoppedBackend {
    /// Starts it again, echoing, on the same port and recording into the same log.
    pub async fn restart(self) -> TestBackend {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        TestBackend::on_listener(&self.name, BackendBehavior::default(), listener, self.log)
    }
}

/// What every connection task of one backend shares.
#[derive(Clone)]
struct Server {
    name: String,
    log: Arc<BackendLog>,
    pushers: Arc<Mutex<Vec<mpsc::Sender<Message>>>>,
}

/// Large enough for any message a test sends (the relay enforces its own limits).
fn big_messages() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(512 << 20))
        .max_frame_size(Some(512 << 20))
}

impl Server {
    async fn serve(
        self,
        listener: TcpListener,
        behavior: watch::Receiver<BackendBehavior>,
        kill: watch::Receiver<u64>,
    ) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else { continue };
                    let current = behavior.borrow().clone();
                    connections.spawn(self.clone().serve_one(tcp, current, kill.clone()));
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }

    async fn serve_one(
        self,
        tcp: TcpStream,
        behavior: BackendBehavior,
        mut kill: watch::Receiver<u64>,
    ) {
        kill.borrow_and_update();
        let seen = self.log.clone();
        let accept = behavior.clone();
        let callback = move |request: &Request, response: Response| {
            handshake(&accept, &seen, request, response)
        };
        let Ok(mut socket) =
            tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(big_messages()))
                .await
        else {
            return;
        };
        self.log.open.fetch_add(1, Ordering::SeqCst);
        if behavior.silent {
            // Hold the socket, never read it: pings go unanswered.
            let _ = kill.changed().await;
        } else {
            self.converse(&mut socket, &behavior, &mut kill).await;
        }
        self.log.open.fetch_sub(1, Ordering::SeqCst);
    }

    async fn converse(
        &self,
        socket: &mut WebSocketStream<TcpStream>,
        behavior: &BackendBehavior,
        kill: &mut watch::Receiver<u64>,
    ) {
        let (push_tx, mut push_rx) = mpsc::channel::<Message>(16);
        self.pushers.lock().unwrap().push(push_tx);
        loop {
            tokio::select! {
                _ = kill.changed() => return,
                Some(message) = push_rx.recv() => {
                    if socket.send(message).await.is_err() { return; }
                }
                incoming = socket.next() => {
                    let Some(Ok(message)) = incoming else { return };
                    match message {
                        Message::Ping(payload) => {
                            self.log.pings.lock().unwrap().push(payload.to_vec());
                        }
                        Message::Close(frame) => {
                            self.log.closes.lock().unwrap().push(frame);
                            // Let tungstenite finish the close handshake.
                            let _ = socket.close(None).await;
                            return;
                        }
                        Message::Text(_) | Message::Binary(_) => {
                            self.log.messages.lock().unwrap().push(message.clone());
                            if let Some(frame) = close_for(behavior, &message) {
                                let _ = socket.close(Some(frame)).await;
                                while let Some(Ok(_)) = socket.next().await {}
                                return;
                            }
                            if behavior.echo && socket.send(self.reply(message)).await.is_err() {
                                return;
                            }
                        }
                        Message::Pong(_) | Message::Frame(_) => {}
                    }
                }
            }
        }
    }

    /// The echo of `message`; `whoami` gets the backend's name.
    fn reply(&self, message: Message) -> Message {
        match message {
            Message::Text(text) if text.as_str() == "whoami" => Message::text(self.name.clone()),
            other => other,
        }
    }
}

/// The close a data message calls for: the behavior's, or the one a `close:CODE` text asks.
fn close_for(behavior: &BackendBehavior, message: &Message) -> Option<CloseFrame> {
    if let Some((code, reason)) = &behavior.close_at_first {
        return Some(CloseFrame {
            code: (*code).into(),
            reason: reason.as_str().into(),
        });
    }
    let Message::Text(text) = message else {
        return None;
    };
    let code: u16 = text.as_str().strip_prefix("close:")?.parse().ok()?;
    Some(CloseFrame {
        code: code.into(),
        reason: "test close".into(),
    })
}

/// Answers one handshake by `behavior`, recording it in `log` when accepted.
fn handshake(
    behavior: &BackendBehavior,
    log: &BackendLog,
    request: &Request,
    mut response: Response,
) -> Result<Response, ErrorResponse> {
    if let Some(status) = behavior.refuse {
        let mut refusal = ErrorResponse::new(Some(format!("refused by test backend: {status}")));
        *refusal.status_mut() = status;
        let headers = refusal.headers_mut();
        headers.insert("x-backend-reason", HeaderValue::from_static("test"));
        if let Some(seconds) = behavior.retry_after {
            headers.insert("retry-after", HeaderValue::from(seconds));
        }
        return Err(refusal);
    }
    log.connections.lock().unwrap().push(SeenConnection {
        target: request
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_default(),
        headers: request.headers().clone(),
    });
    if let Some(wanted) = &behavior.protocol {
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
}
