//! The TOML configuration of DESIGN section 3: parsing, defaults and validation.
//!
//! Every value is checked while it is deserialized, so a bad value is reported by `toml` with
//! the span of the offending key; checks that need more than one value (a route naming a missing
//! upstream, a key that is set but not implemented yet) run afterwards on [`toml::Spanned`] fields
//! so they, too, can point at a line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use http::uri::{Authority, PathAndQuery, Uri};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use toml::Spanned;

use crate::inspect::InspectorRegistry;

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
}

/// `[server]`: the listener and process-wide settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Client-facing listener address.
    pub listen: Spanned<ListenAddr>,
    /// TLS certificate chain (PEM); with `tls_key`, the listener speaks wss://.
    pub tls_cert: Option<Spanned<PathBuf>>,
    /// TLS private key (PEM).
    pub tls_key: Option<Spanned<PathBuf>>,
    /// Admin and metrics listener.
    pub admin: Option<Spanned<ListenAddr>>,
    /// Bearer token the admin listener requires, if set.
    pub admin_token: Option<Spanned<String>>,
    /// Connections (handshaking or established) above which new ones get HTTP 503.
    pub max_connections: Spanned<usize>,
    /// Time allowed for a client's whole handshake, backend dial included.
    pub handshake_timeout: HumanDuration,
    /// Time allowed for a graceful drain on SIGTERM/SIGINT.
    pub shutdown_grace: HumanDuration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: Spanned::new(0..0, ListenAddr(SocketAddr::from(([0, 0, 0, 0], 8080)))),
            tls_cert: None,
            tls_key: None,
            admin: None,
            admin_token: None,
            max_connections: Spanned::new(0..0, 100_000),
            handshake_timeout: HumanDuration(Duration::from_secs(10)),
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
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
    pub max_message_size: ByteSize,
    /// Largest single frame; larger closes the sender with 1009.
    pub max_frame_size: ByteSize,
    /// Per-client message rate; 0 means unlimited.
    pub max_messages_per_second: Spanned<u32>,
    /// Allowed `Origin` values; empty allows any.
    pub allowed_origins: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: ByteSize(1 << 20),
            max_frame_size: ByteSize(1 << 20),
            max_messages_per_second: Spanned::new(0..0, 0),
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

/// `[upstream.NAME]`: a group of backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The backends, ranked per client by rendezvous hashing.
    pub backends: Spanned<Vec<BackendConfig>>,
    /// Time allowed for one backend's TCP connect plus WebSocket handshake.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Shared links per backend in mux mode.
    pub mux_links: Option<Spanned<u32>>,
    /// What happens to a client whose backend goes away.
    #[serde(default)]
    pub on_backend_loss: OnBackendLoss,
    /// Active health checking.
    pub health_check: Option<Spanned<HealthCheckConfig>>,
}

fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
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

/// One backend of an upstream: a `ws://` URL and a rendezvous weight.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// The backend's URL as written in the config.
    pub url: BackendUrl,
    /// Relative share of clients (rendezvous capacity); 1.0 unless set.
    pub weight: f64,
}

/// A parsed `ws://host:port[/base]` backend address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendUrl {
    /// The URL exactly as configured; it is also the backend's identity for hashing.
    pub original: String,
    /// `host:port` to dial and to send as `Host` when `preserve_host = false`.
    pub authority: String,
    /// Path prefix put in front of the client's path; empty for `/`.
    pub base_path: String,
}

impl BackendUrl {
    /// Parses and checks a backend URL.
    pub fn parse(text: &str) -> Result<BackendUrl, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("invalid backend URL {text:?}: {e}"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => {
                return Err(format!(
                    "not supported yet: wss:// backends ({text:?}); use ws://"
                ));
            }
            _ => return Err(format!("backend URL {text:?} must start with ws://")),
        }
        let authority: &Authority = uri
            .authority()
            .ok_or_else(|| format!("backend URL {text:?} has no host"))?;
        if authority.host().is_empty() {
            return Err(format!("backend URL {text:?} has no host"));
        }
        if uri.query().is_some() {
            return Err(format!(
                "backend URL {text:?} must not have a query: the client's query is forwarded"
            ));
        }
        let port = authority.port_u16().unwrap_or(80);
        let base_path = match uri.path_and_query().map(PathAndQuery::path) {
            None | Some("/") | Some("") => String::new(),
            Some(path) => path.trim_end_matches('/').to_owned(),
        };
        Ok(BackendUrl {
            original: text.to_owned(),
            authority: format!("{}:{port}", authority.host()),
            base_path,
        })
    }
}

impl fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

