//! Why a link ended ([`LinkError`]) and why a stream could not be opened ([`OpenError`]).

use crate::version::Side;

/// Why a link ended, or could not be established.
///
/// [`LinkDriver`](super::LinkDriver) resolves to one of these,
/// [`LinkHandle::closed`](super::LinkHandle::closed) returns a clone of it, and every stream
/// still open when the link ends sees its text in an `io::ErrorKind::ConnectionAborted` error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The peer broke the protocol (a malformed or unknown frame, a text message, a credit
    /// overrun, a frame for a stream that was never opened, a failed negotiation...). This end
    /// closed the link with WebSocket close code 1002 and `reason`.
    #[error("protocol error: {reason}")]
    Protocol {
        /// What was wrong, e.g. `unknown frame type tag 0x42 at byte 2`.
        reason: String,
    },
    /// The peer sent a WebSocket message larger than this end accepts; this end closed the
    /// link with 1009.
    #[error("peer sent a {size}-byte message, over this link's limit of {limit} bytes")]
    MessageTooBig {
        /// The message's size in bytes.
        size: usize,
        /// The largest message this end accepts (`max_frame + 64 KiB`).
        limit: usize,
    },
    /// The peer closed the WebSocket without a `GoAway` first.
    #[error("link closed by the peer with code {code}{}{reason}", if reason.is_empty() { "" } else { ": " })]
    Closed {
        /// The close code the peer sent (1005 if its close frame had none).
        code: u16,
        /// The close reason the peer sent.
        reason: String,
    },
    /// The link shut down cleanly after a `GoAway`: no streams were left.
    #[error("link shut down after a GoAway from the {side} side: {reason}")]
    GoAway {
        /// Which end sent the `GoAway` (the local one if both did).
        side: Side,
        /// The `GoAway` reason.
        reason: String,
    },
    /// No `Hello` arrived in time, or no frame at all arrived within `pong_timeout` after a
    /// ping: the peer is presumed dead.
    #[error(
        "link timed out: the peer sent nothing within the pong timeout after a ping (or no Hello in time)"
    )]
    Timeout,
    /// The WebSocket failed: a socket error, or the connection ended without a close frame.
    #[error("link I/O error: {reason}")]
    Io {
        /// The underlying error's text.
        reason: String,
    },
    /// The [`LinkConfig`](super::LinkConfig) cannot be used (e.g. `initial_window < max_frame`).
    #[error("invalid link configuration: {reason}")]
    Config {
        /// What is wrong with it.
        reason: String,
    },
    /// Every [`LinkHandle`](super::LinkHandle) was dropped and no stream was left, so nothing
    /// could use the link any more; this end closed it with 1000.
    #[error("link released: every handle was dropped and no stream was open")]
    Released,
    /// The [`LinkDriver`](super::LinkDriver) future was dropped before the link ended.
    #[error("link driver was dropped")]
    Aborted,
}

impl LinkError {
    /// True for the ends that are part of normal operation: a clean shutdown after `GoAway`, a
    /// released link, or a peer's close with 1000 or 1001.
    pub fn is_graceful(&self) -> bool {
        match self {
            LinkError::GoAway { .. } | LinkError::Released => true,
            LinkError::Closed { code, .. } => matches!(code, 1000 | 1001),
            _ => false,
        }
    }

    pub(crate) fn io(e: impl std::fmt::Display) -> LinkError {
        LinkError::Io {
            reason: e.to_string(),
        }
    }

    pub(crate) fn protocol(reason: impl Into<String>) -> LinkError {
        LinkError::Protocol {
            reason: reason.into(),
        }
    }
}

/// Why [`LinkHandle::open`](super::LinkHandle::open) did not produce a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The peer answered the `Open` with `Reject` (or this end refused it locally: 503 when the
    /// link is at `max_streams`, 500 when `open` is called on the acceptor side of a link).
    #[error("stream rejected with status {status}: {reason}")]
    Rejected {
        /// The HTTP status to answer the client's handshake with.
        status: u16,
        /// The peer's reason.
        reason: String,
    },
    /// The link ended before the stream was accepted.
    #[error("stream could not be opened: {0}")]
    Link(LinkError),
    /// A `GoAway` was sent or received on the link: it takes no new streams. Open the stream on
    /// another link.
    #[error("link is going away and takes no new streams")]
    GoingAway,
}
