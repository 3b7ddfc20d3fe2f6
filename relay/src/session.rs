//! One client's session: the upgraded client leg, its backend leg, the pump between them, and
//! what happens when either side ends (close forwarding, re-origination, drain).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role};

use crate::Shared;
use crate::backends::BackendState;
use crate::config::Mode;
use crate::config::OnBackendLoss;
use crate::dial::{BackendRequest, dial};
use crate::inspect::{ChainTemplate, ConnectionInfo, Direction};
use crate::leg::{AnyLeg, BackendLeg, Leg, StreamLeg};
use crate::mux::{Opened, open_stream};
use crate::pump::{Observer, PumpEnd, PumpState};
use crate::route::Upstream;
use crate::routing::Routing;
use crate::sessions::SessionEntry;
use crate::shutdown::close_delay;

/// Time allowed for a close handshake once the relay has decided to close a leg.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// The client side of a session: its own upgraded socket, or a stream of a mux client's link.
type ClientLeg = AnyLeg<TokioIo<Upgraded>>;

/// How the client side of a session arrives.
pub(crate) enum ClientStart {
    /// A WebSocket of its own, once hyper hands over the upgraded connection.
    Upgrade(OnUpgrade),
    /// A stream a mux client opened (already accepted).
    Stream(StreamLeg),
}

/// A client routed to its backend, waiting for its client side (see `listener::prepare_session`).
pub(crate) struct PendingSession {
    pub shared: Arc<Shared>,
    /// The configuration generation the session started under.
    pub routing: Arc<Routing>,
    pub conn_id: u64,
    pub peer: SocketAddr,
    pub path: String,
    /// The route's path prefix.
    pub route_path: Arc<str>,
    /// The route's inspectors, if any.
    pub route_inspectors: Option<ChainTemplate>,
    /// The route is `sensitive` (no payload in taps).
    pub route_sensitive: bool,
    pub upstream: Arc<Upstream>,
    /// The client's hash key, to rank backends again after a loss.
    pub hash_key: Vec<u8>,
    pub backend_index: usize,
    pub backend: BackendLeg,
    /// Per-client or mux: how replacement backends are reached.
    pub mode: Mode,
    /// The subprotocol the client was given; a replacement backend must pick the same.
    pub protocol: Option<HeaderValue>,
    pub backend_request: BackendRequest,
}

impl PendingSession {
    /// The session, complete with its client side and connection slot.
    pub fn with_client(
        self,
        client: ClientStart,
        slot: Option<OwnedSemaphorePermit>,
    ) -> SessionStart {
        SessionStart {
            pending: self,
            client,
            slot,
        }
    }
}

/// Everything a session starts from.
pub(crate) struct SessionStart {
    pending: PendingSession,
    client: ClientStart,
    /// The client's connection slot, held for the session's life (none for a mux client's
    /// stream: its link holds the slot).
    slot: Option<OwnedSemaphorePermit>,
}

/// Runs a session to its end; the grace period's end (`abort`) cuts it short.
pub(crate) async fn run(start: SessionStart) {
    let abort = start.pending.shared.shutdown.abort.clone();
    tokio::select! {
        () = run_to_end(start) => {}
        () = abort.cancelled() => debug!("session dropped at the end of the grace period"),
    }
}

