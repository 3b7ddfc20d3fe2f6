//! Checks that need more than one value (a route naming a missing upstream, TLS files given in
//! pairs, zero limits), run after deserialization on `toml::Spanned` fields so that each problem
//! can point at its line; and the error types that carry every problem found.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use super::{Config, RouteConfig, UpstreamConfig};

/// What the configuration asks of the inspectors its routes name: whether an `inspect` entry
/// (`name` or `name:argument`) is known and its argument valid. The relay's inspector registry
/// answers, so this module names no inspector.
pub trait InspectorCatalog {
    /// `Err` with the reason when `entry` can't be used.
    fn check_entry(&self, entry: &str) -> Result<(), String>;
}

/// A catalog that accepts every entry (for configurations built in code without inspectors).
impl<F: Fn(&str) -> Result<(), String>> InspectorCatalog for F {
    fn check_entry(&self, entry: &str) -> Result<(), String> {
        self(entry)
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

impl ConfigError {
    /// `Ok` when there are no problems, else the error naming `origin`.
    pub(super) fn from_problems(origin: &str, problems: Vec<ConfigProblem>) -> Result<(), Self> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                origin: origin.to_owned(),
                problems,
            })
        }
    }

    /// The error for a file `toml` could not read as a configuration.
    pub(super) fn unparsable(source: &str, origin: &str, error: &toml::de::Error) -> Self {
        ConfigError {
            origin: origin.to_owned(),
            problems: vec![ConfigProblem {
                line: error.span().map(|span| line_of(source, span.start)),
                key: key_of_parse_error(source, error.span()),
                message: error.message().trim().to_owned(),
            }],
        }
    }
}

/// Collects problems, turning spans into lines of `source` (when there is a source and the
/// value came from it: defaults have the span `0..0`).
struct Report<'a> {
    source: Option<&'a str>,
    problems: Vec<ConfigProblem>,
}

impl Report<'_> {
    fn add(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let line = self
            .source
            .filter(|_| span != (0..0))
            .map(|s| line_of(s, span.start));
        self.problems.push(ConfigProblem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }
}

/// Every cross-key problem of `config`, in file order.
pub(super) fn problems(
    config: &Config,
    source: Option<&str>,
    inspectors: &dyn InspectorCatalog,
) -> Vec<ConfigProblem> {
    let mut report = Report {
        source,
        problems: Vec::new(),
    };
    server_problems(config, &mut report);
    if config.routes.is_empty() {
        report.add(0..0, "route", "no [[route]] configured");
    }
    let mut seen_paths = BTreeMap::new();
    for (index, route) in config.routes.iter().enumerate() {
        if let Some(first) = seen_paths.insert(route.path.get_ref().clone(), index) {
            report.add(
                route.path.span(),
                format!("route[{index}].path"),
                format!(
                    "{:?} is also the path of route[{first}]",
                    route.path.get_ref()
                ),
            );
        }
        route_problems(config, index, route, inspectors, &mut report);
    }
    for (name, upstream) in &config.upstreams {
        upstream_problems(name, upstream, &mut report);
    }
    let mut problems = report.problems;
    problems.sort_by_key(|problem| problem.line);
    problems
}

fn server_problems(config: &Config, report: &mut Report<'_>) {
    let server = &config.server;
    match (&server.tls_cert, &server.tls_key) {
        (Some(cert), None) => {
            report.add(cert.span(), "server.tls_cert", "needs server.tls_key too")
        }
        (None, Some(key)) => report.add(key.span(), "server.tls_key", "needs server.tls_cert too"),
        _ => {}
    }
    if let Some(admin) = &server.admin
        && !admin.get_ref().0.ip().is_loopback()
        && server.admin_token.is_none()
    {
        report.add(
            admin.span(),
            "server.admin",
            format!(
                "the admin listener on non-loopback {} needs server.admin_token",
                admin.get_ref().0
            ),
        );
    }
    if *server.max_connections.get_ref() == 0 {
        report.add(
            server.max_connections.span(),
            "server.max_connections",
            "must be at least 1",
        );
    }
    let keepalive = &config.keepalive;
    if !keepalive.ping_interval.is_zero() && keepalive.pong_timeout.get_ref().is_zero() {
        report.add(
            keepalive.pong_timeout.span(),
            "keepalive.pong_timeout",
            "must be above 0s while ping_interval is set",
        );
    }
    if config.limits.max_message_size.0 == 0 || config.limits.max_frame_size.0 == 0 {
        report.add(
            0..0,
            "limits",
            "max_message_size and max_frame_size must be above 0",
        );
    }
}

fn route_problems(
    config: &Config,
    index: usize,
    route: &RouteConfig,
    inspectors: &dyn InspectorCatalog,
    report: &mut Report<'_>,
) {
    let key = |field: &str| format!("route[{index}].{field}");
    let path = route.path.get_ref();
    if !path.starts_with('/') {
        report.add(
            route.path.span(),
            key("path"),
            format!("{path:?} must start with '/'"),
        );
    }
    if !config.upstreams.contains_key(route.upstream.get_ref()) {
        report.add(
            route.upstream.span(),
            key("upstream"),
            format!("no [upstream.{}] is defined", route.upstream.get_ref()),
        );
    }
    for entry in route.inspect.get_ref() {
        let bare_rate = entry.trim() == "rate";
        if bare_rate && *config.limits.max_messages_per_second.get_ref() == 0 {
            report.add(
                route.inspect.span(),
                key("inspect"),
                "\"rate\" needs a rate: write \"rate:N\" or set [limits] max_messages_per_second",
            );
        } else if !bare_rate && let Err(problem) = inspectors.check_entry(entry) {
            report.add(route.inspect.span(), key("inspect"), problem);
        }
    }
}

fn upstream_problems(name: &str, upstream: &UpstreamConfig, report: &mut Report<'_>) {
    let key = |field: &str| format!("upstream.{name}.{field}");
    let backends = upstream.backends.get_ref();
    if backends.is_empty() {
        report.add(
            upstream.backends.span(),
            key("backends"),
            "needs at least one backend",
        );
    }
    for (index, backend) in backends.iter().enumerate() {
        if backends[..index]
            .iter()
            .any(|other| other.url == backend.url)
        {
            report.add(
                upstream.backends.span(),
                key("backends"),
                format!("{} is listed twice", backend.url),
            );
        }
    }
    if upstream.connect_timeout.is_zero() {
        report.add(0..0, key("connect_timeout"), "must be above 0s");
    }
    if let Some(links) = &upstream.mux_links
        && *links.get_ref() == 0
    {
        report.add(links.span(), key("mux_links"), "must be at least 1");
    }
    if let Some(check) = &upstream.health_check {
        let values = check.get_ref();
        if values.interval.is_zero() || values.timeout.is_zero() {
            report.add(
                check.span(),
                key("health_check"),
                "interval and timeout must be above 0s",
            );
        }
        if values.unhealthy_after == 0 || values.healthy_after == 0 {
            report.add(
                check.span(),
                key("health_check"),
                "unhealthy_after and healthy_after must be at least 1",
            );
        }
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
fn key_of_parse_error(source: &str, span: Option<Range<usize>>) -> String {
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
