//! The async link engine: runs the mux protocol over an established WebSocket.
//!
//! [`Link::establish`] exchanges `Hello`s and returns a [`LinkHandle`], which opens
//! ([`LinkHandle::open`], initiator) or accepts ([`LinkHandle::accept`], acceptor) streams, and
//! a [`LinkDriver`], the future that owns the socket. The caller spawns the driver; it resolves
//! to the [`LinkError`] that says why the link ended. Each stream is a [`MuxStream`]: a
//! `Stream` + `Sink` of `tungstenite::Message`s, like a WebSocket of its own.
//!
//! ```no_run
//! # async fn demo(ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Result<(), Box<dyn std::error::Error>> {
//! use futures_util::{SinkExt, StreamExt};
//! use wsrelay_protocol::link::{Link, LinkConfig, LinkRole, OpenRequest};
//!
//! let (handle, driver) = Link::establish(ws, LinkRole::Initiator, LinkConfig::default()).await?;
//! tokio::spawn(driver);
//! let mut stream = handle.open(OpenRequest::new("/chat")).await?;
//! stream.send(tungstenite::Message::text("hello")).await?;
//! let echo = stream.next().await;
//! # Ok(()) }
//! ```
//!
//! How it works (see also the crate README, sections 7 and 8):
//! - **One task owns the socket.** The driver reads and writes; handles and streams talk to it
//!   through the link's outbox (a queue whose `Data` bytes are bounded by a per-link budget)
//!   and through each stream's shared state.
//! - **Credit.** A stream's `Sink` takes payload bytes from its send credit and waits when a
//!   message does not fit; the driver adds credit on `Window`. Received messages wait in the
//!   stream's queue, which never holds more payload than the credit this end granted, so the
//!   driver never waits for a slow consumer. Taking messages returns credit: when half a window
//!   was consumed, or at once whenever the peer's credit fell below one maximal message.
//! - **Batching.** The driver encodes queued frames into one binary message up to the peer's
//!   message limit, writes it, and flushes when nothing more is queued.
//! - **Shutdown.** A protocol error closes the link with 1002; every stream then yields an
//!   error naming the reason and pending `open`s fail. `GoAway` stops new streams and closes the
//!   link with 1001 once the last stream is done. When every handle is dropped the link stays
//!   up until its last stream ends.

mod driver;
mod error;
mod shared;
mod stream;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tungstenite::Message;

pub use error::{LinkError, OpenError};
pub use stream::{
    DROPPED_CLOSE_CODE, IncomingStream, MAX_CLOSE_REASON, MuxStream, truncate_reason,
    wire_close_code,
};

use crate::frame::{Frame, Hello, Limits, decode_frame, encode};
use crate::version::{LinkParams, negotiate};
use shared::{LinkShared, Out, StreamShared, lock};

/// The WebSocket subprotocol a link is opened with: an initiator offers it, an acceptor picks
/// it. (An acceptor that is offered none may still run the link.)
pub const LINK_SUBPROTOCOL: &str = "wsrelay.mux";

/// Most messages one stream's receive queue holds before the stream is closed with 1008.
///
/// Credit bounds the queued payload bytes; this bounds the per-message overhead when a peer
/// sends many tiny (or empty, which need no credit) messages to a consumer that does not read.
pub const MAX_QUEUED_MESSAGES: usize = 65_536;

/// Settings of one end of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// The largest `Data` payload this end accepts (its `Hello.max_frame`), in bytes.
    pub max_frame: u32,
    /// The credit this end grants the peer on every new stream (its `Hello.initial_window`), in
    /// payload bytes. Must be at least `max_frame`.
    pub initial_window: u32,
    /// Ping the peer when it has sent nothing for this long; zero disables keepalive.
    pub ping_interval: Duration,
    /// After a ping, the peer must send something (any frame) within this long, or the link
    /// ends with [`LinkError::Timeout`]. Also bounds the `Hello` exchange (together with
    /// `ping_interval`) and the closing handshake.
    pub pong_timeout: Duration,
    /// Most streams open at once on the link; more `Open`s are rejected with 503.
    pub max_streams: usize,
}