impl<'de> Deserialize<'de> for BackendConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BackendVisitor;
        impl<'de> Visitor<'de> for BackendVisitor {
            type Value = BackendConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a backend URL "ws://host:port" or { url = "...", weight = 2.0 }"#)
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<BackendConfig, E> {
                Ok(BackendConfig {
                    url: BackendUrl::parse(value).map_err(E::custom)?,
                    weight: 1.0,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BackendConfig, A::Error> {
                let mut url = None;
                let mut weight = 1.0f64;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "url" => {
                            let text: String = map.next_value()?;
                            url = Some(BackendUrl::parse(&text).map_err(de::Error::custom)?);
                        }
                        "weight" => {
                            weight = map.next_value()?;
                            if !(weight.is_normal() && weight > 0.0) {
                                return Err(de::Error::custom(format!(
                                    "backend weight must be a positive number, got {weight}"
                                )));
                            }
                        }
                        other => {
                            return Err(de::Error::unknown_field(other, &["url", "weight"]));
                        }
                    }
                }
                let url = url.ok_or_else(|| de::Error::missing_field("url"))?;
                Ok(BackendConfig { url, weight })
            }
        }
        deserializer.deserialize_any(BackendVisitor)
    }
}

/// What identifies a client for rendezvous hashing (`hash_key`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HashKey {
    /// The client's IP address (port excluded), like nginx `hash $remote_addr`.
    #[default]
    RemoteAddr,
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// A query parameter's value.
    Query(String),
    /// The request path.
    Path,
}

impl HashKey {
    /// Parses `remote_addr | header:NAME | cookie:NAME | query:NAME | path`.
    pub fn parse(text: &str) -> Result<HashKey, String> {
        let named = |prefix: &str| {
            text.strip_prefix(prefix)
                .map(str::trim)
                .filter(|name| !name.is_empty())
        };
        if text == "remote_addr" {
            Ok(HashKey::RemoteAddr)
        } else if text == "path" {
            Ok(HashKey::Path)
        } else if let Some(name) = named("header:") {
            HeaderName::try_from(name)
                .map(HashKey::Header)
                .map_err(|_| format!("invalid header name {name:?} in hash_key"))
        } else if let Some(name) = named("cookie:") {
            Ok(HashKey::Cookie(name.to_owned()))
        } else if let Some(name) = named("query:") {
            Ok(HashKey::Query(name.to_owned()))
        } else {
            Err(format!(
                "invalid hash_key {text:?}: expected remote_addr, header:NAME, cookie:NAME, query:NAME or path"
            ))
        }
    }
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HashKey::parse(&text).map_err(de::Error::custom)
    }
}

/// A socket address written as a string, e.g. `"127.0.0.1:8080"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(ListenAddr).map_err(|_| {
            de::Error::custom(format!(
                "invalid listen address {text:?}: expected IP:PORT such as \"0.0.0.0:8080\""
            ))
        })
    }
}

/// A duration written like `"20s"`, `"500ms"`, `"2m"`, `"1h"` or `"0s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Parses a number followed by one of `ms`, `s`, `m`, `h`.
    pub fn parse(text: &str) -> Result<HumanDuration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: f64 = number.parse().map_err(|_| bad_duration(text))?;
        let seconds = match unit.trim() {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            "" if value == 0.0 => 0.0,
            _ => return Err(bad_duration(text)),
        };
        Duration::try_from_secs_f64(seconds)
            .map(HumanDuration)
            .map_err(|_| bad_duration(text))
    }

    /// True for a zero duration, which disables the feature it configures.
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

fn bad_duration(text: &str) -> String {
    format!(
        "invalid duration {text:?}: expected a number and a unit, e.g. \"20s\", \"500ms\", \"2m\""
    )
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HumanDuration::parse(&text).map_err(de::Error::custom)
    }
}

/// A size written like `"1MiB"`, `"64KiB"`, `"1000"` or as a plain integer of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses a number with an optional `B`, `KiB`, `MiB`, `GiB`, `KB`, `MB` or `GB` suffix.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: u64 = number.parse().map_err(|_| bad_size(text))?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad_size(text)),
        };
        value
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| bad_size(text))
    }

    /// The size as a `usize`, saturating on 32-bit targets.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

fn bad_size(text: &str) -> String {
    format!("invalid size {text:?}: expected e.g. \"1MiB\", \"64KiB\" or a number of bytes")
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"1MiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<ByteSize, E> {
                u64::try_from(value)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size must not be negative, got {value}")))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(value))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<ByteSize, E> {
                ByteSize::parse(value).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// One problem found in a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// 1-based line of the offending key or value, when known.
    pub line: Option<usize>,
    /// The dotted key the problem is about, e.g. `route[0].upstream`.
    pub key: String,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Every problem found in a configuration; the configuration is refused if there is any.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// Where the configuration came from (a file name, or `command line`).
    pub origin: String,
    /// The problems, in file order.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        write!(
            f,
            "{}: {count} problem{}",
            self.origin,
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  {}:{problem}", self.origin)?;
        }
        Ok(())
    }
}

