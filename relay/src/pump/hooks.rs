//! The pump's only view of whoever watches or shapes a session's traffic: a hooks trait with a
//! default that does nothing for every phase. Inspectors, taps and metrics implement it
//! elsewhere; the pump calls it at fixed points and never waits on it.

use std::time::Duration;

use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client towards the backend.
    ClientToBackend,
    /// From the backend towards the client.
    BackendToClient,
}

impl Direction {
    /// `"in"` (client to backend) or `"out"` (backend to client), as logs and metrics say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToBackend => "in",
            Direction::BackendToClient => "out",
        }
    }
}

/// One side of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's leg.
    Client,
    /// The backend's leg.
    Backend,
}

impl Side {
    /// `"client"` or `"backend"`, as logs and metrics say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }
}

/// What to do with a data message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on (possibly rewritten in place).
    Forward,
    /// Swallow it silently.
    Drop,
    /// Close the connection: the sender of the message gets this code and reason, the other
    /// leg a 1001 "going away".
    Close(CloseCode, String),
}

/// Counters of what crossed, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    /// Messages from the client to the backend.
    pub client_messages: u64,
    /// Payload bytes from the client to the backend.
    pub client_bytes: u64,
    /// Messages from the backend to the client.
    pub backend_messages: u64,
    /// Payload bytes from the backend to the client.
    pub backend_bytes: u64,
}

impl Traffic {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Traffic) {
        self.client_messages += other.client_messages;
        self.client_bytes += other.client_bytes;
        self.backend_messages += other.backend_messages;
        self.backend_bytes += other.backend_bytes;
    }

    /// Each count raised to `other`'s where that is higher.
    pub fn raise_to(&mut self, other: &Traffic) {
        self.client_messages = self.client_messages.max(other.client_messages);
        self.client_bytes = self.client_bytes.max(other.client_bytes);
        self.backend_messages = self.backend_messages.max(other.backend_messages);
        self.backend_bytes = self.backend_bytes.max(other.backend_bytes);
    }

    /// Counts one message of `len` payload bytes going `direction`.
    #[inline]
    pub fn count(&mut self, direction: Direction, len: usize) {
        let (messages, bytes) = match direction {
            Direction::ClientToBackend => (&mut self.client_messages, &mut self.client_bytes),
            Direction::BackendToClient => (&mut self.backend_messages, &mut self.backend_bytes),
        };
        *messages += 1;
        *bytes += len as u64;
    }
}

/// The phases of a session's traffic that the outside may watch or shape. Each runs on the
/// session's own task, so an implementation keeps state without locks; none may block.
pub trait PumpHooks {
    /// A text or binary message read from one leg, before it is forwarded. It may be
    /// rewritten in place; anything but [`Verdict::Forward`] keeps it from the other leg.
    #[inline]
    fn on_message(&mut self, direction: Direction, message: &mut Message) -> Verdict {
        let _ = (direction, message);
        Verdict::Forward
    }

    /// A control frame (ping, pong, close) read from one leg; the relay handles those itself.
    #[inline]
    fn on_control(&mut self, direction: Direction, message: &Message) {
        let _ = (direction, message);
    }

    /// A keepalive ping on `side` was answered after `rtt`.
    #[inline]
    fn on_ping_rtt(&mut self, side: Side, rtt: Duration) {
        let _ = (side, rtt);
    }

    /// What crossed so far; called after every round of pumping and when the pump stops.
    #[inline]
    fn on_traffic(&mut self, traffic: &Traffic) {
        let _ = traffic;
    }
}

/// Hooks that watch nothing (benchmarks, tests).
impl PumpHooks for () {}
