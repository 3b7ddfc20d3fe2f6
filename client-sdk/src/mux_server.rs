//! The backend side of mux mode: [`MuxServer`] accepts mux links from relays and yields one
//! [`VirtualConnection`] per client stream carried on them.
//!
//! Life of a link: the accept loop takes a TCP connection, completes the WebSocket handshake
//! and the `Hello` exchange (the link engine as acceptor) within [`HANDSHAKE_TIMEOUT`], spawns
//! the link's driver (the one task that owns the socket) and a forwarder task that turns each
//! incoming stream into a `VirtualConnection` on the server's bounded queue. When the
//! application stops taking connections, the queue fills and the forwarders wait; the streams
//! wait in their link's accept queue (bounded by the link's `max_streams`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wsrelay_protocol::link::{IncomingStream, Link, LinkConfig, LinkHandle, LinkRole, MuxStream};

/// How long a new link may take to complete its WebSocket handshake and `Hello` exchange.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Virtual connections accepted from links but not yet taken with [`MuxServer::accept`].
const ACCEPT_QUEUE: usize = 1024;

/// Why a [`MuxServer`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The listener's local address could not be read.
    #[error("read the listener's local address: {0}")]
    LocalAddr(std::io::Error),
}

/// A backend-side mux server: accepts mux links from one or more relays and yields a
/// [`VirtualConnection`] for every client stream on them.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use futures_util::{SinkExt, StreamExt};
/// use wsrelay_client::MuxServer;
///
/// let server = MuxServer::bind("127.0.0.1:9001").await?;
/// while let Some(conn) = server.accept().await {
///     let mut stream = conn.accept(None);
///     tokio::spawn(async move {
///         while let Some(Ok(msg)) = stream.next().await {
///             if msg.is_close() || stream.send(msg).await.is_err() {
///                 break;
///             }
///         }
///     });
/// }
/// # Ok(()) }
/// ```
///
/// Dropping the server stops accepting links; established links keep serving the streams
/// already accepted, take no new ones, and close when those end.
pub struct MuxServer {
    local_addr: SocketAddr,
    conns: tokio::sync::Mutex<mpsc::Receiver<VirtualConnection>>,
    links: Arc<Mutex<HashMap<u64, LinkHandle>>>,
    accept_loop: JoinHandle<()>,
}

impl std::fmt::Debug for MuxServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxServer")
            .field("local_addr", &self.local_addr)
            .field("links", &self.link_count())
            .finish()
    }
}

impl MuxServer {
    /// Listens on `addr` with the default [`LinkConfig`].
    pub async fn bind(
        addr: impl ToSocketAddrs + std::fmt::Display,
    ) -> Result<MuxServer, ServerError> {
        let shown = addr.to_string();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: shown,
                source,
            })?;
        MuxServer::from_listener(listener)
    }

    /// Serves links accepted by `listener`, with the default [`LinkConfig`].
    pub fn from_listener(listener: TcpListener) -> Result<MuxServer, ServerError> {
        MuxServer::with_config(listener, LinkConfig::default())
    }

    /// Serves links accepted by `listener`; each link's end uses `config`.
    pub fn with_config(
        listener: TcpListener,
        config: LinkConfig,
    ) -> Result<MuxServer, ServerError> {
        let local_addr = listener.local_addr().map_err(ServerError::LocalAddr)?;
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let links = Arc::new(Mutex::new(HashMap::new()));
        let accept_loop = tokio::spawn(accept_links(listener, config, tx, Arc::clone(&links)));
        Ok(MuxServer {
            local_addr,
            conns: tokio::sync::Mutex::new(rx),
            links,
            accept_loop,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next client stream from any link. `None` only if the accept loop has stopped.
    pub async fn accept(&self) -> Option<VirtualConnection> {
        self.conns.lock().await.recv().await
    }

    /// Mux links currently established (typically `mux_links` per relay).
    pub fn link_count(&self) -> usize {
        lock(&self.links).len()
    }

    /// Sends `GoAway` on every established link: relays open no new streams on them, and each
    /// closes once its streams end. New links are still accepted.
    pub fn go_away(&self, reason: &str) {
        for handle in lock(&self.links).values() {
            handle.go_away(reason);
        }
    }
}

impl Drop for MuxServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Accepts TCP connections and sets each up as a link in its own task.
async fn accept_links(
    listener: TcpListener,
    config: LinkConfig,
    conns: mpsc::Sender<VirtualConnection>,
    links: Arc<Mutex<HashMap<u64, LinkHandle>>>,
) {
    let ids = Arc::new(Ids::default());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "mux server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let link = LinkSetup {
            config: config.clone(),
            conns: conns.clone(),
            links: Arc::clone(&links),
            ids: Arc::clone(&ids),
        };
        tokio::spawn(link.run(tcp, peer));
    }
}

/// Server-wide id counters.
#[derive(Default)]
struct Ids {
    link: AtomicU64,
    conn: AtomicU64,
}

