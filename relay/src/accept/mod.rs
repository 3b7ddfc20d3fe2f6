//! The client-facing listener: accept, limit, TLS, serve HTTP/1.1 with hyper until the request
//! upgrades, or HTTP/2 (`[server] http2`, [`http2`]) while its streams live. What each request
//! gets is decided in [`answer`], whichever version carried it; the RFC 6455 and RFC 8441 checks
//! are the pure functions of [`upgrade`]; clients that multiplex on their side are served by
//! [`mux_client`].

mod answer;
mod connect;
mod http2;
mod mux_client;
mod outcome;
mod static_files;
pub(crate) mod tls;
mod upgrade;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::admission::{Admission, ConnectionAdmission, ConnectionSlot, NotAdmitted};
use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use http2::{OpenStreams, Protocols, TrackedExecutor};
pub use static_files::EmbeddedFiles;
pub(crate) use static_files::StaticFiles;
pub(crate) use upgrade::{check_upgrade, websocket_accepted};

use crate::session::SessionContext;

/// How long a client connection outlives its handshake deadline, to write the answer.
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// Largest request head hyper buffers; beyond it the client gets 431.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// What the listener and every client connection share.
pub(crate) struct Acceptor {
    /// What the sessions it starts share.
    pub sessions: SessionContext,
    /// Who may connect and start a handshake.
    pub admission: Admission,
    /// The next connection id.
    pub next_conn_id: AtomicU64,
    /// Owns every connection and session task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// The folder plain `GET`s are served from, if configured (fixed at start).
    pub static_files: Option<StaticFiles>,
    /// TLS for the client listener, if configured at start; a reload may change its
    /// certificate.
    pub tls: Option<tls::ListenerTls>,
    /// `[server] http2` as the relay started (it needs a restart to change).
    pub http2: bool,
}

/// Accepts until the relay stops accepting.
pub(crate) async fn accept_loop(acceptor: Arc<Acceptor>, listener: TcpListener) {
    let stop = acceptor.sessions.shutdown.stop_accepting.clone();
    let inherited = nodelay_inherited(&listener);
    let mut failures = 0u32;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                if failures > 0 {
                    info!(failures, "accepting connections again");
                    failures = 0;
                }
                pair
            }
            Err(error) => {
                // Usually EMFILE: the process is out of file descriptors until connections
                // close. Said once per streak; backing off keeps the loop from spinning a core.
                if failures == 0 {
                    warn!(%error, "accept failed; backing off until connections close (out of file descriptors? raise `ulimit -n` or lower max_connections)");
                }
                failures = failures.saturating_add(1);
                let pause = accept_backoff(failures);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => break,
                }
                continue;
            }
        };
        if !inherited {
            let _ = tcp.set_nodelay(true);
        }
        let admitted = admit(&acceptor, peer);
        // Boxed: tokio copies a task's future whole into the task and again at each change of
        // its stage; behind a box that is a pointer rather than kilobytes per connection.
        let connection = Box::pin(serve_connection(acceptor.clone(), tcp, peer, admitted));
        acceptor.tasks.spawn(connection);
    }
}

/// Sets `TCP_NODELAY` on `listener`, which Linux copies to every socket it accepts; true if
/// that is done, so accepted sockets need no setsockopt of their own (one syscall less per
/// connection). Elsewhere, or if it fails, each accepted socket gets it itself.
fn nodelay_inherited(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux")
        && socket2::SockRef::from(listener)
            .set_tcp_nodelay(true)
            .is_ok()
}

/// Asks admission for a slot for a connection from `peer`, under the current limits.
fn admit(acceptor: &Acceptor, peer: SocketAddr) -> Result<ConnectionSlot, NotAdmitted> {
    let generation = acceptor.sessions.generations.current();
    let per_ip = *generation.config.limits.max_connections_per_ip.get_ref();
    acceptor.admission.admit(peer.ip(), per_ip)
}

/// Serves one plain-HTTP client connection arriving on `io` from `peer` exactly as the accept
/// loop serves an accepted TCP one (admission, then hyper until the request upgrades): the
/// fuzz target's way in, with the client's bytes in memory.
#[cfg(feature = "fuzzing")]
pub(crate) async fn serve_plain<I>(acceptor: Arc<Acceptor>, io: I, peer: SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let admitted = admit(&acceptor, peer);
    let timeout = acceptor
        .sessions
        .generations
        .current()
        .config
        .server
        .handshake_timeout
        .get_ref()
        .0;
    let protocols = Protocols::for_connection(acceptor.http2, None);
    let connection = ClientConnection::new(peer, "http", ConnectionAdmission::new(admitted));
    serve_http(acceptor, io, connection, protocols, timeout, timeout).await;
}

