//! The relay's control plane: the shared root that reloads, the admin API, discovery and
//! shutdown work on. The data plane gets narrower contexts: the listener its [`Acceptor`],
//! sessions their [`SessionContext`].
//!
//! Every change of backends goes through one path, [`Shared::install`]: a reload, and a
//! `discover` upstream whose DNS answer changed. Added backends join the rankings; removed ones
//! are drained, so their sessions move (or close 1012) after `shutdown_grace`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use hickory_resolver::TokioResolver;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::tls::ListenerTls;
use crate::accept::{Acceptor, StaticFiles};
use crate::admission::Admission;
use crate::certificates::{self, Certificates};
use crate::config::{
    BackendConfig, Config, ConfigError, ConfigProblem, DiscoverConfig, ServerConfig,
};
use crate::discovery::{self, Discoveries, Watch};
use crate::generation::{self, Generation, Generations};
use crate::inspect::InspectorRegistry;
use crate::observe::Observatory;
use crate::session::SessionContext;
use crate::shutdown::Shutdown;
use crate::upstream::{BackendSets, BackendTls};

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
    /// `/readyz` can say "draining", and stop at its end. Discovery watches run here too, and
    /// stop at the drain.
    pub control: TaskTracker,
    /// Held while a new generation is built and installed, so that a reload and a discovery
    /// change never build on the same old generation and lose one another's change.
    installing: Mutex<()>,
    /// The resolver and the refresh loops of `discover` upstreams.
    discovery: Mutex<DiscoveryState>,
}

