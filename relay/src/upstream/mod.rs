//! Everything on the backend side of a session: the request a backend sees, opening a
//! WebSocket to one backend, the one walk down a client's ranking that finds its backend (with
//! passive health), the book of backend states, active health checks, and the mux links shared
//! by the clients of mux routes.

mod book;
mod dial;
pub(crate) mod handshake;
mod health;
mod links;
mod request;
mod tls;
mod walk;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use book::{BackendBook, BackendState};
pub(crate) use health::spawn_checks;
pub(crate) use links::{LINK_SUBPROTOCOL, MuxPool, link_config, link_socket_config};
pub(crate) use request::BackendRequest;
pub(crate) use tls::BackendTls;
pub(crate) use walk::{BackendRefusal, Replacing, Via, Walk, Walked};

use crate::config::{BackendConfig, BackendUrl, HealthCheckConfig, OnBackendLoss};
use crate::hashing::Ranking;

/// Every upstream's backends as one generation serves them, by upstream name: the configured
/// ones, or the addresses last discovered.
pub(crate) type BackendSets = BTreeMap<String, Vec<BackendConfig>>;

/// A group of backends that routes send clients to.
pub(crate) struct Upstream {
    /// The `[upstream.NAME]` name.
    pub name: String,
    /// Backends in configuration order; rankings refer to them by index.
    pub backends: Vec<BackendUrl>,
    /// Rendezvous ranking over `backends`.
    pub ranking: Ranking,
    /// Time allowed for one backend's connect plus handshake.
    pub connect_timeout: Duration,
    /// What a client experiences when its backend goes away.
    pub on_backend_loss: OnBackendLoss,
    /// Active health checking, if configured.
    pub health_check: Option<HealthCheckConfig>,
    /// Links per backend when a mux route uses this upstream.
    pub mux_links: usize,
    /// How its `wss://` backends are reached; `None` when it has none.
    pub tls: Option<Arc<BackendTls>>,
}

impl Upstream {
    /// `(unhealthy_after, healthy_after)` when active checks are on.
    pub fn health_thresholds(&self) -> Option<(u32, u32)> {
        self.health_check
            .as_ref()
            .map(|check| (check.unhealthy_after.max(1), check.healthy_after.max(1)))
    }
}

impl Upstream {
    /// The run-time form of `[upstream.NAME]`, serving `backends`, with the TLS settings
    /// loaded for it.
    pub fn from_config(
        name: &str,
        config: &crate::config::UpstreamConfig,
        backends: &[BackendConfig],
        tls: Option<Arc<BackendTls>>,
    ) -> Upstream {
        Upstream {
            name: name.to_owned(),
            backends: backends.iter().map(|b| b.url.clone()).collect(),
            ranking: Ranking::new(backends.iter().map(|b| (b.url.original.as_ref(), b.weight))),
            connect_timeout: config.connect_timeout.get_ref().0,
            on_backend_loss: config.on_backend_loss,
            health_check: config.health_check.as_ref().map(|c| c.get_ref().clone()),
            mux_links: config
                .mux_links
                .as_ref()
                .map_or(2, |n| *n.get_ref() as usize),
            tls,
        }
    }
}