impl Default for LinkConfig {
    /// 1 MiB frames, a 4 MiB window, a ping after 20 s of quiet, 10 s to answer it, and at most
    /// 100 000 streams.
    fn default() -> LinkConfig {
        LinkConfig {
            max_frame: 1 << 20,
            initial_window: 4 << 20,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            max_streams: 100_000,
        }
    }
}

/// Which end of a link this is. Only the initiator opens streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkRole {
    /// Opens streams: the relay on a relay → backend link, a `MuxClient` on a client → relay
    /// link.
    Initiator,
    /// Receives `Open`s and accepts or rejects them.
    Acceptor,
}

/// What the initiator asks for when it opens a stream: the client's request, as forwarded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenRequest {
    /// The request path without the query, e.g. `/chat/room1`.
    pub path: String,
    /// The query string without `?`; empty if none.
    pub query: String,
    /// Forwarded request headers as (lowercase name, raw value) pairs.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The client's address as `ip:port` (`[v6]:port`); may be empty.
    pub client_addr: String,
    /// True when this re-originates a client whose previous backend was lost.
    pub resumed: bool,
}

impl OpenRequest {
    /// A request for `path_and_query` (`/chat?room=1` is split at the first `?`) with no
    /// headers and no client address.
    pub fn new(path_and_query: &str) -> OpenRequest {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        OpenRequest {
            path: path.to_owned(),
            query: query.to_owned(),
            ..OpenRequest::default()
        }
    }

    /// Checks the request against the protocol's default decoder limits, so an oversized
    /// request is refused locally instead of making the peer close the whole link.
    fn check(&self) -> Result<(), OpenError> {
        let limits = Limits::DEFAULT;
        let too_long = |what: &str, len: usize| OpenError::Rejected {
            status: if what == "path" || what == "query" {
                414
            } else {
                431
            },
            reason: format!(
                "{what} of {len} bytes is over the limit of {}",
                limits.max_string
            ),
        };
        if self.path.len() > limits.max_string {
            return Err(too_long("path", self.path.len()));
        }
        if self.query.len() > limits.max_string {
            return Err(too_long("query", self.query.len()));
        }
        if self.client_addr.len() > limits.max_string {
            return Err(too_long("client address", self.client_addr.len()));
        }
        if self.headers.len() > limits.max_headers {
            return Err(OpenError::Rejected {
                status: 431,
                reason: format!(
                    "{} headers are over the limit of {}",
                    self.headers.len(),
                    limits.max_headers
                ),
            });
        }
        for (name, value) in &self.headers {
            if name.len() > limits.max_string || value.len() > limits.max_string {
                return Err(too_long("header", name.len().max(value.len())));
            }
        }
        Ok(())
    }
}

/// The WebSocket a link runs over: a stream and sink of tungstenite messages that answers
/// pings and Closes by itself, as tokio-tungstenite's `WebSocketStream` does (the client SDK's
/// links) and the relay's own WebSocket does (the relay's links).
pub trait LinkSocket:
    futures_util::Stream<Item = Result<Message, tungstenite::Error>>
    + futures_util::Sink<Message, Error = tungstenite::Error>
    + Unpin
    + Send
    + 'static
{
}

impl<W> LinkSocket for W where
    W: futures_util::Stream<Item = Result<Message, tungstenite::Error>>
        + futures_util::Sink<Message, Error = tungstenite::Error>
        + Unpin
        + Send
        + 'static
{
}

/// Sets up links; see [`Link::establish`].
pub struct Link;

