//! The frame pump: moves messages both ways between a client leg and a backend leg, in one
//! task, with one message of buffering per direction.
//!
//! Each direction reads a message from its source only once the destination has accepted the
//! previous one, so a slow reader slows its writer through TCP back-pressure and the relay never
//! holds more than one message plus tungstenite's write buffer per direction. Payloads are the
//! `Bytes` tungstenite decoded into: forwarding them copies nothing until the destination frames
//! them. Writes are flushed once a source has nothing more to read, so bursts share syscalls.
//! The same poll also drives keepalive (one timer for both legs), idle timeout and drain.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message};

use prometheus_client::metrics::histogram::Histogram;

use crate::inspect::{Direction, InspectorChain, Verdict};
use crate::keepalive::{KeepalivePolicy, LegLiveness, LegVerdict, far_future};
use crate::leg::Leg;
use crate::metrics::TrafficCounters;
use crate::replay::ReplayLog;
use crate::sessions::SessionEntry;
use crate::tap::TapHub;

/// Messages a direction moves before it lets the other direction and the timers run.
const FAIRNESS_BUDGET: usize = 32;

/// Why the pump stopped; the session decides what to do with each leg.
#[derive(Debug)]
pub enum PumpEnd {
    /// The client sent a Close frame (already answered by tungstenite).
    ClientClosed(Option<CloseFrame>),
    /// The client's connection ended without a close handshake, or it stopped answering pings.
    ClientGone(String),
    /// The client broke the protocol or a limit; it gets this close code.
    ClientViolation(CloseCode, String),
    /// The backend sent a Close frame (already answered by tungstenite).
    BackendClosed(Option<CloseFrame>),
    /// The backend's connection ended without a close handshake, or it stopped answering pings.
    BackendGone(String),
    /// The backend broke the protocol or a limit; it gets this close code.
    BackendViolation(CloseCode, String),
    /// No message crossed for `idle_timeout`.
    Idle,
    /// The relay is draining.
    Drain,
    /// An inspector closed the connection over a message travelling this way: its sender gets
    /// the code, the other leg 1001.
    Inspector(Direction, CloseCode, String),
}

/// Counters of what crossed, per direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    /// Messages from the client to the backend.
    pub client_messages: u64,
    /// Payload bytes from the client to the backend.
    pub client_bytes: u64,
    /// Messages from the backend to the client.
    pub backend_messages: u64,
    /// Payload bytes from the backend to the client.
    pub backend_bytes: u64,
}

impl Traffic {
    /// Counts one message of `len` payload bytes going `direction`.
    #[inline]
    fn count(&mut self, direction: Direction, len: usize) {
        let (messages, bytes) = match direction {
            Direction::ClientToBackend => (&mut self.client_messages, &mut self.client_bytes),
            Direction::BackendToClient => (&mut self.backend_messages, &mut self.backend_bytes),
        };
        *messages += 1;
        *bytes += len as u64;
    }
}

/// Pump state that outlives one backend leg, so a session can re-originate to another
/// backend without losing what the client sent.
pub struct PumpState {
    policy: KeepalivePolicy,
    to_backend: Option<Message>,
    /// Client messages the backend has not acknowledged; `None` when the session will not
    /// re-originate (`on_backend_loss = "close"`), so nothing needs keeping.
    replay: Option<ReplayLog>,
    to_client: Option<Message>,
    backend_needs_flush: bool,
    client_needs_flush: bool,
    client_live: LegLiveness,
    backend_live: LegLiveness,
    last_message: Instant,
    next_check: Instant,
    /// The route's inspectors for this connection, if it has any.
    inspectors: Option<InspectorChain>,
    /// The backend serving the connection, as inspectors see it.
    backend_name: Arc<str>,
    /// Where the session is watched from: registry entry, taps, metrics.
    observer: Observer,
    /// What crossed so far.
    pub traffic: Traffic,
}

/// How an error on a leg ends the session.
type ErrorEnd = fn(WsError) -> PumpEnd;

/// The payload of keepalive pings; ack pings of the replay log are 8 bytes, so never equal.
const KEEPALIVE_PAYLOAD: &[u8] = b"wsrelay";

/// Everything outside the session that watches it: the admin API's registry entry, taps, and
/// metrics. The pump reports to it; it never waits on it.
pub struct Observer {
    /// Connection id.
    pub conn_id: u64,
    /// Route path prefix.
    pub route: Arc<str>,
    /// The session's registry entry.
    pub entry: Arc<SessionEntry>,
    /// Where taps listen.
    pub tap: Arc<TapHub>,
    /// The route is `sensitive`: taps get no payload preview.
    pub redact: bool,
    /// Shared traffic counters.
    pub counters: TrafficCounters,
    /// Keepalive RTT of the client leg.
    pub client_rtt: Histogram,
    /// Keepalive RTT of the backend leg.
    pub backend_rtt: Histogram,
    /// What was last added to `counters`.
    pub published: Traffic,
}