async fn run_to_end(start: SessionStart) {
    let SessionStart {
        pending,
        client,
        slot: _slot,
    } = start;
    let PendingSession {
        shared,
        routing,
        conn_id,
        peer,
        path,
        route_path,
        route_inspectors,
        route_sensitive,
        mut upstream,
        hash_key,
        mut backend_index,
        backend,
        mode,
        protocol,
        backend_request,
    } = pending;
    let mut backend = backend;
    let mut client: ClientLeg = match client {
        ClientStart::Stream(stream) => AnyLeg::Stream(stream),
        ClientStart::Upgrade(upgrade) => match upgrade.await {
            // Boxed, as the other one-off steps below: a session's future is as large as its
            // largest step, and it lives as long as the client does.
            Ok(upgraded) => AnyLeg::Socket(
                Box::pin(WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(routing.client_ws),
                ))
                .await,
            ),
            Err(error) => {
                debug!(%peer, %error, "client left before the upgrade completed");
                close_leg(
                    &mut backend,
                    Some(close(CloseCode::Away, "client went away")),
                )
                .await;
                return;
            }
        },
    };
    let started = Instant::now();
    info!(%peer, %path, backend = %upstream.backends[backend_index], "session open");

    let replayable = upstream.on_backend_loss == OnBackendLoss::Reconnect;
    let inspectors = route_inspectors.map(|template| {
        template.instantiate(ConnectionInfo {
            conn_id,
            route: route_path.clone(),
            path: path.clone(),
            client_addr: peer,
        })
    });
    let backend_name = |upstream: &Upstream, index: usize| -> Arc<str> {
        upstream.backends[index].original.as_str().into()
    };
    let entry = Arc::new(SessionEntry::new(
        conn_id,
        peer,
        route_path.clone(),
        path.clone(),
        match mode {
            Mode::PerClient => "per-client",
            Mode::Mux => "mux",
        },
        backend_name(&upstream, backend_index),
    ));
    let _registered = shared.sessions.register(entry.clone());
    let metrics = &shared.metrics;
    let rtt = |leg: &str| {
        metrics
            .ping_rtt
            .get_or_create_owned(&vec![("leg", leg.to_owned())])
    };
    let observer = Observer {
        conn_id,
        route: route_path.clone(),
        entry: entry.clone(),
        tap: shared.tap.clone(),
        redact: route_sensitive,
        counters: metrics.traffic_counters(),
        client_rtt: rtt("client"),
        backend_rtt: rtt("backend"),
        published: Default::default(),
    };
    let gauge = |upstream: &Upstream, index: usize| {
        metrics.connections.get_or_create_owned(&vec![
            ("route", route_path.to_string()),
            ("backend", upstream.backends[index].original.clone()),
        ])
    };
    let mut connections_gauge = gauge(&upstream, backend_index);
    connections_gauge.inc();
    let streams_gauge = |upstream: &Upstream, index: usize| {
        (mode == Mode::Mux).then(|| {
            metrics.mux_streams.get_or_create_owned(&vec![(
                "backend",
                upstream.backends[index].original.clone(),
            )])
        })
    };
    let mut mux_streams = streams_gauge(&upstream, backend_index);
    mux_streams.iter().for_each(|g| {
        g.inc();
    });
    let mut state = PumpState::new(
        routing.keepalive,
        started,
        replayable,
        inspectors,
        backend_name(&upstream, backend_index),
        observer,
    );
    let mut draining = false;
    let (closed_by, client_code, outcome) = loop {
        let end = if draining {
            let delay = close_delay(conn_id, shared.sessions.len(), shared.shutdown_grace());
            let stop = async move {
                tokio::time::sleep(delay).await;
                PumpEnd::Drain
            };
            state.run(&mut client, &mut backend, stop).await
        } else {
            let backend_state = shared
                .routing()
                .backends
                .get_arc(&upstream.backends[backend_index].original);
            let grace = shared.shutdown_grace();
            let stop = async {
                tokio::select! {
                    () = shared.shutdown.drain.cancelled() => PumpEnd::Drain,
                    () = admin_drained(backend_state, grace) => {
                        PumpEnd::BackendGone("backend drained by the admin".into())
                    }
                }
            };
            state.run(&mut client, &mut backend, stop).await
        };
        match end {
            PumpEnd::Drain if !draining => {
                draining = true;
                continue;
            }
            PumpEnd::Drain => {
                let going_away = close(CloseCode::Away, "going away: relay shutting down");
                close_both(
                    &mut client,
                    Some(going_away.clone()),
                    &mut backend,
                    Some(going_away),
                )
                .await;
                break ("relay", Some(1001), "drained".to_owned());
            }
            PumpEnd::ClientClosed(frame) => {
                let code = describe(&frame);
                let client_code = frame.as_ref().map(|f| u16::from(f.code));
                close_both(&mut client, None, &mut backend, frame).await;
                break ("client", client_code, format!("client closed ({code})"));
            }
            PumpEnd::ClientGone(reason) => {
                close_leg(
                    &mut backend,
                    Some(close(CloseCode::Away, "client went away")),
                )
                .await;
                break ("client", None, format!("client gone: {reason}"));
            }
            PumpEnd::ClientViolation(code, reason) => {
                info!(%peer, %code, %reason, "closing client");
                // Replies the backend owes for the client's earlier, valid messages still
                // reach it: close the backend first, forwarding what it sends until its
                // close, then fail the client.
                let pending = state.take_pending_to_client();
                Box::pin(forward_until_backend_closed(
                    &mut client,
                    &mut backend,
                    pending,
                ))
                .await;
                close_leg(&mut client, Some(close(code, &reason))).await;
                break (
                    "relay",
                    Some(u16::from(code)),
                    format!("client violation ({code}: {reason})"),
                );
            }
            PumpEnd::BackendViolation(code, reason) => {
                warn!(backend = %upstream.backends[backend_index], %code, %reason, "closing backend");
                close_both(
                    &mut client,
                    Some(close(
                        CloseCode::Bad(1014),
                        "bad gateway: the backend misbehaved",
                    )),
                    &mut backend,
                    Some(close(code, &reason)),
                )
                .await;
                break (
                    "relay",
                    Some(1014),
                    format!("backend violation ({code}: {reason})"),
                );
            }
            PumpEnd::Inspector(direction, code, reason) => {
                info!(%code, %reason, from = direction.as_str(), "inspector closed the connection");
                let going_away = Some(close(CloseCode::Away, "going away"));
                let verdict = Some(close(code, &reason));
                let client_code = match direction {
                    Direction::ClientToBackend => u16::from(code),
                    Direction::BackendToClient => 1001,
                };
                match direction {
                    Direction::ClientToBackend => {
                        close_both(&mut client, verdict, &mut backend, going_away).await;
                    }
                    Direction::BackendToClient => {
                        close_both(&mut client, going_away, &mut backend, verdict).await;
                    }
                }
                break (
                    "relay",
                    Some(client_code),
                    format!("inspector ({code}: {reason})"),
                );
            }
            PumpEnd::Idle => {
                let idle = close(CloseCode::Normal, "idle timeout");
                close_both(&mut client, Some(idle.clone()), &mut backend, Some(idle)).await;
                break ("relay", Some(1000), "idle timeout".to_owned());
            }
            PumpEnd::BackendClosed(frame)
                if !is_backend_loss(&frame) || upstream.on_backend_loss == OnBackendLoss::Close =>
            {
                let code = describe(&frame);
                let client_code = if upstream.on_backend_loss == OnBackendLoss::Close
                    && is_backend_loss(&frame)
                {
                    Some(1012)
                } else {
                    frame.as_ref().map(|f| u16::from(f.code))
                };
                if upstream.on_backend_loss == OnBackendLoss::Close && is_backend_loss(&frame) {
                    close_both(&mut client, Some(service_restart()), &mut backend, None).await;
                } else {
                    close_both(&mut client, frame, &mut backend, None).await;
                }
                break ("backend", client_code, format!("backend closed ({code})"));
            }
            PumpEnd::BackendGone(reason) if upstream.on_backend_loss == OnBackendLoss::Close => {
                close_leg(&mut client, Some(service_restart())).await;
                break ("backend", Some(1012), format!("backend gone: {reason}"));
            }
            PumpEnd::BackendClosed(_) | PumpEnd::BackendGone(_) => {
                let lost = upstream.backends[backend_index].original.clone();
                info!(backend = %lost, ?end, "backend lost; re-originating the client");
                let Some(replay) = state.take_replay(Instant::now()) else {
                    // The client sent more than the replay log holds since the backend last
                    // acknowledged: moving it would lose messages silently.
                    close_leg(&mut client, Some(service_restart())).await;
                    break (
                        "relay",
                        Some(1012),
                        format!(
                            "backend {lost} lost with more unacknowledged messages than can be replayed"
                        ),
                    );
                };
                let found = tokio::select! {
                    // Boxed: dialing is rare and its future is large.
                    found = Box::pin(reconnect(&shared, mode, &upstream.name, &hash_key, &lost, &backend_request, peer, protocol.as_ref())) => found,
                    () = shared.shutdown.drain.cancelled() => None,
                };
                let Some((new_upstream, index, mut replacement)) = found else {
                    close_leg(&mut client, Some(service_restart())).await;
                    break (
                        "relay",
                        Some(1012),
                        format!("backend {lost} lost, no other backend took the client"),
                    );
                };
                let replayed = replay.len();
                let mut replay_ok = true;
                for message in replay {
                    if replacement.feed(message).await.is_err() {
                        replay_ok = false;
                        break;
                    }
                }
                if !replay_ok || replacement.flush().await.is_err() {
                    close_leg(&mut client, Some(service_restart())).await;
                    break (
                        "relay",
                        Some(1012),
                        "replacement backend failed during replay".to_owned(),
                    );
                }
                info!(from = %lost, to = %upstream.backends[index], replayed, "client re-originated");
                upstream = new_upstream;
                backend_index = index;
                backend = replacement;
                state.set_backend_name(backend_name(&upstream, index));
                entry.set_backend(backend_name(&upstream, index));
                connections_gauge.dec();
                connections_gauge = gauge(&upstream, index);
                connections_gauge.inc();
                mux_streams.iter().for_each(|g| {
                    g.dec();
                });
                mux_streams = streams_gauge(&upstream, index);
                mux_streams.iter().for_each(|g| {
                    g.inc();
                });
                metrics.reoriginations.inc();
            }
        }
    };
    connections_gauge.dec();
    mux_streams.iter().for_each(|g| {
        g.dec();
    });
    metrics.close(closed_by, client_code);
    state.publish_metrics();
    let traffic = state.traffic;
    info!(
        %peer,
        how = %outcome,
        seconds = started.elapsed().as_secs_f64(),
        messages_in = traffic.client_messages,
        bytes_in = traffic.client_bytes,
        messages_out = traffic.backend_messages,
        bytes_out = traffic.backend_bytes,
        "session closed"
    );
}