impl Link {
    /// Runs the `Hello` exchange over an established WebSocket: sends this end's `Hello`, reads
    /// the peer's (it must arrive within `ping_interval + pong_timeout`), and negotiates.
    ///
    /// Returns a cloneable handle and the driver future. The caller spawns the driver (and so
    /// owns its cancellation: dropping it ends the link with [`LinkError::Aborted`]).
    ///
    /// The WebSocket must accept messages of at least `max_frame + 64 KiB` (tungstenite's
    /// default limits do).
    pub async fn establish<W: LinkSocket>(
        mut ws: W,
        role: LinkRole,
        config: LinkConfig,
    ) -> Result<(LinkHandle, LinkDriver), LinkError> {
        let local = Hello::new(config.max_frame, config.initial_window);
        negotiate(&local, &local).map_err(|e| LinkError::Config {
            reason: e.to_string(),
        })?;
        ws.send(Message::Binary(encode(&Frame::Hello(local))))
            .await
            .map_err(|e| LinkError::io(format!("sending Hello: {e}")))?;
        let wait = config.ping_interval + config.pong_timeout;
        let grace = config.pong_timeout;
        let (remote, rest) = match tokio::time::timeout(wait, read_hello(&mut ws)).await {
            Err(_) => return Err(LinkError::Timeout),
            Ok(Err((error, close))) => {
                if close {
                    driver::close_with(&mut ws, crate::PROTOCOL_ERROR, &error.to_string(), grace)
                        .await;
                }
                return Err(error);
            }
            Ok(Ok(hello)) => hello,
        };
        let params = match negotiate(&local, &remote) {
            Ok(params) => params,
            Err(e) => {
                let reason = e.to_string();
                driver::close_with(&mut ws, crate::PROTOCOL_ERROR, &reason, grace).await;
                return Err(LinkError::Protocol { reason });
            }
        };
        tracing::debug!(?role, ?params, "mux link established");
        let shared = Arc::new(LinkShared::new(role, config, params));
        let (tx, rx) = match role {
            LinkRole::Acceptor => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(tokio::sync::Mutex::new(rx)))
            }
            LinkRole::Initiator => (None, None),
        };
        let engine = driver::Engine::new(ws, Arc::clone(&shared), tx, rest);
        let handle = LinkHandle {
            inner: Arc::new(HandleInner {
                shared,
                incoming: rx,
            }),
        };
        let driver = LinkDriver {
            fut: Box::pin(engine.run()),
        };
        Ok((handle, driver))
    }
}

/// Reads messages until the peer's `Hello`. Returns it and the rest of its message (frames the
/// peer batched after it, if it had already seen ours). On error, says whether to close with
/// 1002.
async fn read_hello<W: LinkSocket>(
    ws: &mut W,
) -> Result<(Hello, Option<Bytes>), (LinkError, bool)> {
    loop {
        let msg = match ws.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => return Err((LinkError::io(format!("waiting for Hello: {e}")), false)),
            None => {
                return Err((
                    LinkError::io("the connection ended before the peer's Hello"),
                    false,
                ));
            }
        };
        let bytes = match msg {
            Message::Binary(b) if b.is_empty() => continue,
            Message::Binary(b) => b,
            Message::Text(_) => {
                return Err((LinkError::protocol("text message on a mux link"), true));
            }
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return Err((LinkError::Closed { code, reason }, false));
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        return match decode_frame(&bytes, 0, &Limits::DEFAULT) {
            Ok((Frame::Hello(hello), end)) => {
                let rest = (end < bytes.len()).then(|| bytes.slice(end..));
                Ok((hello, rest))
            }
            Ok((other, _)) => Err((
                LinkError::protocol(format!(
                    "the first frame was {}, not Hello",
                    other.frame_type()
                )),
                true,
            )),
            Err(e) => Err((LinkError::protocol(e.to_string()), true)),
        };
    }
}

/// The future that runs a link: it owns the WebSocket and resolves, when the link ends, to why.
///
/// Spawn it (`tokio::spawn(driver)`). Dropping it ends the link at once: every stream and handle
/// sees [`LinkError::Aborted`].
#[must_use = "the link does nothing unless its driver is polled (spawn it)"]
pub struct LinkDriver {
    fut: Pin<Box<dyn Future<Output = LinkError> + Send>>,
}

impl std::fmt::Debug for LinkDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkDriver").finish_non_exhaustive()
    }
}

impl Future for LinkDriver {
    type Output = LinkError;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LinkError> {
        self.fut.as_mut().poll(cx)
    }
}

