//! A leg is one side of a session: a WebSocket the relay reads and writes messages on. Most
//! legs are real sockets; in mux mode a leg is a stream on a shared link. The pump and the
//! session work with any [`Leg`].

use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tungstenite::{Error as WsError, Message};

/// What the pump needs of a leg beyond reading and writing messages.
pub trait Leg:
    Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin
{
    /// True when the relay pings this leg itself. A mux stream is kept alive by its link's
    /// keepalive, so the relay neither pings it nor expects pongs from it.
    fn pings(&self) -> bool;

    /// Payload bytes sent on this leg that the peer has not yet confirmed consuming, when the
    /// leg can tell (a mux stream, from its flow-control credit); `None` for a socket, whose
    /// acknowledgements come from ping/pong instead.
    fn unconfirmed_bytes(&self) -> Option<u64>;
}

impl<S: AsyncRead + AsyncWrite + Unpin> Leg for WebSocketStream<S> {
    fn pings(&self) -> bool {
        true
    }

    fn unconfirmed_bytes(&self) -> Option<u64> {
        None
    }
}
