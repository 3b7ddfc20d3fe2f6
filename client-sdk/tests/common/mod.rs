//! Shared pieces of the client tests: a real WebSocket backend on 127.0.0.1 that echoes, can
//! close with a given code, go silent or refuse handshakes; an in-process relay; and waits on
//! a client's events bounded by deadlines (nothing asserts on elapsed real time).

#![allow(dead_code)] // each test file uses its own subset

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tungstenite::Message;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::{HeaderMap, HeaderValue, StatusCode};
use tungstenite::protocol::CloseFrame;
use wsrelay::RelayHandle;
use wsrelay::config::Config;
use wsrelay_client::{Client, CloseReason, Event, Reconnect};

/// Upper bound for any single wait; generous because the machine is shared.
pub const WAIT: Duration = Duration::from_secs(10);

/// A reconnect policy quick enough for tests: 20 ms to 200 ms, forever.
pub fn quick_reconnect() -> Reconnect {
    Reconnect::default().backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// How a [`Backend`] treats new connections.
#[derive(Debug, Clone, Default)]
pub struct Mode {
    /// Refuse the handshake with this status (and `Retry-After` seconds, if set).
    pub refuse: Option<(u16, Option<u64>)>,
    /// Complete the handshake, then never read or write (no pongs).
    pub silent: bool,
    /// Pick this subprotocol when the client offers it.
    pub protocol: Option<String>,
}

/// What a backend saw.
#[derive(Default)]
pub struct Log {
    /// Handshakes completed.
    pub connections: AtomicUsize,
    /// Request headers of each handshake.
    pub headers: Mutex<Vec<HeaderMap>>,
    /// Text messages received, in order (all connections).
    pub texts: Mutex<Vec<String>>,
    /// Close codes received from clients.
    pub closes: Mutex<Vec<(u16, String)>>,
}

/// A WebSocket backend: echoes text and binary; the text `close:CODE` makes it close with
/// `CODE`.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub log: Arc<Log>,
    kill: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Backend {
    /// An echo backend on a free port.
    pub async fn start() -> Backend {
        Backend::with(Mode::default()).await
    }

    /// A backend in `mode` on a free port.
    pub async fn with(mode: Mode) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Backend::on(listener, mode, Arc::default())
    }

    /// A backend in `mode` on `listener`, logging into `log` (to restart one on its port).
    pub fn on(listener: TcpListener, mode: Mode, log: Arc<Log>) -> Backend {
        let addr = listener.local_addr().unwrap();
        let (kill, kill_rx) = watch::channel(0);
        let task = tokio::spawn(serve(listener, mode, Arc::clone(&log), kill_rx));
        Backend {
            addr,
            log,
            kill,
            task,
        }
    }

    /// `ws://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Drops every connection without a close frame, like a crashed process.
    pub fn kill_connections(&self) {
        self.kill.send_modify(|generation| *generation += 1);
    }

    /// Stops listening and drops every connection; returns the address and log, to restart
    /// it on the same port.
    pub fn stop(self) -> (SocketAddr, Arc<Log>) {
        self.kill_connections();
        self.task.abort();
        (self.addr, Arc::clone(&self.log))
    }

    /// Text messages received so far.
    pub fn texts(&self) -> Vec<String> {
        self.log.texts.lock().unwrap().clone()
    }

    /// Handshakes completed so far.
    pub fn connections(&self) -> usize {
        self.log.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, mode: Mode, log: Arc<Log>, kill: watch::Receiver<u64>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                connections.spawn(serve_one(tcp, mode.clone(), Arc::clone(&log), kill.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

#[allow(clippy::result_large_err)] // tungstenite's callback signature
async fn serve_one(tcp: TcpStream, mode: Mode, log: Arc<Log>, mut kill: watch::Receiver<u64>) {
    kill.borrow_and_update();
    let seen = Arc::clone(&log);
    let accept_mode = mode.clone();
    let callback = move |request: &Request, mut response: Response| {
        if let Some((status, retry_after)) = accept_mode.refuse {
            let mut refusal = ErrorResponse::new(Some("refused by the test backend".into()));
            *refusal.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(seconds) = retry_after {
                refusal
                    .headers_mut()
                    .insert("retry-after", HeaderValue::from(seconds));
            }
            return Err(refusal);
        }
        seen.headers.lock().unwrap().push(request.headers().clone());
        if let Some(wanted) = &accept_mode.protocol {
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
    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
        return;
    };
    log.connections.fetch_add(1, Ordering::SeqCst);
    if mode.silent {
        // Hold the socket, never read it: pings go unanswered.
        let _ = kill.changed().await;
        return;
    }
    loop {
        tokio::select! {
            _ = kill.changed() => return,
            incoming = socket.next() => {
                let Some(Ok(message)) = incoming else { return };
                let reply = match message {
                    Message::Text(text) => {
                        log.texts.lock().unwrap().push(text.to_string());
                        if let Some(code) = text.strip_prefix("close:") {
                            let frame = CloseFrame {
                                code: code.parse::<u16>().unwrap().into(),
                                reason: "test close".into(),
                            };
                            let _ = socket.close(Some(frame)).await;
                            while let Some(Ok(_)) = socket.next().await {}
                            return;
                        }
                        Message::Text(text)
                    }
                    Message::Binary(data) => Message::Binary(data),
                    Message::Close(frame) => {
                        let (code, reason) = frame
                            .map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new()));
                        log.closes.lock().unwrap().push((code, reason));
                        while let Some(Ok(_)) = socket.next().await {}
                        return;
                    }
                    _ => continue,
                };
                if socket.send(reply).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A relay from a TOML configuration (give it `[server] listen = "127.0.0.1:0"` or a port).
pub async fn start_relay(toml: &str) -> RelayHandle {
    let config = Config::from_toml(toml, "test").unwrap_or_else(|e| panic!("{e}"));
    wsrelay::Relay::bind(config).await.unwrap()
}

/// A relay on `addr` with one route `/` in per-client mode over `backend` (the quick start).
pub async fn quick_relay(addr: SocketAddr, backend: &str) -> RelayHandle {
    let config = Config::quick_start(addr, &[backend.to_owned()]).unwrap();
    wsrelay::Relay::bind(config).await.unwrap()
}

/// The next event, within [`WAIT`]; panics if the client ended.
pub async fn next_event(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("no event in time")
        .expect("the client ended")
}

/// Reads events until `pick` returns something; panics on `Closed` (unless picked) and on
/// the deadline.
pub async fn wait_for<T>(
    client: &mut Client,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .unwrap_or_else(|_| panic!("gave up waiting for {what}"))
            .unwrap_or_else(|| panic!("the client ended while waiting for {what}"));
        if let Some(found) = pick(&event) {
            return found;
        }
        if let Event::Closed(why) = event {
            panic!("the client closed ({why}) while waiting for {what}");
        }
    }
}

/// The next text message (skipping other events).
pub async fn next_text(client: &mut Client) -> String {
    wait_for(client, "a text message", |event| match event {
        Event::Message(message) => message.as_text().map(str::to_owned),
        _ => None,
    })
    .await
}

/// Waits for a `Connected` event; returns its connection number.
pub async fn connected(client: &mut Client) -> u64 {
    wait_for(client, "Connected", |event| match event {
        Event::Connected(c) => Some(c.connection),
        _ => None,
    })
    .await
}

/// Waits for `Disconnected`; returns its code and reason.
pub async fn disconnected(client: &mut Client) -> (Option<u16>, String) {
    wait_for(client, "Disconnected", |event| match event {
        Event::Disconnected { code, reason } => Some((*code, reason.clone())),
        _ => None,
    })
    .await
}

/// Waits for the final `Closed` event and checks that no event follows it.
pub async fn closed(client: &mut Client) -> CloseReason {
    let why = wait_for(client, "Closed", |event| match event {
        Event::Closed(why) => Some(why.clone()),
        _ => None,
    })
    .await;
    let after = tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("the event stream did not end after Closed");
    assert!(after.is_none(), "an event after Closed: {after:?}");
    why
}

/// Polls `check` every 10 ms until it holds, failing after [`WAIT`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An address nothing listens on (a port just released).
pub async fn unused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}
