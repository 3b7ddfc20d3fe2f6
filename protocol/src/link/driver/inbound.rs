//! The driver's receive side: routing each received message and frame to its stream, and
//! enforcing the protocol's rules on what the peer sends (ids, answers, credit, closes).
//!
//! Nothing here waits: a stream's queue is bounded by the credit this end granted, so a frame is
//! either delivered at once or is a protocol error.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::time::Instant;
use tungstenite::Message;
use tungstenite::protocol::frame::Utf8Bytes;

use super::{COMPACT_MIN_MESSAGE, Engine, Phase, Stop, wake_both};
use crate::frame::{Frame, FrameType, decode_all};
use crate::link::error::{LinkError, OpenError};
use crate::link::shared::{RecvEnd, StreamShared, lock};
use crate::link::stream::{IncomingStream, MuxStream, wire_close_code};
use crate::link::{LinkRole, MAX_QUEUED_MESSAGES};
use crate::version::Side;

impl<S> Engine<S> {
    pub(super) fn on_message(&mut self, msg: Message) -> Result<(), Stop> {
        self.last_recv = Instant::now();
        self.ping_sent = None;
        match msg {
            Message::Binary(bytes) => {
                let limit = self.shared.params.max_recv_message();
                if bytes.len() > limit {
                    let error = LinkError::MessageTooBig {
                        size: bytes.len(),
                        limit,
                    };
                    return Err(Stop::Close(error, 1009, "message too big".into()));
                }
                self.on_binary(bytes)
            }
            Message::Text(_) => Err(Stop::protocol("text message on a mux link")),
            Message::Close(frame) => {
                let error = match (&self.local_goaway, &self.remote_goaway, frame) {
                    (Some(reason), ..) => LinkError::GoAway {
                        side: Side::Local,
                        reason: reason.clone(),
                    },
                    (None, Some(reason), _) => LinkError::GoAway {
                        side: Side::Remote,
                        reason: reason.clone(),
                    },
                    (None, None, Some(f)) => LinkError::Closed {
                        code: f.code.into(),
                        reason: f.reason.to_string(),
                    },
                    (None, None, None) => LinkError::Closed {
                        code: 1005,
                        reason: String::new(),
                    },
                };
                Err(Stop::PeerClosed(error))
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
        }
    }

    pub(super) fn on_binary(&mut self, message: Bytes) -> Result<(), Stop> {
        let len = message.len();
        for frame in decode_all(message, &self.limits) {
            let frame = frame.map_err(|e| Stop::protocol(e.to_string()))?;
            self.on_frame(frame, len)?;
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: Frame, message_len: usize) -> Result<(), Stop> {
        match frame {
            Frame::Hello(_) => Err(Stop::protocol("a second Hello on the link")),
            Frame::GoAway { reason } => {
                if self.remote_goaway.is_none() {
                    tracing::debug!(%reason, "peer sent GoAway");
                    self.shared.going_away.store(true, Ordering::Release);
                    self.remote_goaway = Some(reason);
                }
                Ok(())
            }
            Frame::Open {
                stream,
                path,
                query,
                headers,
                client_addr,
                resumed,
            } => self.on_open(IncomingStream {
                id: stream,
                path,
                query,
                headers,
                client_addr,
                resumed,
                shared: None,
            }),
            Frame::Accept { stream, protocol } => self.on_answer(stream, Ok(protocol)),
            Frame::Reject {
                stream,
                status,
                reason,
            } => self.on_answer(stream, Err((status, reason))),
            Frame::Data {
                stream,
                text,
                payload,
            } => self.on_data(stream, text, payload, message_len),
            Frame::Window { stream, credit } => self.on_window(stream, credit),
            Frame::Close {
                stream,
                code,
                reason,
            } => self.on_close(stream, code, reason),
        }
    }

    /// Checks that a frame names a stream that was opened: `Ok(true)` if it is live,
    /// `Ok(false)` if it already finished.
    fn known(&self, id: u64, ty: FrameType) -> Result<bool, Stop> {
        if self.entries.contains_key(&id) {
            Ok(true)
        } else if id > self.max_id {
            Err(Stop::protocol(format!(
                "{ty} for stream {id}, which was never opened"
            )))
        } else {
            Ok(false)
        }
    }

    fn on_open(&mut self, mut incoming: IncomingStream) -> Result<(), Stop> {
        let id = incoming.id;
        if self.shared.role != LinkRole::Acceptor {
            return Err(Stop::protocol(format!(
                "Open for stream {id} sent to the initiator of the link"
            )));
        }
        if id <= self.max_id {
            return Err(Stop::protocol(format!(
                "Open for stream {id} does not increase the stream id (last was {})",
                self.max_id
            )));
        }
        self.max_id = id;
        let refusal = if self.local_goaway.is_some() {
            Some("link is going away".to_owned())
        } else if self.entries.len() >= self.shared.config.max_streams {
            Some(format!(
                "link is at its limit of {} streams",
                self.shared.config.max_streams
            ))
        } else if self.incoming.is_none() {
            Some("link is not accepting streams".to_owned())
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.frames.push_back(Frame::Reject {
                stream: id,
                status: 503,
                reason,
            });
            return Ok(());
        }
        let shared = StreamShared::new(id, Arc::clone(&self.shared));
        self.insert(Arc::clone(&shared), Phase::AwaitingAccept);
        incoming.shared = Some(shared);
        if let Some(tx) = &self.incoming
            && tx.send(incoming).is_err()
        {
            // Every handle is gone; the dropped IncomingStream queues a Reject.
            self.incoming = None;
        }
        Ok(())
    }

    /// `Accept` (`Ok(protocol)`) or `Reject` (`Err((status, reason))`) from the acceptor.
    fn on_answer(
        &mut self,
        id: u64,
        answer: Result<Option<String>, (u16, String)>,
    ) -> Result<(), Stop> {
        let ty = if answer.is_ok() {
            FrameType::Accept
        } else {
            FrameType::Reject
        };
        let Some(entry) = self.entries.get_mut(&id) else {
            return Err(Stop::protocol(format!(
                "{ty} for stream {id}, which is not waiting for an answer"
            )));
        };
        let Phase::Opening(reply) = &mut entry.phase else {
            return Err(Stop::protocol(format!(
                "{ty} for stream {id}, which is not waiting for an answer"
            )));
        };
        let reply = reply.take();
        match answer {
            Ok(protocol) => {
                entry.phase = Phase::Open;
                let stream = MuxStream::new(Arc::clone(&entry.shared), protocol);
                // If open() was cancelled, the stream comes back and its Drop closes it (1001).
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(stream));
                }
            }
            Err((status, reason)) => {
                // After the peer's GoAway, its 503s mean "open it on another link".
                let error = if status == 503 && self.remote_goaway.is_some() {
                    OpenError::GoingAway
                } else {
                    OpenError::Rejected { status, reason }
                };
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error));
                }
                self.retire(id);
            }
        }
        Ok(())
    }

    fn on_data(
        &mut self,
        id: u64,
        text: bool,
        payload: Bytes,
        message_len: usize,
    ) -> Result<(), Stop> {
        let len = payload.len() as u64;
        if !self.known(id, FrameType::Data)? {
            if len > self.stale_allowance {
                return Err(Stop::protocol(format!(
                    "Data of {len} bytes for finished stream {id}, beyond the remaining grace of {} bytes",
                    self.stale_allowance
                )));
            }
            self.stale_allowance -= len;
            return Ok(());
        }
        let Some(entry) = self.entries.get(&id) else {
            return Ok(());
        };
        if !matches!(entry.phase, Phase::Open) {
            return Err(Stop::protocol(format!(
                "Data on stream {id} before it was accepted"
            )));
        }
        if entry.recv_close {
            return Err(Stop::protocol(format!(
                "Data on stream {id} after its Close"
            )));
        }
        let shared = Arc::clone(&entry.shared);
        let mut st = lock(&shared.state);
        if len > st.peer_credit {
            return Err(Stop::protocol(format!(
                "Data of {len} bytes on stream {id} exceeds its remaining credit of {} bytes",
                st.peer_credit
            )));
        }
        st.peer_credit -= len;
        if st.detached || st.recv_end.is_some() {
            return Ok(());
        }
        let payload = if message_len > COMPACT_MIN_MESSAGE && payload.len() * 2 < message_len {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        let msg = if text {
            match Utf8Bytes::try_from(payload) {
                Ok(t) => Message::Text(t),
                Err(_) => {
                    drop(st);
                    self.close_stream(id, 1007, "invalid UTF-8 in a text message");
                    return Ok(());
                }
            }
        } else {
            Message::Binary(payload)
        };
        if st.inbound.len() >= MAX_QUEUED_MESSAGES {
            drop(st);
            self.close_stream(id, 1008, "too many messages queued for a slow reader");
            return Ok(());
        }
        st.inbound.push_back(msg);
        if let Some(w) = st.recv_waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Ends a stream from this side for a reason found by the driver: the consumer sees
    /// `Close(code, reason)` after the messages already queued, and the peer gets `Close`.
    fn close_stream(&mut self, id: u64, code: u16, reason: &str) {
        let Some(entry) = self.entries.get(&id) else {
            return;
        };
        {
            let mut st = lock(&entry.shared.state);
            st.recv_end = Some(RecvEnd::Closed {
                code,
                reason: reason.to_owned(),
            });
            st.send_closed = true;
            wake_both(&mut st);
        }
        self.send_close(id, Some((code, reason.to_owned())));
    }

    fn on_window(&mut self, id: u64, credit: u32) -> Result<(), Stop> {
        if !self.known(id, FrameType::Window)? {
            return Ok(());
        }
        let Some(entry) = self.entries.get(&id) else {
            return Ok(());
        };
        let mut st = lock(&entry.shared.state);
        st.send_credit += u64::from(credit);
        if st.send_credit > u64::from(u32::MAX) {
            return Err(Stop::protocol(format!(
                "Window on stream {id} raises its credit to {}, over 2^32 - 1",
                st.send_credit
            )));
        }
        if let Some(w) = st.send_waker.take() {
            w.wake();
        }
        Ok(())
    }

    fn on_close(&mut self, id: u64, code: u16, reason: String) -> Result<(), Stop> {
        if !self.known(id, FrameType::Close)? {
            return Ok(());
        }
        let Some(entry) = self.entries.get_mut(&id) else {
            return Ok(());
        };
        if matches!(entry.phase, Phase::Opening(_)) {
            return Err(Stop::protocol(format!(
                "Close on stream {id} before Accept or Reject"
            )));
        }
        if entry.recv_close {
            return Err(Stop::protocol(format!("a second Close on stream {id}")));
        }
        entry.recv_close = true;
        {
            let mut st = lock(&entry.shared.state);
            if st.recv_end.is_none() {
                st.recv_end = Some(RecvEnd::Closed {
                    code: wire_close_code(code),
                    reason,
                });
            }
            st.remote_closed = true;
            wake_both(&mut st);
        }
        if matches!(entry.phase, Phase::Open) {
            if entry.sent_close {
                self.retire(id);
            } else {
                self.send_close(id, None);
            }
        }
        Ok(())
    }
}