/// A cloneable handle to a link: opens or accepts streams, watches the link, winds it down.
///
/// When every clone is dropped the link keeps running until its last stream ends, then closes
/// (the driver resolves to [`LinkError::Released`]).
#[derive(Clone)]
pub struct LinkHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    shared: Arc<LinkShared>,
    /// Incoming streams (acceptor only), shared by all clones.
    incoming: Option<tokio::sync::Mutex<mpsc::UnboundedReceiver<IncomingStream>>>,
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        self.shared.push(Out::HandlesDropped);
    }
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle")
            .field("role", &self.inner.shared.role)
            .field("open_streams", &self.open_streams())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl LinkHandle {
    /// Opens a stream (initiator only) and waits for the peer's `Accept` or `Reject`.
    ///
    /// Fails with [`OpenError::GoingAway`] after a `GoAway` either way, [`OpenError::Link`] if
    /// the link ended, [`OpenError::Rejected`] if the peer refused (or locally: 503 at
    /// `max_streams`, 414/431 for a request over the protocol's string or header limits, 500 on
    /// the acceptor side). Cancelling the future before the answer closes the stream (1001)
    /// once it is accepted.
    pub async fn open(&self, open: OpenRequest) -> Result<MuxStream, OpenError> {
        let shared = &self.inner.shared;
        if shared.role != LinkRole::Initiator {
            return Err(OpenError::Rejected {
                status: 500,
                reason: "open() called on the acceptor side of a link".into(),
            });
        }
        if let Some(e) = shared.end_error() {
            return Err(OpenError::Link(e));
        }
        if shared.going_away.load(Ordering::Acquire) {
            return Err(OpenError::GoingAway);
        }
        open.check()?;
        let (reply, answer) = oneshot::channel();
        let waker = {
            let mut outbox = lock(&shared.outbox);
            if let Some(e) = &outbox.ended {
                return Err(OpenError::Link(e.clone()));
            }
            // Assigned under the outbox lock, so Opens are queued in increasing id order.
            let id = outbox.next_id;
            outbox.next_id += 1;
            let frame = Frame::Open {
                stream: id,
                path: open.path,
                query: open.query,
                headers: open.headers,
                client_addr: open.client_addr,
                resumed: open.resumed,
            };
            outbox.items.push_back(Out::Open {
                stream: StreamShared::new(id, Arc::clone(shared)),
                frame,
                reply,
            });
            outbox.driver.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(OpenError::Link(
                shared.end_error().unwrap_or(LinkError::Aborted),
            )),
        }
    }

    /// The next stream the peer opened (acceptor only); `None` once the link has ended (and
    /// always on the initiator side).
    pub async fn accept(&self) -> Option<IncomingStream> {
        let incoming = self.inner.incoming.as_ref()?;
        incoming.lock().await.recv().await
    }

    /// Streams currently open on the link (including ones being opened or waiting to be
    /// accepted).
    pub fn open_streams(&self) -> usize {
        self.inner.shared.open_streams.load(Ordering::Acquire)
    }

    /// True once the link has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.ended.borrow().is_some()
    }

    /// Resolves when the link ends, with why (the same error the driver returns).
    pub async fn closed(&self) -> LinkError {
        let mut rx = self.inner.shared.ended.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(ended) => ended.clone().unwrap_or(LinkError::Aborted),
            Err(_) => LinkError::Aborted,
        }
    }

    /// Sends `GoAway` with `reason`: no new streams in either direction (pending and later
    /// `open`s fail with [`OpenError::GoingAway`], later `Open`s from the peer are rejected with
    /// 503); existing streams carry on, and the link closes (1001) when the last one ends.
    pub fn go_away(&self, reason: &str) {
        self.inner.shared.going_away.store(true, Ordering::Release);
        self.inner.shared.push(Out::GoAway {
            reason: reason.to_owned(),
        });
    }

    /// True after a `GoAway` was sent or received, or once the link ended: no new streams.
    pub fn is_going_away(&self) -> bool {
        self.inner.shared.going_away.load(Ordering::Acquire)
    }

    /// This end's role on the link.
    pub fn role(&self) -> LinkRole {
        self.inner.shared.role
    }

    /// The parameters negotiated in the `Hello` exchange.
    pub fn params(&self) -> LinkParams {
        self.inner.shared.params
    }
}
