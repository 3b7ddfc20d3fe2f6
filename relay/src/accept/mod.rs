//! The client-facing listener: accept, limit, TLS, serve HTTP/1.1 with hyper until the request
//! upgrades. What each request gets is decided in [`answer`]; the RFC 6455 checks are the pure
//! functions of [`upgrade`]; clients that multiplex on their side are served by [`mux_client`].

mod answer;
mod connect;
mod mux_client;
mod outcome;
mod static_files;
pub(crate) mod tls;
mod upgrade;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::admission::{Admission, ConnectionSlot, NotAdmitted};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub(crate) use static_files::StaticFiles;
pub(crate) use upgrade::{check_upgrade, switching_protocols};

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
    /// TLS for the client listener, if configured (fixed at start).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Accepts until the relay stops accepting.
pub(crate) async fn accept_loop(acceptor: Arc<Acceptor>, listener: TcpListener) {
    let stop = acceptor.sessions.shutdown.stop_accepting.clone();
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
        let _ = tcp.set_nodelay(true);
        let admitted = admit(&acceptor, peer);
        acceptor
            .tasks
            .spawn(serve_connection(acceptor.clone(), tcp, peer, admitted));
    }
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
        .0;
    serve_http(acceptor, io, peer, admitted, "http", timeout).await;
}

/// The pause after the `failures`-th accept error in a row: 10 ms, doubling, at most 1 s.
fn accept_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(7);
    (Duration::from_millis(10) * 2u32.pow(doublings)).min(Duration::from_secs(1))
}

/// A client connection's admission: refused (it gets 503 for every request), or its slot,
/// until an upgrade hands it to a session.
struct Admitted(Mutex<Result<Option<ConnectionSlot>, NotAdmitted>>);

impl Admitted {
    /// Why the connection was not admitted, if it wasn't.
    fn refusal(&self) -> Option<NotAdmitted> {
        self.0
            .lock()
            .expect("admission lock")
            .as_ref()
            .err()
            .copied()
    }

    /// The slot, for the session (or mux link) the connection becomes.
    fn take(&self) -> Option<ConnectionSlot> {
        self.0.lock().expect("admission lock").as_mut().ok()?.take()
    }
}

/// The admission of one client connection, shared by its requests.
type Slot = Arc<Admitted>;

async fn serve_connection(
    acceptor: Arc<Acceptor>,
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: Result<ConnectionSlot, NotAdmitted>,
) {
    let timeout = acceptor
        .sessions
        .generations
        .current()
        .config
        .server
        .handshake_timeout
        .0;
    let Some(tls) = acceptor.tls.clone() else {
        return serve_http(acceptor, tcp, peer, admitted, "http", timeout).await;
    };
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
            serve_http(acceptor, stream, peer, admitted, "https", left).await;
        }
        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => debug!(%peer, ?timeout, "TLS handshake timed out"),
    }
}

/// Serves HTTP/1.1 on a client connection until it upgrades or `timeout` passes.
async fn serve_http<I>(
    acceptor: Arc<Acceptor>,
    io: I,
    peer: SocketAddr,
    admitted: Result<ConnectionSlot, NotAdmitted>,
    scheme: &'static str,
    timeout: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slot: Slot = Arc::new(Admitted(Mutex::new(admitted.map(Some))));
    let drain = acceptor.sessions.shutdown.drain.clone();
    // Backends are tried until the deadline; the connection lives a little longer, so that the
    // client still gets the answer (504) when they took all of it.
    let deadline = tokio::time::Instant::now() + timeout;
    let service = service_fn(move |request| {
        let acceptor = acceptor.clone();
        let slot = slot.clone();
        async move {
            let answer = answer::answer(&acceptor, peer, scheme, &slot, deadline, request).await;
            Ok::<_, Infallible>(answer.counted(&acceptor.sessions.observe.metrics))
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::select! {
        served = tokio::time::timeout(timeout + ANSWER_GRACE, connection) => match served {
            Ok(Ok(())) => {}
            Ok(Err(error)) => debug!(%peer, %error, "client HTTP connection failed"),
            Err(_) => debug!(%peer, ?timeout, "client handshake timed out"),
        },
        () = drain.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_back_off_up_to_a_second() {
        assert_eq!(accept_backoff(1), Duration::from_millis(10));
        assert_eq!(accept_backoff(2), Duration::from_millis(20));
        assert_eq!(accept_backoff(8), Duration::from_secs(1));
        assert_eq!(accept_backoff(u32::MAX), Duration::from_secs(1));
    }
}
