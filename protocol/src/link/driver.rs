//! The link driver: the one task that owns a link's WebSocket.
//!
//! It reads messages and routes their frames to streams (never waiting for a stream's
//! consumer: each stream's queue is bounded by the credit it granted), and it drains the
//! link's outbox into batches of frames, each batch one binary message of at most the peer's
//! message limit, flushed when nothing more is queued. Reading and writing are polled side by
//! side in the same task, so a peer that stops reading never stops this end from reading.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;

use super::LinkSocket;
use super::error::{LinkError, OpenError};
use super::shared::{LinkShared, Out, RecvEnd, StreamMap, StreamShared, lock};
use super::stream::{IncomingStream, MuxStream, truncate_reason, wire_close_code};
use crate::frame::{Frame, Limits, encode_into};
use crate::version::Side;

mod inbound;

/// Most messages read, or batches written, per poll before the driver yields.
const IO_BUDGET: usize = 64;
/// Most read/write rounds per poll before the driver yields to other tasks.
const ROUNDS: usize = 8;
/// The cap on the grace given to `Data` for finished streams (see `stale_allowance`).
const MAX_STALE_ALLOWANCE: u64 = 64 << 20;
/// Frames gathered into one binary message at most, unless one frame alone is larger. A
/// batch as large as the peer's message limit (a MiB and more) made both ends hold it twice
/// (the batch and the socket's write buffer; the peer's read buffer and the frames sliced from
/// it) while busy: 50 streams echoing 4 KiB messages held about 90 KiB per stream. Past a few
/// frames per message the batch saves nothing more: the socket still writes a burst of them
/// in one system call.
const BATCH_TARGET: usize = 16 * 1024;
/// In a received message larger than this, a payload smaller than half the message is copied
/// out, so a small queued payload never pins a large message in memory.
const COMPACT_MIN_MESSAGE: usize = 1024;

/// Where a stream is in its life, as the driver sees it.
enum Phase {
    /// Initiator: `Open` sent, waiting for `Accept`/`Reject`; the reply goes to `open()`.
    Opening(Option<oneshot::Sender<Result<MuxStream, OpenError>>>),
    /// Acceptor: `Open` received and handed to the application, which has not answered yet.
    AwaitingAccept,
    /// Accepted: data may flow.
    Open,
}

/// The driver's record of one live stream. Removed ("retired") once `Close` was both sent and
/// received, or the stream was rejected; its id is never used again.
struct Entry {
    shared: Arc<StreamShared>,
    phase: Phase,
    sent_close: bool,
    recv_close: bool,
}

/// Why the main loop stopped, and how to end the WebSocket.
enum Stop {
    /// Close the WebSocket with this code and reason, then wait for the peer's close.
    Close(LinkError, u16, String),
    /// The peer closed the WebSocket: flush our reply.
    PeerClosed(LinkError),
    /// The socket is unusable (or the peer is dead): just drop it.
    Broken(LinkError),
}

impl Stop {
    fn protocol(reason: impl Into<String>) -> Stop {
        let reason = reason.into();
        let wire = truncate_reason(&reason).to_owned();
        Stop::Close(LinkError::protocol(reason), crate::PROTOCOL_ERROR, wire)
    }
}

/// The state of a running link; see the module docs.
pub(crate) struct Engine<W> {
    ws: W,
    shared: Arc<LinkShared>,
    limits: Limits,
    entries: StreamMap<Entry>,
    /// The highest stream id opened on the link so far (received in an `Open` on the
    /// acceptor, sent in an `Open` on the initiator). A frame naming a larger id is an error;
    /// one naming a smaller id that has no entry refers to a finished stream.
    max_id: u64,
    /// Where incoming streams go (acceptor); `None` once no handle can accept them.
    incoming: Option<mpsc::UnboundedSender<IncomingStream>>,
    /// Commands taken from the outbox, not processed yet.
    local: VecDeque<Out>,
    /// Frames ready to be encoded, in order.
    frames: VecDeque<Frame>,
    /// The binary message being assembled.
    batch: BytesMut,
    need_flush: bool,
    ping_due: bool,
    last_recv: Instant,
    ping_sent: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    local_goaway: Option<String>,
    remote_goaway: Option<String>,
    handles_gone: bool,
    /// `Data` payload bytes still tolerated for finished streams: the credit their peers
    /// still had when they finished. Beyond it, such `Data` is a protocol error.
    stale_allowance: u64,
    /// The rest of the message that carried the peer's `Hello`.
    first: Option<Bytes>,
    finished: bool,
}