/// The pause after the `failures`-th accept error in a row: 10 ms, doubling, at most 1 s.
fn accept_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(7);
    (Duration::from_millis(10) * 2u32.pow(doublings)).min(Duration::from_secs(1))
}

/// What the requests of one client connection share.
struct ClientConnection {
    /// The client's address.
    pub peer: SocketAddr,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub scheme: &'static str,
    /// Its admission, and its slot until a WebSocket takes it.
    pub admission: ConnectionAdmission,
    /// Its requests in flight and the WebSockets they became.
    pub streams: OpenStreams,
    /// Set once a request came over HTTP/2: the connection then outlives its handshake.
    pub http2: AtomicBool,
}

async fn serve_connection(
    acceptor: Arc<Acceptor>,
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: Result<ConnectionSlot, NotAdmitted>,
) {
    let generation = acceptor.sessions.generations.current();
    let timeout = generation.config.server.handshake_timeout.get_ref().0;
    drop(generation);
    let admission = ConnectionAdmission::new(admitted);
    let http2 = acceptor.http2;
    let Some(tls) = acceptor.tls.as_ref().map(tls::ListenerTls::acceptor) else {
        let protocols = Protocols::for_connection(http2, None);
        let connection = ClientConnection::new(peer, "http", admission);
        return serve_http(acceptor, tcp, connection, protocols, timeout, timeout).await;
    };
    // Boxed: a TLS connection's future is three times a plain one's, and every plain
    // connection would otherwise be allocated at its size until it upgrades.
    Box::pin(serve_tls(acceptor, tls, tcp, peer, admission, timeout)).await;
}

/// Serves a client connection on a TLS listener: the TLS handshake, then HTTP on it.
async fn serve_tls(
    acceptor: Arc<Acceptor>,
    tls: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: ConnectionAdmission,
    timeout: Duration,
) {
    let http2 = acceptor.http2;
    // The TLS handshake is part of the client handshake and shares its deadline.
    let started = tokio::time::Instant::now();
    let drain = acceptor.sessions.shutdown.drain.clone();
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(timeout, tls.accept(tcp)) => accepted,
        () = drain.cancelled() => return,
    };
    match accepted {
        Ok(Ok(stream)) => {
            let left = timeout.saturating_sub(started.elapsed());
            let protocols = Protocols::for_connection(http2, stream.get_ref().1.alpn_protocol());
            let connection = ClientConnection::new(peer, "https", admission);
            serve_http(acceptor, stream, connection, protocols, left, timeout).await;
        }
        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => debug!(%peer, ?timeout, "TLS handshake timed out"),
    }
}

impl ClientConnection {
    fn new(peer: SocketAddr, scheme: &'static str, admission: ConnectionAdmission) -> Arc<Self> {
        Arc::new(ClientConnection {
            peer,
            scheme,
            admission,
            streams: OpenStreams::new(),
            http2: AtomicBool::new(false),
        })
    }
}

/// Serves HTTP on a client connection with `protocols`. HTTP/1.1 (and a connection that sent
/// no HTTP/2 request) has `left` to upgrade; an HTTP/2 connection lives while it carries
/// streams, each request with `handshake_timeout` of its own.
async fn serve_http<I>(
    acceptor: Arc<Acceptor>,
    io: I,
    connection: Arc<ClientConnection>,
    protocols: Protocols,
    left: Duration,
    handshake_timeout: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if protocols != Protocols::Http1 {
        // Boxed: the HTTP/2-capable server is more than twice the size of the HTTP/1.1 one,
        // and every HTTP/1.1 connection would otherwise be allocated at its size.
        let served = serve_auto(acceptor, io, connection, protocols, left, handshake_timeout);
        return Box::pin(served).await;
    }
    let peer = connection.peer;
    // Backends are tried until the deadline; the connection lives a little longer, so that the
    // client still gets the answer (504) when they took all of it.
    let deadline = tokio::time::Instant::now() + left;
    let shutdown = acceptor.sessions.shutdown.clone();
    let service = client_service(acceptor, connection, deadline, handshake_timeout);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(left)
        .max_buf_size(MAX_REQUEST_HEAD);
    let served = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::select! {
        served = tokio::time::timeout(left + ANSWER_GRACE, served) => match served {
            Ok(Ok(())) => {}
            Ok(Err(error)) if error.is_parse_version_h2() => debug!(%peer, "a client sent the HTTP/2 preface, but HTTP/2 is off on this listener (set [server] http2 = true to serve it); closed"),
            Ok(Err(error)) => debug!(%peer, %error, "client HTTP connection failed"),
            Err(_) => debug!(%peer, ?left, "client handshake timed out"),
        },
        () = shutdown.drain.cancelled() => {}
    }
}