/// What the control plane runs for discovery.
#[derive(Default)]
struct DiscoveryState {
    /// The resolver, built for `[server] resolver` (`None`: the system's) as `resolver_for` says.
    resolver: Option<(Option<SocketAddr>, TokioResolver)>,
    /// The running watch of each `discover` upstream: its settings, the `[server] resolver` it
    /// asks, and the token that stops it.
    watches: BTreeMap<String, (DiscoverConfig, Option<SocketAddr>, CancellationToken)>,
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
        // `discover` upstreams have no backends until `start_discovery` resolves them, before
        // the first client is accepted.
        let first = Generation::new(
            config,
            BackendSets::new(),
            &inspectors,
            None,
            shutdown.drain.child_token(),
            certificates.upstreams,
        );
        let generations = Arc::new(Generations::new(first));
        let sessions = SessionContext {
            generations: generations.clone(),
            observe: Arc::new(Observatory::default()),
            shutdown: Arc::new(shutdown),
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
                tls: certificates
                    .listener
                    .map(|listener| ListenerTls::new(listener, started.http2)),
                http2: started.http2,
            }),
            started,
            listen,
            control: TaskTracker::new(),
            installing: Mutex::new(()),
            discovery: Mutex::default(),
        }
    }

    pub fn observe(&self) -> &Arc<Observatory> {
        &self.acceptor.sessions.observe
    }

    pub fn shutdown(&self) -> &Arc<Shutdown> {
        &self.acceptor.sessions.shutdown
    }

    /// Starts the background work of the current generation (health checks, mux links).
    pub fn start_generation(&self) {
        self.generations
            .current()
            .start(&self.acceptor.tasks, self.shutdown());
    }

    /// Builds the resolver if the configuration the relay started with has `discover`
    /// upstreams, so that one that can't be had (no `/etc/resolv.conf`) fails the start.
    pub fn prepare_discovery(&self) -> Result<(), ConfigError> {
        let config = &self.generations.current().config;
        if config.upstreams.values().any(|u| u.discover.is_some()) {
            self.resolver_for(config)?;
        }
        Ok(())
    }

    /// Resolves the `discover` upstreams of the configuration the relay started with and
    /// starts their refresh loops; the accept loop starts after it. A name that does not
    /// resolve leaves its upstream without backends (clients get 503) until a refresh answers.
    pub async fn start_discovery(self: &Arc<Self>) -> Result<(), ConfigError> {
        let first = self.generations.current();
        let config = &first.config;
        if !config.upstreams.values().any(|u| u.discover.is_some()) {
            return Ok(());
        }
        let resolver = self.resolver_for(config)?;
        let (discovered, failing) = self.resolve_all(config, &resolver, None).await;
        // A reload that came in meanwhile resolved its own configuration and started its own
        // watches: this older one must not replace it.
        let installed = self.install_over(|current| {
            std::ptr::eq(current, &*first)
                .then(|| (config.clone(), discovered, current.upstream_tls.clone()))
        });
        if let Some(report) = installed {
            tracing::info!(backends = %list(&report.added), "discovered backends at start");
            self.restart_watches(config, &resolver, &failing);
        }
        Ok(())
    }

    /// Applies a new configuration to new connections at once, its `discover` upstreams
    /// resolved first; sessions on backends it removes are moved (or closed 1012) after
    /// `shutdown_grace`. Its TLS files are read first: one that can't be used refuses the
    /// whole reload, and the running certificates stay.
    pub async fn reload(self: &Arc<Self>, config: Config) -> Result<ReloadReport, ConfigError> {
        self.reload_named(config, "configuration").await
    }

    /// [`Shared::reload`], naming the configuration `origin` in its problems.
    async fn reload_named(
        self: &Arc<Self>,
        mut config: Config,
        origin: &str,
    ) -> Result<ReloadReport, ConfigError> {
        config.check_inspectors(&self.inspectors)?;
        if let Some(addr) = self.listen {
            config.server.listen = toml::Spanned::new(0..0, crate::config::ListenAddr(addr));
        }
        let resolver = self.resolver_for(&config)?;
        let dir = self
            .config_path
            .as_deref()
            .and_then(std::path::Path::parent);
        let certificates = certificates::load(&config, dir, origin)?;
        let old = self.generations.current();
        let (discovered, failing) = self.resolve_all(&config, &resolver, Some(&old)).await;
        // Against what the process really runs with: a key changed by an earlier reload is
        // still not in force.
        let restart_needed = generation::restart_needed(&self.started, &config.server);
        let mut report = self.install(config.clone(), discovered, certificates.upstreams);
        report.restart_needed = restart_needed;
        report.listener_certificate = match (&self.acceptor.tls, certificates.listener) {
            (Some(tls), Some(certificate)) => {
                if tls.replace(certificate) {
                    ListenerCertificate::Changed
                } else {
                    ListenerCertificate::Unchanged
                }
            }
            (Some(_), None) => ListenerCertificate::Kept,
            (None, _) => ListenerCertificate::NoTls,
        };
        self.restart_watches(&config, &resolver, &failing);
        tracing::info!(
            added = %list(&report.added),
            removed = %list(&report.removed),
            routes = report.routes,
            restart_needed = %list(&report.restart_needed),
            listener_certificate = report.listener_certificate.as_str(),
            "configuration reloaded"
        );
        Ok(report)
    }

    /// Makes `config`, with `discovered` as the backends of its `discover` upstreams and
    /// `tls` as the settings of its `wss://` upstreams, the current generation: backends it
    /// lacks are drained (their sessions move or close after `shutdown_grace`), the old
    /// generation is retired (its health checks stop, its mux links go away once their
    /// streams have), and the new one's background work starts.
    fn install(
        &self,
        config: Config,
        discovered: BackendSets,
        tls: BTreeMap<String, Arc<BackendTls>>,
    ) -> ReloadReport {
        self.install_over(|_| Some((config, discovered, tls)))
            .expect("an unconditional install")
    }

    /// [`Shared::install`] of what `next` makes of the current generation, if anything; the
    /// current generation can't change between the two.
    fn install_over(
        &self,
        next: impl FnOnce(
            &Generation,
        ) -> Option<(Config, BackendSets, BTreeMap<String, Arc<BackendTls>>)>,
    ) -> Option<ReloadReport> {
        let _installing = self.installing.lock().expect("install lock");
        let old = self.generations.current();
        let (config, discovered, tls) = next(&old)?;
        let retired = self.shutdown().drain.child_token();
        let new = Arc::new(Generation::new(
            config,
            discovered,
            &self.inspectors,
            Some(&old),
            retired,
            tls,
        ));
        let removed = old.backends_missing_from(&new);
        let added = new.backends_missing_from(&old);
        for url in &removed {
            old.backends.drain(url);
        }
        let routes = new.routes.len();
        self.generations.replace(new);
        // After the swap: a session that looks its backend up from now on finds it gone.
        for url in &removed {
            self.observe().sessions.backend_drained(url);
        }
        old.retired.cancel();
        self.start_generation();
        Some(ReloadReport {
            added,
            removed,
            routes,
            restart_needed: Vec::new(),
            listener_certificate: ListenerCertificate::NoTls,
        })
    }

    /// The resolver for `config`'s `[server] resolver`: the one already built if that did not
    /// change, else a new one.
    fn resolver_for(&self, config: &Config) -> Result<TokioResolver, ConfigError> {
        let server = config.server.resolver.as_ref().map(|addr| addr.get_ref().0);
        let mut state = self.discovery.lock().expect("discovery lock");
        if let Some((built_for, resolver)) = &state.resolver
            && *built_for == server
        {
            return Ok(resolver.clone());
        }
        let resolver = discovery::resolver(server).map_err(|message| ConfigError {
            origin: "configuration".to_owned(),
            problems: vec![ConfigProblem {
                line: None,
                key: "server.resolver".to_owned(),
                message,
            }],
        })?;
        state.resolver = Some((server, resolver.clone()));
        Ok(resolver)
    }

    /// Looks up every `discover` upstream of `config` at once. One that fails keeps the set
    /// `previous` had for it under the same settings (none otherwise), is counted, and is
    /// named in the second value.
    async fn resolve_all(
        &self,
        config: &Config,
        resolver: &TokioResolver,
        previous: Option<&Generation>,
    ) -> (BackendSets, Vec<String>) {
        let lookups = config.upstreams.iter().filter_map(|(name, upstream)| {
            let discover = upstream.discover.as_ref()?.get_ref();
            Some(async move { (name, discover, discovery::lookup(resolver, discover).await) })
        });
        let mut discovered = BackendSets::new();
        let mut failing = Vec::new();
        for (name, discover, answer) in futures_util::future::join_all(lookups).await {
            match answer {
                Ok(backends) => {
                    discovered.insert(name.clone(), backends);
                }
                Err(error) => {
                    self.failed(name);
                    let kept = previous
                        .filter(|old| {
                            old.config
                                .upstreams
                                .get(name)
                                .and_then(|u| u.discover.as_ref())
                                .is_some_and(|d| d.get_ref() == discover)
                        })
                        .and_then(|old| old.discovered_backends(name))
                        .map(<[BackendConfig]>::to_vec)
                        .unwrap_or_default();
                    tracing::warn!(
                        upstream = %name,
                        %error,
                        kept = kept.len(),
                        "discovery failed; the upstream keeps its last backends and is retried every refresh"
                    );
                    discovered.insert(name.clone(), kept);
                    failing.push(name.clone());
                }
            }
        }
        (discovered, failing)
    }

    /// Starts a refresh loop for every `discover` upstream of `config` that has none with the
    /// same settings and `resolver`, and stops the loops of upstreams it no longer discovers
    /// (or discovers otherwise). `failing` names the upstreams whose last lookup failed.
    fn restart_watches(
        self: &Arc<Self>,
        config: &Config,
        resolver: &TokioResolver,
        failing: &[String],
    ) {
        let mut state = self.discovery.lock().expect("discovery lock");
        let wanted: BTreeMap<&String, &DiscoverConfig> = config
            .upstreams
            .iter()
            .filter_map(|(name, upstream)| Some((name, upstream.discover.as_ref()?.get_ref())))
            .collect();
        let server = config.server.resolver.as_ref().map(|addr| addr.get_ref().0);
        state.watches.retain(|name, (discover, asks, stop)| {
            let keep = *asks == server && wanted.get(name) == Some(&&*discover);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (name, discover) in wanted {
            if state.watches.contains_key(name) {
                continue;
            }
            let stop = self.shutdown().drain.child_token();
            let watch = Watch {
                upstream: name.clone(),
                discover: discover.clone(),
                resolver: resolver.clone(),
                failing: failing.contains(name),
            };
            self.control.spawn(watch.run(self.clone(), stop.clone()));
            state
                .watches
                .insert(name.clone(), (discover.clone(), server, stop));
        }
    }

    /// Reloads from the file the relay was started with.
    pub async fn reload_from_file(self: &Arc<Self>) -> Result<ReloadReport, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let source = std::fs::read_to_string(path).map_err(|error| ReloadError::Read {
            path: path.clone(),
            error,
        })?;
        let origin = path.display().to_string();
        let config = Config::from_toml_with(&source, &origin, &self.inspectors)?;
        Ok(self.reload_named(config, &origin).await?)
    }
}

