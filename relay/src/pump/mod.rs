//! The frame pump: moves messages both ways between a client leg and a backend leg, in one
//! task, with one message of buffering per direction.
//!
//! Each direction reads a message from its source only once the destination has accepted the
//! previous one, so a slow reader slows its writer through TCP back-pressure and the relay never
//! holds more than one message plus a write batch per direction. Payloads are the `Bytes` the
//! source leg decoded into: forwarding them copies nothing until the destination frames them.
//! Writes are flushed once a source has nothing more to read, so bursts share syscalls.
//! The same poll also drives keepalive (one timer for both legs), idle timeout and drain.
//!
//! The pump knows nothing of who watches it: inspection, taps and metrics sit behind
//! [`PumpHooks`]. What a session does once the pump stops is the session's business.

mod hooks;
pub mod keepalive;
mod leg;
pub mod replay;

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Error as WsError, Message};

pub use hooks::{Direction, PumpHooks, Side, Traffic, Verdict};
pub use keepalive::KeepalivePolicy;
pub use leg::{
    AnyLeg, BackendLeg, BackendStream, CLOSE_HANDSHAKE_TIMEOUT, Leg, StreamLeg, close_leg,
};

use keepalive::{LegLiveness, LegVerdict, far_future};
use replay::ReplayLog;

/// Messages a direction moves before it lets the other direction and the timers run.
const FAIRNESS_BUDGET: usize = 32;

/// The payload of keepalive pings; ack pings of the replay log are 8 bytes, so never equal.
const KEEPALIVE_PAYLOAD: &[u8] = b"wsrelay";

/// Why the pump stopped; the session decides what to do with each leg.
#[derive(Debug, Clone, PartialEq)]
pub enum PumpEnd {
    /// The client sent a Close frame (already answered by its leg).
    ClientClosed(Option<CloseFrame>),
    /// The client's connection ended without a close handshake, or it stopped answering pings.
    ClientGone(String),
    /// The client broke the protocol or a limit; it gets this close code.
    ClientViolation(CloseCode, String),
    /// The backend sent a Close frame (already answered by its leg).
    BackendClosed(Option<CloseFrame>),
    /// The backend's connection ended without a close handshake, or it stopped answering pings.
    BackendGone(String),
    /// The backend broke the protocol or a limit; it gets this close code.
    BackendViolation(CloseCode, String),
    /// No message crossed for `idle_timeout`.
    Idle,
    /// The relay is draining.
    Drain,
    /// The admin drained the backend (or a reload removed it) and the grace period is over.
    BackendDrained,
    /// The admin closed the connection: the client gets this code and reason.
    ClosedByAdmin(u16, String),
    /// An inspector closed the connection over a message travelling this way: its sender gets
    /// the code, the other leg 1001.
    Inspector(Direction, CloseCode, String),
}

impl std::fmt::Display for PumpEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let close = |frame: &Option<CloseFrame>| match frame {
            Some(frame) => format!("{} {:?}", u16::from(frame.code), frame.reason.as_str()),
            None => "no status".to_owned(),
        };
        match self {
            PumpEnd::ClientClosed(frame) => write!(f, "client closed ({})", close(frame)),
            PumpEnd::ClientGone(reason) => write!(f, "client gone: {reason}"),
            PumpEnd::ClientViolation(code, reason) => {
                write!(f, "client violation ({code}: {reason})")
            }
            PumpEnd::BackendClosed(frame) => write!(f, "backend closed ({})", close(frame)),
            PumpEnd::BackendGone(reason) => write!(f, "backend gone: {reason}"),
            PumpEnd::BackendViolation(code, reason) => {
                write!(f, "backend violation ({code}: {reason})")
            }
            PumpEnd::Idle => f.write_str("idle timeout"),
            PumpEnd::Drain => f.write_str("relay draining"),
            PumpEnd::BackendDrained => f.write_str("backend drained"),
            PumpEnd::ClosedByAdmin(code, reason) => {
                write!(f, "closed by the admin ({code}: {reason})")
            }
            PumpEnd::Inspector(direction, code, reason) => {
                write!(f, "inspector on {} ({code}: {reason})", direction.as_str())
            }
        }
    }
}

impl PumpEnd {
    fn gone(side: Side, reason: String) -> PumpEnd {
        match side {
            Side::Client => PumpEnd::ClientGone(reason),
            Side::Backend => PumpEnd::BackendGone(reason),
        }
    }