impl Config {
    /// Parses and validates a TOML configuration; `origin` names it in error messages.
    /// Inspector names are checked against the built-ins.
    pub fn from_toml(source: &str, origin: &str) -> Result<Config, ConfigError> {
        Self::from_toml_with(source, origin, &InspectorRegistry::default())
    }

    /// Like [`Config::from_toml`], checking inspector names against `inspectors` (the built-ins
    /// plus an embedding application's own).
    pub fn from_toml_with(
        source: &str,
        origin: &str,
        inspectors: &InspectorRegistry,
    ) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(source).map_err(|error| ConfigError {
            origin: origin.to_owned(),
            problems: vec![ConfigProblem {
                line: error.span().map(|span| line_of(source, span.start)),
                key: key_of_parse_error(source, error.span()),
                message: error.message().trim().to_owned(),
            }],
        })?;
        let problems = config.problems(Some(source), inspectors);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                origin: origin.to_owned(),
                problems,
            })
        }
    }

    /// Builds the quick-start configuration: one route `/` in per-client mode over `backends`.
    pub fn quick_start(listen: SocketAddr, backends: &[String]) -> Result<Config, ConfigError> {
        let origin = "command line";
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
        let mut config = Config {
            server: ServerConfig::default(),
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
            }],
            upstreams: BTreeMap::from([(
                "default".to_owned(),
                UpstreamConfig {
                    backends: Spanned::new(0..0, parsed),
                    connect_timeout: default_connect_timeout(),
                    mux_links: None,
                    on_backend_loss: OnBackendLoss::Reconnect,
                    health_check: None,
                },
            )]),
        };
        config.server.listen = Spanned::new(0..0, ListenAddr(listen));
        problems.extend(config.problems(None, &InspectorRegistry::default()));
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                origin: origin.into(),
                problems,
            })
        }
    }

    /// Checks the configuration again against `inspectors` (used when an application
    /// registers inspectors of its own after loading the file).
    pub fn check_inspectors(&self, inspectors: &InspectorRegistry) -> Result<(), ConfigError> {
        let problems = self.problems(None, inspectors);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                origin: "configuration".into(),
                problems,
            })
        }
    }

    /// The client-facing listen address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.server.listen.get_ref().0
    }

    /// Checks what single values can't: references between sections, and keys set for
    /// features this build does not implement yet.
    fn problems(&self, source: Option<&str>, inspectors: &InspectorRegistry) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut report = |span: std::ops::Range<usize>, key: String, message: String| {
            let line = source
                .filter(|_| span != (0..0))
                .map(|s| line_of(s, span.start));
            problems.push(ConfigProblem { line, key, message });
        };

        let server = &self.server;
        match (&server.tls_cert, &server.tls_key) {
            (Some(cert), None) => report(
                cert.span(),
                "server.tls_cert".into(),
                "needs server.tls_key too".into(),
            ),
            (None, Some(key)) => report(
                key.span(),
                "server.tls_key".into(),
                "needs server.tls_cert too".into(),
            ),
            _ => {}
        }
        if let Some(admin) = &server.admin
            && !admin.get_ref().0.ip().is_loopback()
            && server.admin_token.is_none()
        {
            report(
                admin.span(),
                "server.admin".into(),
                format!(
                    "the admin listener on non-loopback {} needs server.admin_token",
                    admin.get_ref().0
                ),
            );
        }
        if *server.max_connections.get_ref() == 0 {
            report(
                server.max_connections.span(),
                "server.max_connections".into(),
                "must be at least 1".into(),
            );
        }
        if !self.keepalive.ping_interval.is_zero()
            && self.keepalive.pong_timeout.get_ref().is_zero()
        {
            report(
                self.keepalive.pong_timeout.span(),
                "keepalive.pong_timeout".into(),
                "must be above 0s while ping_interval is set".into(),
            );
        }
        if self.limits.max_message_size.0 == 0 || self.limits.max_frame_size.0 == 0 {
            report(
                0..0,
                "limits".into(),
                "max_message_size and max_frame_size must be above 0".into(),
            );
        }

        if self.routes.is_empty() {
            report(0..0, "route".into(), "no [[route]] configured".into());
        }
        let mut seen_paths = BTreeMap::new();
        for (index, route) in self.routes.iter().enumerate() {
            let key = |field: &str| format!("route[{index}].{field}");
            let path = route.path.get_ref();
            if !path.starts_with('/') {
                report(
                    route.path.span(),
                    key("path"),
                    format!("{path:?} must start with '/'"),
                );
            }
            if let Some(first) = seen_paths.insert(path.clone(), index) {
                report(
                    route.path.span(),
                    key("path"),
                    format!("{path:?} is also the path of route[{first}]"),
                );
            }
            if !self.upstreams.contains_key(route.upstream.get_ref()) {
                report(
                    route.upstream.span(),
                    key("upstream"),
                    format!("no [upstream.{}] is defined", route.upstream.get_ref()),
                );
            }
            for entry in route.inspect.get_ref() {
                let bare_rate = entry.trim() == "rate";
                if bare_rate && *self.limits.max_messages_per_second.get_ref() == 0 {
                    report(
                        route.inspect.span(),
                        key("inspect"),
                        "\"rate\" needs a rate: write \"rate:N\" or set [limits] max_messages_per_second".into(),
                    );
                } else if !bare_rate && let Err(problem) = inspectors.check(entry) {
                    report(route.inspect.span(), key("inspect"), problem);
                }
            }
        }
        for (name, upstream) in &self.upstreams {
            let key = |field: &str| format!("upstream.{name}.{field}");
            let backends = upstream.backends.get_ref();
            if backends.is_empty() {
                report(
                    upstream.backends.span(),
                    key("backends"),
                    "needs at least one backend".into(),
                );
            }
            for (index, backend) in backends.iter().enumerate() {
                if backends[..index]
                    .iter()
                    .any(|other| other.url == backend.url)
                {
                    report(
                        upstream.backends.span(),
                        key("backends"),
                        format!("{} is listed twice", backend.url),
                    );
                }
            }
            if upstream.connect_timeout.is_zero() {
                report(0..0, key("connect_timeout"), "must be above 0s".into());
            }
            if let Some(links) = &upstream.mux_links
                && *links.get_ref() == 0
            {
                report(links.span(), key("mux_links"), "must be at least 1".into());
            }
            if let Some(check) = &upstream.health_check {
                let values = check.get_ref();
                if values.interval.is_zero() || values.timeout.is_zero() {
                    report(
                        check.span(),
                        key("health_check"),
                        "interval and timeout must be above 0s".into(),
                    );
                }
                if values.unhealthy_after == 0 || values.healthy_after == 0 {
                    report(
                        check.span(),
                        key("health_check"),
                        "unhealthy_after and healthy_after must be at least 1".into(),
                    );
                }
            }
        }
        problems.sort_by_key(|problem| problem.line);
        problems
    }
}

