//! The part of the relay's state that a reload replaces: the configuration and everything
//! derived from it (routes, upstreams and their rankings, backend states, mux links, socket
//! limits, keepalive), one [`Generation`] at a time.
//!
//! New connections read the current generation; an established session keeps the one it
//! started with, so a reload never disturbs it, unless its backend was removed: removed backends
//! are drained, and their sessions move (or close 1012) after `shutdown_grace`, exactly as after
//! `POST /api/backends/drain`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tungstenite::protocol::WebSocketConfig;

use crate::config::{BackendConfig, Config, KeepaliveConfig, Mode, ServerConfig};
use crate::inspect::InspectorRegistry;
use crate::pump::KeepalivePolicy;
use crate::route::RouteTable;
use crate::shutdown::Shutdown;
use crate::upstream::{
    self, BackendBook, BackendRequest, BackendSets, BackendTls, MuxPool, Upstream, Via, Walk,
};

/// Bytes a WebSocket reads from its socket at a time. Each leg keeps a buffer this big while
/// idle, so it is small; messages larger than it get a buffer of their own size as they arrive.
const READ_CHUNK: usize = 4 * 1024;
/// Frames are gathered up to this size before a write syscall; the pump flushes after each
/// burst anyway. tungstenite keeps its write buffer's capacity once grown, so this also bounds
/// what a busy connection keeps while idle (a leg that never sent holds none). 16 KiB gathers a
/// burst of 4 KiB messages into one write: measured with 50 connections of 4 in-flight echoes,
/// 3.7-4.0 syscalls and 26-30 µs of relay CPU per 4 KiB echo instead of 5.4-5.7 and 43 µs at
/// 4 KiB, and no change at 64 B. A bigger read chunk would cut reads too, but tungstenite
/// zero-fills its whole read chunk before every read and every idle leg holds one: at 16 KiB,
/// 64 B echoes cost more CPU, not less.
const WRITE_BATCH: usize = 16 * 1024;

/// One generation of configuration-derived state.
pub(crate) struct Generation {
    /// The configuration it was built from.
    pub config: Config,
    /// The backends of its `discover` upstreams, by upstream name, as they were discovered
    /// when it was built (the others' backends are in `config`).
    pub discovered: BackendSets,
    /// The TLS settings of its upstreams with `wss://` backends, by upstream name (a discovery
    /// change builds the next generation with the same ones).
    pub upstream_tls: BTreeMap<String, Arc<BackendTls>>,
    /// Routes, longest prefix first.
    pub routes: RouteTable,
    /// Every upstream some route uses, once each.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Backend health and drain state, by URL.
    pub backends: Arc<BackendBook>,
    /// Keepalive settings for both legs.
    pub keepalive: Arc<KeepalivePolicy>,
    /// tungstenite settings of client and backend legs alike.
    pub socket: WebSocketConfig,
    /// The links of mux upstreams.
    pub mux: MuxPool,
    /// Cancelled when a reload replaces this generation, or when the relay drains: its health
    /// checkers stop and its mux links go away once their streams end.
    pub retired: CancellationToken,
}