    fn closed(side: Side, frame: Option<CloseFrame>) -> PumpEnd {
        match side {
            Side::Client => PumpEnd::ClientClosed(frame),
            Side::Backend => PumpEnd::BackendClosed(frame),
        }
    }

    /// How a read error on `side` ends the session: a violation the peer is told about, or a
    /// peer that is simply gone.
    fn read_failed(side: Side, error: WsError) -> PumpEnd {
        match (close_code_for(&error), side) {
            (Some((code, reason)), Side::Client) => PumpEnd::ClientViolation(code, reason),
            (Some((code, reason)), Side::Backend) => PumpEnd::BackendViolation(code, reason),
            (None, side) => PumpEnd::gone(side, error.to_string()),
        }
    }

    fn write_failed(side: Side, error: WsError) -> PumpEnd {
        PumpEnd::gone(side, format!("write failed: {error}"))
    }
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

pin_project_lite::pin_project! {
    /// The pump running between two legs until it stops ([`PumpState::run`]). A struct, not
    /// an `async fn`: an async function keeps its arguments beside what it awaits, and every
    /// session holds this future for as long as its client stays.
    #[must_use = "futures do nothing unless polled"]
    pub struct Running<'a, H, C, B, S> {
        state: &'a mut PumpState<H>,
        client: &'a mut C,
        backend: &'a mut B,
        #[pin]
        stop: S,
        #[pin]
        timer: Sleep,
    }
}

impl<H: PumpHooks, C: Leg, B: Leg, S: Future<Output = PumpEnd>> Future for Running<'_, H, C, B, S> {
    type Output = PumpEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PumpEnd> {
        let this = self.project();
        let end = match this.stop.poll(cx) {
            Poll::Ready(end) => end,
            Poll::Pending => {
                let client = &mut **this.client;
                let backend = &mut **this.backend;
                std::task::ready!(this.state.poll_once(cx, client, backend, this.timer))
            }
        };
        this.state.hooks.on_traffic(&this.state.traffic);
        Poll::Ready(end)
    }
}

/// One direction's buffer: the message read but not yet accepted by its destination.
#[derive(Debug, Default)]
struct Lane {
    waiting: Option<Message>,
    /// The destination holds written frames not yet flushed.
    needs_flush: bool,
}

/// Pump state that outlives one backend leg, so a session can re-originate to another
/// backend without losing what the client sent.
pub struct PumpState<H> {
    /// Shared: one per configuration generation, not a copy in every session.
    policy: Arc<KeepalivePolicy>,
    inbound: Lane,
    outbound: Lane,
    /// Client messages the backend has not acknowledged; `None` when the session will not
    /// re-originate (`on_backend_loss = "close"`), so nothing needs keeping.
    replay: Option<ReplayLog>,
    client_live: LegLiveness,
    backend_live: LegLiveness,
    last_message: Instant,
    next_check: Instant,
    hooks: H,
    /// What crossed so far.
    pub traffic: Traffic,
}

impl<H: PumpHooks> PumpState<H> {
    /// State for a session whose legs both finished their handshake at `now`; `replayable`
    /// keeps a [`ReplayLog`] so a lost backend's messages can go to its replacement.
    pub fn new(policy: Arc<KeepalivePolicy>, now: Instant, replayable: bool, hooks: H) -> Self {
        PumpState {
            policy,
            inbound: Lane::default(),
            outbound: Lane::default(),
            replay: replayable.then(ReplayLog::default),
            client_live: LegLiveness::new(now),
            backend_live: LegLiveness::new(now),
            last_message: now,
            next_check: now,
            hooks,
            traffic: Traffic::default(),
        }
    }

    /// How long a peer may stay silent after a ping before it counts as dead.
    pub fn pong_timeout(&self) -> Duration {
        self.policy.pong_timeout
    }

    /// The hooks, e.g. to read what they know of the session.
    pub fn hooks(&self) -> &H {
        &self.hooks
    }

    /// The hooks, e.g. to tell them the backend changed.
    pub fn hooks_mut(&mut self) -> &mut H {
        &mut self.hooks
    }