/// 1-based line number of a byte offset.
fn line_of(source: &str, offset: usize) -> usize {
    let offset = offset.min(source.len());
    source.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The `key` of the `key = value` line a parse error points at, if it is one.
fn key_of_parse_error(source: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return "(file)".into();
    };
    let start = span.start.min(source.len());
    let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = source[start..]
        .find('\n')
        .map_or(source.len(), |i| start + i);
    let line = source[line_start..line_end].trim();
    match line.split_once('=') {
        Some((key, _)) => key.trim().to_owned(),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(config.limits.max_message_size.0, 1 << 20);
        let route = &config.routes[0];
        assert_eq!(
            route.hash_key,
            HashKey::Header(HeaderName::from_static("x-user"))
        );
        let backends = config.upstreams["chat"].backends.get_ref();
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
    fn unimplemented_keys_are_refused_not_ignored() {
        let source = FULL.replace("ws://127.0.0.1:9001", "wss://127.0.0.1:9001");
        let error = Config::from_toml(&source, "t.toml").unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("not supported yet: wss:// backends"),
            "{text}"
        );
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
    fn a_route_to_a_missing_upstream_is_refused() {
        let source = FULL.replace("upstream = \"chat\"", "upstream = \"chta\"");
        let error = Config::from_toml(&source, "t.toml").unwrap_err();
        assert_eq!(error.problems[0].line, Some(21));
        assert!(error.problems[0].message.contains("no [upstream.chta]"));
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
        assert!(BackendUrl::parse("http://x:1").is_err());
        assert!(
            BackendUrl::parse("wss://x:1")
                .unwrap_err()
                .contains("not supported yet")
        );
        assert_eq!(
            BackendUrl::parse("ws://example.com").unwrap().authority,
            "example.com:80"
        );
        assert!(HashKey::parse("cookie:").is_err());
        assert_eq!(
            HashKey::parse("query:room").unwrap(),
            HashKey::Query("room".into())
        );
    }
}
