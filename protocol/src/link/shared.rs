//! State shared between a link's driver and the handles and streams that talk to it.
//!
//! The driver task owns the socket. Everything else reaches it through the link's [`Outbox`],
//! a queue of [`Out`] commands that the driver drains when the socket can take more bytes, and
//! each stream's [`StreamState`], where the driver delivers received messages and credit.
//!
//! The outbox is bounded: `Data` commands count against a per-link byte budget (a stream waits
//! in `poll_ready` while the budget is spent) and every other command is bounded by the number
//! of streams (each stream sends at most one `Accept`/`Reject`, one `Close`, and one `Window`
//! per batch of consumed messages).
//!
//! Lock order: a stream's state, then the outbox. The driver never holds the outbox lock while
//! it takes a stream's lock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use tungstenite::Message;

use super::error::{LinkError, OpenError};
use super::stream::MuxStream;
use super::{LinkConfig, LinkRole};
use crate::version::LinkParams;

/// What a handle or stream asks the driver to do. Processed in order.
/// A map by stream id. Looked up for every message a link carries, so hashed with foldhash
/// (seeded per map, so a peer choosing ids can't aim them at one bucket) rather than std's
/// SipHash, which cost a mux relay 6% of its instructions per message.
pub(crate) type StreamMap<V> = HashMap<u64, V, foldhash::fast::RandomState>;

pub(crate) enum Out {
    /// Send `Open` for a new stream (initiator). The id was assigned under the outbox lock, so
    /// `Open`s enter the queue in increasing id order.
    Open {
        stream: Arc<StreamShared>,
        frame: crate::Frame,
        reply: oneshot::Sender<Result<MuxStream, OpenError>>,
    },
    /// Send `Accept` for an incoming stream (acceptor).
    Accept { id: u64, protocol: Option<String> },
    /// Send `Reject` for an incoming stream (acceptor).
    Reject {
        id: u64,
        status: u16,
        reason: String,
    },
    /// Send one message; its credit was already taken from the stream.
    Data { id: u64, text: bool, payload: Bytes },
    /// Return credit to the peer.
    Window { id: u64, credit: u32 },
    /// Close the local half of a stream.
    Close { id: u64, code: u16, reason: String },
    /// Send `GoAway` and wind the link down.
    GoAway { reason: String },
    /// The last [`LinkHandle`](super::LinkHandle) was dropped.
    HandlesDropped,
}

/// The command queue into the driver; see the module docs.
pub(crate) struct Outbox {
    pub items: VecDeque<Out>,
    /// Payload bytes of the `Data` commands in `items` and in the driver's local queue.
    pub queued_data: usize,
    /// The driver's waker, taken and woken by whoever pushes.
    pub driver: Option<Waker>,
    /// Streams waiting for `queued_data` to drop below the budget, by stream id.
    pub budget_waiters: StreamMap<Waker>,
    /// The next stream id the initiator assigns; ids start at 1 and only grow.
    pub next_id: u64,
    /// Set when the link has ended: nothing more is accepted.
    pub ended: Option<LinkError>,
}

/// Per-link state every handle and stream can see.
pub(crate) struct LinkShared {
    pub role: LinkRole,
    pub config: LinkConfig,
    pub params: LinkParams,
    /// Most `Data` payload bytes waiting for the driver before streams must wait.
    pub send_budget: usize,
    pub outbox: Mutex<Outbox>,
    /// Streams the driver tracks: opening, awaiting accept, or open.
    pub open_streams: AtomicUsize,
    /// A `GoAway` was sent or received: no new streams.
    pub going_away: AtomicBool,
    /// `Some(why)` once the link has ended.
    pub ended: watch::Sender<Option<LinkError>>,
}

