//! The part of the relay's state that a reload replaces: the configuration and everything
//! derived from it (routes, upstream rankings, backend states, WebSocket limits, keepalive).
//!
//! New connections read the current [`Routing`]; an established session keeps the snapshot it
//! started with, so a reload never disturbs it, unless its backend was removed: removed backends
//! are drained, and their sessions move (or close 1012) after `shutdown_grace`, exactly as after
//! `POST /api/backends/drain`.

use std::collections::BTreeSet;

use tokio_util::sync::CancellationToken;
use tungstenite::protocol::WebSocketConfig;

use crate::backends::BackendBook;
use crate::config::Config;
use crate::inspect::InspectorRegistry;
use crate::keepalive::KeepalivePolicy;
use crate::mux::MuxPool;
use crate::route::RouteTable;

/// Bytes a WebSocket reads from its socket at a time. Each leg keeps a buffer this big while
/// idle, so it is small; messages larger than it get a buffer of their own size as they arrive.
const READ_CHUNK: usize = 4 * 1024;
/// Frames are gathered up to this size before a write syscall; the pump flushes after each
/// burst anyway. tungstenite keeps its write buffer's capacity once grown, so this also bounds
/// what a busy connection keeps while idle.
const WRITE_BATCH: usize = 4 * 1024;

/// One generation of configuration-derived state.
pub struct Routing {
    /// The configuration it was built from.
    pub config: Config,
    /// Routes, longest prefix first.
    pub routes: RouteTable,
    /// Backend health and drain state, by URL.
    pub backends: BackendBook,
    /// Keepalive settings for both legs.
    pub keepalive: KeepalivePolicy,
    /// tungstenite settings of client legs.
    pub client_ws: WebSocketConfig,
    /// tungstenite settings of backend legs.
    pub backend_ws: WebSocketConfig,
    /// Cancelled when a reload replaces this generation; its health checkers stop and its mux
    /// links go away once their streams end.
    pub retired: CancellationToken,
    /// The links of mux upstreams.
    pub mux: MuxPool,
}

impl Routing {
    /// Builds a generation; backends that `previous` knew keep their health and drain state.
    pub fn new(
        config: Config,
        inspectors: &InspectorRegistry,
        previous: Option<&Routing>,
    ) -> Routing {
        let limits = &config.limits;
        let ws = WebSocketConfig::default()
            .read_buffer_size(READ_CHUNK)
            .write_buffer_size(WRITE_BATCH)
            .max_message_size(Some(limits.max_message_size.as_usize()))
            .max_frame_size(Some(limits.max_frame_size.as_usize()));
        let routes = RouteTable::from_config(&config, inspectors);
        Routing {
            mux: MuxPool::new(&routes.upstream_modes()),
            routes,
            backends: BackendBook::from_config(&config, previous.map(|p| &p.backends)),
            keepalive: KeepalivePolicy::from_config(&config.keepalive),
            client_ws: ws,
            backend_ws: ws,
            retired: CancellationToken::new(),
            config,
        }
    }

    /// Backend URLs this generation has and `other` lacks.
    pub fn backends_missing_from(&self, other: &Routing) -> BTreeSet<String> {
        self.backends
            .iter()
            .map(|(url, _)| url.clone())
            .filter(|url| other.backends.get(url).is_none())
            .collect()
    }
}
