//! The live tap: `GET /api/tap?conn=ID` or `?route=/path` on the admin listener streams one JSON
//! record per matching frame. Taps are lossy by design: records go through a bounded broadcast
//! channel, a tap that can't keep up loses records (counted, and told how many), and the tapped
//! traffic never waits. With no tap open, a session pays one relaxed atomic load per frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::broadcast;
use tungstenite::Message;

use crate::inspect::{opcode_name, preview};
use crate::pump::Direction;

/// Records kept for taps that fall behind before they start losing records.
const TAP_BUFFER: usize = 4096;
/// Payload bytes a record previews.
const PREVIEW_BYTES: usize = 64;

/// One frame, as a tap sees it.
#[derive(Debug, Clone, Serialize)]
pub struct TapRecord {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// Connection id.
    pub conn: u64,
    /// Route path prefix.
    pub route: Arc<str>,
    /// Backend serving the connection.
    pub backend: Arc<str>,
    /// `in` (client to backend) or `out`.
    pub direction: &'static str,
    /// `text`, `binary`, `ping`, `pong` or `close`.
    pub opcode: &'static str,
    /// Payload length in bytes.
    pub len: usize,
    /// The first payload bytes (text as is, binary as hex); empty on `sensitive` routes.
    pub preview: String,
}

/// What a tap wants to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapFilter {
    /// One connection.
    Connection(u64),
    /// Every connection of a route (by its path prefix).
    Route(String),
}

impl std::fmt::Display for TapFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TapFilter::Connection(id) => write!(f, "connection {id}"),
            TapFilter::Route(route) => write!(f, "route {route}"),
        }
    }
}

impl TapFilter {
    /// True if `record` is for this tap.
    pub fn matches(&self, record: &TapRecord) -> bool {
        match self {
            TapFilter::Connection(id) => record.conn == *id,
            TapFilter::Route(route) => &*record.route == route,
        }
    }
}

/// Where sessions publish frames for taps.
pub struct TapHub {
    sender: broadcast::Sender<Arc<TapRecord>>,
    taps: AtomicUsize,
}

impl Default for TapHub {
    fn default() -> Self {
        TapHub {
            sender: broadcast::channel(TAP_BUFFER).0,
            taps: AtomicUsize::new(0),
        }
    }
}

impl TapHub {
    /// True while at least one tap is open.
    #[inline]
    pub fn active(&self) -> bool {
        self.taps.load(Ordering::Relaxed) > 0
    }

    /// Publishes a frame (call only when [`TapHub::active`]); `redact` leaves out the payload
    /// preview (routes marked `sensitive`).
    pub fn publish(
        &self,
        conn: u64,
        route: &Arc<str>,
        backend: &Arc<str>,
        direction: Direction,
        message: &Message,
        redact: bool,
    ) {
        let record = TapRecord {
            time_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            conn,
            route: route.clone(),
            backend: backend.clone(),
            direction: direction.as_str(),
            opcode: opcode_name(message),
            len: message.len(),
            preview: if redact {
                String::new()
            } else {
                preview(message, PREVIEW_BYTES)
            },
        };
        // No receiver left is fine: the tap closed between the check and the send.
        let _ = self.sender.send(Arc::new(record));
    }

    /// Opens a tap; records flow until the returned subscription drops.
    pub fn subscribe(self: &Arc<Self>) -> TapSubscription {
        let receiver = self.sender.subscribe();
        self.taps.fetch_add(1, Ordering::Relaxed);
        TapSubscription {
            hub: self.clone(),
            receiver,
        }
    }
}

/// An open tap.
pub struct TapSubscription {
    hub: Arc<TapHub>,
    /// Records as they are published.
    pub receiver: broadcast::Receiver<Arc<TapRecord>>,
}

impl Drop for TapSubscription {
    fn drop(&mut self) {
        self.hub.taps.fetch_sub(1, Ordering::Relaxed);
    }
}