/// The service answering a client connection's requests: an HTTP/1.1 request before
/// `deadline`, an HTTP/2 stream within `handshake_timeout` of its start.
fn client_service(
    acceptor: Arc<Acceptor>,
    connection: Arc<ClientConnection>,
    deadline: tokio::time::Instant,
    handshake_timeout: Duration,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send + 'static,
> + Send
+ 'static {
    service_fn(move |request: Request<Incoming>| {
        let acceptor = acceptor.clone();
        let connection = connection.clone();
        async move {
            let _open = connection.streams.open();
            let deadline = if request.version() == Version::HTTP_2 {
                connection.http2.store(true, Ordering::Relaxed);
                tokio::time::Instant::now() + handshake_timeout
            } else {
                deadline
            };
            let answer = answer::answer(&acceptor, &connection, deadline, request).await;
            Ok::<_, Infallible>(answer.counted(&acceptor.sessions.observe.metrics))
        }
    })
}

/// Serves HTTP/2, or either version as the client's first bytes say, on a client connection
/// (see [`serve_http`]).
async fn serve_auto<I>(
    acceptor: Arc<Acceptor>,
    io: I,
    connection: Arc<ClientConnection>,
    protocols: Protocols,
    left: Duration,
    handshake_timeout: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = connection.peer;
    let deadline = tokio::time::Instant::now() + left;
    if protocols == Protocols::Http2 {
        connection.http2.store(true, Ordering::Relaxed);
    }
    let shutdown = acceptor.sessions.shutdown.clone();
    let executor = TrackedExecutor {
        tasks: acceptor.tasks.clone(),
        abort: shutdown.abort.clone(),
    };
    let service = client_service(acceptor, connection.clone(), deadline, handshake_timeout);
    let mut builder = auto::Builder::new(executor);
    if protocols == Protocols::Http2 {
        builder = builder.http2_only();
    }
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(left)
        .max_buf_size(MAX_REQUEST_HEAD);
    http2::configure(&mut builder, MAX_REQUEST_HEAD);
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    let log = |served: Result<(), _>| {
        if let Err(error) = served {
            debug!(%peer, %error, "client HTTP connection failed");
        }
    };
    let draining = tokio::select! {
        served = served.as_mut() => return log(served),
        () = tokio::time::sleep_until(deadline + ANSWER_GRACE) => false,
        () = shutdown.drain.cancelled() => true,
    };
    if !connection.http2.load(Ordering::Relaxed) {
        // HTTP/1.1 that has not upgraded by now, or a client that never sent a request.
        debug!(%peer, ?left, "client handshake timed out");
        return;
    }
    if !draining {
        tokio::select! {
            served = served.as_mut() => return log(served),
            () = connection.streams.idle_for(handshake_timeout) => debug!(%peer, "HTTP/2 connection idle; closing it"),
            () = shutdown.drain.cancelled() => {}
        }
    }
    // GOAWAY: no new streams; the open ones (their sessions close 1001 in a drain) finish,
    // then the connection ends.
    served.as_mut().graceful_shutdown();
    tokio::select! {
        served = served => log(served),
        () = shutdown.abort.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nodelay_without_a_setsockopt_of_their_own() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inherited = nodelay_inherited(&listener);
        assert_eq!(inherited, cfg!(target_os = "linux"));
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, client) = tokio::join!(listener.accept(), client);
        let (accepted, _client) = (accepted.unwrap().0, client.unwrap());
        if inherited {
            assert!(accepted.nodelay().unwrap(), "TCP_NODELAY not inherited");
        }
    }

    #[test]
    fn accept_errors_back_off_up_to_a_second() {
        assert_eq!(accept_backoff(1), Duration::from_millis(10));
        assert_eq!(accept_backoff(2), Duration::from_millis(20));
        assert_eq!(accept_backoff(8), Duration::from_secs(1));
        assert_eq!(accept_backoff(u32::MAX), Duration::from_secs(1));
    }
}
