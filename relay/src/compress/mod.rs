//! `permessage-deflate` (RFC 7692) on the client leg, for routes with `compression = "client"`.
//!
//! tungstenite 0.30 fails every frame with RSV1 set (`NonZeroReservedBits`), so a compressed
//! client leg is a [yawc](https://docs.rs/yawc) WebSocket instead: the SDK's [`DeflateStream`]
//! (its `Client` runs compressed connections on the same one), wrapped in a [`DeflateLeg`]
//! that counts the compression metrics and speaks the same [`Message`]s as every other
//! [`Leg`]: the pump, inspectors, taps and limits see decompressed messages and know nothing
//! of compression. The backend leg stays tungstenite, uncompressed.
//!
//! [`negotiate`] chooses the answer to the client's offer; the answer always imposes no context
//! takeover in both directions, so deflate state is needed only while a message is being
//! compressed or decompressed, and lives in one process-wide pool ([`pool`]) between messages:
//! an idle compressed client holds none.

pub(crate) mod negotiate;

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};

use futures_util::{Sink, Stream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Error as WsError, Message};
use wsrelay_client::deflate::DeflateStream;
use yawc::{CompressionLevel, DeflateOptions, DeflatePool, Options, Role};

use crate::observe::CompressionCounters;
use crate::pump::Leg;
pub(crate) use negotiate::Agreed;

/// Messages shorter than this go out uncompressed (RFC 7692 lets each message choose). It is 0,
/// every message compressed: a message of a few bytes grows by one or two, but kosoku, the
/// Autobahn runner CI uses, fails its cases 12.*.1 and 13.*.1 (16-byte messages) when the echo
/// comes back uncompressed (it hashes the text as a str), and some clients may share that bug.
const COMPRESSION_THRESHOLD: usize = 0;

/// Idle deflate and inflate states kept per window size, in the pool every compressed leg
/// shares: enough for the messages being (de)compressed at one moment, one or two per worker
/// thread, never per connection. A message that finds the pool empty builds its own state.
fn pool_capacity() -> usize {
    std::thread::available_parallelism().map_or(4, |n| 2 * n.get())
}

/// The process's deflate state pool, made at the first compressed session.
fn pool() -> DeflatePool {
    static POOL: OnceLock<DeflatePool> = OnceLock::new();
    POOL.get_or_init(|| DeflatePool::new(pool_capacity()))
        .clone()
}

/// yawc's settings for a client leg under `socket` (the generation's limits and buffers).
fn options(socket: &WebSocketConfig) -> Options {
    // yawc's limits are exclusive, tungstenite's (and the relay's documented ones) inclusive.
    // One bound covers a frame's payload before and after inflating it, so it is the message
    // limit: a single-frame message may be as large as a message may be; inflating stops, and
    // the client gets 1009, as soon as the output would pass it.
    let max_message = socket.max_message_size.unwrap_or(usize::MAX - 1) + 1;
    let compression = DeflateOptions {
        // Level 1: each message is compressed on its own, and on chat-sized JSON zlib's levels
        // 1, 6 and 9 give the same bytes (measured with Python's zlib on the test's messages),
        // so the higher levels would cost CPU for nothing.
        level: CompressionLevel::fast(),
        server_no_context_takeover: true,
        client_no_context_takeover: true,
        compression_threshold: COMPRESSION_THRESHOLD,
        pool: Some(pool()),
        ..DeflateOptions::default()
    };
    Options {
        compression: Some(compression),
        ..Options::default()
    }
    .with_limits(max_message, max_message)
    .with_read_buffer_capacity(socket.read_buffer_size)
    .with_write_buffer_capacity(socket.write_buffer_size)
    .with_utf8()
}

/// A client leg with `permessage-deflate`: the SDK's [`DeflateStream`] (a yawc WebSocket
/// speaking [`Message`]s with tungstenite's close behaviour, which the session relies on) over
/// the upgraded connection, counting into the compression metrics.
pub(crate) struct DeflateLeg<S> {
    socket: DeflateStream<Counted<S>>,
    counters: CompressionCounters,
}