    /// A new backend leg replaces a lost one: returns the client messages the old leg may not
    /// have delivered, oldest first, or `None` if that can't be known (the replay log
    /// overflowed, or the session keeps none). They stay in the log as sent to the new leg.
    pub fn take_replay(&mut self, now: Instant) -> Option<Vec<Message>> {
        let log = self.replay.as_mut()?;
        let mut replay = log.take_for_replay()?;
        replay.extend(self.inbound.waiting.take());
        // The replacement has acknowledged none of them yet: if it is lost as well, they go
        // to the next one (the caller sends them all, or ends the session).
        for message in &replay {
            log.sent(message.clone(), now);
        }
        self.inbound.needs_flush = false;
        // A message already read from the lost backend (`outbound`) is still the client's.
        self.backend_live = LegLiveness::new(now);
        self.next_check = now;
        Some(replay)
    }

    /// The message read for `direction` but not yet handed to its destination, if any.
    pub fn take_waiting(&mut self, direction: Direction) -> Option<Message> {
        self.lane(direction).waiting.take()
    }

    /// Runs until one of the [`PumpEnd`] events, or until `stop` completes with one. `stop` is
    /// polled at every wakeup of the pump, so it must cost little when nothing happened: a
    /// flag, as a session's stop requests are.
    pub fn run<'a, C: Leg, B: Leg, S: Future<Output = PumpEnd>>(
        &'a mut self,
        client: &'a mut C,
        backend: &'a mut B,
        stop: S,
    ) -> Running<'a, H, C, B, S> {
        Running {
            timer: tokio::time::sleep_until(self.next_check),
            state: self,
            client,
            backend,
            stop,
        }
    }

    /// Before a move the relay decides (a drained or removed backend): stops taking the
    /// client's messages, waits until the backend has acknowledged everything it was sent,
    /// and keeps forwarding its answers to the client meanwhile, so the move replays nothing
    /// and delivers each message once. A socket is asked with an ack ping; a mux stream
    /// acknowledges by returning all its credit once its consumer has caught up. Returns
    /// `None` when everything is acknowledged, or how the backend leg ended first (closed,
    /// gone, or silent for `within`); the move then falls back to the replay, at least once.
    pub async fn settle<C: Leg, B: Leg>(
        &mut self,
        client: &mut C,
        backend: &mut B,
        within: Duration,
    ) -> Option<PumpEnd> {
        let deadline = tokio::time::sleep(within);
        tokio::pin!(deadline);
        let end = poll_fn(|cx| {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(PumpEnd::BackendGone(format!(
                    "did not acknowledge the client's messages within {within:?}"
                ))));
            }
            if backend.pings() {
                self.poll_settle(cx, client, backend)
            } else {
                self.poll_settle_consumed(cx, client, backend)
            }
        })
        .await;
        if end.is_some()
            && let Some(replay) = self.replay.as_mut()
            && let Some(acknowledged) = backend.acknowledged_bytes()
        {
            // What the credit confirmed so far is not replayed.
            replay.confirm_through(acknowledged);
        }
        self.hooks.on_traffic(&self.traffic);
        end
    }

    /// One step of a settle: what was written to the backend is flushed, and only the
    /// backend's side moves, so its answers reach the client while the client's next
    /// messages wait in its socket for the new backend. `Some` when a leg ended.
    fn settle_step<C: Leg, B: Leg>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        backend: &mut B,
    ) -> Option<PumpEnd> {
        if self.inbound.needs_flush {
            match Pin::new(&mut *backend).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.inbound.needs_flush = false,
                Poll::Ready(Err(error)) => {
                    return Some(PumpEnd::write_failed(Side::Backend, error));
                }
                Poll::Pending => {}
            }
        }
        let now = Instant::now();
        match self.pump_lane(Direction::BackendToClient, backend, client, now, cx) {
            Poll::Ready(end) => Some(end),
            Poll::Pending => None,
        }
    }

    /// [`Self::settle`] on a leg that acknowledges through its credit (a mux stream).
    fn poll_settle_consumed<C: Leg, B: Leg>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        backend: &mut B,
    ) -> Poll<Option<PumpEnd>> {
        // The answers it sends before its credit comes back reach the client first.
        if let Some(end) = self.settle_step(cx, client, backend) {
            return Poll::Ready(Some(end));
        }
        let Some(replay) = self.replay.as_mut() else {
            return Poll::Ready(None);
        };
        // A message still waiting for credit to go out is not acknowledged: it lies beyond
        // what the stream took.
        let through = replay.leg_bytes();
        if backend.poll_acknowledged(cx, through).is_ready() {
            replay.confirm_through(through);
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    fn poll_settle<C: Leg, B: Leg>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        backend: &mut B,
    ) -> Poll<Option<PumpEnd>> {
        loop {
            let Some(replay) = self.replay.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(ping) = replay.ack_ping_now() {
                if let Err(error) = Pin::new(&mut *backend).start_send(ping) {
                    return Poll::Ready(Some(PumpEnd::write_failed(Side::Backend, error)));
                }
                self.inbound.needs_flush = true;
            }
            // Its answers (and the acknowledging pong) reach the client.
            if let Some(end) = self.settle_step(cx, client, backend) {
                return Poll::Ready(Some(end));
            }
            let Some(replay) = self.replay.as_ref() else {
                return Poll::Ready(None);
            };
            if !replay.awaits_confirmation() {
                return Poll::Ready(None);
            }
            // A pong just acknowledged an earlier ping while later messages still wait: ask
            // again at once rather than wait for a wakeup that nothing would send.
            if !replay.can_ping_now() {
                return Poll::Pending;
            }
        }
    }

    fn poll_once<C: Leg, B: Leg>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        backend: &mut B,
        mut timer: Pin<&mut Sleep>,
    ) -> Poll<PumpEnd> {
        let now = Instant::now();
        if now >= self.next_check {
            if let Some(end) = self.check_timers(now, client, backend) {
                return Poll::Ready(end);
            }
            timer.as_mut().reset(self.next_check);
        }
        // Registers the timer's waker; it fires at `next_check`.
        let _ = timer.as_mut().poll(cx);

        if let Poll::Ready(end) =
            self.pump_lane(Direction::ClientToBackend, client, backend, now, cx)
        {
            return Poll::Ready(end);
        }
        if let Poll::Ready(end) =
            self.pump_lane(Direction::BackendToClient, backend, client, now, cx)
        {
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
            && let Some(acknowledged) = backend.acknowledged_bytes()
        {
            replay.confirm_through(acknowledged);
        }
        self.hooks.on_traffic(&self.traffic);
        Poll::Pending
    }

    fn lane(&mut self, direction: Direction) -> &mut Lane {
        match direction {
            Direction::ClientToBackend => &mut self.inbound,
            Direction::BackendToClient => &mut self.outbound,
        }
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
        let (from, to) = sides(direction);
        let mut moved = 0;
        loop {
            match self.deliver_waiting(direction, destination, now, cx) {
                Err(error) => return Poll::Ready(PumpEnd::write_failed(to, error)),
                Ok(false) => break,
                Ok(true) => {}
            }
            if moved == FAIRNESS_BUDGET {
                cx.waker().wake_by_ref();
                break;
            }
            let message = match Pin::new(&mut *source).poll_next(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    return Poll::Ready(PumpEnd::gone(from, "connection closed".into()));
                }
                Poll::Ready(Some(Err(error))) => {
                    return Poll::Ready(PumpEnd::read_failed(from, error));
                }
                Poll::Ready(Some(Ok(message))) => message,
            };
            self.liveness(from).heard(now);
            let end = if message.is_text() || message.is_binary() {
                moved += 1;
                self.take_data(direction, message, now)
            } else {
                self.take_control(direction, message, now)
            };
            if let Some(end) = end {
                return Poll::Ready(end);
            }
        }
        self.flush_lane(direction, destination, now, cx)
    }

    /// Hands the lane's waiting message to `destination` if it can take it; false while it
    /// can't (the message stays).
    fn deliver_waiting<D: Leg>(
        &mut self,
        direction: Direction,
        destination: &mut D,
        now: Instant,
        cx: &mut Context<'_>,
    ) -> Result<bool, WsError> {
        let Some(message) = self.lane(direction).waiting.take() else {
            return Ok(true);
        };
        match Pin::new(&mut *destination).poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(error)) => {
                // Still the sender's: a re-originated session sends it to the next backend.
                self.lane(direction).waiting = Some(message);
                return Err(error);
            }
            Poll::Pending => {
                self.lane(direction).waiting = Some(message);
                return Ok(false);
            }
        }
        if direction == Direction::ClientToBackend
            && let Some(replay) = &mut self.replay
        {
            let sent = destination.start_send_kept(&message);
            // Logged even if the write failed: the next backend gets it in the replay.
            replay.sent(message, now);
            sent?;
        } else {
            Pin::new(&mut *destination).start_send(message)?;
        }
        self.lane(direction).needs_flush = true;
        Ok(true)
    }

    /// A data message just read: counted, shown to the hooks, and queued unless they say
    /// otherwise.
    fn take_data(
        &mut self,
        direction: Direction,
        mut message: Message,
        now: Instant,
    ) -> Option<PumpEnd> {
        self.last_message = now;
        self.traffic.count(direction, message.len());
        match self.hooks.on_message(direction, &mut message) {
            Verdict::Forward => self.lane(direction).waiting = Some(message),
            Verdict::Drop => {}
            Verdict::Close(code, reason) => {
                return Some(PumpEnd::Inspector(direction, code, reason));
            }
        }
        None
    }

    /// A control frame just read. Pings are answered by the leg itself; pongs prove liveness,
    /// time keepalive, and (from a backend) acknowledge what the replay log holds.
    fn take_control(
        &mut self,
        direction: Direction,
        message: Message,
        now: Instant,
    ) -> Option<PumpEnd> {
        self.hooks.on_control(direction, &message);
        let (from, _) = sides(direction);
        match message {
            Message::Close(frame) => return Some(PumpEnd::closed(from, frame)),
            Message::Pong(payload) if payload[..] == KEEPALIVE_PAYLOAD[..] => {
                if let Some(rtt) = self.liveness(from).ping_rtt(now) {
                    self.hooks.on_ping_rtt(from, rtt);
                }
            }
            Message::Pong(payload) if from == Side::Backend => {
                if let Some(replay) = &mut self.replay {
                    replay.pong(&payload);
                }
            }
            _ => {}
        }
        None
    }

    /// Flushes what the lane wrote to `destination`; towards the backend, the ack ping that is
    /// due rides in the same write as the messages it acknowledges.
    fn flush_lane<D: Leg>(
        &mut self,
        direction: Direction,
        destination: &mut D,
        now: Instant,
        cx: &mut Context<'_>,
    ) -> Poll<PumpEnd> {
        if !self.lane(direction).needs_flush {
            return Poll::Pending;
        }
        let (_, to) = sides(direction);
        if to == Side::Backend
            && destination.pings()
            && let Some(ping) = self.replay.as_mut().and_then(|log| log.ack_ping(now))
            && let Err(error) = Pin::new(&mut *destination).start_send(ping)
        {
            return Poll::Ready(PumpEnd::write_failed(to, error));
        }
        match Pin::new(&mut *destination).poll_flush(cx) {
            Poll::Ready(Ok(())) => self.lane(direction).needs_flush = false,
            Poll::Ready(Err(error)) => return Poll::Ready(PumpEnd::write_failed(to, error)),
            Poll::Pending => {}
        }
        Poll::Pending
    }

    fn liveness(&mut self, side: Side) -> &mut LegLiveness {
        match side {
            Side::Client => &mut self.client_live,
            Side::Backend => &mut self.backend_live,
        }
    }

    /// Keepalive and idle checks; sends due pings. Sets `next_check`.
    fn check_timers<C: Leg, B: Leg>(
        &mut self,
        now: Instant,
        client: &mut C,
        backend: &mut B,
    ) -> Option<PumpEnd> {
        let mut next = far_future(now);
        client.release_idle_buffers();
        backend.release_idle_buffers();
        if let Some(replay) = &mut self.replay {
            replay.release_idle_buffer();
        }
        if let Some(idle) = self.policy.idle_timeout {
            let due = self.last_message + idle;
            if now >= due {
                return Some(PumpEnd::Idle);
            }
            next = next.min(due);
        }
        // A leg we stopped reading (its message waits for the other side) can't be heard from;
        // it is not to blame for that.
        if self.inbound.waiting.is_some() {
            self.client_live.heard(now);
        }
        if self.outbound.waiting.is_some() {
            self.backend_live.heard(now);
        }
        if let Some(end) = self.check_leg(Side::Client, client, now, &mut next) {
            return Some(end);
        }
        if backend.pings()
            && let Some(ping) = self.replay.as_mut().and_then(|log| log.ack_ping(now))
        {
            if let Err(error) = Pin::new(&mut *backend).start_send(ping) {
                return Some(PumpEnd::write_failed(Side::Backend, error));
            }
            self.inbound.needs_flush = true;
        }
        if let Some(due) = self.replay.as_ref().and_then(ReplayLog::ack_due) {
            next = next.min(due);
        }
        if let Some(end) = self.check_leg(Side::Backend, backend, now, &mut next) {
            return Some(end);
        }
        self.next_check = next;
        None
    }

    /// One leg's keepalive: pings it when due, finds it dead when it stopped answering, and
    /// lowers `next` to when it next needs looking at.
    fn check_leg<L: Leg>(
        &mut self,
        side: Side,
        leg: &mut L,
        now: Instant,
        next: &mut Instant,
    ) -> Option<PumpEnd> {
        if !leg.pings() {
            return None;
        }
        let policy = *self.policy;
        match self.liveness(side).check(now, &policy) {
            LegVerdict::Dead => Some(PumpEnd::gone(
                side,
                "no answer to ping within pong_timeout".into(),
            )),
            LegVerdict::Wait(at) => {
                *next = (*next).min(at);
                None
            }
            LegVerdict::Ping(at) => {
                *next = (*next).min(at);
                // A static payload: any frame from the peer, not only the matching pong,
                // proves it alive.
                let ping = Message::Ping(bytes::Bytes::from_static(KEEPALIVE_PAYLOAD));
                if let Err(error) = Pin::new(&mut *leg).start_send(ping) {
                    return Some(PumpEnd::write_failed(side, error));
                }
                let towards = match side {
                    Side::Client => Direction::BackendToClient,
                    Side::Backend => Direction::ClientToBackend,
                };
                self.lane(towards).needs_flush = true;
                None
            }
        }
    }
}

