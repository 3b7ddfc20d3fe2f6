//! The wsrelay client SDK.
//!
//! - [`MuxServer`]: the backend side of mux mode. It accepts mux links from relays and yields a
//!   [`VirtualConnection`] (path, query, headers, client address) per client; accept it to get a
//!   [`MuxStream`] that reads and writes messages like a WebSocket.
//! - [`MuxClient`]: the client side. One WebSocket to a relay route in mode "mux" carries any
//!   number of logical WebSockets, each with its own URL path.
//!
//! Both run the link engine of [`wsrelay_protocol::link`]; see that crate's README for the wire
//! protocol, flow control and close semantics.
//!
//! Examples (`cargo run --release -p wsrelay-client --example NAME -- --listen ADDR`):
//! `mux_echo_backend` (echo, and `whoami` answers `--name`) and `chat_backend` (multi-room chat).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod mux_client;
pub mod mux_server;

pub use mux_client::{ConnectError, MuxClient};
pub use mux_server::{MuxServer, ServerError, VirtualConnection};
pub use wsrelay_protocol::link::{LinkConfig, LinkError, MuxStream, OpenError, OpenRequest};
