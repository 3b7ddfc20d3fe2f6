//! The end-to-end tests' own piece of support: [`MuxBackend`], a backend in mux mode built on
//! the SDK's [`MuxServer`] (the server side of a link is the SDK's, not re-implemented here).
//! Everything else the tests share (backends, relay, clients, raw sockets, waits) is in
//! `wsrelay-testkit`, which cannot hold this: it must not depend on the SDK.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use wsrelay_client::{MuxServer, MuxStream, VirtualConnection};
use wsrelay_testkit::{Isolated, KillableProxy, spawn_isolated};

/// What a mux backend saw of one stream: its `Open`.
#[derive(Debug, Clone)]
pub struct SeenStream {
    /// The request path, without the query.
    pub path: String,
    /// The query, without `?`.
    pub query: String,
    /// The forwarded headers, as (lowercase name, value).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The client's address as the relay saw it.
    pub client_addr: String,
    /// The `resumed` flag: the client was moved here from a lost backend.
    pub resumed: bool,
}

impl SeenStream {
    fn of(connection: &VirtualConnection) -> SeenStream {
        SeenStream {
            path: connection.path().to_owned(),
            query: connection.query().to_owned(),
            headers: connection.headers().to_vec(),
            client_addr: connection.client_addr().to_owned(),
            resumed: connection.resumed(),
        }
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Everything a mux backend observed of its streams.
#[derive(Default)]
struct MuxLog {
    streams: Mutex<Vec<SeenStream>>,
    streams_open: AtomicUsize,
    messages: AtomicUsize,
}

/// A mux backend on 127.0.0.1: the SDK's [`MuxServer`] behind a [`KillableProxy`]. It records
/// every stream's `Open`, echoes, answers `whoami` with its name, can reject new streams, and
/// can drop its links like a crash (the relay re-dials them).
///
/// It runs apart from the test's tasks ([`spawn_isolated`]), as a backend process would: its
/// work doesn't queue behind the thousands of client tasks a test may run.
pub struct MuxBackend {
    /// Its `whoami` answer.
    pub name: String,
    server: Arc<MuxServer>,
    proxy: KillableProxy,
    log: Arc<MuxLog>,
    reject: Arc<Mutex<Option<u16>>>,
    // Dropping it stops the backend: its links and streams end.
    _running: Isolated,
}

impl MuxBackend {
    /// Starts a mux echo backend.
    pub async fn start(name: &str) -> MuxBackend {
        Self::start_on(name, std::net::TcpListener::bind("127.0.0.1:0").unwrap()).await
    }

    /// Starts a mux echo backend that the relay reaches at `listener`'s address.
    pub async fn start_on(name: &str, listener: std::net::TcpListener) -> MuxBackend {
        let log = Arc::new(MuxLog::default());
        let reject = Arc::new(Mutex::new(None));
        let (started, server) = oneshot::channel();
        let (own_name, own_log, own_reject) = (name.to_owned(), log.clone(), reject.clone());
        let running = spawn_isolated(move || async move {
            let server = Arc::new(MuxServer::bind("127.0.0.1:0").await.unwrap());
            let _ = started.send(server.clone());
            serve(server, own_name, own_log, own_reject).await;
        });
        let server = server.await.expect("the mux backend started");
        let proxy = KillableProxy::on_listener(listener, server.local_addr());
        MuxBackend {
            name: name.to_owned(),
            server,
            proxy,
            log,
            reject,
            _running: running,
        }
    }

    /// `ws://127.0.0.1:PORT`, the URL the relay dials.
    pub fn url(&self) -> String {
        self.proxy.url()
    }

    /// Drops every link abruptly (no close), like a crash; the relay re-dials.
    pub fn kill_links(&self) {
        self.proxy.kill_connections();
    }

    /// Rejects new streams with `status` (or accepts them again with `None`).
    pub fn reject_with(&self, status: Option<u16>) {
        *self.reject.lock().unwrap() = status;
    }

    /// Streams seen so far.
    pub fn streams(&self) -> Vec<SeenStream> {
        self.log.streams.lock().unwrap().clone()
    }

    /// Links (TCP connections) accepted so far.
    pub fn links_accepted(&self) -> usize {
        self.proxy.accepted()
    }

    /// Links established now.
    pub fn links_open(&self) -> usize {
        self.server.link_count()
    }

    /// Streams open now.
    pub fn streams_open(&self) -> usize {
        self.log.streams_open.load(Ordering::SeqCst)
    }

    /// Data messages received so far, over all streams.
    pub fn messages(&self) -> usize {
        self.log.messages.load(Ordering::SeqCst)
    }
}

async fn serve(
    server: Arc<MuxServer>,
    name: String,
    log: Arc<MuxLog>,
    reject: Arc<Mutex<Option<u16>>>,
) {
    while let Some(connection) = server.accept().await {
        let status = *reject.lock().unwrap();
        if let Some(status) = status {
            connection.reject(status, "rejected by test backend");
            continue;
        }
        log.streams
            .lock()
            .unwrap()
            .push(SeenStream::of(&connection));
        log.streams_open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(echo(connection.accept(None), name.clone(), log.clone()));
    }
}

async fn echo(mut stream: MuxStream, name: String, log: Arc<MuxLog>) {
    while let Some(Ok(message)) = stream.next().await {
        let reply = match message {
            Message::Text(ref text) if text.as_str() == "whoami" => Message::text(name.clone()),
            Message::Text(_) | Message::Binary(_) => message,
            Message::Close(_) => break,
            _ => continue,
        };
        log.messages.fetch_add(1, Ordering::SeqCst);
        if stream.send(reply).await.is_err() {
            break;
        }
    }
    log.streams_open.fetch_sub(1, Ordering::SeqCst);
}
