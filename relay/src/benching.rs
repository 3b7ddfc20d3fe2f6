//! The entry point of the pump benchmark in `relay/benches/pump.rs`, hidden from the
//! documentation: not part of the API.
//!
//! The pump is crate-private (its types change as it is optimised), so the benchmark gets one
//! function that runs it between two WebSocket streams of the caller's, e.g. over
//! `tokio::io::duplex`, rather than the pump's types themselves.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;

use crate::pump::{KeepalivePolicy, PumpState};

/// Relays messages both ways between `client` (the relay's end of a client connection, role
/// server) and `backend` (its end of a backend connection, role client) with the relay's pump,
/// as a per-client session does, without keepalive, idle timeout, replay or hooks, until one
/// side closes or fails; returns how it ended, as the relay would log it.
pub async fn pump<C, B>(client: &mut WebSocketStream<C>, backend: &mut WebSocketStream<B>) -> String
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let policy = KeepalivePolicy {
        ping_interval: None,
        pong_timeout: Duration::from_secs(30),
        idle_timeout: None,
    };
    let mut state = PumpState::new(policy, Instant::now(), false, ());
    state
        .run(client, backend, std::future::pending())
        .await
        .to_string()
}