impl Observer {
    #[inline]
    fn saw(&self, backend: &Arc<str>, direction: Direction, message: &Message) {
        if self.tap.active() {
            self.tap.publish(
                self.conn_id,
                &self.route,
                backend,
                direction,
                message,
                self.redact,
            );
        }
    }
}

impl PumpState {
    /// State for a session whose legs both finished their handshake at `now`; `replayable`
    /// keeps a [`ReplayLog`] so a lost backend's messages can go to its replacement.
    pub fn new(
        policy: KeepalivePolicy,
        now: Instant,
        replayable: bool,
        inspectors: Option<InspectorChain>,
        backend_name: Arc<str>,
        observer: Observer,
    ) -> PumpState {
        PumpState {
            policy,
            to_backend: None,
            replay: replayable.then(ReplayLog::default),
            to_client: None,
            backend_needs_flush: false,
            client_needs_flush: false,
            client_live: LegLiveness::new(now),
            backend_live: LegLiveness::new(now),
            last_message: now,
            next_check: now,
            inspectors,
            backend_name,
            observer,
            traffic: Traffic::default(),
        }
    }

    /// Adds what crossed since the last call to the shared metrics.
    pub fn publish_metrics(&mut self) {
        let observer = &mut self.observer;
        observer
            .counters
            .publish(&mut observer.published, self.traffic);
        observer.entry.store_traffic(&self.traffic);
    }

    /// Names the backend now serving the connection (after a re-origination).
    pub fn set_backend_name(&mut self, name: Arc<str>) {
        self.backend_name = name;
    }

    /// A new backend leg replaces a lost one: returns the client messages the old leg may not
    /// have delivered, oldest first, or `None` if that can't be known (the replay log
    /// overflowed, or the session keeps none).
    pub fn take_replay(&mut self, now: Instant) -> Option<Vec<Message>> {
        let mut replay = self.replay.as_mut()?.take_for_replay()?;
        replay.extend(self.to_backend.take());
        self.backend_needs_flush = false;
        // A message already read from the lost backend (`to_client`) is still the client's.
        self.backend_live = LegLiveness::new(now);
        self.next_check = now;
        Some(replay)
    }

    /// The backend message read but not yet handed to the client, if any.
    pub fn take_pending_to_client(&mut self) -> Option<Message> {
        self.to_client.take()
    }

    /// Runs until one of the [`PumpEnd`] events, or until `stop` completes with one.
    pub async fn run<C, B>(
        &mut self,
        client: &mut C,
        backend: &mut B,
        stop: impl Future<Output = PumpEnd>,
    ) -> PumpEnd
    where
        C: Leg,
        B: Leg,
    {
        let timer = tokio::time::sleep_until(self.next_check);
        tokio::pin!(timer, stop);
        poll_fn(|cx| {
            if let Poll::Ready(end) = stop.as_mut().poll(cx) {
                return Poll::Ready(end);
            }
            self.poll_once(cx, client, backend, timer.as_mut())
        })
        .await
    }