impl Generation {
    /// Builds a generation serving `config`, whose `discover` upstreams have the backends in
    /// `discovered` (none when they have no entry); backends that `previous` knew keep their
    /// health and drain state. `retired` is its own token, cancelled by whoever replaces it.
    /// `upstream_tls` holds the settings of the upstreams with `wss://` backends, loaded from
    /// their files for this configuration.
    pub fn new(
        config: Config,
        mut discovered: BackendSets,
        inspectors: &InspectorRegistry,
        previous: Option<&Generation>,
        retired: CancellationToken,
        upstream_tls: BTreeMap<String, Arc<BackendTls>>,
    ) -> Generation {
        let limits = &config.limits;
        let socket = WebSocketConfig::default()
            .read_buffer_size(READ_CHUNK)
            .write_buffer_size(WRITE_BATCH)
            .max_message_size(Some(limits.max_message_size.get_ref().as_usize()))
            .max_frame_size(Some(limits.max_frame_size.get_ref().as_usize()));
        // Entries for upstreams that are gone or no longer discovered mean nothing.
        discovered.retain(|name, _| {
            config
                .upstreams
                .get(name)
                .is_some_and(|upstream| upstream.discover.is_some())
        });
        let sets: BackendSets = config
            .upstreams
            .iter()
            .map(|(name, upstream)| {
                let backends = match &upstream.discover {
                    Some(_) => discovered.get(name).cloned().unwrap_or_default(),
                    None => upstream.configured_backends().to_vec(),
                };
                (name.clone(), backends)
            })
            .collect();
        let routes = RouteTable::from_config(&config, &sets, inspectors, &upstream_tls);
        let keepalive = keepalive_policy(&config.keepalive);
        let link_config = upstream::link_config(
            limits.max_message_size.get_ref().0,
            keepalive.ping_interval,
            keepalive.pong_timeout,
        );
        Generation {
            mux: MuxPool::new(&routes.mux_upstreams(), link_config),
            upstreams: routes.upstreams(),
            routes,
            backends: Arc::new(BackendBook::from_config(
                &config,
                &sets,
                previous.map(|p| &*p.backends),
            )),
            keepalive: Arc::new(keepalive),
            socket,
            retired,
            config,
            discovered,
            upstream_tls,
        }
    }

    /// The backends of `upstream` as last discovered, if it is a `discover` upstream.
    pub fn discovered_backends(&self, upstream: &str) -> Option<&[BackendConfig]> {
        self.discovered.get(upstream).map(Vec::as_slice)
    }

    /// Starts what the generation runs in the background, owned by `tasks`: health checks
    /// and mux links.
    pub fn start(&self, tasks: &TaskTracker, shutdown: &Arc<Shutdown>) {
        upstream::spawn_checks(
            tasks,
            &self.upstreams,
            &self.backends,
            self.socket,
            &self.retired,
        );
        let mux = self.routes.mux_upstreams();
        self.mux.start(
            &mux,
            &self.backends,
            self.socket,
            tasks,
            &self.retired,
            shutdown,
        );
    }

    /// A client's walk down `upstream`'s ranking, reaching backends as `mode` says, within
    /// `deadline` if the client waits for its handshake.
    pub fn walk<'a>(
        &'a self,
        upstream: &'a Upstream,
        mode: Mode,
        request: &'a BackendRequest,
        peer: SocketAddr,
        conn_id: u64,
        deadline: Option<tokio::time::Instant>,
    ) -> Walk<'a> {
        Walk {
            upstream,
            book: &self.backends,
            via: match mode {
                Mode::PerClient => Via::Socket(self.socket),
                Mode::Mux => Via::Mux(&self.mux),
            },
            request,
            peer,
            conn_id,
            deadline,
        }
    }

    /// Backend URLs this generation has and `other` lacks.
    pub fn backends_missing_from(&self, other: &Generation) -> Vec<String> {
        let others: BTreeSet<&str> = other.backends.iter().map(|(url, _)| url).collect();
        self.backends
            .iter()
            .map(|(url, _)| url)
            .filter(|url| !others.contains(url))
            .map(str::to_owned)
            .collect()
    }
}

/// Keepalive settings resolved from `[keepalive]` (zero disables a feature).
fn keepalive_policy(config: &KeepaliveConfig) -> KeepalivePolicy {
    let enabled = |d: Duration| (!d.is_zero()).then_some(d);
    KeepalivePolicy {
        ping_interval: enabled(config.ping_interval.0),
        pong_timeout: config.pong_timeout.get_ref().0,
        idle_timeout: enabled(config.idle_timeout.0),
    }
}

