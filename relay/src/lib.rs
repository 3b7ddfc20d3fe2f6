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
//! mux links, TLS to backends), `certificates` (the TLS files a configuration names), `session`
//! (one client's life and how it ends), `pump` (frames both ways, keepalive, replay), `observe`
//! (registry, metrics, taps), `inspect`, `admin`, `config`, `generation` (what a reload
//! replaces), `discovery` (backends from DNS), `shutdown`.

mod accept;
mod admin;
mod admission;
mod ascii;
#[doc(hidden)]
pub mod benching;
mod certificates;
mod compress;
pub mod config;
mod control;
mod discovery;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod generation;
pub mod hashing;
mod headers;
pub mod inspect;
mod observe;
mod pump;
mod route;
mod session;
mod shutdown;
#[cfg(test)]
mod testing;
mod upstream;
mod websocket;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use accept::EmbeddedFiles;
pub use control::{ListenerCertificate, ReloadError, ReloadReport};

use crate::config::{Config, ConfigError};
use crate::control::Shared;
use crate::inspect::{InspectorFactory, InspectorRegistry};

impl Config {
    /// Parses and validates a TOML configuration; `origin` names it in error messages.
    /// Inspector names are checked against the built-ins (see [`Config::from_toml_with`] for
    /// an application's own).
    pub fn from_toml(source: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with(source, origin, &InspectorRegistry::default())
    }

    /// Reads the TLS files the configuration names (the listener's certificate and key, each
    /// upstream's `tls` files and, for `wss://` backends without `tls.ca_file`, the system's
    /// roots) as a start or a reload would; `config_dir` is the directory relative paths are
    /// resolved against (the config file's). Each problem names its key and line.
    pub fn check_files(
        &self,
        config_dir: Option<&std::path::Path>,
        origin: &str,
    ) -> Result<(), ConfigError> {
        certificates::load(self, config_dir, origin).map(drop)
    }
}

/// Errors from starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The configuration names something this relay does not know (e.g. an inspector), or a
    /// TLS file that can't be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `[server] static_dir` can't be served (missing, not a folder); says which and why.
    #[error("{0}")]
    StaticDir(String),
    /// The client-facing listener could not be bound.
    #[error("listen on {addr}: {error}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed (not a `source`: the message says it once).
        error: std::io::Error,
    },
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
            listen: None,
            embedded_files: None,
        }
    }
}

/// A relay being configured; see [`Relay::builder`].
pub struct RelayBuilder {
    config: Config,
    inspectors: InspectorRegistry,
    config_path: Option<PathBuf>,
    listen: Option<SocketAddr>,
    embedded_files: Option<EmbeddedFiles>,
}

impl RelayBuilder {
    /// Listens on `addr` whatever `[server] listen` says, in this configuration and in every
    /// one a reload brings (as the CLI's `--listen` does).
    pub fn listen(mut self, addr: SocketAddr) -> RelayBuilder {
        self.listen = Some(addr);
        self.config.server.listen = toml::Spanned::new(0..0, config::ListenAddr(addr));
        self
    }

    /// Serves `files` to plain `GET`s instead of `[server] static_dir` (the way `wsrelay demo`
    /// serves its page); upgrades on the same paths still reach the routes.
    pub fn static_files(mut self, files: EmbeddedFiles) -> RelayBuilder {
        self.embedded_files = Some(files);
        self
    }

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
        let reuse_port = self.config.server.reuse_port;
        let listener =
            listen(addr, reuse_port).map_err(|error| RelayError::Bind { addr, error })?;
        self.serve(listener)
    }

    /// Serves on an already bound listener (e.g. one bound with `SO_REUSEPORT`).
    pub fn serve(self, listener: TcpListener) -> Result<RelayHandle, RelayError> {
        self.config.check_inspectors(&self.inspectors)?;
        let local_addr = listener.local_addr().map_err(|error| RelayError::Bind {
            addr: self.config.listen_addr(),
            error,
        })?;
        let admin = match &self.config.server.admin {
            Some(addr) => {
                let addr = addr.get_ref().0;
                let bind = || -> std::io::Result<TcpListener> {
                    let listener = std::net::TcpListener::bind(addr)?;
                    listener.set_nonblocking(true)?;
                    TcpListener::from_std(listener)
                };
                Some(bind().map_err(|error| RelayError::Bind { addr, error })?)
            }
            None => None,
        };
        let near_config = |path: &std::path::Path| match &self.config_path {
            Some(config) if path.is_relative() => config
                .parent()
                .map_or_else(|| path.to_owned(), |dir| dir.join(path)),
            _ => path.to_owned(),
        };
        let static_files = match (self.embedded_files, &self.config.server.static_dir) {
            (Some(files), _) => Some(accept::StaticFiles::Embedded(Arc::new(files))),
            (None, Some(dir)) => Some(
                accept::StaticFiles::new(&near_config(dir.get_ref()))
                    .map_err(RelayError::StaticDir)?,
            ),
            (None, None) => None,
        };
        let origin = self
            .config_path
            .as_ref()
            .map_or_else(|| "configuration".to_owned(), |p| p.display().to_string());
        let config_dir = self
            .config_path
            .as_deref()
            .and_then(std::path::Path::parent);
        let certificates = certificates::load(&self.config, config_dir, &origin)?;
        let shared = Arc::new(Shared::new(
            self.config,
            self.inspectors,
            self.config_path,
            self.listen,
            static_files,
            certificates,
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
        // Built now, so that a resolver that can't be had fails the start, not the first
        // lookup.
        shared.prepare_discovery()?;
        let accept = tokio::spawn({
            let shared = shared.clone();
            async move {
                // Discovered upstreams have their backends before the first client is routed.
                if let Err(error) = shared.start_discovery().await {
                    tracing::error!(%error, "discovery could not start");
                }
                accept::accept_loop(shared.acceptor.clone(), listener).await;
            }
        });
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
/// and a deep accept backlog; with `reuse_port`, also `SO_REUSEPORT`, so relay processes that
/// all set it share the address and the kernel spreads new connections over them.
fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
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
    /// Upstreams with `discover` are resolved before the new configuration applies.
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, ConfigError> {
        self.shared.reload(config).await
    }

    /// Reloads the file given to [`RelayBuilder::config_path`].
    pub async fn reload_from_file(&self) -> Result<ReloadReport, ReloadError> {
        self.shared.reload_from_file().await
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
        shared.observe().sessions.drain_all();
        tasks.close();
        let mut sessions_aborted = 0;
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            sessions_aborted = shared.observe().sessions.len();
            tracing::warn!(
                sessions = sessions_aborted,
                "grace period over; dropping the rest"
            );
            shutdown.abort_now();
            shared.observe().sessions.abort_all();
            tasks.wait().await;
        }
        shutdown.abort_now();
        shared.control.close();
        shared.control.wait().await;
        tracing::info!("drained");
        ShutdownReport {
            sessions_at_drain,
            sessions_aborted,
        }
    }
}