/// Everything one link's task needs.
struct LinkSetup {
    config: LinkConfig,
    conns: mpsc::Sender<VirtualConnection>,
    links: Arc<Mutex<HashMap<u64, LinkHandle>>>,
    ids: Arc<Ids>,
}

impl LinkSetup {
    async fn run(self, tcp: TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let setup = async {
            let ws = tokio_tungstenite::accept_hdr_async(tcp, pick_link_subprotocol)
                .await
                .map_err(|e| (format!("WebSocket handshake: {e}"), false))?;
            Link::establish(ws, LinkRole::Acceptor, self.config.clone())
                .await
                .map_err(|e| (format!("link setup: {e}"), e.is_graceful()))
        };
        let (handle, driver) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, setup).await {
            Ok(Ok(link)) => link,
            // A relay's health probe opens a link and closes it cleanly before `Hello`: normal
            // operation, every few seconds, not news.
            Ok(Err((e, true))) => {
                tracing::debug!(%peer, error = %e, "mux server: link closed during setup");
                return;
            }
            Ok(Err((e, false))) => {
                tracing::info!(%peer, error = %e, "mux server: link refused");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "mux server: link handshake timed out");
                return;
            }
        };
        let link_id = self.ids.link.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(%peer, link_id, "mux server: link established");
        lock(&self.links).insert(link_id, handle.clone());
        let driver = tokio::spawn(driver);

        while let Some(incoming) = handle.accept().await {
            let conn = VirtualConnection {
                id: self.ids.conn.fetch_add(1, Ordering::Relaxed) + 1,
                link_id,
                link_peer: peer,
                incoming,
            };
            if self.conns.send(conn).await.is_err() {
                // The server was dropped: the stream is rejected (503) as it drops; take no more.
                handle.go_away("server is shutting down");
                break;
            }
        }
        drop(handle);
        let why = match driver.await {
            Ok(why) => why.to_string(),
            Err(e) => format!("driver task failed: {e}"),
        };
        lock(&self.links).remove(&link_id);
        tracing::debug!(%peer, link_id, reason = %why, "mux server: link ended");
    }
}

/// One client stream on a mux link, waiting to be accepted: what a backend sees instead of a
/// WebSocket upgrade request.
///
/// Dropping it without [`accept`](Self::accept) or [`reject`](Self::reject) rejects it with 503.
pub struct VirtualConnection {
    id: u64,
    link_id: u64,
    link_peer: SocketAddr,
    incoming: IncomingStream,
}

impl std::fmt::Debug for VirtualConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualConnection")
            .field("id", &self.id)
            .field("link_id", &self.link_id)
            .field("stream", &self.incoming)
            .finish()
    }
}

impl VirtualConnection {
    /// An id unique among this server's connections, from 1.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The stream's id on its link.
    pub fn stream_id(&self) -> u64 {
        self.incoming.id
    }

    /// Which of the server's links carries it (ids from 1, unique per server).
    pub fn link_id(&self) -> u64 {
        self.link_id
    }

    /// The address of the relay at the other end of the link.
    pub fn link_peer(&self) -> SocketAddr {
        self.link_peer
    }

    /// The client's request path without the query, e.g. `/chat/room1`.
    pub fn path(&self) -> &str {
        &self.incoming.path
    }

    /// The query string without `?` (empty if none).
    pub fn query(&self) -> &str {
        &self.incoming.query
    }

    /// The forwarded request headers as (lowercase name, raw value) pairs, in order.
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.incoming.headers
    }

    /// The first header named `name` (case-insensitive), if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.incoming.header(name)
    }

    /// The client's address as `ip:port`, as the relay saw it (empty if the opener gave none).
    pub fn client_addr(&self) -> &str {
        &self.incoming.client_addr
    }

    /// True when this client was moved here after losing its previous backend.
    pub fn resumed(&self) -> bool {
        self.incoming.resumed
    }

    /// Accepts the connection with `protocol` as its subprotocol; read and write the returned
    /// stream like a WebSocket.
    pub fn accept(self, protocol: Option<String>) -> MuxStream {
        self.incoming.accept(protocol)
    }

    /// Refuses the connection: the client's handshake is answered with HTTP `status`.
    pub fn reject(self, status: u16, reason: &str) {
        self.incoming.reject(status, reason);
    }
}

/// Picks the link subprotocol when the peer offers it (the relay does); a peer that offers
/// nothing still gets a link.
#[allow(clippy::result_large_err)] // the error type is tungstenite's callback signature
fn pick_link_subprotocol(
    request: &tungstenite::handshake::server::Request,
    mut response: tungstenite::handshake::server::Response,
) -> Result<tungstenite::handshake::server::Response, tungstenite::handshake::server::ErrorResponse>
{
    let offered = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim() == wsrelay_protocol::LINK_SUBPROTOCOL);
    if offered {
        response.headers_mut().insert(
            "sec-websocket-protocol",
            tungstenite::http::HeaderValue::from_static(wsrelay_protocol::LINK_SUBPROTOCOL),
        );
    }
    Ok(response)
}
