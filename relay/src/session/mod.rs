//! One client's session: the upgraded client leg, its backend leg, the pump between them, and
//! carrying out what [`ending::decide`] says when the pump stops: close both legs, move the
//! client to another backend ([`reoriginate`]), or wait for its turn in a drain.

mod ending;
mod reoriginate;
mod stop;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream as ServerTlsStream;
use tokio_util::either::Either;
use tracing::{debug, info};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role};

use crate::compress::{Agreed, DeflateLeg, MaybeDeflate};
use crate::config::OnBackendLoss;
use crate::generation::{Generation, Generations};
use crate::inspect::ConnectionInfo;
use crate::observe::{Observatory, SessionEntry, SessionObserver, StopRequest, conn_span};
use crate::pump::{
    AnyLeg, BackendLeg, CLOSE_HANDSHAKE_TIMEOUT, Direction, Leg, PumpEnd, PumpState, Side,
    StreamLeg, close_leg,
};
use crate::route::Route;
use crate::shutdown::{Shutdown, UntilAborted, close_delay, or_aborted, until_aborted};
use crate::upstream::{BackendRequest, BackendState, Upstream};
use crate::websocket::WebSocket;
use ending::{Closing, Farewell, Next};
use stop::StopRequested;

/// The client side of a session: its own upgraded socket (compressed or not), or a stream of a
/// mux client's link.
type ClientLeg = MaybeDeflate<AnyLeg<ClientStream>, TokioIo<Upgraded>>;

/// The connection under a client's own uncompressed WebSocket. hyper hands it over as
/// `Upgraded`, a boxed stream behind a buffer of what it read past the request; the plain and
/// TLS sockets are taken back out of it, so every read and write goes straight to the socket
/// and no buffer of hyper's stays. An HTTP/2 stream stays `Upgraded`.
type ClientStream = Either<TcpStream, Either<Box<ServerTlsStream<TcpStream>>, TokioIo<Upgraded>>>;

/// `upgraded` as the stream a session reads and writes, and the bytes the client sent after
/// its request (its first frames, if it did not wait for the `101`).
fn client_stream(upgraded: Upgraded) -> (ClientStream, Bytes) {
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return (Either::Left(parts.io.into_inner()), parts.read_buf),
        Err(upgraded) => upgraded,
    };
    match upgraded.downcast::<TokioIo<ServerTlsStream<TcpStream>>>() {
        Ok(parts) => {
            let tls = Box::new(parts.io.into_inner());
            (Either::Right(Either::Left(tls)), parts.read_buf)
        }
        Err(upgraded) => (
            Either::Right(Either::Right(TokioIo::new(upgraded))),
            Bytes::new(),
        ),
    }
}

/// What every session of a relay shares: the current generation (a re-origination routes by
/// it), the observers, and the shutdown stages.
#[derive(Clone)]
pub(crate) struct SessionContext {
    /// The configuration generations.
    pub generations: Arc<Generations>,
    /// Registry, metrics, taps.
    pub observe: Arc<Observatory>,
    /// Drain and abort (shared: each session holds one pointer, not three tokens).
    pub shutdown: Arc<Shutdown>,
}

/// How the client side of a session arrives.
pub(crate) enum ClientStart {
    /// A WebSocket of its own, once hyper hands over the upgraded connection.
    Upgrade(OnUpgrade),
    /// The same with `permessage-deflate`, as the client's answer agreed.
    Deflate(OnUpgrade, Agreed),
    /// A stream a mux client opened (already accepted).
    Stream(StreamLeg),
}

/// A client routed to its backend, waiting for its client side.
pub(crate) struct PendingSession {
    /// The generation the session started under (its socket limits and keepalive).
    pub generation: Arc<Generation>,
    /// The route that matched.
    pub route: Arc<Route>,
    /// The relay's id for the connection.
    pub conn_id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// The HTTP version that carries the client: `1.1` or `2`.
    pub http: &'static str,
    /// The request path.
    pub path: String,
    /// The client's hash key, to rank backends again after a loss.
    pub hash_key: Vec<u8>,
    /// The backend's index in the route's upstream.
    pub backend_index: usize,
    /// The open backend leg.
    pub backend: BackendLeg,
    /// The subprotocol the backend picked; a replacement backend must pick the same.
    pub protocol: Option<HeaderValue>,
    /// What the backend was asked, to ask a replacement the same.
    pub request: BackendRequest,
}