impl<W: LinkSocket> Engine<W> {
    pub fn new(
        ws: W,
        shared: Arc<LinkShared>,
        incoming: Option<mpsc::UnboundedSender<IncomingStream>>,
        first: Option<Bytes>,
    ) -> Engine<W> {
        let limits = shared.params.recv_limits(Limits::DEFAULT);
        let now = Instant::now();
        let timer = Box::pin(tokio::time::sleep_until(next_ping(&shared, now)));
        Engine {
            ws,
            shared,
            limits,
            entries: StreamMap::default(),
            max_id: 0,
            incoming,
            local: VecDeque::new(),
            frames: VecDeque::new(),
            batch: BytesMut::new(),
            need_flush: false,
            ping_due: false,
            last_recv: now,
            ping_sent: None,
            timer,
            local_goaway: None,
            remote_goaway: None,
            handles_gone: false,
            stale_allowance: 0,
            first,
            finished: false,
        }
    }

    /// Runs the link until it ends, and says why.
    pub async fn run(mut self) -> LinkError {
        let stop = match self.first.take() {
            Some(rest) => self.on_binary(rest).err(),
            None => None,
        };
        let stop = match stop {
            Some(stop) => stop,
            None => poll_fn(|cx| self.poll_run(cx)).await,
        };
        let error = match &stop {
            Stop::Close(e, ..) | Stop::PeerClosed(e) | Stop::Broken(e) => e.clone(),
        };
        match &error {
            e if e.is_graceful() => tracing::debug!(error = %e, "mux link ended"),
            e => tracing::info!(error = %e, "mux link ended"),
        }
        // Tell every stream and handle at once; then take the WebSocket down.
        self.finish(error.clone());
        let grace = self
            .shared
            .config
            .pong_timeout
            .max(Duration::from_millis(100));
        let ws = &mut self.ws;
        match stop {
            Stop::Close(_, code, reason) => {
                let frame = CloseFrame {
                    code: code.into(),
                    reason: reason.into(),
                };
                let _ = tokio::time::timeout(grace, async {
                    if ws.send(Message::Close(Some(frame))).await.is_ok() {
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                })
                .await;
            }
            Stop::PeerClosed(_) => {
                // The socket queued its answer to the peer's close when it read it; send it.
                let _ = tokio::time::timeout(grace, ws.flush()).await;
            }
            Stop::Broken(_) => {}
        }
        error
    }

    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Stop> {
        for _ in 0..ROUNDS {
            if let Err(stop) = self.poll_keepalive(cx) {
                return Poll::Ready(stop);
            }
            let mut progress = false;
            for _ in 0..IO_BUDGET {
                match self.ws.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(msg))) => {
                        progress = true;
                        if let Err(stop) = self.on_message(msg) {
                            return Poll::Ready(stop);
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(Stop::Broken(LinkError::io(e)));
                    }
                    Poll::Ready(None) => {
                        return Poll::Ready(Stop::Broken(LinkError::io(
                            "the connection ended without a close frame",
                        )));
                    }
                    Poll::Pending => break,
                }
            }
            match self.poll_write(cx) {
                Err(stop) => return Poll::Ready(stop),
                Ok(more) => progress |= more,
            }
            if let Some(stop) = self.check_end() {
                return Poll::Ready(stop);
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Still busy: let other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Sends a ping when the peer has been quiet for `ping_interval`; fails when nothing came
    /// back within `pong_timeout` after it.
    fn poll_keepalive(&mut self, cx: &mut Context<'_>) -> Result<(), Stop> {
        let config = &self.shared.config;
        if config.ping_interval.is_zero() {
            return Ok(());
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let next = match self.ping_sent {
                Some(sent) if now >= sent + config.pong_timeout => {
                    return Err(Stop::Broken(LinkError::Timeout));
                }
                Some(sent) => sent + config.pong_timeout,
                None if now >= self.last_recv + config.ping_interval => {
                    self.ping_due = true;
                    self.ping_sent = Some(now);
                    now + config.pong_timeout
                }
                None => self.last_recv + config.ping_interval,
            };
            self.timer.as_mut().reset(next);
        }
        Ok(())
    }

    /// Writes pings and batches while the socket takes them, then flushes. Returns true when it
    /// stopped only because of its budget (there may be more to write).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, Stop> {
        let mut sent = 0;
        loop {
            if self.batch.is_empty() {
                self.fill_batch(cx);
            }
            if !self.ping_due && self.batch.is_empty() {
                break;
            }
            if sent == IO_BUDGET {
                return Ok(true);
            }
            match self.ws.poll_ready_unpin(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Err(Stop::Broken(LinkError::io(e))),
                Poll::Ready(Ok(())) => {}
            }
            let msg = if self.ping_due {
                self.ping_due = false;
                Message::Ping(Bytes::new())
            } else {
                Message::Binary(self.batch.split().freeze())
            };
            if let Err(e) = self.ws.start_send_unpin(msg) {
                return Err(Stop::Broken(LinkError::io(e)));
            }
            self.need_flush = true;
            sent += 1;
        }
        if self.need_flush {
            match self.ws.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => self.need_flush = false,
                Poll::Ready(Err(e)) => return Err(Stop::Broken(LinkError::io(e))),
                Poll::Pending => {}
            }
        }
        Ok(false)
    }

