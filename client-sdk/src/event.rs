//! What a [`Client`](crate::Client) tells its application ([`Event`]) and the data messages
//! it carries both ways ([`Message`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tungstenite::Utf8Bytes;

use crate::deflate::Negotiated;
use crate::dial::ConnectError;

/// A WebSocket data message: text or binary. (Pings, pongs and close frames are the
/// client's business and never show up here.)
///
/// Payloads are reference-counted ([`Utf8Bytes`], [`Bytes`]): cloning one does not copy it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Message {
    /// A text message (valid UTF-8).
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
}

impl Message {
    /// A text message.
    pub fn text(text: impl Into<Utf8Bytes>) -> Message {
        Message::Text(text.into())
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Message {
        Message::Binary(data.into())
    }

    /// The text, if this is a text message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Message::Text(text) => Some(text.as_str()),
            Message::Binary(_) => None,
        }
    }

    /// The payload's bytes, text or binary.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(data) => data,
        }
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// True for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Converts from a tungstenite message; `None` for control frames.
    pub fn from_tungstenite(message: tungstenite::Message) -> Option<Message> {
        match message {
            tungstenite::Message::Text(text) => Some(Message::Text(text)),
            tungstenite::Message::Binary(data) => Some(Message::Binary(data)),
            _ => None,
        }
    }
}

impl From<Message> for tungstenite::Message {
    fn from(message: Message) -> tungstenite::Message {
        match message {
            Message::Text(text) => tungstenite::Message::Text(text),
            Message::Binary(data) => tungstenite::Message::Binary(data),
        }
    }
}

impl From<String> for Message {
    fn from(text: String) -> Message {
        Message::Text(text.into())
    }
}

impl From<&str> for Message {
    fn from(text: &str) -> Message {
        Message::Text(text.into())
    }
}

impl From<Utf8Bytes> for Message {
    fn from(text: Utf8Bytes) -> Message {
        Message::Text(text)
    }
}

impl From<Vec<u8>> for Message {
    fn from(data: Vec<u8>) -> Message {
        Message::Binary(data.into())
    }
}

impl From<&[u8]> for Message {
    fn from(data: &[u8]) -> Message {
        Message::Binary(Bytes::copy_from_slice(data))
    }
}

impl From<Bytes> for Message {
    fn from(data: Bytes) -> Message {
        Message::Binary(data)
    }
}

/// Something that happened to a [`Client`](crate::Client), in order. Read them with
/// [`Client::next_event`](crate::Client::next_event).
///
/// A client's life reads: `Connected`, any number of `Message`s, `Disconnected`, then either
/// `Reconnecting` (one per attempt) and `Connected` again, or `Closed`, after which
/// `next_event` returns `None`.
#[derive(Debug, Clone)]
pub enum Event {
    /// A connection opened (the first, or a reconnect).
    Connected(Connected),
    /// A message from the server.
    Message(Message),
    /// The connection ended. Unless a `Closed` follows, the client reconnects.
    Disconnected {
        /// The server's close code; `None` when the connection was lost without a close
        /// frame (dropped, reset, or silent past the heartbeat's pong timeout). A close frame
        /// without a code shows as 1005.
        code: Option<u16>,
        /// The server's close reason, or what happened to the connection.
        reason: String,
    },
    /// The client will dial again after `delay`.
    Reconnecting {
        /// The attempt this is, from 1 (reset by every connection that opens).
        attempt: u32,
        /// The backoff wait before the attempt.
        delay: Duration,
        /// Why the previous attempt failed; `None` for the first attempt after a lost
        /// connection (see the `Disconnected` before it).
        error: Option<Arc<ConnectError>>,
    },
    /// The client stopped for good: the last event.
    Closed(CloseReason),
}

/// About a connection that just opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    /// The subprotocol the server picked, if any.
    pub protocol: Option<String>,
    /// Which connection of this client this is: 1 for the first, 2 after one reconnect...
    pub connection: u64,
    /// The `permessage-deflate` parameters the server agreed to, when the client offered it
    /// ([`ClientBuilder::deflate`](crate::ClientBuilder::deflate)) and the server accepted;
    /// `None` for an uncompressed connection.
    pub compression: Option<Negotiated>,
}

impl Connected {
    /// True for every connection after the first.
    pub fn is_reconnect(&self) -> bool {
        self.connection > 1
    }

    /// True when messages on this connection are compressed (`permessage-deflate`).
    pub fn is_compressed(&self) -> bool {
        self.compression.is_some()
    }
}

/// Why a [`Client`](crate::Client) stopped for good.
#[derive(Debug, Clone)]
pub enum CloseReason {
    /// The application closed it ([`Client::close`](crate::Client::close)), or dropped every
    /// handle (code 1000, reason `"client dropped"`).
    Local {
        /// The close code sent.
        code: u16,
        /// The close reason sent.
        reason: String,
    },
    /// The server closed with a code in [`Reconnect::stop_codes`](crate::Reconnect::stop_codes)
    /// (by default 1000, 1005 or 1008), or any code while reconnecting is off.
    Remote {
        /// The server's close code (1005: the frame had none).
        code: u16,
        /// The server's close reason.
        reason: String,
    },
    /// A connection was lost without a close frame while reconnecting is off.
    Lost {
        /// What happened.
        reason: String,
    },
    /// A dial failed in a way retrying cannot fix ([`ConnectError::is_permanent`]), e.g. the
    /// server answered 401 or 404.
    Refused(Arc<ConnectError>),
    /// [`Reconnect::max_attempts`](crate::Reconnect::max_attempts) attempts in a row failed.
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Why the last one failed.
        last_error: Option<Arc<ConnectError>>,
    },
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Local { code, reason } => {
                write!(f, "closed by the application ({code} {reason})")
            }
            CloseReason::Remote { code, reason } => {
                write!(f, "closed by the server ({code} {reason})")
            }
            CloseReason::Lost { reason } => {
                write!(f, "connection lost and reconnecting is off: {reason}")
            }
            CloseReason::Refused(error) => write!(f, "refused, not retried: {error}"),
            CloseReason::GaveUp {
                attempts,
                last_error: Some(error),
            } => write!(f, "gave up after {attempts} attempts: {error}"),
            CloseReason::GaveUp {
                attempts,
                last_error: None,
            } => write!(f, "gave up after {attempts} attempts"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_convert_from_common_types() {
        assert_eq!(Message::from("hi").as_text(), Some("hi"));
        assert_eq!(Message::from(String::from("hi")), Message::text("hi"));
        assert_eq!(Message::from(vec![1u8, 2]).as_bytes(), &[1, 2]);
        assert_eq!(Message::from(&b"ab"[..]).len(), 2);
        assert!(Message::binary(Bytes::new()).is_empty());
        let wire: tungstenite::Message = Message::text("x").into();
        assert_eq!(Message::from_tungstenite(wire), Some(Message::text("x")));
        assert_eq!(
            Message::from_tungstenite(tungstenite::Message::Ping(Bytes::new())),
            None
        );
    }
}
