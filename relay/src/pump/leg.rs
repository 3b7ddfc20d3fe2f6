//! A leg is one side of a session: a WebSocket the relay reads and writes messages on. Most
//! legs are real sockets; in mux mode a leg is a stream on a shared link. The pump and the
//! session work with any [`Leg`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error as WsError, Message};
use wsrelay_protocol::MuxStream;

use crate::websocket::WebSocket;

/// What the pump needs of a leg beyond reading and writing messages.
pub trait Leg:
    Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin
{
    /// True when the relay pings this leg itself. A mux stream is kept alive by its link's
    /// keepalive, so the relay neither pings it nor expects pongs from it.
    fn pings(&self) -> bool;

    /// Payload bytes sent on this leg since it opened that the peer has confirmed consuming,
    /// when the leg can tell (a mux stream, from its returned flow-control credit); `None`
    /// for a socket, whose acknowledgements come from ping/pong instead.
    fn acknowledged_bytes(&self) -> Option<u64>;

    /// For a leg that doesn't ping (a mux stream): `Ready` once the peer has confirmed
    /// consuming the first `through` payload bytes sent on it and everything it sent before
    /// that was read; otherwise `cx` is woken when that may have changed. A leg that pings is
    /// acknowledged by its pongs instead and is always `Ready` here.
    fn poll_acknowledged(&mut self, cx: &mut Context<'_>, through: u64) -> Poll<()>;

    /// True when closing waits for the peer's Close in return (a socket's close handshake); a
    /// mux stream's Close is one frame on its link.
    fn awaits_close_reply(&self) -> bool;

    /// Gives back buffers a burst grew and nothing fills now; called at keepalive checks. A
    /// socket leg keeps none between reads and writes, so by default this does nothing.
    fn release_idle_buffers(&mut self) {}

    /// [`Sink::start_send`] of a message the caller keeps (the replay log's copy of what went
    /// to a backend). A socket encodes it from the borrow; a clone would allocate, as the first
    /// clone of a payload read into a buffer of its own allocates its shared count.
    fn start_send_kept(&mut self, message: &Message) -> Result<(), WsError> {
        Pin::new(self).start_send(message.clone())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Leg for WebSocket<S> {
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

    fn start_send_kept(&mut self, message: &Message) -> Result<(), WsError> {
        self.send_borrowed(message)
    }
}

/// A mux stream as a leg.
pub struct StreamLeg {
    stream: MuxStream,
}

impl StreamLeg {
    /// Wraps `stream`.
    pub fn new(stream: MuxStream) -> StreamLeg {
        StreamLeg { stream }
    }
}

impl Leg for StreamLeg {
    fn pings(&self) -> bool {
        false
    }

    fn acknowledged_bytes(&self) -> Option<u64> {
        Some(self.stream.acknowledged_bytes())
    }

    fn poll_acknowledged(&mut self, cx: &mut Context<'_>, through: u64) -> Poll<()> {
        self.stream.poll_acknowledged(cx, through)
    }

    fn awaits_close_reply(&self) -> bool {
        false
    }

    fn release_idle_buffers(&mut self) {
        self.stream.release_idle_buffer();
    }
}

impl Stream for StreamLeg {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.stream).poll_next(cx)
    }
}

impl Sink<Message> for StreamLeg {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.stream).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        Pin::new(&mut self.stream).start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.stream).poll_close(cx)
    }
}

/// One side of a session: its own socket, or a stream on a mux link.
pub enum AnyLeg<S> {
    /// A WebSocket of its own.
    Socket(WebSocket<S>),
    /// A stream on a mux link.
    Stream(StreamLeg),
}

/// The connection under a backend WebSocket: plain TCP for `ws://`, TLS over it for `wss://`.
/// The TLS session is boxed: it is over a kilobyte, and every plain backend leg would carry
/// that much otherwise.
pub type BackendStream =
    tokio_util::either::Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The backend side of a session: one WebSocket per client (per-client mode) or a stream on a
/// shared link (mux mode).
pub type BackendLeg = AnyLeg<BackendStream>;

macro_rules! each_leg {
    ($self:expr, $leg:ident => $body:expr) => {
        match $self {
            AnyLeg::Socket($leg) => $body,
            AnyLeg::Stream($leg) => $body,
        }
    };
}

impl<S: AsyncRead + AsyncWrite + Unpin> Leg for AnyLeg<S> {
    fn pings(&self) -> bool {
        each_leg!(self, leg => leg.pings())
    }

    fn acknowledged_bytes(&self) -> Option<u64> {
        each_leg!(self, leg => leg.acknowledged_bytes())
    }

    fn poll_acknowledged(&mut self, cx: &mut Context<'_>, through: u64) -> Poll<()> {
        each_leg!(self, leg => leg.poll_acknowledged(cx, through))
    }

    fn awaits_close_reply(&self) -> bool {
        each_leg!(self, leg => leg.awaits_close_reply())
    }

    fn release_idle_buffers(&mut self) {
        each_leg!(self, leg => leg.release_idle_buffers())
    }

    fn start_send_kept(&mut self, message: &Message) -> Result<(), WsError> {
        each_leg!(self, leg => leg.start_send_kept(message))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for AnyLeg<S> {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        each_leg!(self.get_mut(), leg => Pin::new(leg).poll_next(cx))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for AnyLeg<S> {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        each_leg!(self.get_mut(), leg => Pin::new(leg).poll_ready(cx))
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        each_leg!(self.get_mut(), leg => Pin::new(leg).start_send(item))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        each_leg!(self.get_mut(), leg => Pin::new(leg).poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        each_leg!(self.get_mut(), leg => Pin::new(leg).poll_close(cx))
    }
}

/// Time allowed for a close handshake once the relay has decided to close a leg.
pub const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Sends our Close (or completes the peer's), then reads until the peer ends the connection,
/// within [`CLOSE_HANDSHAKE_TIMEOUT`]. Data that arrives meanwhile is dropped: the other leg
/// is closing too.
pub async fn close_leg<L: Leg>(leg: &mut L, frame: Option<CloseFrame>) {
    // Boxed: rare work should not grow every session's future, which lives as long as its
    // client.
    Box::pin(async move {
        let finish = async {
            // If the peer closed first, tungstenite has queued the echo of its Close and
            // refuses a second one; `SinkExt::close` then only flushes that echo.
            let _ = leg.send(Message::Close(frame)).await;
            if SinkExt::close(leg).await.is_err() || !leg.awaits_close_reply() {
                return;
            }
            // tungstenite ends the stream once the close handshake is complete.
            while let Some(Ok(_)) = leg.next().await {}
        };
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, finish).await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_backend_stream_costs_about_what_its_tcp_stream_does() {
        assert!(
            std::mem::size_of::<BackendStream>() <= 2 * std::mem::size_of::<TcpStream>(),
            "{} bytes",
            std::mem::size_of::<BackendStream>()
        );
    }
}
