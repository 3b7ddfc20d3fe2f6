//! The wsrelay mux wire protocol.
//!
//! In mux mode one WebSocket link carries many client WebSockets as *streams*. Each binary
//! WebSocket message on a link holds one or more frames ([`Frame`]), encoded with bincode 2.
//! The crate has a sans-IO core: the frame types, their encoder and bounded decoder
//! ([`encode_into`], [`decode_all`]) and version negotiation ([`negotiate`]), which do no I/O;
//! and the async [`link`] engine that runs the protocol over a tokio-tungstenite WebSocket
//! ([`Link::establish`], [`LinkHandle`], [`MuxStream`]).
//!
//! The byte-level wire format is specified in the crate's `README.md`.
//!
//! ```
//! use bytes::Bytes;
//! use wsrelay_protocol::{decode_all, encode_into, Frame, Hello, Limits};
//!
//! let mut message = Vec::new();
//! encode_into(&Frame::Hello(Hello::new(1 << 20, 1 << 20)), &mut message);
//! encode_into(
//!     &Frame::Data { stream: 1, text: true, payload: Bytes::from_static(b"hi") },
//!     &mut message,
//! );
//! let frames: Vec<Frame> = decode_all(Bytes::from(message), &Limits::default())
//!     .collect::<Result<_, _>>()
//!     .unwrap();
//! assert_eq!(frames.len(), 2);
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod frame;
pub mod link;
pub mod version;

pub use frame::{
    DecodeError, Frame, FrameDecoder, FrameType, Hello, LINK_STREAM, Limits, MESSAGE_SLACK,
    WIRE_CONFIG, decode_all, decode_frame, encode, encode_into, max_message_len,
};
pub use link::{
    IncomingStream, LINK_SUBPROTOCOL, Link, LinkConfig, LinkDriver, LinkError, LinkHandle,
    LinkRole, LinkSocket, MuxStream, OpenError, OpenRequest,
};
pub use version::{
    LinkParams, MIN_PROTOCOL_VERSION, NegotiateError, PROTOCOL_VERSION, Side, negotiate,
};

/// The WebSocket close code a receiver sends when it closes a link for a protocol error: an
/// unknown frame type, a malformed frame ([`DecodeError`]) or a failed [`negotiate`].
pub const PROTOCOL_ERROR: u16 = 1002;
