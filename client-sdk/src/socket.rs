//! The socket a [`Client`](crate::Client) connection runs on: tungstenite's, or a
//! `permessage-deflate` one when the server agreed to compression. Both are a `Stream` and a
//! `Sink` of tungstenite messages, so the connection task does not know which it has.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Sink, Stream};
use tokio_tungstenite::WebSocketStream;
use tungstenite::{Error as WsError, Message};

use crate::deflate::{DeflateStream, Rewind};
use crate::dial::Transport;

/// One connection's WebSocket.
#[expect(
    clippy::large_enum_variant,
    reason = "one per connection, moved once into its task: boxing would only add a pointer chase per frame"
)]
pub(crate) enum Socket {
    /// Uncompressed: tungstenite, as without [`Deflate`](crate::Deflate).
    Plain(WebSocketStream<Transport>),
    /// `permessage-deflate`.
    Deflate(DeflateStream<Rewind<Transport>>),
}

macro_rules! either {
    ($self:expr, $socket:ident => $body:expr) => {
        match $self {
            Socket::Plain($socket) => $body,
            Socket::Deflate($socket) => $body,
        }
    };
}

impl Stream for Socket {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        either!(self.get_mut(), socket => Pin::new(socket).poll_next(cx))
    }
}

impl Sink<Message> for Socket {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        either!(self.get_mut(), socket => Pin::new(socket).poll_ready(cx))
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        either!(self.get_mut(), socket => Pin::new(socket).start_send(item))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        either!(self.get_mut(), socket => Pin::new(socket).poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        either!(self.get_mut(), socket => Pin::new(socket).poll_close(cx))
    }
}