    /// Assembles the next batch: frames in order, as many as fit one message to the peer.
    /// Registers the driver's waker with the outbox when the outbox is found empty.
    fn fill_batch(&mut self, cx: &mut Context<'_>) {
        let max = self.shared.params.max_send_message().min(BATCH_TARGET);
        let mut data_taken = 0;
        loop {
            if let Some(frame) = self.frames.front() {
                if !self.batch.is_empty() && self.batch.len() + frame.encoded_len() > max {
                    break;
                }
                if let Some(frame) = self.frames.pop_front() {
                    encode_into(&frame, &mut self.batch);
                }
                continue;
            }
            if self.local.is_empty() {
                let mut outbox = lock(&self.shared.outbox);
                if outbox.items.is_empty() {
                    outbox.driver = Some(cx.waker().clone());
                    break;
                }
                std::mem::swap(&mut self.local, &mut outbox.items);
            }
            if let Some(item) = self.local.pop_front() {
                self.process(item, &mut data_taken);
            }
        }
        if data_taken > 0 {
            let waiters: Vec<_> = {
                let mut outbox = lock(&self.shared.outbox);
                outbox.queued_data = outbox.queued_data.saturating_sub(data_taken);
                if outbox.queued_data < self.shared.send_budget {
                    outbox.budget_waiters.drain().map(|(_, w)| w).collect()
                } else {
                    Vec::new()
                }
            };
            waiters.into_iter().for_each(|w| w.wake());
        }
    }
}

