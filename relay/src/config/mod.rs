//! The TOML configuration (every key: `docs/configuration.md`): the file's schema with its
//! defaults, the value types, and validation.
//!
//! Every value is checked while it is deserialized, so a bad value is reported by `toml` with
//! the span of the offending key; checks that need more than one value (a route naming a missing
//! upstream, a key that is set but not implemented yet) run afterwards on [`toml::Spanned`] fields
//! so they, too, can point at a line.
//!
//! This module depends on nothing else of the relay: what it needs to know of inspectors comes
//! in through [`InspectorCatalog`].

mod check;
mod values;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use check::{ConfigError, ConfigProblem, InspectorCatalog};
pub use values::{
    BackendConfig, BackendUrl, ByteSize, DnsTarget, HashKey, HumanDuration, ListenAddr,
    ResolverAddr,
};

pub(crate) use check::problem_at;

/// The whole relay configuration, as read from a TOML file or built from CLI flags.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The client-facing listener and process-wide settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// Ping/pong keepalive, applied to both legs of every connection.
    #[serde(default)]
    pub keepalive: KeepaliveConfig,
    /// Per-message and per-client limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Routes, matched by longest path prefix.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Named groups of backends that routes point at.
    #[serde(default, rename = "upstream")]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// The text it was parsed from, so that problems found later (in the files it names)
    /// can point at its lines too.
    #[serde(skip)]
    pub(crate) source: Source,
}

/// The TOML text a [`Config`] was read from, if it was read from one.
#[derive(Clone, Default)]
pub(crate) struct Source(pub Option<std::sync::Arc<str>>);

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(text) => write!(f, "Source({} bytes)", text.len()),
            None => f.write_str("Source(none)"),
        }
    }
}

/// `[server]`: the listener and process-wide settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Client-facing listener address.
    pub listen: Spanned<ListenAddr>,
    /// Bind `listen` with `SO_REUSEPORT`, so several relay processes with this setting share
    /// the address and the kernel spreads new connections over them (scaling out on one box).
    pub reuse_port: bool,
    /// TLS certificate chain (PEM); with `tls_key`, the listener speaks wss://.
    pub tls_cert: Option<Spanned<PathBuf>>,
    /// TLS private key (PEM).
    pub tls_key: Option<Spanned<PathBuf>>,
    /// Also speak HTTP/2 on `listen` (h2 by ALPN under TLS, h2c with prior knowledge on plain
    /// TCP), with WebSockets over it by extended CONNECT (RFC 8441). Off by default: the
    /// listener speaks HTTP/1.1 alone.
    pub http2: bool,
    /// Plain `GET`s that are not upgrades are served from this folder (relative to the config
    /// file); unset, they get 426.
    pub static_dir: Option<Spanned<PathBuf>>,
    /// Admin and metrics listener.
    pub admin: Option<Spanned<ListenAddr>>,
    /// Bearer token the admin listener requires, if set.
    pub admin_token: Option<Spanned<String>>,
    /// Connections (handshaking or established) above which new ones get HTTP 503.
    pub max_connections: Spanned<usize>,
    /// Time allowed for a client's whole handshake, backend dial included.
    pub handshake_timeout: Spanned<HumanDuration>,
    /// Time allowed for a graceful drain on SIGTERM/SIGINT.
    pub shutdown_grace: HumanDuration,
    /// The DNS server that `discover` upstreams ask; unset, the system's (`/etc/resolv.conf`).
    pub resolver: Option<Spanned<ResolverAddr>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: Spanned::new(0..0, ListenAddr(SocketAddr::from(([0, 0, 0, 0], 8080)))),
            reuse_port: false,
            tls_cert: None,
            tls_key: None,
            http2: false,
            static_dir: None,
            admin: None,
            admin_token: None,
            max_connections: Spanned::new(0..0, 100_000),
            handshake_timeout: Spanned::new(0..0, HumanDuration(Duration::from_secs(10))),
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
            resolver: None,
        }
    }
}

/// `[keepalive]`: ping/pong on both legs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveConfig {
    /// Send a Ping when a leg has received nothing for this long; zero disables pings.
    pub ping_interval: HumanDuration,
    /// After a Ping, a leg that sends no frame at all within this is dead.
    pub pong_timeout: Spanned<HumanDuration>,
    /// Close a connection whose legs carried no message for this long; zero disables it.
    pub idle_timeout: HumanDuration,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            ping_interval: HumanDuration(Duration::from_secs(20)),
            pong_timeout: Spanned::new(0..0, HumanDuration(Duration::from_secs(10))),
            idle_timeout: HumanDuration(Duration::ZERO),
        }
    }
}