impl PendingSession {
    /// The session, run to its end with its client side; the grace period's end (`abort`)
    /// cuts it short. `held` is let go when it ends: the client's connection slot (none for a
    /// mux client's stream, whose link holds the slot) and whatever else the caller counts
    /// open while the session lives.
    pub fn run<H: Send + 'static>(
        self,
        context: SessionContext,
        client: ClientStart,
        held: H,
    ) -> UntilAborted<impl Future<Output = ()> + Send + 'static, H> {
        let shutdown = context.shutdown.clone();
        // Boxed until the session starts: an async function keeps its arguments for its whole
        // life, and a session lives as long as its client.
        let start = Box::new(Start {
            pending: self,
            context,
            client,
        });
        until_aborted(run_to_end(start), shutdown, held)
    }

    /// Takes over the client's side (its upgraded connection, or a mux client's stream) and
    /// opens the session; `None` when the client left first or its leg could not start (the
    /// backend leg is closed then).
    async fn start(
        mut self,
        context: SessionContext,
        client: ClientStart,
    ) -> Option<(Session, ClientLeg)> {
        let (upgrade, agreed) = match client {
            ClientStart::Stream(stream) => {
                let client = MaybeDeflate::Plain(AnyLeg::Stream(stream));
                return Some((Session::open(self, context), client));
            }
            ClientStart::Upgrade(upgrade) => (upgrade, None),
            ClientStart::Deflate(upgrade, agreed) => (upgrade, Some(agreed)),
        };
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                conn_span(self.conn_id).in_scope(|| debug!(peer = %self.peer, %error, "client left before the upgrade completed"));
                let away = ending::close(CloseCode::Away, "client went away");
                close_leg(&mut self.backend, Some(away)).await;
                return None;
            }
        };
        let socket = &self.generation.socket;
        let client = match agreed {
            None => {
                let (io, read_ahead) = client_stream(upgraded);
                let leg = WebSocket::new(io, Role::Server, socket, &read_ahead);
                MaybeDeflate::Plain(AnyLeg::Socket(leg))
            }
            Some(agreed) => {
                let counters = context.observe.metrics.compression().clone();
                match DeflateLeg::new(TokioIo::new(upgraded), agreed, socket, counters) {
                    Ok(leg) => MaybeDeflate::Deflate(Box::new(leg)),
                    Err(error) => {
                        // Only a mismatch between the answer and yawc's reading of it gets
                        // here; the client was told compression is on.
                        conn_span(self.conn_id).in_scope(
                            || tracing::warn!(%error, "compressed client leg failed to start"),
                        );
                        let away = ending::close(CloseCode::Error, "relay error");
                        close_leg(&mut self.backend, Some(away)).await;
                        return None;
                    }
                }
            }
        };
        Some((Session::open(self, context), client))
    }
}

/// What a session starts from, in one box until it starts: an async function keeps its
/// arguments for its whole life, and a session lives as long as its client.
struct Start {
    pending: PendingSession,
    context: SessionContext,
    client: ClientStart,
}

impl Start {
    /// The parts, with the box freed: a box moved out of in an async function stays allocated
    /// until the function ends, here the session's whole life.
    fn into_parts(self: Box<Self>) -> (PendingSession, SessionContext, ClientStart) {
        let Start {
            pending,
            context,
            client,
        } = *self;
        (pending, context, client)
    }
}

async fn run_to_end(start: Box<Start>) {
    let (pending, context, client) = start.into_parts();
    // The start is one-off and boxed: a session's future is as large as its largest step.
    let started = Box::pin(async move {
        let shutdown = context.shutdown.clone();
        or_aborted(pending.start(context, client), &shutdown).await
    });
    let Some((mut session, mut client)) = started.await else {
        return;
    };
    let closing = session.pump_to_end(&mut client).await;
    // Boxed, with what it decided: kept beside the pump, it would grow every session's future.
    Box::pin(async move {
        let shutdown = session.context.shutdown.clone();
        or_aborted(session.carry_out(&mut client, &closing), &shutdown).await;
        session.finish(&closing);
    })
    .await;
}

/// A session between its start and its end.
struct Session {
    context: SessionContext,
    route: Arc<Route>,
    conn_id: u64,
    hash_key: Vec<u8>,
    /// The upstream serving the session now (a re-origination takes the current
    /// generation's).
    upstream: Arc<Upstream>,
    backend_index: usize,
    backend: BackendLeg,
    /// Boxed: most clients ask for no subprotocol, and every session would hold a header's room.
    protocol: Option<Box<HeaderValue>>,
    request: BackendRequest,
    pump: PumpState<SessionObserver>,
    started: Instant,
}