/// Completes `grace` after `backend` is drained (by the admin, or by a reload that removed
/// it); never, if it isn't.
async fn admin_drained(backend: Option<Arc<BackendState>>, grace: Duration) {
    match backend {
        Some(state) => {
            state.drained().cancelled().await;
            tokio::time::sleep(grace).await;
        }
        None => std::future::pending().await,
    }
}

/// Finds the next backend in the client's rank, in the current configuration (a reload may
/// have changed the upstream), skipping the one just lost and any being drained. In mux mode
/// the backend gets an `Open` flagged as resumed.
#[allow(clippy::too_many_arguments)]
async fn reconnect(
    shared: &Shared,
    mode: Mode,
    upstream_name: &str,
    hash_key: &[u8],
    lost: &str,
    request: &BackendRequest,
    peer: SocketAddr,
    protocol: Option<&HeaderValue>,
) -> Option<(Arc<Upstream>, usize, BackendLeg)> {
    let routing = shared.routing();
    let upstream = routing.routes.upstream(upstream_name)?;
    let ranked = upstream.ranking.rank(hash_key);
    if mode == Mode::Mux {
        return match open_stream(
            &routing,
            &upstream,
            &ranked,
            request,
            peer,
            true,
            Some(lost),
        )
        .await
        {
            Opened::Stream(stream, index)
                if stream.protocol().map(str::as_bytes) == protocol.map(HeaderValue::as_bytes) =>
            {
                Some((upstream.clone(), index, BackendLeg::Stream(stream)))
            }
            Opened::Stream(mut stream, _) => {
                warn!("replacement backend picked another subprotocol; giving up");
                close_leg(
                    &mut stream,
                    Some(close(CloseCode::Protocol, "subprotocol mismatch")),
                )
                .await;
                None
            }
            _ => None,
        };
    }
    for index in ranked {
        let backend = &upstream.backends[index];
        if backend.original == lost || !routing.backends.accepts_new(&backend.original) {
            continue;
        }
        match dial(
            backend,
            request,
            routing.backend_ws,
            upstream.connect_timeout,
        )
        .await
        {
            Ok(leg) if leg.protocol.as_ref() == protocol => {
                return Some((upstream.clone(), index, BackendLeg::Socket(leg.socket)));
            }
            Ok(mut leg) => {
                warn!(%backend, "replacement backend picked another subprotocol; skipping it");
                close_leg(
                    &mut leg.socket,
                    Some(close(CloseCode::Protocol, "subprotocol mismatch")),
                )
                .await;
            }
            Err(error) => warn!(%error, "replacement backend failed"),
        }
    }
    None
}