/// Locks a mutex, recovering the data if another thread panicked while holding it (the state
/// is kept consistent at every unlock, so it is still usable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LinkShared {
    pub fn new(role: LinkRole, config: LinkConfig, params: LinkParams) -> LinkShared {
        let send_budget = params.max_send_message().saturating_mul(4);
        LinkShared {
            role,
            config,
            params,
            send_budget,
            outbox: Mutex::new(Outbox {
                items: VecDeque::new(),
                queued_data: 0,
                driver: None,
                budget_waiters: StreamMap::default(),
                next_id: 1,
                ended: None,
            }),
            open_streams: AtomicUsize::new(0),
            going_away: AtomicBool::new(false),
            ended: watch::channel(None).0,
        }
    }

    /// Queues a command for the driver. Returns false (and drops the command) if the link has
    /// ended.
    pub fn push(&self, item: Out) -> bool {
        let waker = {
            let mut outbox = lock(&self.outbox);
            if outbox.ended.is_some() {
                return false;
            }
            outbox.items.push_back(item);
            outbox.driver.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// The error the link ended with, if it has.
    pub fn end_error(&self) -> Option<LinkError> {
        self.ended.borrow().clone()
    }
}

/// How the receive side of a stream ended.
#[derive(Debug, Clone)]
pub(crate) enum RecvEnd {
    /// The peer sent `Close` (or the driver closed the stream, e.g. 1007 for bad UTF-8).
    Closed { code: u16, reason: String },
    /// The link ended first.
    Failed(String),
}

/// The part of a stream the driver and the stream's owner both touch.
pub(crate) struct StreamState {
    // --- receive side ---
    /// Messages received and not yet taken by the consumer. Their payload bytes never exceed
    /// the credit this end granted.
    pub inbound: VecDeque<Message>,
    pub recv_waker: Option<Waker>,
    /// Payload bytes the peer may still send: granted minus received.
    pub peer_credit: u64,
    /// Payload bytes the consumer took that were not yet returned with `Window`.
    pub unreported: u64,
    /// Set once the peer closed the stream or the link failed.
    pub recv_end: Option<RecvEnd>,
    /// The consumer has seen `recv_end`; the stream yields `None` from now on.
    pub end_delivered: bool,
    /// The `MuxStream` was dropped: received data is discarded.
    pub detached: bool,
    // --- send side ---
    /// Payload bytes this end may still send.
    pub send_credit: u64,
    /// Payload bytes this end has sent (each took credit), since the stream opened.
    pub sent_bytes: u64,
    pub send_waker: Option<Waker>,
    /// This end queued its `Close` (or the driver sent one for it).
    pub send_closed: bool,
    /// The peer closed the stream: data can no longer be sent.
    pub remote_closed: bool,
    /// The link ended with this reason.
    pub failed: Option<String>,
}

/// One stream, shared by the driver and the stream's owner (`IncomingStream`/`MuxStream`).
pub(crate) struct StreamShared {
    pub id: u64,
    pub link: Arc<LinkShared>,
    pub state: Mutex<StreamState>,
}

impl StreamShared {
    pub fn new(id: u64, link: Arc<LinkShared>) -> Arc<StreamShared> {
        let state = StreamState {
            inbound: VecDeque::new(),
            recv_waker: None,
            peer_credit: u64::from(link.params.recv_initial_window),
            unreported: 0,
            recv_end: None,
            end_delivered: false,
            detached: false,
            send_credit: u64::from(link.params.send_initial_window),
            sent_bytes: 0,
            send_waker: None,
            send_closed: false,
            remote_closed: false,
            failed: None,
        };
        Arc::new(StreamShared {
            id,
            link,
            state: Mutex::new(state),
        })
    }

    /// Queues one message for the driver once the stream has credit for it and the link's
    /// send budget has room. Called with the stream's state locked.
    pub fn poll_push_data(
        &self,
        st: &mut StreamState,
        cx: &mut Context<'_>,
        text: bool,
        payload: &Bytes,
    ) -> Poll<Result<(), LinkError>> {
        let len = payload.len() as u64;
        if len > st.send_credit {
            st.send_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let waker = {
            let mut outbox = lock(&self.link.outbox);
            if let Some(e) = &outbox.ended {
                return Poll::Ready(Err(e.clone()));
            }
            let queued = outbox.queued_data;
            if queued > 0 && queued + payload.len() > self.link.send_budget {
                outbox.budget_waiters.insert(self.id, cx.waker().clone());
                return Poll::Pending;
            }
            outbox.queued_data += payload.len();
            outbox.items.push_back(Out::Data {
                id: self.id,
                text,
                payload: payload.clone(),
            });
            outbox.driver.take()
        };
        st.send_credit -= len;
        st.sent_bytes += len;
        if let Some(w) = waker {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }

    /// Records that the consumer took `len` payload bytes and returns credit to the peer when
    /// the grant rule says so (see the crate README, "Flow control"). Called with the state
    /// locked.
    pub fn consumed(&self, st: &mut StreamState, len: usize) {
        st.unreported += len as u64;
        let window = u64::from(self.link.params.recv_initial_window);
        let max_frame = u64::from(self.link.params.recv_max_frame);
        // Grant in batches of half a window; but whenever the peer's credit has fallen below
        // one maximal message, return everything consumed so far, so a sender waiting to send a
        // large message is never stuck behind a batch that will not fill.
        if st.unreported * 2 >= window || st.peer_credit < max_frame {
            self.return_unreported(st);
        }
    }

    /// The consumer found nothing left to read: returns everything it consumed so far. A
    /// sender that sees all its credit back then knows every message was taken, which is
    /// how a relay moving a client off this stream knows it can go without replaying any
    /// (the ack a socket gets from ping/pong). One `Window` per burst of messages, not per
    /// message, and it rides in the same write as the answer the consumer sends first.
    /// Called with the state locked.
    pub fn caught_up(&self, st: &mut StreamState) {
        self.return_unreported(st);
    }

    fn return_unreported(&self, st: &mut StreamState) {
        if st.unreported == 0 || st.recv_end.is_some() || st.detached {
            return;
        }
        // unreported <= window <= u32::MAX: every byte counted was granted before.
        let credit = u32::try_from(st.unreported).unwrap_or(u32::MAX);
        st.peer_credit += u64::from(credit);
        st.unreported -= u64::from(credit);
        self.link.push(Out::Window {
            id: self.id,
            credit,
        });
    }
}