/// `[limits]`: what a single client may send.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest whole message; larger closes the sender with 1009.
    pub max_message_size: Spanned<ByteSize>,
    /// Largest single frame; larger closes the sender with 1009.
    pub max_frame_size: Spanned<ByteSize>,
    /// Per-client message rate; 0 means unlimited.
    pub max_messages_per_second: Spanned<u32>,
    /// Connections (handshaking or established) one client IP address may hold; 0 means
    /// unlimited. Beyond it: HTTP 503 with `Retry-After`.
    pub max_connections_per_ip: Spanned<usize>,
    /// WebSocket handshakes the relay starts per second, all clients together; 0 means
    /// unlimited. Beyond it: HTTP 503 with `Retry-After`.
    pub max_handshakes_per_second: Spanned<u32>,
    /// Allowed `Origin` values; empty allows any.
    pub allowed_origins: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: Spanned::new(0..0, ByteSize(1 << 20)),
            max_frame_size: Spanned::new(0..0, ByteSize(1 << 20)),
            max_messages_per_second: Spanned::new(0..0, 0),
            max_connections_per_ip: Spanned::new(0..0, 0),
            max_handshakes_per_second: Spanned::new(0..0, 0),
            allowed_origins: Vec::new(),
        }
    }
}

/// One `[[route]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix this route serves; the longest matching prefix wins.
    pub path: Spanned<String>,
    /// Name of the `[upstream.NAME]` that serves it.
    pub upstream: Spanned<String>,
    /// How clients reach the backends.
    #[serde(default = "unspanned")]
    pub mode: Spanned<Mode>,
    /// What identifies a client for rendezvous hashing.
    #[serde(default)]
    pub hash_key: HashKey,
    /// Send the client's `Host` to the backend instead of the backend's own authority.
    #[serde(default = "default_true")]
    pub preserve_host: bool,
    /// Inspector chain for the route's frames, in order.
    #[serde(default = "unspanned")]
    pub inspect: Spanned<Vec<String>>,
    /// The route carries secrets: frame logs and taps show no payload bytes.
    #[serde(default)]
    pub sensitive: bool,
    /// Whether clients that offer `permessage-deflate` (RFC 7692) get it.
    #[serde(default)]
    pub compression: Compression,
}

/// A default value, which has no place in the file (span `0..0`).
fn unspanned<T: Default>() -> Spanned<T> {
    Spanned::new(0..0, T::default())
}

fn default_true() -> bool {
    true
}

/// How a route carries its clients to the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One backend WebSocket per client.
    #[default]
    PerClient,
    /// Clients share the upstream's mux links.
    Mux,
}

/// A route's `compression`: what the relay answers a client's `permessage-deflate` offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Decline every offer: the client leg is uncompressed (the default).
    #[default]
    Off,
    /// Negotiate `permessage-deflate` with clients that offer it; the backend leg stays
    /// uncompressed.
    Client,
}

/// `[upstream.NAME]`: a group of backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The backends, ranked per client by rendezvous hashing. An upstream has these or
    /// `discover`, never both.
    pub backends: Option<Spanned<Vec<BackendConfig>>>,
    /// The backends are the addresses a DNS name resolves to, resolved again every `refresh`.
    pub discover: Option<Spanned<DiscoverConfig>>,
    /// Time allowed for one backend's TCP connect plus WebSocket handshake.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Spanned<HumanDuration>,
    /// Shared links per backend in mux mode.
    pub mux_links: Option<Spanned<u32>>,
    /// What happens to a client whose backend goes away.
    #[serde(default)]
    pub on_backend_loss: OnBackendLoss,
    /// Active health checking.
    pub health_check: Option<Spanned<HealthCheckConfig>>,
    /// How the `wss://` backends are reached: trusted roots, client certificate, server name.
    pub tls: Option<Spanned<UpstreamTlsConfig>>,
}

/// `tls = { ... }` of an upstream: the TLS client settings of its `wss://` backends. Paths are
/// relative to the config file's directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM file of the certificates to trust instead of the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM certificate chain the relay presents to backends that ask for one (mTLS).
    pub client_cert: Option<std::path::PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<std::path::PathBuf>,
    /// The name sent as SNI and verified in the backend's certificate, instead of the URL's
    /// host.
    pub server_name: Option<String>,
}

