//! `permessage-deflate` (RFC 7692) on the client leg, for routes with `compression = "client"`.
//!
//! tungstenite 0.30 fails every frame with RSV1 set (`NonZeroReservedBits`), so a compressed
//! client leg is a [yawc](https://docs.rs/yawc) WebSocket instead, wrapped in a [`DeflateLeg`]
//! that speaks the same [`Message`]s as every other [`Leg`]: the pump, inspectors, taps and
//! limits see decompressed messages and know nothing of compression. The backend leg stays
//! tungstenite, uncompressed.
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

use bytes::Bytes;
use futures_util::{Sink, Stream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Error as WsError, Message, Utf8Bytes};
use yawc::{
    CompressionLevel, DeflateOptions, DeflatePool, Frame, OpCode, Options, Role, WebSocket,
};

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

/// A client leg with `permessage-deflate`: a yawc WebSocket over the upgraded connection,
/// speaking [`Message`]s. It keeps tungstenite's close behaviour the session relies on: the
/// peer's Close is answered by the leg itself, a second Close is not sent, and the stream ends
/// once the close handshake is done.
pub(crate) struct DeflateLeg<S> {
    socket: WebSocket<Counted<S>>,
    counters: CompressionCounters,
    /// A Close was read from the client (the leg has answered it) or the leg failed (and sent
    /// its own Close with the code for the failure).
    peer_closed: bool,
    /// A Close was sent, by the relay or by the leg.
    close_sent: bool,
    /// The largest message the client may send (`max_message_size`), for the errors.
    max_message: usize,
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
        let socket = WebSocket::from_stream_with_extensions(
            io,
            Role::Server,
            Some(&header),
            options(socket),
        )?;
        counters.sessions.inc();
        Ok(DeflateLeg {
            socket,
            counters,
            peer_closed: false,
            close_sent: false,
            max_message,
        })
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
        let this = &mut *self;
        loop {
            let frame = match ready!(this.socket.poll_next_frame(cx)) {
                Ok(frame) => frame,
                Err(yawc::WebSocketError::ConnectionClosed) => {
                    // After a Close either way the stream just ends, as tungstenite's does;
                    // before one, the client went away without closing.
                    if this.peer_closed || this.close_sent {
                        return Poll::Ready(None);
                    }
                    this.peer_closed = true;
                    let reset = ProtocolError::ResetWithoutClosingHandshake;
                    return Poll::Ready(Some(Err(WsError::Protocol(reset))));
                }
                Err(error) => {
                    // yawc has queued its Close with the code for `error` (1009, 1007, 1002).
                    this.peer_closed = true;
                    this.close_sent = true;
                    return Poll::Ready(Some(Err(ws_error(error, this.max_message))));
                }
            };
            let (opcode, _, payload) = frame.into_parts();
            let message = match opcode {
                OpCode::Text => match Utf8Bytes::try_from(payload) {
                    Ok(text) => Message::Text(text),
                    Err(error) => return Poll::Ready(Some(Err(WsError::Utf8(error.to_string())))),
                },
                OpCode::Binary => Message::Binary(payload),
                OpCode::Ping => Message::Ping(payload),
                OpCode::Pong => Message::Pong(payload),
                OpCode::Close => {
                    this.peer_closed = true;
                    // yawc queued the echo of this Close.
                    this.close_sent = true;
                    Message::Close(close_frame(&payload))
                }
                // yawc assembles fragments: a lone continuation can't come out of it.
                OpCode::Continuation => continue,
            };
            if let Message::Text(_) | Message::Binary(_) = &message {
                this.counters.message_in.inc_by(message.len() as u64);
            }
            return Poll::Ready(Some(Ok(message)));
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for DeflateLeg<S> {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.socket)
            .poll_ready(cx)
            .map_err(|e| ws_error(e, self.max_message))
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        let this = &mut *self;
        let frame = match message {
            Message::Text(text) => {
                this.counters.message_out.inc_by(text.len() as u64);
                Frame::text(Bytes::from(text))
            }
            Message::Binary(data) => {
                this.counters.message_out.inc_by(data.len() as u64);
                Frame::binary(data)
            }
            Message::Ping(data) => Frame::ping(data),
            Message::Pong(data) => Frame::pong(data),
            Message::Close(frame) => {
                if this.close_sent {
                    // The peer's Close was answered already, or the leg sent its own on a
                    // failure: tungstenite refuses a second Close too.
                    return Ok(());
                }
                this.close_sent = true;
                match frame {
                    Some(frame) => {
                        Frame::close(u16::from(frame.code).into(), frame.reason.as_bytes())
                    }
                    // yawc makes no empty Close; 1000 is what "no status" means.
                    None => Frame::close(yawc::close::CloseCode::Normal, []),
                }
            }
            // The pump never sends raw frames.
            Message::Frame(_) => return Ok(()),
        };
        let max_message = this.max_message;
        Pin::new(&mut this.socket)
            .start_send(frame)
            .map_err(|e| ws_error(e, max_message))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.socket)
            .poll_flush(cx)
            .map_err(|e| ws_error(e, self.max_message))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        // yawc's own close skips the frames it queued itself (the echo of the peer's Close,
        // the Close of a failure); getting ready sends them first, so the client gets them
        // rather than a plain 1000.
        let _ = ready!(Pin::new(&mut self.socket).poll_ready(cx));
        Pin::new(&mut self.socket)
            .poll_close(cx)
            .map_err(|e| ws_error(e, self.max_message))
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

/// A Close frame's payload as tungstenite's [`CloseFrame`] (none when it has no code; yawc has
/// checked the code and the reason's UTF-8).
fn close_frame(payload: &Bytes) -> Option<CloseFrame> {
    let code = u16::from_be_bytes(payload.get(..2)?.try_into().ok()?);
    let reason = Utf8Bytes::try_from(payload.slice(2..)).unwrap_or_default();
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason,
    })
}

/// yawc's error as the tungstenite error the pump and the ending already understand
/// (`pump::close_code_for`): too big is a capacity error (1009), bad UTF-8 a UTF-8 error
/// (1007), the rest protocol errors (1002) or I/O.
fn ws_error(error: yawc::WebSocketError, max_size: usize) -> WsError {
    use yawc::WebSocketError as E;
    match error {
        E::FrameTooLarge => WsError::Capacity(CapacityError::MessageTooLong {
            size: max_size.saturating_add(1),
            max_size,
        }),
        E::InvalidUTF8 => WsError::Utf8("invalid UTF-8 in a text message".into()),
        E::ConnectionClosed => WsError::ConnectionClosed,
        E::IoError(error) => WsError::Io(error),
        E::ReservedBitsNotZero => WsError::Protocol(ProtocolError::NonZeroReservedBits),
        E::ControlFrameFragmented => WsError::Protocol(ProtocolError::FragmentedControlFrame),
        E::PingFrameTooLarge => WsError::Protocol(ProtocolError::ControlFrameTooBig),
        E::InvalidOpCode(code) => WsError::Protocol(ProtocolError::UnknownDataFrameType(code)),
        E::InvalidFragment | E::InvalidContinuationFrame | E::FragmentTimeout => {
            WsError::Protocol(ProtocolError::UnexpectedContinueFrame)
        }
        E::InvalidCloseFrame | E::InvalidCloseCode => {
            WsError::Protocol(ProtocolError::InvalidCloseSequence)
        }
        E::CompressionNotSupported => WsError::Protocol(ProtocolError::NonZeroReservedBits),
        other => WsError::Io(io::Error::other(other.to_string())),
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