/// The refresh loops report here: a changed set is installed like a reload's backends.
impl Discoveries for Arc<Shared> {
    fn found(&self, upstream: &str, backends: Vec<BackendConfig>) {
        let changed = self.install_over(|current| {
            // A reload may have replaced or removed the upstream since the lookup began; its
            // own watch reports for it.
            let still_discovered = current
                .config
                .upstreams
                .get(upstream)
                .is_some_and(|u| u.discover.is_some());
            if !still_discovered || current.discovered_backends(upstream) == Some(&backends[..]) {
                return None;
            }
            let mut discovered = current.discovered.clone();
            discovered.insert(upstream.to_owned(), backends);
            Some((
                current.config.clone(),
                discovered,
                current.upstream_tls.clone(),
            ))
        });
        let Some(report) = changed else {
            return;
        };
        tracing::info!(
            upstream,
            added = %list(&report.added),
            removed = %list(&report.removed),
            "discovered backends changed"
        );
    }

    fn failed(&self, upstream: &str) {
        Shared::failed(self, upstream);
    }
}

impl Shared {
    /// Counts a failed lookup of `upstream`.
    fn failed(&self, upstream: &str) {
        self.observe().metrics.discovery_failed(upstream);
    }
}

/// `items` joined for a log line, or `none`.
fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
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
    /// What became of the client listener's certificate.
    pub listener_certificate: ListenerCertificate,
}