/// The leg a direction reads from and the one it writes to.
fn sides(direction: Direction) -> (Side, Side) {
    match direction {
        Direction::ClientToBackend => (Side::Client, Side::Backend),
        Direction::BackendToClient => (Side::Backend, Side::Client),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io;

    use futures_util::{Sink, Stream};

    use super::*;

    /// A leg played from a script: it yields `incoming`, then waits forever; its sink takes
    /// messages while `open`, and fails every call once not.
    #[derive(Default)]
    struct ScriptedLeg {
        incoming: VecDeque<Message>,
        sent: Vec<Message>,
        open: bool,
        pings: bool,
    }

    fn broken() -> WsError {
        WsError::Io(io::Error::other("link I/O error: reset"))
    }

    impl Stream for ScriptedLeg {
        type Item = Result<Message, WsError>;

        fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            match self.incoming.pop_front() {
                Some(message) => Poll::Ready(Some(Ok(message))),
                None => Poll::Pending,
            }
        }
    }

    impl Sink<Message> for ScriptedLeg {
        type Error = WsError;

        fn poll_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            Poll::Ready(if self.open { Ok(()) } else { Err(broken()) })
        }

        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
            if !self.open {
                return Err(broken());
            }
            self.sent.push(item);
            Ok(())
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            Poll::Ready(if self.open { Ok(()) } else { Err(broken()) })
        }

        fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Leg for ScriptedLeg {
        fn pings(&self) -> bool {
            self.pings
        }

        fn acknowledged_bytes(&self) -> Option<u64> {
            None
        }

        fn poll_acknowledged(&mut self, _cx: &mut Context<'_>, _through: u64) -> Poll<()> {
            Poll::Ready(())
        }

        fn awaits_close_reply(&self) -> bool {
            false
        }
    }

    fn quiet_policy() -> KeepalivePolicy {
        KeepalivePolicy {
            ping_interval: None,
            pong_timeout: Duration::from_secs(30),
            idle_timeout: None,
        }
    }

    #[tokio::test]
    async fn a_message_read_when_the_backend_breaks_goes_to_the_next_backend() {
        let mut state = PumpState::new(Arc::new(quiet_policy()), Instant::now(), true, ());
        let mut client = ScriptedLeg {
            incoming: VecDeque::from([Message::text("whoami")]),
            open: true,
            pings: true,
            ..ScriptedLeg::default()
        };
        // The backend's link died before the message could be handed to it.
        let mut backend = ScriptedLeg::default();
        let end = state
            .run(&mut client, &mut backend, std::future::pending())
            .await;
        assert!(matches!(end, PumpEnd::BackendGone(_)), "{end}");
        assert_eq!(
            state.take_replay(Instant::now()),
            Some(vec![Message::text("whoami")])
        );
    }
}