impl Session {
    fn open(pending: PendingSession, context: SessionContext) -> Session {
        let PendingSession {
            generation,
            route,
            conn_id,
            peer,
            http,
            path,
            hash_key,
            backend_index,
            backend,
            protocol,
            request,
        } = pending;
        let upstream = route.upstream.clone();
        let backend_url = upstream.backends[backend_index].original.clone();
        // The access line at the close says all of this again, so opening costs no write at
        // the default level.
        conn_span(conn_id)
            .in_scope(|| debug!(%peer, %path, backend = %backend_url, "session open"));
        let route_path = route.path.clone();
        let inspectors = route.inspectors.as_ref().map(|template| {
            template.instantiate(ConnectionInfo {
                conn_id,
                route: route_path.clone(),
                path: path.clone(),
                client_addr: peer,
            })
        });
        let entry = SessionEntry::new(
            conn_id,
            peer,
            http,
            route_path,
            path,
            route.mode,
            backend_url,
        );
        let observer = SessionObserver::new(&context.observe, entry, inspectors, route.sensitive);
        let started = Instant::now();
        let replayable = upstream.on_backend_loss == OnBackendLoss::Reconnect;
        Session {
            pump: PumpState::new(generation.keepalive.clone(), started, replayable, observer),
            context,
            route,
            conn_id,
            hash_key,
            upstream,
            backend_index,
            backend,
            protocol: protocol.map(Box::new),
            request,
            started,
        }
    }

    /// The client's address (its registry entry has it).
    fn peer(&self) -> SocketAddr {
        self.pump.hooks().session().client_addr
    }

    fn backend_url(&self) -> &str {
        &self.upstream.backends[self.backend_index].original
    }

    /// Pumps until the session must end, moving the client to another backend and waiting
    /// for its turn in a drain on the way, as the decision says.
    async fn pump_to_end(&mut self, client: &mut ClientLeg) -> Closing {
        let mut draining = false;
        loop {
            let end = self.pump_once(client, draining).await;
            let farewell = match ending::decide(&end, self.upstream.on_backend_loss, draining) {
                Next::Drain => {
                    draining = true;
                    continue;
                }
                Next::Close(closing) => return closing,
                Next::Reoriginate { farewell } => farewell,
            };
            // Boxed: a move is rare, and what it holds would otherwise sit in every session's
            // future beside the pump.
            let shutdown = self.context.shutdown.clone();
            let (session, leg) = (&mut *self, &mut *client);
            let moved = Box::pin(async move {
                let moving = session.move_client(leg, end, farewell, draining);
                or_aborted(moving, &shutdown).await
            });
            if let Err(closing) = moved.await {
                return closing;
            }
        }
    }

    /// Moves the client to another backend after the pump stopped with `end`; a move the
    /// relay decided (`farewell` for the old backend) first lets that backend acknowledge what
    /// it was sent, so the move replays nothing. `Err` says how the session ends instead.
    async fn move_client(
        &mut self,
        client: &mut ClientLeg,
        end: PumpEnd,
        farewell: Option<CloseFrame>,
        draining: bool,
    ) -> Result<(), Closing> {
        let span = conn_span(self.conn_id);
        if farewell.is_some() {
            let within = self.pump.pong_timeout();
            match self.pump.settle(client, &mut self.backend, within).await {
                None => {}
                Some(end @ (PumpEnd::ClientGone(_) | PumpEnd::ClientClosed(_))) => {
                    if let Next::Close(closing) =
                        ending::decide(&end, self.upstream.on_backend_loss, draining)
                    {
                        return Err(closing);
                    }
                }
                Some(end) => {
                    span.in_scope(|| info!(backend = %self.backend_url(), %end, "backend did not acknowledge before the move; replaying"));
                }
            }
            span.in_scope(|| info!(backend = %self.backend_url(), %end, "moving the client"));
        } else {
            span.in_scope(|| info!(backend = %self.backend_url(), %end, "backend lost; re-originating the client"));
        }
        self.reoriginate(farewell).await
    }

    /// Runs the pump until it stops on its own, the relay drains, or the backend is drained
    /// (by the admin or a reload) and the grace period has passed. While `draining`, it stops
    /// at this session's turn to close instead.
    async fn pump_once(&mut self, client: &mut ClientLeg, draining: bool) -> PumpEnd {
        let context = &self.context;
        let grace = context.generations.shutdown_grace();
        let entry = self.pump.hooks_mut().entry();
        if draining {
            let open = context.observe.sessions.len();
            let delay = close_delay(self.conn_id, open, grace);
            let turn = StopRequested::drain_turn(entry, delay);
            return self.pump.run(client, &mut self.backend, turn).await;
        }
        // Raised here too, for what happened before the session registered or moved: the
        // walks that raise them only see the sessions registered by then.
        if context.shutdown.drain.is_cancelled() {
            entry.raise(StopRequest::Drain);
        }
        let url = &self.upstream.backends[self.backend_index].original;
        // A backend the current generation lacks was removed after the walk that chose it.
        let generation = context.generations.current();
        if generation
            .backends
            .get(url)
            .is_none_or(BackendState::draining)
        {
            entry.raise(StopRequest::BackendDrained);
        }
        drop(generation);
        let stop = StopRequested::new(entry, grace);
        self.pump.run(client, &mut self.backend, stop).await
    }

