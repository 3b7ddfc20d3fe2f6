//! Mux mode (DESIGN 5): instead of one backend WebSocket per client, the relay keeps
//! `mux_links` links open to each backend of a mux upstream and carries every client as a
//! stream on the least loaded one. The wire protocol and the link engine live in
//! `wsrelay-protocol`; this module owns the links: `pool` dials and re-dials them, `open` turns a
//! client into a stream.

mod clients;
mod open;
mod pool;

pub(crate) use clients::serve_mux_client;
pub(crate) use open::{Opened, open_stream};
pub use pool::MuxPool;

/// The WebSocket subprotocol a mux link is opened with.
pub use wsrelay_protocol::LINK_SUBPROTOCOL;