/// The `[server]` keys whose change only a restart applies; a reload keeps their old values.
pub(crate) fn restart_needed(before: &ServerConfig, after: &ServerConfig) -> Vec<String> {
    let mut keys = Vec::new();
    if before.listen.get_ref() != after.listen.get_ref() {
        keys.push("server.listen".to_owned());
    }
    if before.reuse_port != after.reuse_port {
        keys.push("server.reuse_port".to_owned());
    }
    if before.admin.as_ref().map(|a| *a.get_ref()) != after.admin.as_ref().map(|a| *a.get_ref()) {
        keys.push("server.admin".to_owned());
    }
    if before.max_connections.get_ref() != after.max_connections.get_ref() {
        keys.push("server.max_connections".to_owned());
    }
    // New certificate files (other paths or new contents) apply at a reload; whether the
    // listener speaks TLS at all is fixed while it runs.
    let speaks_tls = |server: &ServerConfig| server.tls_cert.is_some() && server.tls_key.is_some();
    if speaks_tls(before) != speaks_tls(after) {
        keys.push("server.tls_cert/tls_key".to_owned());
    }
    if before.http2 != after.http2 {
        keys.push("server.http2".to_owned());
    }
    let folder = |server: &ServerConfig| server.static_dir.as_ref().map(|p| p.get_ref().clone());
    if folder(before) != folder(after) {
        keys.push("server.static_dir".to_owned());
    }
    keys
}

/// The current generation, swapped whole by a reload.
pub(crate) struct Generations {
    current: ArcSwap<Generation>,
}

impl Generations {
    /// Starts with `first`.
    pub fn new(first: Generation) -> Generations {
        Generations {
            current: ArcSwap::from_pointee(first),
        }
    }

    /// The generation new connections use.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Makes `next` current; returns the one it replaced.
    pub fn replace(&self, next: Arc<Generation>) -> Arc<Generation> {
        self.current.swap(next)
    }

    /// The current `shutdown_grace`.
    pub fn shutdown_grace(&self) -> Duration {
        self.current.load().config.server.shutdown_grace.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_keys_are_named() {
        let config = |listen: &str, admin: &str, extra: &str| {
            let source = format!(
                "[server]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\n{extra}\n[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\nbackends = [\"ws://127.0.0.1:1\"]\n"
            );
            Config::from_toml(&source, "t").unwrap().server
        };
        let base = config("127.0.0.1:1", "127.0.0.1:2", "");
        assert!(
            restart_needed(
                &base,
                &config("127.0.0.1:1", "127.0.0.1:2", "shutdown_grace = \"1s\"")
            )
            .is_empty()
        );
        assert_eq!(
            restart_needed(
                &base,
                &config("127.0.0.1:3", "127.0.0.1:4", "max_connections = 5")
            ),
            ["server.listen", "server.admin", "server.max_connections"]
        );
        assert_eq!(
            restart_needed(
                &base,
                &config("127.0.0.1:1", "127.0.0.1:2", "reuse_port = true")
            ),
            ["server.reuse_port"],
            "the listening socket is bound once"
        );
        assert_eq!(
            restart_needed(&base, &config("127.0.0.1:1", "127.0.0.1:2", "http2 = true")),
            ["server.http2"],
            "the TLS listener's ALPN list is fixed at start"
        );
    }

    #[test]
    fn new_certificate_files_apply_but_turning_tls_on_or_off_needs_a_restart() {
        let config = |extra: &str| {
            let source = format!(
                "[server]\n{extra}\n[[route]]\npath = \"/\"\nupstream = \"u\"\n[upstream.u]\nbackends = [\"ws://127.0.0.1:1\"]\n"
            );
            Config::from_toml(&source, "t").unwrap().server
        };
        let plain = config("");
        let old = config("tls_cert = \"a.pem\"\ntls_key = \"a-key.pem\"");
        let new = config("tls_cert = \"b.pem\"\ntls_key = \"b-key.pem\"");
        assert!(restart_needed(&old, &new).is_empty());
        assert_eq!(restart_needed(&plain, &new), ["server.tls_cert/tls_key"]);
        assert_eq!(restart_needed(&old, &plain), ["server.tls_cert/tls_key"]);
    }
}
