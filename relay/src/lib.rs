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
//! A reader finds each concept by its module (the map, and how one connection flows through
//! them: `docs/architecture.md`): `accept` (listener, upgrade checks, answers, mux clients),
//! `route` (routes, hash keys), `upstream` (backend requests, dialing, the ranking walk, health,
//! mux links), `session` (one client's life and how it ends), `pump` (frames both ways,
//! keepalive, replay), `observe` (registry, metrics, taps), `inspect`, `admin`, `config`,
//! `generation` (what a reload replaces), `shutdown`.

mod accept;
mod admin;
pub mod config;
mod generation;
pub mod hashing;
mod headers;
pub mod inspect;
mod observe;
mod pump;
mod route;
mod session;
mod shutdown;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

pub use accept::tls::TlsError;

use crate::accept::Acceptor;
use crate::config::{Config, ConfigError};
use crate::generation::{Generation, Generations};
use crate::inspect::{InspectorFactory, InspectorRegistry};
use crate::observe::Observatory;
use crate::session::SessionContext;
use crate::shutdown::Shutdown;

impl Config {
    /// Parses and validates a TOML configuration; `origin` names it in error messages.
    /// Inspector names are checked against the built-ins (see [`Config::from_toml_with`] for
    /// an application's own).
    pub fn from_toml(source: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with(source, origin, &InspectorRegistry::default())
    }
}

/// Errors from starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The configuration names something this relay does not know (e.g. an inspector).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS certificate or key could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The client-facing listener could not be bound.
    #[error("listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
}

/// The relay's root: what its control plane (reloads, the admin API, shutdown) works on. The
/// data plane gets narrower contexts: the listener its [`Acceptor`], sessions their
/// [`SessionContext`].
pub(crate) struct Shared {
    generations: Arc<Generations>,
    /// Inspector names a reloaded configuration may use.
    inspectors: InspectorRegistry,
    /// The file `POST /api/reload` and SIGHUP read, if the relay was started from one.
    config_path: Option<PathBuf>,
    acceptor: Arc<Acceptor>,
    /// The admin listener's tasks (its connections, taps): they outlive the drain, so that
    /// `/readyz` can say "draining", and stop at its end.
    control: TaskTracker,
}

impl Shared {
    fn new(
        config: Config,
        inspectors: InspectorRegistry,
        config_path: Option<PathBuf>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Shared {
        let max_connections = *config.server.max_connections.get_ref();
        let shutdown = Shutdown::default();
        let first = Generation::new(config, &inspectors, None, shutdown.drain.child_token());
        let generations = Arc::new(Generations::new(first));
        let sessions = SessionContext {
            generations: generations.clone(),
            observe: Arc::new(Observatory::default()),
            shutdown,
        };
        Shared {
            generations,
            inspectors,
            config_path,
            acceptor: Arc::new(Acceptor {
                sessions,
                slots: Arc::new(Semaphore::new(max_connections)),
                next_conn_id: AtomicU64::new(1),
                tasks: TaskTracker::new(),
                tls,
            }),
            control: TaskTracker::new(),
        }
    }

    fn observe(&self) -> &Arc<Observatory> {
        &self.acceptor.sessions.observe
    }

    fn shutdown(&self) -> &Shutdown {
        &self.acceptor.sessions.shutdown
    }

    /// Starts the background work of the current generation (health checks, mux links).
    fn start_generation(&self) {
        self.generations
            .current()
            .start(&self.acceptor.tasks, self.shutdown());
    }

    /// Applies a new configuration to new connections at once; sessions on backends it removes
    /// are moved (or closed 1012) after `shutdown_grace`.
    fn reload(&self, config: Config) -> Result<ReloadReport, ConfigError> {
        config.check_inspectors(&self.inspectors)?;
        let old = self.generations.current();
        let restart_needed = generation::restart_needed(&old.config.server, &config.server);
        let retired = self.shutdown().drain.child_token();
        let new = Arc::new(Generation::new(
            config,
            &self.inspectors,
            Some(&old),
            retired,
        ));
        let removed = old.backends_missing_from(&new);
        let added = new.backends_missing_from(&old);
        for url in &removed {
            old.backends.drain(url);
        }
        let routes = new.routes.len();
        self.generations.replace(new);
        old.retired.cancel();
        self.start_generation();
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
    fn reload_from_file(&self) -> Result<ReloadReport, ReloadError> {
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
    Config(#[from] ConfigError),
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
                Some(accept::tls::acceptor(
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
                if let Some(addr) = addr {
                    tracing::info!(admin = %addr, "admin listening");
                }
                let task = admin::serve(shared.clone(), admin);
                shared.control.spawn(task);
                addr
            }
            None => None,
        };
        shared.start_generation();
        let accept = tokio::spawn(accept::accept_loop(shared.acceptor.clone(), listener));
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

    /// Applies a new configuration: new routes and backends serve new connections at once;
    /// sessions on removed backends move after `shutdown_grace`.
    pub fn reload(&self, config: Config) -> Result<ReloadReport, ConfigError> {
        self.shared.reload(config)
    }

    /// Reloads the file given to [`RelayBuilder::config_path`].
    pub fn reload_from_file(&self) -> Result<ReloadReport, ReloadError> {
        self.shared.reload_from_file()
    }

    /// Established sessions right now.
    pub fn open_sessions(&self) -> usize {
        self.shared.observe().sessions.len()
    }

    /// Graceful drain: stop accepting, close every client with 1001 (spread over
    /// the grace period), close the backend legs, and return once all are gone or the grace
    /// period has passed.
    pub async fn shutdown(self) -> ShutdownReport {
        let shared = &self.shared;
        let shutdown = shared.shutdown();
        let tasks = &shared.acceptor.tasks;
        let grace = shared.generations.shutdown_grace();
        shutdown.stop_accepting.cancel();
        let sessions_at_drain = self.open_sessions();
        let _ = self.accept.await;
        tracing::info!(sessions = sessions_at_drain, ?grace, "draining");
        shutdown.drain.cancel();
        tasks.close();
        let mut sessions_aborted = 0;
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            sessions_aborted = shared.observe().sessions.len();
            tracing::warn!(
                sessions = sessions_aborted,
                "grace period over; dropping the rest"
            );
            shutdown.abort.cancel();
            tasks.wait().await;
        }
        shutdown.abort.cancel();
        shared.control.close();
        shared.control.wait().await;
        tracing::info!("drained");
        ShutdownReport {
            sessions_at_drain,
            sessions_aborted,
        }
    }
}