    fn poll_once<C, B>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        backend: &mut B,
        mut timer: Pin<&mut Sleep>,
    ) -> Poll<PumpEnd>
    where
        C: Leg,
        B: Leg,
    {
        let now = Instant::now();
        if now >= self.next_check {
            if let Some(end) = self.check_timers(now, client, backend) {
                return Poll::Ready(end);
            }
            timer.as_mut().reset(self.next_check);
        }
        // Registers the timer's waker; it fires at `next_check`.
        let _ = timer.as_mut().poll(cx);

        let inbound = Direction::ClientToBackend;
        if let Poll::Ready(end) = self.pump_lane(inbound, client, backend, now, cx) {
            return Poll::Ready(end);
        }
        let outbound = Direction::BackendToClient;
        if let Poll::Ready(end) = self.pump_lane(outbound, backend, client, now, cx) {
            return Poll::Ready(end);
        }
        // A batch of messages waiting for its ack ping wakes the timer when the ping is due.
        if backend.pings()
            && let Some(due) = self.replay.as_ref().and_then(ReplayLog::ack_due)
            && due < self.next_check
        {
            self.next_check = due;
            timer.as_mut().reset(due);
            let _ = timer.as_mut().poll(cx);
        }
        // A leg that reports consumption (a mux stream's credit, behind a lock) acknowledges
        // that way; asked only while something waits for it.
        if let Some(replay) = self.replay.as_mut().filter(|log| log.awaits_confirmation())
            && let Some(unconfirmed) = backend.unconfirmed_bytes()
        {
            replay.confirm_all_but(unconfirmed);
        }
        self.observer.entry.store_traffic(&self.traffic);
        Poll::Pending
    }

    /// Moves messages one way, from `source` to `destination`, until the source has nothing
    /// more to read, the destination can take no more, or the fairness budget is spent; then
    /// flushes the destination. `Ready` ends the session.
    fn pump_lane<S: Leg, D: Leg>(
        &mut self,
        direction: Direction,
        source: &mut S,
        destination: &mut D,
        now: Instant,
        cx: &mut Context<'_>,
    ) -> Poll<PumpEnd> {
        let inbound = direction == Direction::ClientToBackend;
        let (read_failed, write_failed): (ErrorEnd, ErrorEnd) = if inbound {
            (client_read_failed, backend_write_failed)
        } else {
            (backend_read_failed, client_write_failed)
        };
        let mut moved = 0;
        loop {
            let waiting = if inbound {
                &mut self.to_backend
            } else {
                &mut self.to_client
            };
            if let Some(message) = waiting.take() {
                match Pin::new(&mut *destination).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(error)) => return Poll::Ready(write_failed(error)),
                    Poll::Pending => {
                        *waiting = Some(message);
                        break;
                    }
                }
                if inbound && let Some(replay) = &mut self.replay {
                    replay.sent(message.clone(), now);
                }
                if let Err(error) = Pin::new(&mut *destination).start_send(message) {
                    return Poll::Ready(write_failed(error));
                }
                *self.needs_flush(!inbound) = true;
            }
            if moved == FAIRNESS_BUDGET {
                cx.waker().wake_by_ref();
                break;
            }
            let mut message = match Pin::new(&mut *source).poll_next(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    let gone = "connection closed".to_owned();
                    return Poll::Ready(if inbound {
                        PumpEnd::ClientGone(gone)
                    } else {
                        PumpEnd::BackendGone(gone)
                    });
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(read_failed(error)),
                Poll::Ready(Some(Ok(message))) => message,
            };
            self.liveness(inbound).heard(now);
            self.observer.saw(&self.backend_name, direction, &message);
            if message.is_text() || message.is_binary() {
                moved += 1;
                self.last_message = now;
                self.traffic.count(direction, message.len());
                if let Some(inspectors) = &mut self.inspectors {
                    match inspectors.on_message(&self.backend_name, direction, &mut message) {
                        Verdict::Forward => {}
                        Verdict::Drop => continue,
                        Verdict::Close(code, reason) => {
                            return Poll::Ready(PumpEnd::Inspector(direction, code, reason));
                        }
                    }
                }
                let waiting = if inbound {
                    &mut self.to_backend
                } else {
                    &mut self.to_client
                };
                *waiting = Some(message);
                continue;
            }
            if let Some(inspectors) = &mut self.inspectors {
                inspectors.on_control(&self.backend_name, direction, &message);
            }
            // Pings are answered by tungstenite; pongs prove liveness, time keepalive, and
            // (from a backend) acknowledge what the replay log holds.
            match message {
                Message::Close(frame) if inbound => {
                    return Poll::Ready(PumpEnd::ClientClosed(frame));
                }
                Message::Close(frame) => return Poll::Ready(PumpEnd::BackendClosed(frame)),
                Message::Pong(payload) if payload[..] == KEEPALIVE_PAYLOAD[..] => {
                    if let Some(rtt) = self.liveness(inbound).ping_rtt(now) {
                        let histogram = if inbound {
                            &self.observer.client_rtt
                        } else {
                            &self.observer.backend_rtt
                        };
                        histogram.observe(rtt.as_secs_f64());
                    }
                }
                Message::Pong(payload) if !inbound => {
                    if let Some(replay) = &mut self.replay {
                        replay.pong(&payload);
                    }
                }
                _ => {}
            }
        }
        if *self.needs_flush(!inbound) {
            // The ack ping rides in the same write as the messages it acknowledges.
            if inbound
                && destination.pings()
                && let Some(ping) = self.replay.as_mut().and_then(|log| log.ack_ping(now))
                && let Err(error) = Pin::new(&mut *destination).start_send(ping)
            {
                return Poll::Ready(write_failed(error));
            }
            match Pin::new(&mut *destination).poll_flush(cx) {
                Poll::Ready(Ok(())) => *self.needs_flush(!inbound) = false,
                Poll::Ready(Err(error)) => return Poll::Ready(write_failed(error)),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// The liveness of the client leg (`true`) or the backend leg.
    fn liveness(&mut self, client: bool) -> &mut LegLiveness {
        if client {
            &mut self.client_live
        } else {
            &mut self.backend_live
        }
    }

    /// Whether the client leg (`true`) or the backend leg has writes to flush.
    fn needs_flush(&mut self, client: bool) -> &mut bool {
        if client {
            &mut self.client_needs_flush
        } else {
            &mut self.backend_needs_flush
        }
    }

    /// Keepalive and idle checks; sends due pings. Sets `next_check`.
    fn check_timers<C, B>(
        &mut self,
        now: Instant,
        client: &mut C,
        backend: &mut B,
    ) -> Option<PumpEnd>
    where
        C: Leg,
        B: Leg,
    {
        let mut next = far_future(now);
        if let Some(idle) = self.policy.idle_timeout {
            let due = self.last_message + idle;
            if now >= due {
                return Some(PumpEnd::Idle);
            }
            next = next.min(due);
        }
        // A leg we stopped reading (its message waits for the other side) can't be heard from;
        // it is not to blame for that.
        if self.to_backend.is_some() {
            self.client_live.heard(now);
        }
        if self.to_client.is_some() {
            self.backend_live.heard(now);
        }
        let client_verdict = if client.pings() {
            self.client_live.check(now, &self.policy)
        } else {
            LegVerdict::Wait(far_future(now))
        };
        match client_verdict {
            LegVerdict::Dead => {
                return Some(PumpEnd::ClientGone(
                    "no answer to ping within pong_timeout".into(),
                ));
            }
            LegVerdict::Wait(at) => next = next.min(at),
            LegVerdict::Ping(at) => {
                next = next.min(at);
                if let Err(error) = send_ping(client) {
                    return Some(client_write_failed(error));
                }
                self.client_needs_flush = true;
            }
        }
        if backend.pings()
            && let Some(ping) = self.replay.as_mut().and_then(|log| log.ack_ping(now))
        {
            if let Err(error) = Pin::new(&mut *backend).start_send(ping) {
                return Some(backend_write_failed(error));
            }
            self.backend_needs_flush = true;
        }
        if let Some(due) = self.replay.as_ref().and_then(ReplayLog::ack_due) {
            next = next.min(due);
        }
        let backend_verdict = if backend.pings() {
            self.backend_live.check(now, &self.policy)
        } else {
            LegVerdict::Wait(far_future(now))
        };
        match backend_verdict {
            LegVerdict::Dead => {
                return Some(PumpEnd::BackendGone(
                    "no answer to ping within pong_timeout".into(),
                ));
            }
            LegVerdict::Wait(at) => next = next.min(at),
            LegVerdict::Ping(at) => {
                next = next.min(at);
                if let Err(error) = send_ping(backend) {
                    return Some(backend_write_failed(error));
                }
                self.backend_needs_flush = true;
            }
        }
        self.next_check = next;
        self.publish_metrics();
        None
    }
}

fn send_ping<L: Leg>(leg: &mut L) -> Result<(), WsError> {
    // A static payload: any frame from the peer, not only the matching pong, proves it alive.
    Pin::new(leg).start_send(Message::Ping(bytes::Bytes::from_static(KEEPALIVE_PAYLOAD)))
}

/// The close code a peer gets for a read error, or `None` when the peer is simply gone.
pub fn close_code_for(error: &WsError) -> Option<(CloseCode, String)> {
    match error {
        WsError::Capacity(capacity) => Some((CloseCode::Size, capacity.to_string())),
        WsError::Utf8(_) => Some((CloseCode::Invalid, "invalid UTF-8 in a text message".into())),
        WsError::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(protocol) => Some((CloseCode::Protocol, protocol.to_string())),
        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => None,
        other => Some((CloseCode::Error, other.to_string())),
    }
}

fn client_read_failed(error: WsError) -> PumpEnd {
    match close_code_for(&error) {
        Some((code, reason)) => PumpEnd::ClientViolation(code, reason),
        None => PumpEnd::ClientGone(error.to_string()),
    }
}

fn backend_read_failed(error: WsError) -> PumpEnd {
    match close_code_for(&error) {
        Some((code, reason)) => PumpEnd::BackendViolation(code, reason),
        None => PumpEnd::BackendGone(error.to_string()),
    }
}

fn client_write_failed(error: WsError) -> PumpEnd {
    PumpEnd::ClientGone(format!("write failed: {error}"))
}

fn backend_write_failed(error: WsError) -> PumpEnd {
    PumpEnd::BackendGone(format!("write failed: {error}"))
}
