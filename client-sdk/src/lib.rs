//! The wsrelay client SDK: what a Rust application (a chat client, a bot, a service) uses to
//! talk through [wsrelay](https://crates.io/crates/wsrelay), or to any WebSocket server.
//!
//! - [`Client`]: a WebSocket client that stays connected. It reconnects with exponential
//!   backoff and full jitter when the server restarts, goes away or the network drops,
//!   pings a quiet connection to find a dead one, queues what you send while it is down and
//!   writes it, in order, once it is back. You read what happens as [`Event`]s.
//! - [`MuxClient`]: one WebSocket to a relay route in mode "mux" carrying any number of
//!   logical WebSockets, each with its own URL path; it re-dials its link with the same
//!   [`Reconnect`] policy.
//! - [`MuxServer`]: the backend side of mux mode. It accepts mux links from relays and yields
//!   a [`VirtualConnection`] (path, query, headers, client address) per client; accept it to
//!   get a [`MuxStream`] that reads and writes messages like a WebSocket.
//!
//! # A chat client in 20 lines
//!
//! ```no_run
//! use wsrelay_client::{Client, Event, QueuePolicy};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let mut client = Client::builder("ws://127.0.0.1:8080/chat")
//!         .queue(QueuePolicy::Buffer { max_messages: 100 })
//!         // Written first on every connection: a reconnect restores the session.
//!         .on_connect(|_| vec![r#"{"type":"nick","name":"ann"}"#.into()])
//!         .connect()
//!         .await?;
//!     client.send(r#"{"type":"say","text":"hello"}"#).await?;
//!     while let Some(event) = client.next_event().await {
//!         match event {
//!             Event::Message(message) => println!("{}", message.as_text().unwrap_or("<binary>")),
//!             Event::Disconnected { code, reason } => println!("* lost ({code:?} {reason})"),
//!             Event::Reconnecting { attempt, delay, .. } => println!("* retry {attempt} in {delay:?}"),
//!             Event::Connected(c) if c.is_reconnect() => println!("* reconnected"),
//!             Event::Closed(why) => println!("* {why}"),
//!             _ => {}
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! # How the client behaves
//!
//! **Connecting.** [`ClientBuilder::connect`] dials once and returns the error if that fails
//! (a wrong URL, 401, 404 show up at once); [`ClientBuilder::start`] returns at once and keeps
//! dialing in the background by the reconnect policy. Each dial (TCP, TLS for `wss://`,
//! WebSocket handshake) is bounded by the connect timeout. TLS is rustls (ring provider) with
//! the system's trust roots, or the CA you give ([`Tls`]).
//!
//! **Reconnecting** ([`Reconnect`]). After a lost connection, attempt `n` waits
//! `min(max, min + uniform(0 ..= min(max, min * 2^(n-1))))` (see [`Backoff`]), then dials; an
//! open connection resets `n`. Whether a server's close reconnects depends on its code: 1001
//! (going away), 1012 (service restart), 1013 (try again later), every other code and a
//! connection lost without a close frame reconnect; 1000 (normal), 1005 (no code) and 1008
//! (policy violation) end the client ([`Reconnect::stop_codes`]). A dial refused for good
//! ([`ConnectError::is_permanent`]: HTTP 4xx other than 408/429, a subprotocol mismatch, an
//! unusable TLS setup) ends it too; a 503's `Retry-After` lengthens the wait.
//!
//! **Heartbeat** ([`Heartbeat`]). After `interval` without hearing from the server the client
//! pings; if nothing arrives within `timeout` the connection is declared dead and the client
//! reconnects.
//!
//! **Sending** ([`QueuePolicy`]). Messages go through one bounded queue, in order.
//! `Buffer { max_messages }` keeps them while disconnected and writes them on the next
//! connection, after the [`on_connect`](ClientBuilder::on_connect) messages that restore the
//! session; `FailFast` refuses them while disconnected. No message is ever written twice; one
//! already written to a socket that then died is not replayed (see [`QueuePolicy`] for the
//! exact guarantee).
//!
//! **Compression** ([`Deflate`]). [`ClientBuilder::deflate`] offers `permessage-deflate`
//! (RFC 7692) on every dial, as a browser does; it is off by default, and then the handshake
//! and the frames are exactly as without it. A server that accepts gets a compressed
//! connection (a relay route with `compression = "client"` does), one that declines an
//! uncompressed one; an answer naming an extension or parameter the client did not offer, or a
//! window it can't honour, fails the dial with [`ConnectError::Extension`]. Messages, events,
//! heartbeat, queueing, close codes and limits are the same either way
//! ([`max_message_size`](ClientBuilder::max_message_size) bounds the decompressed message);
//! [`Connected::compression`] says what was agreed, on each connection.
//!
//! **Events** ([`Event`]): `Connected`, `Message`, `Disconnected { code, reason }`,
//! `Reconnecting { attempt, delay, error }`, and a last `Closed(reason)`. They wait in a
//! bounded queue: a client whose application does not read stops reading its socket.
//!
//! # Examples
//!
//! `cargo run --release -p wsrelay-client --example NAME -- ...`:
//! `chat_cli` (a terminal chat client that survives relay restarts), `chat_backend`
//! (multi-room chat in mux mode) and `mux_echo_backend` (echo; `whoami` answers `--name`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod builder;
pub mod client;
mod connection;
pub mod deflate;
pub mod dial;
pub mod event;
pub mod mux_client;
pub mod mux_server;
pub mod reconnect;
mod socket;
pub mod tls;

pub use backoff::{Backoff, Jitter};
pub use builder::ClientBuilder;
pub use client::{Client, ClientSender, Heartbeat, QueuePolicy, SendError, State};
pub use deflate::{Deflate, ExtensionError, Negotiated};
pub use dial::{CONNECT_TIMEOUT, ConnectError};
pub use event::{CloseReason, Connected, Event, Message};
pub use mux_client::{MuxClient, MuxClientBuilder};
pub use mux_server::{MuxServer, ServerError, VirtualConnection};
pub use reconnect::Reconnect;
pub use tls::{Tls, TlsError};
pub use wsrelay_protocol::link::{LinkConfig, LinkError, MuxStream, OpenError, OpenRequest};