/// What a reload did with the client listener's certificate (`[server] tls_cert`, `tls_key`).
/// The files are read at every reload; a pair that can't be used refuses the reload, so a
/// report always describes a usable one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerCertificate {
    /// The listener does not speak TLS (and a file that turns it on needs a restart).
    NoTls,
    /// Read again: the same chain as the one in force, which stays (so do resumable sessions).
    Unchanged,
    /// Read again: a different chain, which new handshakes get from now on.
    Changed,
    /// The file no longer names a certificate; turning TLS off needs a restart, so the one in
    /// force stays (`restart_needed` says so).
    Kept,
}

impl ListenerCertificate {
    /// The name the log and the admin API's JSON use.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerCertificate::NoTls => "no_tls",
            ListenerCertificate::Unchanged => "unchanged",
            ListenerCertificate::Changed => "changed",
            ListenerCertificate::Kept => "kept",
        }
    }
}

impl std::fmt::Display for ListenerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ListenerCertificate::NoTls => "no TLS",
            ListenerCertificate::Unchanged => "re-read, unchanged",
            ListenerCertificate::Changed => "re-read, changed: new handshakes get the new one",
            ListenerCertificate::Kept => "kept until a restart",
        })
    }
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
        )?;
        if self.listener_certificate != ListenerCertificate::NoTls {
            write!(f, "; listener certificate: {}", self.listener_certificate)?;
        }
        Ok(())
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
