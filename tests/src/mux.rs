//! A mux backend for tests, built on the protocol crate's link engine: accepts links, records
//! every stream's `Open`, echoes, answers `whoami` with its name, and can drop its links.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use wsrelay_protocol::{IncomingStream, Link, LinkConfig, LinkRole};

/// What a mux backend saw of one stream.
#[derive(Debug, Clone)]
pub struct SeenStream {
    /// Path of the `Open`.
    pub path: String,
    /// Query of the `Open`.
    pub query: String,
    /// Headers of the `Open`.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Client address of the `Open`.
    pub client_addr: String,
    /// The `resumed` flag.
    pub resumed: bool,
}

impl SeenStream {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Everything a mux backend observed.
#[derive(Default)]
pub struct MuxLog {
    /// Link (TCP) connections accepted so far.
    pub links_accepted: AtomicUsize,
    /// Links open now.
    pub links_open: AtomicUsize,
    /// Streams opened, in order.
    pub streams: Mutex<Vec<SeenStream>>,
    /// Streams open now.
    pub streams_open: AtomicUsize,
    /// Data messages received.
    pub messages: AtomicUsize,
}

/// A mux backend on 127.0.0.1.
pub struct MuxBackend {
    /// Its `whoami` answer.
    pub name: String,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// What it saw.
    pub log: Arc<MuxLog>,
    kill: watch::Sender<u64>,
    reject: Arc<Mutex<Option<u16>>>,
    task: tokio::task::JoinHandle<()>,
}

impl MuxBackend {
    /// Starts a mux echo backend.
    pub async fn start(name: &str) -> MuxBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(MuxLog::default());
        let (kill, kill_rx) = watch::channel(0);
        let reject = Arc::new(Mutex::new(None));
        let task = tokio::spawn(serve(
            listener,
            name.to_owned(),
            log.clone(),
            kill_rx,
            reject.clone(),
        ));
        MuxBackend {
            name: name.to_owned(),
            addr,
            log,
            kill,
            reject,
            task,
        }
    }

    /// `ws://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Drops every link abruptly (no close), like a crash; the relay re-dials.
    pub fn kill_links(&self) {
        self.kill.send_modify(|generation| *generation += 1);
    }

    /// Rejects new streams with `status` (or accepts them again with `None`).
    pub fn reject_with(&self, status: Option<u16>) {
        *self.reject.lock().unwrap() = status;
    }

    /// Streams seen so far.
    pub fn streams(&self) -> Vec<SeenStream> {
        self.log.streams.lock().unwrap().clone()
    }
}

impl Drop for MuxBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    name: String,
    log: Arc<MuxLog>,
    kill: watch::Receiver<u64>,
    reject: Arc<Mutex<Option<u16>>>,
) {
    let mut links = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                log.links_accepted.fetch_add(1, Ordering::SeqCst);
                links.spawn(serve_link(tcp, name.clone(), log.clone(), kill.clone(), reject.clone()));
            }
            Some(_) = links.join_next(), if !links.is_empty() => {}
        }
    }
}

#[allow(clippy::result_large_err)]
fn pick_mux(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    let offered = request
        .headers()
        .get("sec-websocket-protocol")
        .is_some_and(|v| v.to_str().unwrap_or("").contains("wsrelay.mux"));
    if offered {
        response
            .headers_mut()
            .insert("sec-websocket-protocol", "wsrelay.mux".parse().unwrap());
    }
    Ok(response)
}

async fn serve_link(
    tcp: tokio::net::TcpStream,
    name: String,
    log: Arc<MuxLog>,
    mut kill: watch::Receiver<u64>,
    reject: Arc<Mutex<Option<u16>>>,
) {
    kill.borrow_and_update();
    let Ok(socket) = tokio_tungstenite::accept_hdr_async(tcp, pick_mux).await else {
        return;
    };
    let Ok((link, driver)) =
        Link::establish(socket, LinkRole::Acceptor, LinkConfig::default()).await
    else {
        return;
    };
    log.links_open.fetch_add(1, Ordering::SeqCst);
    let mut streams = JoinSet::new();
    tokio::pin!(driver);
    loop {
        tokio::select! {
            _ = &mut driver => break,
            _ = kill.changed() => break,
            incoming = link.accept() => {
                let Some(incoming) = incoming else { break };
                let status = *reject.lock().unwrap();
                match status {
                    Some(status) => incoming.reject(status, "rejected by test backend"),
                    None => {
                        streams.spawn(echo(incoming, name.clone(), log.clone()));
                    }
                }
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    // Dropping the driver and the streams ends the link without a close, like a crash.
    streams.abort_all();
    log.links_open.fetch_sub(1, Ordering::SeqCst);
}

async fn echo(incoming: IncomingStream, name: String, log: Arc<MuxLog>) {
    log.streams.lock().unwrap().push(SeenStream {
        path: incoming.path.clone(),
        query: incoming.query.clone(),
        headers: incoming.headers.clone(),
        client_addr: incoming.client_addr.clone(),
        resumed: incoming.resumed,
    });
    log.streams_open.fetch_add(1, Ordering::SeqCst);
    let mut stream = incoming.accept(None);
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

/// A mux client for tests: one WebSocket to a relay's mux route, speaking the link protocol as
/// initiator (what the SDK's `MuxClient` does).
pub async fn mux_client(url: &str) -> wsrelay_protocol::LinkHandle {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "wsrelay.mux".parse().unwrap());
    let (socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "wsrelay.mux");
    let (link, driver) = Link::establish(socket, LinkRole::Initiator, LinkConfig::default())
        .await
        .unwrap();
    tokio::spawn(driver);
    link
}
