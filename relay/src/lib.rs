//! wsrelay: a WebSocket-terminating message relay.
//!
//! The relay terminates every client WebSocket, decodes its frames and re-originates the
//! conversation to a backend chosen by rendezvous hashing. The binary `wsrelay` is a thin CLI
//! over this library; tests and applications embed the relay with [`Relay::bind`]:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = wsrelay::config::Config::quick_start(
//!     "127.0.0.1:0".parse()?,
//!     &["ws://127.0.0.1:9001".to_owned()],
//! )?;
//! let relay = wsrelay::Relay::bind(config).await?;
//! println!("relay on ws://{}", relay.local_addr());
//! relay.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! A reader finds each concept by its file: `listener` (accept loop, HTTP side), `handshake`
//! (RFC 6455 checks), `route` (routes, hash keys), `hashing` (rendezvous), `dial` (the backend
//! leg), `session` (one client's life), `pump` (frames both ways), `replay` (what a lost backend may
//! have missed), `keepalive`, `shutdown`.

mod admin;
pub mod backends;
pub mod config;
pub mod demo;
pub mod dial;
pub mod handshake;
pub mod hashing;
mod health;
pub mod inspect;
pub mod keepalive;
pub mod leg;
mod listener;
pub mod metrics;
pub mod mux;
pub mod pump;
pub mod replay;
pub mod route;
mod routing;
mod session;
pub mod sessions;
pub mod shutdown;
pub mod tap;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::inspect::{InspectorFactory, InspectorRegistry};
use crate::metrics::Metrics;
use crate::routing::Routing;
use crate::sessions::SessionRegistry;
use crate::shutdown::Shutdown;
use crate::tap::TapHub;

/// Errors from starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The configuration names something this relay does not know (e.g. an inspector).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The TLS certificate or key could not be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The client-facing listener could not be bound.
    #[error("listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
}

/// State every task of one relay shares. The configuration-derived part is one [`Routing`]
/// generation, swapped whole by a reload; the rest lives as long as the process.
pub(crate) struct Shared {
    routing: ArcSwap<Routing>,
    /// Inspector names a reloaded configuration may use.
    inspectors: InspectorRegistry,
    /// The file `POST /api/reload` and SIGHUP read, if the relay was started from one.
    config_path: Option<PathBuf>,
    /// One permit per connection, handshaking or established (`max_connections`; fixed at
    /// start).
    pub connection_slots: Arc<Semaphore>,
    pub next_conn_id: AtomicU64,
    pub shutdown: Shutdown,
    /// Every connection and session task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Established sessions, for the admin API.
    pub sessions: Arc<SessionRegistry>,
    /// Where taps listen.
    pub tap: Arc<TapHub>,
    /// TLS for the client listener, if configured (fixed at start).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Shared {
    fn new(
        config: Config,
        inspectors: InspectorRegistry,
        config_path: Option<PathBuf>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Shared {
        let max_connections = *config.server.max_connections.get_ref();
        Shared {
            routing: ArcSwap::from_pointee(Routing::new(config, &inspectors, None)),
            inspectors,
            config_path,
            connection_slots: Arc::new(Semaphore::new(max_connections)),
            next_conn_id: AtomicU64::new(1),
            shutdown: Shutdown::default(),
            tasks: TaskTracker::new(),
            metrics: Metrics::default(),
            sessions: Arc::default(),
            tap: Arc::default(),
            tls,
        }
    }

    /// The current configuration generation.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// The current `shutdown_grace`.
    pub fn shutdown_grace(&self) -> Duration {
        self.routing.load().config.server.shutdown_grace.0
    }

    /// Applies a new configuration to new connections at once; sessions on backends it removes
    /// are moved (or closed 1012) after `shutdown_grace`.
    pub fn reload(self: &Arc<Self>, config: Config) -> Result<ReloadReport, config::ConfigError> {
        config.check_inspectors(&self.inspectors)?;
        let old = self.routing();
        let mut restart_needed = Vec::new();
        let (before, after) = (&old.config.server, &config.server);
        if before.listen.get_ref() != after.listen.get_ref() {
            restart_needed.push("server.listen".to_owned());
        }
        if before.admin.as_ref().map(|a| *a.get_ref()) != after.admin.as_ref().map(|a| *a.get_ref())
        {
            restart_needed.push("server.admin".to_owned());
        }
        if before.max_connections.get_ref() != after.max_connections.get_ref() {
            restart_needed.push("server.max_connections".to_owned());
        }
        let tls_files = |server: &config::ServerConfig| {
            (
                server.tls_cert.as_ref().map(|p| p.get_ref().clone()),
                server.tls_key.as_ref().map(|p| p.get_ref().clone()),
            )
        };
        if tls_files(before) != tls_files(after) {
            restart_needed.push("server.tls_cert/tls_key".to_owned());
        }
        let new = Arc::new(Routing::new(config, &self.inspectors, Some(&old)));
        let removed: Vec<String> = old.backends_missing_from(&new).into_iter().collect();
        let added: Vec<String> = new.backends_missing_from(&old).into_iter().collect();
        for url in &removed {
            old.backends.drain(url);
        }
        let routes = new.routes.len();
        self.routing.store(new.clone());
        old.retired.cancel();
        health::spawn_checks(self, &new);
        mux::MuxPool::start(self, &new);
        tracing::info!(
            ?added,
            ?removed,
            routes,
            ?restart_needed,
            "configuration reloaded"
        );
        Ok(ReloadReport {
            added,
            removed,
            routes,
            restart_needed,
        })
    }

    /// Reloads from the file the relay was started with.
    pub fn reload_from_file(self: &Arc<Self>) -> Result<ReloadReport, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let source = std::fs::read_to_string(path).map_err(|source| ReloadError::Read {
            path: path.clone(),
            source,
        })?;
        let config =
            Config::from_toml_with(&source, &path.display().to_string(), &self.inspectors)?;
        Ok(self.reload(config)?)
    }
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// Backend URLs new in this configuration.
    pub added: Vec<String>,
    /// Backend URLs gone; their sessions move after `shutdown_grace`.
    pub removed: Vec<String>,
    /// Routes now configured.
    pub routes: usize,
    /// Changed keys that only take effect after a restart (the old values stay in force).
    pub restart_needed: Vec<String>,
}