impl<S: AsyncRead + AsyncWrite + Unpin> DeflateLeg<S> {
    /// Wraps `io`, over which the client was answered with `agreed`, under the generation's
    /// `socket` limits. Counts into `counters`.
    pub fn new(
        io: S,
        agreed: Agreed,
        socket: &WebSocketConfig,
        counters: CompressionCounters,
    ) -> Result<Self, yawc::WebSocketError> {
        let max_message = socket.max_message_size.unwrap_or(usize::MAX);
        let io = Counted {
            inner: io,
            read: counters.wire_in.clone(),
            written: counters.wire_out.clone(),
        };
        let header = agreed.header_value();
        let socket = DeflateStream::new(io, Role::Server, &header, options(socket), max_message)?;
        counters.sessions.inc();
        Ok(DeflateLeg { socket, counters })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Leg for DeflateLeg<S> {
    fn pings(&self) -> bool {
        true
    }

    fn acknowledged_bytes(&self) -> Option<u64> {
        None
    }

    fn poll_acknowledged(&mut self, _cx: &mut Context<'_>, _through: u64) -> Poll<()> {
        Poll::Ready(())
    }

    fn awaits_close_reply(&self) -> bool {
        true
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for DeflateLeg<S> {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = ready!(Pin::new(&mut self.socket).poll_next(cx));
        if let Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) = &item {
            self.counters.message_in.inc_by(message.len() as u64);
        }
        Poll::Ready(item)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for DeflateLeg<S> {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.socket).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        if let Message::Text(_) | Message::Binary(_) = &message {
            self.counters.message_out.inc_by(message.len() as u64);
        }
        Pin::new(&mut self.socket).start_send(message)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.socket).poll_close(cx)
    }
}

/// A client leg that is compressed or not: what a session pumps on.
pub(crate) enum MaybeDeflate<L, S> {
    /// Any other leg (tungstenite's socket, a mux client's stream).
    Plain(L),
    /// A leg with `permessage-deflate`, boxed: yawc's socket is larger than tungstenite's,
    /// and the uncompressed sessions should not pay for it.
    Deflate(Box<DeflateLeg<S>>),
}

macro_rules! either {
    ($self:expr, $leg:ident => $body:expr) => {
        match $self {
            MaybeDeflate::Plain($leg) => $body,
            MaybeDeflate::Deflate($leg) => $body,
        }
    };
}

impl<L: Leg, S: AsyncRead + AsyncWrite + Unpin> Leg for MaybeDeflate<L, S> {
    fn pings(&self) -> bool {
        either!(self, leg => leg.pings())
    }

    fn acknowledged_bytes(&self) -> Option<u64> {
        either!(self, leg => leg.acknowledged_bytes())
    }

    fn poll_acknowledged(&mut self, cx: &mut Context<'_>, through: u64) -> Poll<()> {
        either!(self, leg => leg.poll_acknowledged(cx, through))
    }

    fn awaits_close_reply(&self) -> bool {
        either!(self, leg => leg.awaits_close_reply())
    }

    fn release_idle_buffers(&mut self) {
        either!(self, leg => leg.release_idle_buffers())
    }
}

impl<L: Leg, S: AsyncRead + AsyncWrite + Unpin> Stream for MaybeDeflate<L, S> {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        either!(self.get_mut(), leg => Pin::new(leg).poll_next(cx))
    }
}

impl<L: Leg, S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for MaybeDeflate<L, S> {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        either!(self.get_mut(), leg => Pin::new(leg).poll_ready(cx))
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        either!(self.get_mut(), leg => Pin::new(leg).start_send(item))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        either!(self.get_mut(), leg => Pin::new(leg).poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        either!(self.get_mut(), leg => Pin::new(leg).poll_close(cx))
    }
}

/// The upgraded connection, counting the bytes read and written into the compression
/// counters (one add per read or write, not per message).
struct Counted<S> {
    inner: S,
    read: Counter,
    written: Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        self.read.inc_by((buf.filled().len() - before) as u64);
        Poll::Ready(result)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        if let Ok(written) = result {
            self.written.inc_by(written as u64);
        }
        Poll::Ready(result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs));
        if let Ok(written) = result {
            self.written.inc_by(written as u64);
        }
        Poll::Ready(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
