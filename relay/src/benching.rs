//! The entry point of the pump benchmark in `relay/benches/pump.rs`, hidden from the
//! documentation: not part of the API.
//!
//! The pump and its WebSocket legs are crate-private (their types change as they are
//! optimised), so the benchmark gets one function that runs them between two byte streams of
//! the caller's, e.g. `tokio::io::duplex` pipes, rather than the types themselves.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::pump::{AnyLeg, KeepalivePolicy, PumpState};
use crate::websocket::WebSocket;

/// Relays messages both ways between `client` (the relay's end of a client connection, whose
/// WebSocket handshake is done) and `backend` (its end of a backend connection, likewise) with
/// the relay's WebSocket legs and pump, as a per-client session does with `config`'s limits,
/// without keepalive, idle timeout, replay or hooks, until one side closes or fails; returns
/// how it ended, as the relay would log it.
pub async fn pump<C, B>(client: C, backend: B, config: &WebSocketConfig) -> String
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let policy = KeepalivePolicy {
        ping_interval: None,
        pong_timeout: Duration::from_secs(30),
        idle_timeout: None,
    };
    let mut client = AnyLeg::Socket(WebSocket::new(client, Role::Server, config, &[]));
    let mut backend = AnyLeg::Socket(WebSocket::new(backend, Role::Client, config, &[]));
    let mut state = PumpState::new(Arc::new(policy), Instant::now(), false, ());
    state
        .run(&mut client, &mut backend, std::future::pending())
        .await
        .to_string()
}
