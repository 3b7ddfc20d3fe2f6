//! [`DeflateStream`]: a yawc WebSocket that reads and writes tungstenite [`Message`]s, with
//! tungstenite's close behaviour, for either end of a connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Error as WsError, Message, Utf8Bytes};
use yawc::{Frame, OpCode, Options, Role, WebSocket};

/// A WebSocket with `permessage-deflate` over an upgraded connection, speaking tungstenite
/// [`Message`]s: a `Stream` of what arrives (decompressed) and a `Sink` of what to send.
///
/// It keeps the close behaviour code written for tungstenite relies on: the peer's Close is
/// answered by the stream itself (on the next read or flush), a second Close is not sent (nor
/// an echo of the peer's answer to this end's Close), a
/// peer that sent something invalid gets the Close for it (1009, 1007, 1002) before the
/// error is returned, and the stream ends once the close handshake is done. Pings are
/// answered by it, as tungstenite does. Errors are tungstenite's: too big is
/// [`WsError::Capacity`], bad UTF-8 [`WsError::Utf8`], the rest protocol or I/O errors.
///
/// A [`Client`](crate::Client) uses one for a compressed connection; the relay uses one for
/// a compressed client leg.
pub struct DeflateStream<S> {
    socket: WebSocket<S>,
    /// A Close was read from the peer (the stream has answered it) or reading failed (and
    /// the stream sent its own Close with the code for the failure).
    peer_closed: bool,
    /// A Close was sent, by the owner or by the stream.
    close_sent: bool,
    /// The peer answered a Close this end had sent: the close handshake is over. yawc has
    /// queued an echo of that answer all the same, which must not go out (a second Close).
    answered: bool,
    /// The largest message the peer may send (`max_message_size`), for the errors.
    max_message: usize,
}

impl<S> std::fmt::Debug for DeflateStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeflateStream")
            .field("peer_closed", &self.peer_closed)
            .field("close_sent", &self.close_sent)
            .field("answered", &self.answered)
            .field("max_message", &self.max_message)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> DeflateStream<S> {
    /// Wraps `io`, whose handshake agreed to `extensions` (the `Sec-WebSocket-Extensions`
    /// value both ends run with), as `role`. `options` must enable compression (its level,
    /// threshold and pool are used; the window and context parameters come from
    /// `extensions`); `max_message` is the largest message accepted from the peer, for the
    /// errors (`options`' limits enforce it).
    pub fn new(
        io: S,
        role: Role,
        extensions: &str,
        options: Options,
        max_message: usize,
    ) -> Result<Self, yawc::WebSocketError> {
        let socket = WebSocket::from_stream_with_extensions(io, role, Some(extensions), options)?;
        Ok(DeflateStream {
            socket,
            peer_closed: false,
            close_sent: false,
            answered: false,
            max_message,
        })
    }
}

/// yawc's limit for a connection under `config`: yawc's limits are exclusive, tungstenite's
/// inclusive. One bound covers a frame's payload before and after inflating it, so it is the
/// message limit: a single-frame message may be as large as a message may be, and inflating
/// stops, with 1009, as soon as the output would pass it.
pub(crate) fn exclusive_limit(config: &WebSocketConfig) -> usize {
    config.max_message_size.unwrap_or(usize::MAX - 1) + 1
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for DeflateStream<S> {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.answered {
            // Polling yawc again would write its echo.
            return Poll::Ready(None);
        }
        loop {
            let frame = match ready!(this.socket.poll_next_frame(cx)) {
                Ok(frame) => frame,
                Err(yawc::WebSocketError::ConnectionClosed) => {
                    // After a Close either way the stream just ends, as tungstenite's does;
                    // before one, the peer went away without closing.
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
                    // yawc queued the echo of this Close; it is the answer to the peer's Close,
                    // or a duplicate when this end closed first.
                    this.answered = this.close_sent;
                    this.close_sent = true;
                    Message::Close(close_frame(&payload))
                }
                // yawc assembles fragments: a lone continuation can't come out of it.
                OpCode::Continuation => continue,
            };
            return Poll::Ready(Some(Ok(message)));
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for DeflateStream<S> {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.answered {
            // yawc would first write its queued echo; what could follow is refused anyway.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.socket)
            .poll_ready(cx)
            .map_err(|e| ws_error(e, self.max_message))
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        let this = &mut *self;
        if this.answered {
            // As tungstenite after a close handshake: nothing more goes out.
            return match message {
                Message::Close(_) => Ok(()),
                _ => Err(WsError::Protocol(ProtocolError::SendAfterClosing)),
            };
        }
        let frame = match message {
            Message::Text(text) => Frame::text(Bytes::from(text)),
            Message::Binary(data) => Frame::binary(data),
            Message::Ping(data) => Frame::ping(data),
            Message::Pong(data) => Frame::pong(data),
            Message::Close(frame) => {
                if this.close_sent {
                    // The peer's Close was answered already, or the stream sent its own on a
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
            // Raw frames would bypass compression; nothing here sends them.
            Message::Frame(_) => return Ok(()),
        };
        let max_message = this.max_message;
        Pin::new(&mut this.socket)
            .start_send(frame)
            .map_err(|e| ws_error(e, max_message))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.answered {
            // This end's Close went out before the answer came in: nothing is left to write.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.socket)
            .poll_flush(cx)
            .map_err(|e| ws_error(e, self.max_message))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        // yawc's own close skips the frames it queued itself (the echo of the peer's Close,
        // the Close of a failure); getting ready sends them first, so the peer gets them
        // rather than a plain 1000. After an answered Close the one queued is a duplicate.
        if !self.answered {
            let _ = ready!(Pin::new(&mut self.socket).poll_ready(cx));
        }
        Pin::new(&mut self.socket)
            .poll_close(cx)
            .map_err(|e| ws_error(e, self.max_message))
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

/// yawc's error as the tungstenite error code written for tungstenite already understands:
/// too big is a capacity error (1009), bad UTF-8 a UTF-8 error (1007), the rest protocol
/// errors (1002) or I/O.
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