    /// Tells each leg what `closing` says.
    async fn carry_out(&mut self, client: &mut ClientLeg, closing: &Closing) {
        let farewell = |farewell: &Farewell| match farewell {
            Farewell::Close(frame) => Some(frame.clone()),
            Farewell::Nothing => None,
        };
        let (to_client, to_backend) = (farewell(&closing.client), farewell(&closing.backend));
        let span = conn_span(self.conn_id);
        let peer = self.peer();
        let backend = &mut self.backend;
        match closing.first {
            Some(first) => {
                span.in_scope(|| info!(peer = %peer, how = %closing.how, first = first.as_str(), "closing one leg first"));
                let to_backend_waiting = self.pump.take_waiting(Direction::ClientToBackend);
                let to_client_waiting = self.pump.take_waiting(Direction::BackendToClient);
                let order = match first {
                    Side::Backend => close_in_order(
                        (backend, to_backend, to_backend_waiting),
                        (client, to_client, to_client_waiting),
                    ),
                    Side::Client => close_in_order(
                        (client, to_client, to_client_waiting),
                        (backend, to_backend, to_backend_waiting),
                    ),
                };
                // Boxed, each order its own type, and rare.
                order.await;
            }
            None => {
                let client_close = async {
                    if let Some(frame) = to_client {
                        close_leg(client, frame).await;
                    }
                };
                let backend_close = async {
                    if let Some(frame) = to_backend {
                        close_leg(backend, frame).await;
                    }
                };
                Box::pin(async { tokio::join!(client_close, backend_close) }).await;
            }
        }
    }

    /// Counts the session's end and writes its access line: who, where to, how it ended and
    /// what crossed, one line per session like a web server's access log.
    fn finish(&self, closing: &Closing) {
        self.context
            .observe
            .metrics
            .close(closing.by.as_str(), closing.client_code);
        let traffic = self.pump.traffic;
        let session = self.pump.hooks().session();
        conn_span(self.conn_id).in_scope(|| {
            info!(peer = %session.client_addr,
                route = %session.route,
                path = %session.path,
                http = %session.http,
                backend = %self.backend_url(),
                how = %closing.how,
                by = %closing.by.as_str(),
                code = %CodeField(closing.client_code),
                seconds = %format_args!("{:.3}", self.started.elapsed().as_secs_f64()),
                messages_in = traffic.client_messages,
                bytes_in = traffic.client_bytes,
                messages_out = traffic.backend_messages,
                bytes_out = traffic.backend_bytes,
                "session closed"
            )
        });
    }
}

/// The close code the client got, as the access line shows it: the number, or `none`.
struct CodeField(Option<u16>);

impl std::fmt::Display for CodeField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(code) => write!(f, "{code}"),
            None => f.write_str("none"),
        }
    }
}

/// One leg to close: the leg, its farewell (`None`: nothing to send), and a message already
/// read for it.
type Closable<'a, L> = (&'a mut L, Option<Option<CloseFrame>>, Option<Message>);

/// Closes `first` while forwarding what it still sends to `second`, then closes `second`.
fn close_in_order<'a, A: Leg + Send, B: Leg + Send>(
    (first, first_farewell, to_first): Closable<'a, A>,
    (second, second_farewell, to_second): Closable<'a, B>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        close_forwarding(
            first,
            first_farewell.unwrap_or(None),
            to_first,
            second,
            to_second,
        )
        .await;
        if let Some(frame) = second_farewell {
            close_leg(second, frame).await;
        }
    })
}

/// Closes `first` with `farewell` after handing it `to_first` (a message already read for
/// it), and forwards the data messages it still sends to `second` (after `to_second`, one
/// already read for that one) until its close, within [`CLOSE_HANDSHAKE_TIMEOUT`].
async fn close_forwarding<A: Leg, B: Leg>(
    first: &mut A,
    farewell: Option<CloseFrame>,
    to_first: Option<Message>,
    second: &mut B,
    to_second: Option<Message>,
) {
    let forward = async {
        if let Some(message) = to_second
            && second.feed(message).await.is_err()
        {
            return;
        }
        if let Some(message) = to_first
            && first.feed(message).await.is_err()
        {
            return;
        }
        if first.send(Message::Close(farewell)).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = first.next().await {
            if (message.is_text() || message.is_binary()) && second.feed(message).await.is_err() {
                return;
            }
        }
        let _ = second.flush().await;
    };
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, forward).await;
}