impl UpstreamConfig {
    /// The backends written in the file; none for a discovered upstream.
    pub fn configured_backends(&self) -> &[BackendConfig] {
        self.backends.as_ref().map_or(&[], |list| list.get_ref())
    }

    /// Whether its backends speak TLS: some `wss://` backend, or `discover` with `scheme =
    /// "wss"`.
    pub fn has_wss_backends(&self) -> bool {
        self.configured_backends().iter().any(|b| b.url.secure)
            || self
                .discover
                .as_ref()
                .is_some_and(|d| d.get_ref().scheme == Scheme::Wss)
    }

    /// Where the backends are set, for problems about them: `backends` or `discover`.
    pub fn backends_span(&self) -> std::ops::Range<usize> {
        match (&self.backends, &self.discover) {
            (Some(list), _) => list.span(),
            (None, Some(discover)) => discover.span(),
            (None, None) => 0..0,
        }
    }
}

/// `discover = { dns, refresh, scheme, path }` of an upstream: its backends are
/// `scheme://ADDRESS:port/path` for every A and AAAA record of the name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverConfig {
    /// The name to resolve and the port of every backend.
    pub dns: DnsTarget,
    /// Time between lookups.
    #[serde(default = "default_refresh")]
    pub refresh: HumanDuration,
    /// The scheme of the backend URLs.
    #[serde(default)]
    pub scheme: Scheme,
    /// Path prefix of every backend URL (`""` for none), like a configured URL's path.
    #[serde(default)]
    pub path: String,
}

fn default_refresh() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

/// The scheme of discovered backend URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Plain WebSockets.
    #[default]
    Ws,
    /// WebSockets over TLS.
    Wss,
}

impl Scheme {
    /// `ws` or `wss`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
        }
    }
}

impl DiscoverConfig {
    /// The backend URL of one discovered address.
    pub fn url_of(&self, address: std::net::IpAddr) -> String {
        let host = match address {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        };
        format!(
            "{}://{host}:{}{}",
            self.scheme.as_str(),
            self.dns.port,
            self.path
        )
    }
}

fn default_connect_timeout() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(Duration::from_secs(5)))
}

/// What a client experiences when its backend closes or dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBackendLoss {
    /// Re-originate the client to the next backend in its rank, keeping its socket.
    #[default]
    Reconnect,
    /// Close the client with 1012 (service restart).
    Close,
}

/// `health_check = { ... }` of an upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Time between probes.
    pub interval: HumanDuration,
    /// Time allowed for one probe.
    pub timeout: HumanDuration,
    /// Consecutive failures that mark a backend unhealthy.
    pub unhealthy_after: u32,
    /// Consecutive successes that mark it healthy again.
    pub healthy_after: u32,
}

impl Config {
    /// Parses and validates a TOML configuration; `origin` names it in error messages, and
    /// `inspectors` says which `inspect` entries exist (the relay's registry: the built-ins
    /// plus an embedding application's own). `Config::from_toml` checks against the built-ins.
    pub fn from_toml_with(
        source: &str,
        origin: &str,
        inspectors: &dyn InspectorCatalog,
    ) -> Result<Config, ConfigError> {
        // Cross-key checks run on what parses, so one run reports every kind of problem.
        let (parsed, mut problems) = check::parse_all(source);
        if let Some(config) = &parsed {
            let cross = check::problems(config, Some(source), inspectors);
            let cross = check::without_echoes(cross, &problems, source);
            problems.extend(cross);
        }
        problems.sort_by_key(|problem| problem.line);
        ConfigError::from_problems(origin, problems)?;
        let mut config = parsed.expect("a configuration without problems was parsed");
        config.source = Source(Some(source.into()));
        Ok(config)
    }