/// Closes the backend leg with 1001 and forwards its remaining data messages to the client,
/// within [`CLOSE_HANDSHAKE_TIMEOUT`].
async fn forward_until_backend_closed(
    client: &mut ClientLeg,
    backend: &mut BackendLeg,
    pending: Option<Message>,
) {
    let forward = async {
        if let Some(message) = pending
            && client.feed(message).await.is_err()
        {
            return;
        }
        if backend
            .send(Message::Close(Some(close(
                CloseCode::Away,
                "client went away",
            ))))
            .await
            .is_err()
        {
            return;
        }
        while let Some(Ok(message)) = backend.next().await {
            if (message.is_text() || message.is_binary()) && client.feed(message).await.is_err() {
                return;
            }
        }
        let _ = client.flush().await;
    };
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, forward).await;
}

/// Backend closes that mean "this backend is going away", not "this conversation is over".
fn is_backend_loss(frame: &Option<CloseFrame>) -> bool {
    matches!(
        frame.as_ref().map(|f| f.code),
        Some(CloseCode::Away | CloseCode::Restart | CloseCode::Again)
    )
}

fn service_restart() -> CloseFrame {
    close(CloseCode::Restart, "backend unavailable")
}

fn close(code: CloseCode, reason: &str) -> CloseFrame {
    // A close frame's reason must fit in 123 bytes; cut at a character boundary.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: reason[..end].to_owned().into(),
    }
}