/// Why a reload was refused; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The relay was started from flags, not a file.
    #[error("nothing to reload: the relay was not started with --config")]
    NoFile,
    /// The file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The new configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

/// Entry point: binds a relay and runs it in the background of the current tokio runtime.
pub struct Relay;

impl Relay {
    /// Binds the client listener of `config` and starts serving, with the built-in inspectors.
    pub async fn bind(config: Config) -> Result<RelayHandle, RelayError> {
        Relay::builder(config).bind().await
    }

    /// Serves `config` on an already bound listener (e.g. one bound with `SO_REUSEPORT`).
    pub fn serve(config: Config, listener: TcpListener) -> Result<RelayHandle, RelayError> {
        Relay::builder(config).serve(listener)
    }

    /// Starts configuring a relay, e.g. to register inspectors of your own.
    pub fn builder(config: Config) -> RelayBuilder {
        RelayBuilder {
            config,
            inspectors: InspectorRegistry::default(),
            config_path: None,
        }
    }
}

/// A relay being configured; see [`Relay::builder`].
pub struct RelayBuilder {
    config: Config,
    inspectors: InspectorRegistry,
    config_path: Option<PathBuf>,
}

impl RelayBuilder {
    /// Registers an inspector that routes can name in their `inspect` list.
    pub fn inspector(mut self, name: &str, factory: impl InspectorFactory) -> RelayBuilder {
        self.inspectors.register(name, factory);
        self
    }

    /// The file the configuration came from, so SIGHUP and `POST /api/reload` can read it
    /// again.
    pub fn config_path(mut self, path: impl Into<PathBuf>) -> RelayBuilder {
        self.config_path = Some(path.into());
        self
    }

    /// Binds the client listener and starts serving.
    pub async fn bind(self) -> Result<RelayHandle, RelayError> {
        let addr = self.config.listen_addr();
        let listener = listen(addr).map_err(|source| RelayError::Bind { addr, source })?;
        self.serve(listener)
    }