    /// Builds the quick-start configuration: one route `/` in per-client mode over `backends`.
    pub fn quick_start(listen: SocketAddr, backends: &[String]) -> Result<Config, ConfigError> {
        let mut parsed = Vec::new();
        let mut problems = Vec::new();
        for text in backends {
            match BackendUrl::parse(text) {
                Ok(url) => parsed.push(BackendConfig { url, weight: 1.0 }),
                Err(message) => problems.push(ConfigProblem {
                    line: None,
                    key: "--backend".into(),
                    message,
                }),
            }
        }
        let config = Config {
            server: ServerConfig {
                listen: Spanned::new(0..0, ListenAddr(listen)),
                ..ServerConfig::default()
            },
            keepalive: KeepaliveConfig::default(),
            limits: LimitsConfig::default(),
            routes: vec![RouteConfig {
                path: Spanned::new(0..0, "/".into()),
                upstream: Spanned::new(0..0, "default".into()),
                mode: Spanned::new(0..0, Mode::PerClient),
                hash_key: HashKey::RemoteAddr,
                preserve_host: true,
                inspect: Spanned::new(0..0, Vec::new()),
                sensitive: false,
                compression: Compression::Off,
            }],
            upstreams: BTreeMap::from([(
                "default".to_owned(),
                UpstreamConfig {
                    backends: Some(Spanned::new(0..0, parsed)),
                    discover: None,
                    connect_timeout: default_connect_timeout(),
                    mux_links: None,
                    on_backend_loss: OnBackendLoss::Reconnect,
                    health_check: None,
                    tls: None,
                },
            )]),
            source: Source::default(),
        };
        // The quick start names no inspector.
        let none = |entry: &str| Err(format!("unknown inspector {entry:?}"));
        problems.extend(check::problems(&config, None, &none));
        ConfigError::from_problems("command line", problems)?;
        Ok(config)
    }

    /// Checks the configuration again against `inspectors` (used when an application
    /// registers inspectors of its own after loading the file).
    pub fn check_inspectors(&self, inspectors: &dyn InspectorCatalog) -> Result<(), ConfigError> {
        ConfigError::from_problems("configuration", check::problems(self, None, inspectors))
    }

    /// The problems of `config` as a [`ConfigError`] from where it came (`origin`), each
    /// problem with its line when `config` was read from a file.
    pub(crate) fn error_at(
        &self,
        origin: &str,
        problems: Vec<(std::ops::Range<usize>, String, String)>,
    ) -> Result<(), ConfigError> {
        let source = self.source.0.as_deref();
        let problems = problems
            .into_iter()
            .map(|(span, key, message)| problem_at(source, span, key, message))
            .collect();
        ConfigError::from_problems(origin, problems)
    }

    /// The client-facing listen address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.server.listen.get_ref().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    const FULL: &str = r#"
[server]
listen = "127.0.0.1:8080"
max_connections = 100000
handshake_timeout = "10s"
shutdown_grace = "30s"

[keepalive]
ping_interval = "20s"
pong_timeout = "10s"
idle_timeout = "0s"

[limits]
max_message_size = "1MiB"
max_frame_size = "1MiB"
max_messages_per_second = 0
allowed_origins = []

[[route]]
path = "/"
upstream = "chat"
mode = "per-client"
hash_key = "header:X-User"
preserve_host = true

[upstream.chat]
backends = ["ws://127.0.0.1:9001", { url = "ws://127.0.0.1:9002/base/", weight = 2.0 }]
connect_timeout = "5s"
on_backend_loss = "reconnect"
"#;