fn describe(frame: &Option<CloseFrame>) -> String {
    match frame {
        Some(frame) => format!("{} {:?}", u16::from(frame.code), frame.reason.as_str()),
        None => "no status".to_owned(),
    }
}

async fn close_both(
    client: &mut ClientLeg,
    client_frame: Option<CloseFrame>,
    backend: &mut BackendLeg,
    backend_frame: Option<CloseFrame>,
) {
    Box::pin(async move {
        tokio::join!(
            close_leg(client, client_frame),
            close_leg(backend, backend_frame)
        );
    })
    .await;
}

/// Sends our Close (or completes the peer's), then reads until the peer ends the connection,
/// within [`CLOSE_HANDSHAKE_TIMEOUT`]. Data that arrives meanwhile is dropped: the other leg
/// is closing too.
async fn close_leg<L: Leg>(leg: &mut L, frame: Option<CloseFrame>) {
    // Boxed: rare work should not grow every session's future (DESIGN: memory per client).
    Box::pin(async move {
        let finish = async {
            // If the peer closed first, tungstenite has queued the echo of its Close and
            // refuses a second one; `SinkExt::close` then only flushes that echo.
            let _ = leg.send(Message::Close(frame)).await;
            if SinkExt::close(leg).await.is_err() || !leg.awaits_close_reply() {
                return;
            }
            // tungstenite ends the stream once the close handshake is complete.
            while let Some(Ok(_)) = leg.next().await {}
        };
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, finish).await;
    })
    .await;
}
