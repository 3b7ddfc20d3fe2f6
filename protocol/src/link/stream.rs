//! One logical WebSocket on a link: [`MuxStream`], and [`IncomingStream`], a stream the peer
//! opened that waits for the application to accept or reject it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use super::shared::{Out, RecvEnd, StreamShared, StreamState, lock};

/// The close code sent when a [`MuxStream`] is dropped without being closed: 1001, going away.
pub const DROPPED_CLOSE_CODE: u16 = 1001;

/// The largest close reason on the wire, in bytes (as in a WebSocket close frame).
pub const MAX_CLOSE_REASON: usize = 123;

/// Maps a close code to one that may appear in a `Close` frame (and in a WebSocket close
/// frame): 1005 (no status) becomes 1000; every other code that is not allowed on the wire
/// (below 1000, 1004, 1006, 1015, 1016–2999, 5000 and above) becomes 1011.
pub fn wire_close_code(code: u16) -> u16 {
    if code == 1005 {
        1000
    } else if CloseCode::from(code).is_allowed() {
        code
    } else {
        1011
    }
}

/// Cuts `reason` to at most [`MAX_CLOSE_REASON`] bytes, at a character boundary.
pub fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Sent bytes whose credit came back: the credit the stream started with, less what it has
/// now, is what is still out. A peer granting more than it consumed can't make this exceed
/// what was sent.
fn acknowledged(shared: &StreamShared, st: &StreamState) -> u64 {
    let window = u64::from(shared.link.params.send_initial_window);
    let outstanding = window.saturating_sub(st.send_credit);
    st.sent_bytes.saturating_sub(outstanding)
}

fn aborted(why: &str) -> tungstenite::Error {
    tungstenite::Error::Io(io::Error::new(io::ErrorKind::ConnectionAborted, why))
}

