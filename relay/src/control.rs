//! The relay's control plane: the shared root that reloads, the admin API and shutdown work on.
//! The data plane gets narrower contexts: the listener its [`Acceptor`], sessions their
//! [`SessionContext`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio_util::task::TaskTracker;

use crate::accept::tls::ListenerTls;
use crate::accept::{Acceptor, StaticFiles};
use crate::admission::Admission;
use crate::certificates::{self, Certificates};
use crate::config::{Config, ConfigError, ServerConfig};
use crate::generation::{self, Generation, Generations};
use crate::inspect::InspectorRegistry;
use crate::observe::Observatory;
use crate::session::SessionContext;
use crate::shutdown::Shutdown;

/// The relay's root: what its control plane (reloads, the admin API, shutdown) works on. The
/// data plane gets narrower contexts: the listener its [`Acceptor`], sessions their
/// [`SessionContext`].
pub(crate) struct Shared {
    pub generations: Arc<Generations>,
    /// Inspector names a reloaded configuration may use.
    pub inspectors: InspectorRegistry,
    /// The file `POST /api/reload` and SIGHUP read, if the relay was started from one.
    pub config_path: Option<PathBuf>,
    pub acceptor: Arc<Acceptor>,
    /// `[server]` as the relay started: what `listen`, `admin`, `max_connections` and whether
    /// the listener speaks TLS really are until a restart.
    started: ServerConfig,
    /// The listen address given in code (`--listen`), which every reloaded configuration keeps.
    listen: Option<SocketAddr>,
    /// The admin listener's tasks (its connections, taps): they outlive the drain, so that
    /// `/readyz` can say "draining", and stop at its end.
    pub control: TaskTracker,
}

impl Shared {
    pub fn new(
        config: Config,
        inspectors: InspectorRegistry,
        config_path: Option<PathBuf>,
        listen: Option<SocketAddr>,
        static_files: Option<StaticFiles>,
        certificates: Certificates,
    ) -> Shared {
        let max_connections = *config.server.max_connections.get_ref();
        let started = config.server.clone();
        let shutdown = Shutdown::default();
        let first = Generation::new(
            config,
            &inspectors,
            None,
            shutdown.drain.child_token(),
            &certificates.upstreams,
        );
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
                admission: Admission::new(max_connections),
                next_conn_id: AtomicU64::new(1),
                tasks: TaskTracker::new(),
                static_files,
                tls: certificates.listener.map(ListenerTls::new),
            }),
            started,
            listen,
            control: TaskTracker::new(),
        }
    }

    pub fn observe(&self) -> &Arc<Observatory> {
        &self.acceptor.sessions.observe
    }

    pub fn shutdown(&self) -> &Shutdown {
        &self.acceptor.sessions.shutdown
    }

    /// Starts the background work of the current generation (health checks, mux links).
    pub fn start_generation(&self) {
        self.generations
            .current()
            .start(&self.acceptor.tasks, self.shutdown());
    }

    /// Applies a new configuration to new connections at once; sessions on backends it removes
    /// are moved (or closed 1012) after `shutdown_grace`. Its TLS files are read first: one
    /// that can't be used refuses the whole reload, and the running certificates stay.
    pub fn reload(&self, config: Config) -> Result<ReloadReport, ConfigError> {
        self.reload_named(config, "configuration")
    }

    /// [`Shared::reload`], naming the configuration `origin` in its problems.
    fn reload_named(&self, mut config: Config, origin: &str) -> Result<ReloadReport, ConfigError> {
        config.check_inspectors(&self.inspectors)?;
        if let Some(addr) = self.listen {
            config.server.listen = toml::Spanned::new(0..0, crate::config::ListenAddr(addr));
        }
        let dir = self
            .config_path
            .as_deref()
            .and_then(std::path::Path::parent);
        let certificates = certificates::load(&config, dir, origin)?;
        let old = self.generations.current();
        // Against what the process really runs with: a key changed by an earlier reload is
        // still not in force.
        let restart_needed = generation::restart_needed(&self.started, &config.server);
        let retired = self.shutdown().drain.child_token();
        let new = Arc::new(Generation::new(
            config,
            &self.inspectors,
            Some(&old),
            retired,
            &certificates.upstreams,
        ));
        let listener_certificate = match (&self.acceptor.tls, certificates.listener) {
            (Some(tls), Some(config)) => {
                tls.replace(config);
                "replaced"
            }
            _ => "unchanged",
        };
        let removed = old.backends_missing_from(&new);
        let added = new.backends_missing_from(&old);
        for url in &removed {
            old.backends.drain(url);
        }
        let routes = new.routes.len();
        self.generations.replace(new);
        old.retired.cancel();
        self.start_generation();
        let list = |urls: &[String]| {
            if urls.is_empty() {
                "none".to_owned()
            } else {
                urls.join(", ")
            }
        };
        tracing::info!(
            added = %list(&added),
            removed = %list(&removed),
            routes,
            restart_needed = %list(&restart_needed),
            listener_certificate,
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
    pub fn reload_from_file(&self) -> Result<ReloadReport, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let source = std::fs::read_to_string(path).map_err(|error| ReloadError::Read {
            path: path.clone(),
            error,
        })?;
        let origin = path.display().to_string();
        let config = Config::from_toml_with(&source, &origin, &self.inspectors)?;
        Ok(self.reload_named(config, &origin)?)
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

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |items: &[String]| {
            if items.is_empty() {
                "none".to_owned()
            } else {
                items.join(", ")
            }
        };
        write!(
            f,
            "{} routes; added: {}; removed: {}; restart needed for: {}",
            self.routes,
            list(&self.added),
            list(&self.removed),
            list(&self.restart_needed)
        )
    }
}

/// Why a reload was refused; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The relay was started from flags, not a file.
    #[error("nothing to reload: the relay was not started with --config")]
    NoFile,
    /// The file could not be read.
    #[error("read {path}: {error}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The new configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}