    /// Serves on an already bound listener (e.g. one bound with `SO_REUSEPORT`).
    pub fn serve(self, listener: TcpListener) -> Result<RelayHandle, RelayError> {
        self.config.check_inspectors(&self.inspectors)?;
        let local_addr = listener.local_addr().map_err(|source| RelayError::Bind {
            addr: self.config.listen_addr(),
            source,
        })?;
        let admin = match &self.config.server.admin {
            Some(addr) => {
                let addr = addr.get_ref().0;
                let bind = || -> std::io::Result<TcpListener> {
                    let listener = std::net::TcpListener::bind(addr)?;
                    listener.set_nonblocking(true)?;
                    TcpListener::from_std(listener)
                };
                Some(bind().map_err(|source| RelayError::Bind { addr, source })?)
            }
            None => None,
        };
        let tls = match (&self.config.server.tls_cert, &self.config.server.tls_key) {
            (Some(cert), Some(key)) => {
                let near_config = |path: &std::path::Path| match &self.config_path {
                    Some(config) if path.is_relative() => config
                        .parent()
                        .map_or_else(|| path.to_owned(), |dir| dir.join(path)),
                    _ => path.to_owned(),
                };
                Some(tls::acceptor(
                    &near_config(cert.get_ref()),
                    &near_config(key.get_ref()),
                )?)
            }
            _ => None,
        };
        let shared = Arc::new(Shared::new(
            self.config,
            self.inspectors,
            self.config_path,
            tls,
        ));
        let admin_addr = match admin {
            Some(admin) => {
                let addr = admin.local_addr().ok();
                tracing::info!(admin = ?addr, "admin listening");
                tokio::spawn(admin::serve(shared.clone(), admin));
                addr
            }
            None => None,
        };
        health::spawn_checks(&shared, &shared.routing());
        mux::MuxPool::start(&shared, &shared.routing());
        let accept = tokio::spawn(listener::accept_loop(shared.clone(), listener));
        tracing::info!(%local_addr, "relay listening");
        Ok(RelayHandle {
            local_addr,
            admin_addr,
            shared,
            accept,
        })
    }
}

/// Connections the kernel may queue before the relay accepts them; bursts of connects beyond
/// the usual 1,024 would otherwise wait for SYN retransmits (a second each).
const ACCEPT_BACKLOG: u32 = 4096;

/// Binds the client listener with `SO_REUSEADDR` (a restarted relay gets its port back at once)
/// and a deep accept backlog.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// A running relay. Dropping it leaves the relay running; call [`RelayHandle::shutdown`].
pub struct RelayHandle {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Sessions open when the drain began.
    pub sessions_at_drain: usize,
    /// Sessions still open when the grace period ran out (dropped without a close handshake).
    pub sessions_aborted: usize,
}

impl RelayHandle {
    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address, if `[server] admin` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Applies a new configuration (see DESIGN 7): new routes and backends serve new
    /// connections at once; sessions on removed backends move after `shutdown_grace`.
    pub fn reload(&self, config: Config) -> Result<ReloadReport, config::ConfigError> {
        self.shared.reload(config)
    }

    /// Reloads the file given to [`RelayBuilder::config_path`].
    pub fn reload_from_file(&self) -> Result<ReloadReport, ReloadError> {
        self.shared.reload_from_file()
    }

    /// Established sessions right now.
    pub fn open_sessions(&self) -> usize {
        self.shared.sessions.len()
    }

    /// Graceful drain (DESIGN 7): stop accepting, close every client with 1001 (spread over
    /// the grace period), close the backend legs, and return once all are gone or the grace
    /// period has passed.
    pub async fn shutdown(self) -> ShutdownReport {
        let shared = &self.shared;
        let grace = shared.shutdown_grace();
        shared.shutdown.stop_accepting.cancel();
        let sessions_at_drain = self.open_sessions();
        let _ = self.accept.await;
        tracing::info!(sessions = sessions_at_drain, ?grace, "draining");
        shared.shutdown.drain.cancel();
        shared.tasks.close();
        let mut sessions_aborted = 0;
        if tokio::time::timeout(grace, shared.tasks.wait())
            .await
            .is_err()
        {
            sessions_aborted = shared.sessions.len();
            tracing::warn!(
                sessions = sessions_aborted,
                "grace period over; dropping the rest"
            );
            shared.shutdown.abort.cancel();
            shared.tasks.wait().await;
        }
        // The admin listener answered /readyz (503) during the drain; now it stops too.
        shared.shutdown.abort.cancel();
        tracing::info!("drained");
        ShutdownReport {
            sessions_at_drain,
            sessions_aborted,
        }
    }
}