impl<W> Engine<W> {
    /// Carries out one command from a handle or stream, queueing the frames it produces.
    fn process(&mut self, item: Out, data_taken: &mut usize) {
        match item {
            Out::Open {
                stream,
                frame,
                reply,
            } => {
                if self.local_goaway.is_some() || self.remote_goaway.is_some() {
                    let _ = reply.send(Err(OpenError::GoingAway));
                } else if self.entries.len() >= self.shared.config.max_streams {
                    let _ = reply.send(Err(OpenError::Rejected {
                        status: 503,
                        reason: format!(
                            "link is at its limit of {} streams",
                            self.shared.config.max_streams
                        ),
                    }));
                } else {
                    self.max_id = stream.id;
                    self.insert(stream, Phase::Opening(Some(reply)));
                    self.frames.push_back(frame);
                }
            }
            Out::Accept { id, protocol } => {
                let Some(entry) = self.entries.get_mut(&id) else {
                    return;
                };
                if !matches!(entry.phase, Phase::AwaitingAccept) {
                    return;
                }
                entry.phase = Phase::Open;
                self.frames.push_back(Frame::Accept {
                    stream: id,
                    protocol,
                });
                // The peer closed the stream while it waited: echo its Close now.
                if entry.recv_close {
                    self.send_close(id, None);
                }
            }
            Out::Reject { id, status, reason } => {
                if let Some(Entry {
                    phase: Phase::AwaitingAccept,
                    ..
                }) = self.entries.get(&id)
                {
                    self.frames.push_back(Frame::Reject {
                        stream: id,
                        status,
                        reason: cap_string(reason),
                    });
                    self.retire(id);
                }
            }
            Out::Data { id, text, payload } => {
                *data_taken += payload.len();
                if let Some(entry) = self.entries.get(&id)
                    && matches!(entry.phase, Phase::Open)
                    && !entry.sent_close
                {
                    self.frames.push_back(Frame::Data {
                        stream: id,
                        text,
                        payload,
                    });
                }
            }
            Out::Window { id, credit } => {
                if let Some(entry) = self.entries.get(&id)
                    && !entry.recv_close
                {
                    self.frames.push_back(Frame::Window { stream: id, credit });
                }
            }
            Out::Close { id, code, reason } => {
                self.send_close(id, Some((code, reason)));
            }
            Out::GoAway { reason } => {
                if self.local_goaway.is_none() {
                    let reason = truncate_reason(&reason).to_owned();
                    self.shared.going_away.store(true, Ordering::Release);
                    self.frames.push_back(Frame::GoAway {
                        reason: reason.clone(),
                    });
                    self.local_goaway = Some(reason);
                }
            }
            Out::HandlesDropped => {
                self.handles_gone = true;
                self.incoming = None;
            }
        }
    }