/// One logical WebSocket carried on a link: read it as a `Stream` of messages and write it as a
/// `Sink`, like a `WebSocketStream`.
///
/// - Reading yields `Text` and `Binary` messages in order; once the peer closes the stream, one
///   `Close(Some(frame))` and then `None`. If the link fails first, one
///   `Err(Io(ConnectionAborted, "<why the link ended>"))` and then `None` (messages received
///   before the failure are delivered first).
/// - Writing `Text`/`Binary` sends a `Data` frame. `poll_ready` waits for flow-control credit,
///   so only this stream waits when its peer is slow. `Close(frame)` sends a `Close` frame
///   (no frame or code 1005 becomes 1000). `Ping`, `Pong` and `Frame` are accepted and ignored:
///   the link keeps itself alive. Data after this end or the peer closed the stream fails with
///   `AlreadyClosed`; a second `Close` too.
/// - Taking messages returns credit to the peer (see the crate README, "Flow control").
/// - Dropping it without closing sends `Close` with code 1001.
pub struct MuxStream {
    shared: Arc<StreamShared>,
    protocol: Option<String>,
    /// One message accepted by `start_send` that waits for credit.
    pending: Option<(bool, Bytes)>,
    /// A close accepted by `start_send` that waits behind `pending`.
    pending_close: Option<(u16, String)>,
    /// `Close` was accepted by `start_send` (sending more is an error).
    close_started: bool,
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream")
            .field("id", &self.shared.id)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl MuxStream {
    pub(crate) fn new(shared: Arc<StreamShared>, protocol: Option<String>) -> MuxStream {
        MuxStream {
            shared,
            protocol,
            pending: None,
            pending_close: None,
            close_started: false,
        }
    }

    /// The stream's id on its link.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The WebSocket subprotocol the acceptor selected, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// Gives back the receive queue's buffer if nothing waits in it. A burst of messages grows
    /// the queue, and an idle stream would keep that room for as long as it stays open (a
    /// relay calls this at its keepalive checks); a busy one would only grow it again.
    pub fn release_idle_buffer(&self) {
        let mut st = lock(&self.shared.state);
        if st.inbound.is_empty() && st.inbound.capacity() > 0 {
            st.inbound = std::collections::VecDeque::new();
        }
    }

    /// Payload bytes this stream may send right now before it waits for the peer's credit.
    pub fn send_credit(&self) -> u64 {
        lock(&self.shared.state).send_credit
    }

    /// Payload bytes sent on this stream since it opened that the peer has confirmed
    /// consuming, by returning their credit. With the reference grant rule (the crate README,
    /// "Flow control") a peer that has read everything returns all of it, so once this
    /// reaches what was sent, everything was consumed.
    pub fn acknowledged_bytes(&self) -> u64 {
        acknowledged(&self.shared, &lock(&self.shared.state))
    }

    /// `Ready` once [`Self::acknowledged_bytes`] reaches `through` and every message the peer
    /// sent before returning that credit was read, so its answers are in too. Otherwise `cx`
    /// is woken when credit comes back or a message arrives.
    pub fn poll_acknowledged(&self, cx: &mut Context<'_>, through: u64) -> Poll<()> {
        let mut st = lock(&self.shared.state);
        if acknowledged(&self.shared, &st) >= through && st.inbound.is_empty() {
            return Poll::Ready(());
        }
        st.send_waker = Some(cx.waker().clone());
        st.recv_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Pushes the pending message and then the pending close to the driver; `Ready(Ok)` once
    /// both are gone.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tungstenite::Error>> {
        let shared = Arc::clone(&self.shared);
        let mut st = lock(&shared.state);
        if let Some((text, payload)) = &self.pending {
            if let Some(why) = &st.failed {
                self.pending = None;
                return Poll::Ready(Err(aborted(why)));
            }
            if st.remote_closed {
                self.pending = None;
                return Poll::Ready(Err(tungstenite::Error::AlreadyClosed));
            }
            match shared.poll_push_data(&mut st, cx, *text, payload) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    self.pending = None;
                    return Poll::Ready(Err(aborted(&e.to_string())));
                }
                Poll::Ready(Ok(())) => self.pending = None,
            }
        }
        if let Some((code, reason)) = self.pending_close.take()
            && !st.send_closed
        {
            st.send_closed = true;
            if !st.remote_closed && st.failed.is_none() {
                shared.link.push(Out::Close {
                    id: shared.id,
                    code,
                    reason,
                });
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Stream for MuxStream {
    type Item = Result<Message, tungstenite::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let shared = &self.shared;
        let mut st = lock(&shared.state);
        if let Some(msg) = st.inbound.pop_front() {
            let len = match &msg {
                Message::Text(t) => t.len(),
                Message::Binary(b) => b.len(),
                _ => 0,
            };
            shared.consumed(&mut st, len);
            return Poll::Ready(Some(Ok(msg)));
        }
        if st.end_delivered {
            return Poll::Ready(None);
        }
        match st.recv_end.clone() {
            Some(RecvEnd::Closed { code, reason }) => {
                st.end_delivered = true;
                Poll::Ready(Some(Ok(Message::Close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                })))))
            }
            Some(RecvEnd::Failed(why)) => {
                st.end_delivered = true;
                Poll::Ready(Some(Err(aborted(&why))))
            }
            None => {
                shared.caught_up(&mut st);
                st.recv_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Sink<Message> for MuxStream {
    type Error = tungstenite::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        if this.pending.is_none()
            && !this.close_started
            && let Some(why) = &lock(&this.shared.state).failed
        {
            return Poll::Ready(Err(aborted(why)));
        }
        this.poll_drain(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        let this = self.get_mut();
        let (text, payload) = match item {
            Message::Text(t) => (true, Bytes::from(t)),
            Message::Binary(b) => (false, b),
            Message::Close(frame) => {
                if this.close_started {
                    return Err(tungstenite::Error::AlreadyClosed);
                }
                this.close_started = true;
                let (code, reason) = match frame {
                    Some(f) => (
                        wire_close_code(u16::from(f.code)),
                        truncate_reason(&f.reason).to_owned(),
                    ),
                    None => (1000, String::new()),
                };
                this.pending_close = Some((code, reason));
                return Ok(());
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
        };
        if this.close_started {
            return Err(tungstenite::Error::AlreadyClosed);
        }
        if this.pending.is_some() {
            // The Sink contract: start_send only after poll_ready returned Ready(Ok).
            return Err(tungstenite::Error::Io(io::Error::other(
                "MuxStream::start_send called without poll_ready",
            )));
        }
        let st = lock(&this.shared.state);
        if let Some(why) = &st.failed {
            return Err(aborted(why));
        }
        if st.remote_closed || st.send_closed {
            return Err(tungstenite::Error::AlreadyClosed);
        }
        drop(st);
        let max = this.shared.link.params.send_max_frame as usize;
        if payload.len() > max {
            return Err(tungstenite::Error::Capacity(
                tungstenite::error::CapacityError::MessageTooLong {
                    size: payload.len(),
                    max_size: max,
                },
            ));
        }
        this.pending = Some((text, payload));
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().poll_drain(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        if !this.close_started {
            this.close_started = true;
            this.pending_close = Some((1000, String::new()));
        }
        match this.poll_drain(cx) {
            Poll::Ready(Err(tungstenite::Error::AlreadyClosed)) => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let mut st = lock(&self.shared.state);
        st.detached = true;
        st.inbound.clear();
        if !st.send_closed && !st.remote_closed && st.failed.is_none() {
            st.send_closed = true;
            self.shared.link.push(Out::Close {
                id: self.shared.id,
                code: DROPPED_CLOSE_CODE,
                reason: "stream dropped".into(),
            });
        }
    }
}

/// A stream the peer opened (an `Open` frame) that waits for [`accept`](Self::accept) or
/// [`reject`](Self::reject). Dropping it rejects the stream with 503.
pub struct IncomingStream {
    /// The stream's id on its link.
    pub id: u64,
    /// The client's request path without the query, e.g. `/chat/room1`.
    pub path: String,
    /// The query string without `?`; empty if there was none.
    pub query: String,
    /// Forwarded request headers as (lowercase name, raw value) pairs, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The client's address as `ip:port`.
    pub client_addr: String,
    /// True when the stream re-originates a client whose previous backend was lost.
    pub resumed: bool,
    pub(crate) shared: Option<Arc<StreamShared>>,
}

impl std::fmt::Debug for IncomingStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingStream")
            .field("id", &self.id)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("client_addr", &self.client_addr)
            .field("resumed", &self.resumed)
            .finish_non_exhaustive()
    }
}

impl IncomingStream {
    /// The value of the first header named `name` (compared case-insensitively), if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Accepts the stream, selecting `protocol` as its WebSocket subprotocol, and returns it.
    ///
    /// If the link has already ended, the returned stream yields the link's error.
    pub fn accept(mut self, protocol: Option<String>) -> MuxStream {
        let shared = self
            .shared
            .take()
            .expect("IncomingStream is consumed only once");
        shared.link.push(Out::Accept {
            id: self.id,
            protocol: protocol.clone(),
        });
        MuxStream::new(shared, protocol)
    }

    /// Refuses the stream; the client's handshake is answered with HTTP `status`.
    pub fn reject(mut self, status: u16, reason: &str) {
        if let Some(shared) = self.shared.take() {
            shared.link.push(Out::Reject {
                id: self.id,
                status,
                reason: reason.to_owned(),
            });
        }
    }
}

impl Drop for IncomingStream {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.link.push(Out::Reject {
                id: self.id,
                status: 503,
                reason: "stream was not accepted".into(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Hello;
    use crate::link::shared::LinkShared;
    use crate::link::{LinkConfig, LinkRole};
    use futures_util::StreamExt;
    use futures_util::task::noop_waker_ref;

    #[test]
    fn a_drained_queue_gives_its_buffer_back_when_asked() {
        let hello = Hello::new(1 << 20, 1 << 20);
        let params = crate::negotiate(&hello, &hello).unwrap();
        let link = Arc::new(LinkShared::new(
            LinkRole::Initiator,
            LinkConfig::default(),
            params,
        ));
        let mut stream = MuxStream::new(StreamShared::new(1, link), None);
        lock(&stream.shared.state)
            .inbound
            .extend((0..40).map(|n| Message::binary(vec![n])));
        let mut cx = Context::from_waker(noop_waker_ref());
        stream.release_idle_buffer();
        assert!(
            lock(&stream.shared.state).inbound.capacity() >= 40,
            "kept while full"
        );
        for _ in 0..40 {
            assert!(matches!(
                stream.poll_next_unpin(&mut cx),
                Poll::Ready(Some(Ok(_)))
            ));
        }
        assert!(
            lock(&stream.shared.state).inbound.capacity() >= 40,
            "kept until asked"
        );
        stream.release_idle_buffer();
        assert_eq!(lock(&stream.shared.state).inbound.capacity(), 0);
    }
}