    #[test]
    fn parses_the_design_example() {
        let config = Config::from_toml(FULL, "t.toml").unwrap();
        assert_eq!(config.listen_addr(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.keepalive.ping_interval.0, Duration::from_secs(20));
        assert_eq!(config.limits.max_message_size.get_ref().0, 1 << 20);
        let route = &config.routes[0];
        assert_eq!(
            route.hash_key,
            HashKey::Header(HeaderName::from_static("x-user"))
        );
        let backends = config.upstreams["chat"].configured_backends();
        assert_eq!(backends[1].weight, 2.0);
        assert_eq!(backends[1].url.base_path, "/base");
        assert_eq!(backends[0].url.authority, "127.0.0.1:9001");
    }

    #[test]
    fn a_bad_value_names_its_key_and_line() {
        let source = FULL.replace("pong_timeout = \"10s\"", "pong_timeout = \"ten\"");
        let error = Config::from_toml(&source, "t.toml").unwrap_err();
        let problem = &error.problems[0];
        assert_eq!(problem.line, Some(10));
        assert_eq!(problem.key, "pong_timeout");
        assert!(problem.message.contains("invalid duration"), "{problem}");
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let source = FULL.replace("preserve_host = true", "preserve_hots = true");
        let error = Config::from_toml(&source, "t.toml").unwrap_err();
        assert_eq!(error.problems[0].line, Some(24));
        assert!(error.problems[0].message.contains("preserve_hots"));
    }

    #[test]
    fn a_zero_that_cannot_work_points_at_its_line() {
        for (from, to, expected) in [
            (
                "max_frame_size = \"1MiB\"",
                "max_frame_size = \"00KiB\"",
                "line 15: limits.max_frame_size: must be above 0",
            ),
            (
                "max_message_size = \"1MiB\"",
                "max_message_size = \"0B\"",
                "line 14: limits.max_message_size: must be above 0",
            ),
            (
                "handshake_timeout = \"10s\"",
                "handshake_timeout = \"0s\"",
                "line 5: server.handshake_timeout: must be above 0s",
            ),
            (
                "connect_timeout = \"5s\"",
                "connect_timeout = \"0s\"",
                "line 28: upstream.chat.connect_timeout: must be above 0s",
            ),
        ] {
            let text = Config::from_toml(&FULL.replace(from, to), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(text.contains(expected), "{to}: {text}");
        }
    }

    #[test]
    fn zero_mux_links_are_refused() {
        let zero_links = FULL.replace(
            "connect_timeout = \"5s\"",
            "connect_timeout = \"5s\"\nmux_links = 0",
        );
        let text = Config::from_toml(&zero_links, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("upstream.chat.mux_links: must be at least 1"),
            "{text}"
        );
        let mux = FULL.replace("mode = \"per-client\"", "mode = \"mux\"");
        assert!(Config::from_toml(&mux, "t.toml").is_ok());
    }

    #[test]
    fn tls_settings_that_cannot_work_are_refused_with_their_lines() {
        let secure = FULL.replace("ws://127.0.0.1:9001", "wss://127.0.0.1:9001");
        let with = |source: &str, tls: &str| {
            source.replace(
                "connect_timeout = \"5s\"",
                &format!("connect_timeout = \"5s\"\ntls = {tls}"),
            )
        };
        let fine = with(
            &secure,
            "{ ca_file = \"ca.pem\", client_cert = \"c.pem\", client_key = \"k.pem\", server_name = \"chat.internal\" }",
        );
        let config = Config::from_toml(&fine, "t.toml").unwrap();
        let tls = config.upstreams["chat"].tls.as_ref().unwrap().get_ref();
        assert_eq!(tls.server_name.as_deref(), Some("chat.internal"));
        let messages = |source: &str| -> Vec<String> {
            Config::from_toml(source, "t.toml")
                .unwrap_err()
                .problems
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            messages(&with(&secure, "{ client_key = \"k.pem\" }")),
            ["line 29: upstream.chat.tls.client_key: needs upstream.chat.tls.client_cert too"]
        );
        let plain = messages(&with(FULL, "{ ca_file = \"ca.pem\" }"));
        assert_eq!(plain.len(), 1, "{plain:?}");
        assert!(
            plain[0].starts_with("line 29: upstream.chat.tls: applies to wss:// backends only"),
            "{plain:?}"
        );
        let bad_name = messages(&with(&secure, "{ server_name = \"not a name\" }"));
        assert!(bad_name[0].contains("tls.server_name"), "{bad_name:?}");
        let typo = messages(&with(&secure, "{ ca_fle = \"ca.pem\" }"));
        assert!(typo[0].contains("ca_fle"), "{typo:?}");
    }

    #[test]
    fn a_route_to_a_missing_upstream_is_refused() {
        let source = FULL.replace("upstream = \"chat\"", "upstream = \"chta\"");
        let error = Config::from_toml(&source, "t.toml").unwrap_err();
        assert_eq!(error.problems[0].line, Some(21));
        assert!(error.problems[0].message.contains("no [upstream.chta]"));
    }

    #[test]
    fn discover_is_checked_like_every_key() {
        let discovered = |upstream: &str, server: &str| {
            format!(
                "[server]\n{server}\n[[route]]\npath = \"/\"\nupstream = \"chat\"\n\n[upstream.chat]\n{upstream}\n"
            )
        };
        let good = discovered(
            "discover = { dns = \"chat.default.svc:9000\", refresh = \"2s\", path = \"/ws\" }",
            "resolver = \"127.0.0.1:5353\"",
        );
        let config = Config::from_toml(&good, "t.toml").unwrap();
        let upstream = &config.upstreams["chat"];
        let discover = upstream.discover.as_ref().unwrap().get_ref();
        assert_eq!(discover.dns.port, 9000);
        assert_eq!(discover.scheme, Scheme::Ws);
        assert_eq!(discover.refresh.0, Duration::from_secs(2));
        assert!(upstream.configured_backends().is_empty());
        assert_eq!(
            discover.url_of("10.0.0.7".parse().unwrap()),
            "ws://10.0.0.7:9000/ws"
        );
        assert_eq!(
            config.server.resolver.unwrap().get_ref().0,
            "127.0.0.1:5353".parse().unwrap()
        );
        let secure = discovered("discover = { dns = \"chat:9000\", scheme = \"wss\" }", "");
        let config = Config::from_toml(&secure, "t.toml").unwrap();
        assert!(config.upstreams["chat"].has_wss_backends());
        let defaults = discovered("discover = { dns = \"chat:9000\" }", "");
        let config = Config::from_toml(&defaults, "t.toml").unwrap();
        let discover = config.upstreams["chat"]
            .discover
            .clone()
            .unwrap()
            .into_inner();
        assert_eq!(discover.refresh.0, Duration::from_secs(5));
        assert_eq!(discover.path, "");

        let problem = |upstream: &str, server: &str| {
            Config::from_toml(&discovered(upstream, server), "t.toml")
                .unwrap_err()
                .to_string()
        };
        let both = problem(
            "backends = [\"ws://127.0.0.1:1\"]\ndiscover = { dns = \"chat:9000\" }",
            "",
        );
        assert!(
            both.contains("line 9: upstream.chat.discover: an upstream has either backends or discover, not both"),
            "{both}"
        );
        let neither = problem("connect_timeout = \"1s\"", "");
        assert!(
            neither.contains("line 7: upstream.chat: needs backends"),
            "{neither}"
        );
        for (upstream, expected) in [
            (
                "discover = { dns = \"chat\" }",
                "invalid discover.dns \"chat\": no port",
            ),
            (
                "discover = { dns = \"chat:9000\", refresh = \"0s\" }",
                "refresh must be above 0s",
            ),
            (
                "discover = { dns = \"chat:9000\", scheme = \"http\" }",
                "unknown variant `http`",
            ),
            (
                "discover = { dns = \"chat:9000\", path = \"ws\" }",
                "must be empty or start with '/'",
            ),
            (
                "discover = { dns = \"chat:9000\", port = 1 }",
                "unknown field `port`",
            ),
        ] {
            let text = problem(upstream, "");
            assert!(text.contains(expected), "{upstream}: {text}");
            assert!(text.contains("line 8"), "{upstream}: {text}");
            assert!(
                !text.contains("needs backends"),
                "a malformed discover is not reported again as missing: {text}"
            );
        }
        let resolver = problem(
            "discover = { dns = \"chat:9000\" }",
            "resolver = \"localhost\"",
        );
        assert!(
            resolver.contains("line 2: resolver: invalid resolver \"localhost\""),
            "{resolver}"
        );
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(
            HumanDuration::parse("500ms").unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            HumanDuration::parse("2m").unwrap().0,
            Duration::from_secs(120)
        );
        assert_eq!(HumanDuration::parse("0").unwrap().0, Duration::ZERO);
        assert!(HumanDuration::parse("5").is_err());
        assert!(HumanDuration::parse("-1s").is_err());
        assert_eq!(ByteSize::parse("64KiB").unwrap().0, 65536);
        assert_eq!(ByteSize::parse("1000").unwrap().0, 1000);
        assert!(ByteSize::parse("1 lb").is_err());
        assert!(ByteSize::parse("99999999999999GiB").is_err());
    }

    #[test]
    fn backend_urls() {
        assert!(
            BackendUrl::parse("http://x:1")
                .unwrap_err()
                .contains("must start with ws:// or wss://")
        );
        let plain = BackendUrl::parse("ws://example.com").unwrap();
        assert_eq!(plain.authority, "example.com:80");
        assert!(!plain.secure);
        let secure = BackendUrl::parse("wss://chat.example.com/base").unwrap();
        assert!(secure.secure);
        assert_eq!(secure.authority, "chat.example.com:443");
        assert_eq!(secure.host, "chat.example.com");
        assert_eq!(secure.base_path, "/base");
        assert_eq!(BackendUrl::parse("wss://[::1]:9443").unwrap().host, "[::1]");
        assert!(HashKey::parse("cookie:").is_err());
        assert_eq!(
            HashKey::parse("query:room").unwrap(),
            HashKey::Query("room".into())
        );
    }
}