    /// Queues this end's `Close` for stream `id` unless it was sent already (`close` `None`:
    /// echo the peer's code), and retires the stream if the peer's `Close` was received.
    fn send_close(&mut self, id: u64, close: Option<(u16, String)>) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        if entry.sent_close || !matches!(entry.phase, Phase::Open) {
            return;
        }
        entry.sent_close = true;
        let (code, reason) = match close {
            Some((code, reason)) => (wire_close_code(code), truncate_reason(&reason).to_owned()),
            None => {
                let mut st = lock(&entry.shared.state);
                st.send_closed = true;
                let code = match &st.recv_end {
                    Some(RecvEnd::Closed { code, .. }) => *code,
                    _ => 1000,
                };
                (code, String::new())
            }
        };
        self.frames.push_back(Frame::Close {
            stream: id,
            code,
            reason,
        });
        if entry.recv_close {
            self.retire(id);
        }
    }

    fn insert(&mut self, shared: Arc<StreamShared>, phase: Phase) {
        self.entries.insert(
            shared.id,
            Entry {
                shared,
                phase,
                sent_close: false,
                recv_close: false,
            },
        );
        self.shared.open_streams.fetch_add(1, Ordering::AcqRel);
    }

    fn retire(&mut self, id: u64) {
        if let Some(entry) = self.entries.remove(&id) {
            self.shared.open_streams.fetch_sub(1, Ordering::AcqRel);
            let credit = lock(&entry.shared.state).peer_credit;
            self.stale_allowance = (self.stale_allowance + credit).min(MAX_STALE_ALLOWANCE);
        }
    }

    /// The link ends cleanly once nothing is left to send and no stream remains, after a
    /// `GoAway` or once every handle is gone.
    fn check_end(&mut self) -> Option<Stop> {
        if !self.entries.is_empty()
            || !self.frames.is_empty()
            || !self.local.is_empty()
            || !self.batch.is_empty()
        {
            return None;
        }
        if let Some(reason) = &self.local_goaway {
            let error = LinkError::GoAway {
                side: Side::Local,
                reason: reason.clone(),
            };
            return Some(Stop::Close(error, 1001, reason.clone()));
        }
        if let Some(reason) = &self.remote_goaway {
            let error = LinkError::GoAway {
                side: Side::Remote,
                reason: reason.clone(),
            };
            return Some(Stop::Close(error, 1001, reason.clone()));
        }
        if self.handles_gone {
            return Some(Stop::Close(
                LinkError::Released,
                1000,
                "link no longer used".into(),
            ));
        }
        None
    }

    /// Ends every stream and handle with `error`. Runs once.
    fn finish(&mut self, error: LinkError) {
        if self.finished {
            return;
        }
        self.finished = true;
        let (mut items, waiters) = {
            let mut outbox = lock(&self.shared.outbox);
            outbox.ended = Some(error.clone());
            outbox.driver = None;
            let waiters: Vec<_> = outbox.budget_waiters.drain().map(|(_, w)| w).collect();
            (std::mem::take(&mut outbox.items), waiters)
        };
        // Published first, so whoever sees a stream or an open fail also sees is_closed().
        self.shared.ended.send_replace(Some(error.clone()));
        items.extend(self.local.drain(..));
        // An open queued behind a GoAway that ended the link was refused for the GoAway.
        let refused = match &error {
            LinkError::GoAway { .. } => OpenError::GoingAway,
            e => OpenError::Link(e.clone()),
        };
        for item in items {
            if let Out::Open { reply, .. } = item {
                let _ = reply.send(Err(refused.clone()));
            }
        }
        let why = error.to_string();
        for (_, entry) in self.entries.drain() {
            if let Phase::Opening(Some(reply)) = entry.phase {
                let _ = reply.send(Err(OpenError::Link(error.clone())));
            }
            let mut st = lock(&entry.shared.state);
            st.failed = Some(why.clone());
            if st.recv_end.is_none() {
                st.recv_end = Some(RecvEnd::Failed(why.clone()));
            }
            wake_both(&mut st);
        }
        self.shared.open_streams.store(0, Ordering::Release);
        self.shared.going_away.store(true, Ordering::Release);
        self.incoming = None;
        waiters.into_iter().for_each(|w| w.wake());
    }
}

impl<W> Drop for Engine<W> {
    fn drop(&mut self) {
        // Only if the driver future was dropped before the link ended.
        self.finish(LinkError::Aborted);
    }
}

fn wake_both(st: &mut super::shared::StreamState) {
    if let Some(w) = st.recv_waker.take() {
        w.wake();
    }
    if let Some(w) = st.send_waker.take() {
        w.wake();
    }
}

/// When the first keepalive check is due.
fn next_ping(shared: &LinkShared, now: Instant) -> Instant {
    let interval = shared.config.ping_interval;
    if interval.is_zero() {
        now + Duration::from_secs(86_400 * 365)
    } else {
        now + interval
    }
}

/// Cuts a reason for a `Reject` to the default string limit, at a character boundary.
fn cap_string(mut s: String) -> String {
    let max = Limits::DEFAULT.max_string;
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Closes the WebSocket with `code` and `reason` and waits (at most `grace`) for the peer's
/// close; used when the handshake fails.
pub(crate) async fn close_with<W: LinkSocket>(
    ws: &mut W,
    code: u16,
    reason: &str,
    grace: Duration,
) {
    let frame = CloseFrame {
        code: code.into(),
        reason: truncate_reason(reason).into(),
    };
    let _ = tokio::time::timeout(grace, async {
        if ws.send(Message::Close(Some(frame))).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}
