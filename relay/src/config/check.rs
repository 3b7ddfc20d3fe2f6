//! Checks that need more than one value (a route naming a missing upstream, TLS files given in
//! pairs, zero limits), run after deserialization on `toml::Spanned` fields so that each problem
//! can point at its line; and the error types that carry every problem found.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use toml::Spanned;

use super::{BackendUrl, Config, DiscoverConfig, RouteConfig, UpstreamConfig, UpstreamTlsConfig};

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
    pub(crate) fn from_problems(origin: &str, problems: Vec<ConfigProblem>) -> Result<(), Self> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                origin: origin.to_owned(),
                problems,
            })
        }
    }
}

/// Most syntax and type problems one file reports; past this, the rest is likely one mistake
/// seen many times.
const MAX_PARSE_PROBLEMS: usize = 20;

/// Reads `source` as a configuration, reporting every syntax and type problem it can find, not
/// only the first: after each problem the offending entry (a `key = value`, an array element,
/// or a whole table) is blanked out with spaces, so lines and offsets stay those of the file,
/// and the file is read again. Returns the configuration when what is left parses cleanly
/// (then cross-key checks can run on it, problems or not), and the problems, each with its
/// line.
pub(super) fn parse_all(source: &str) -> (Option<Config>, Vec<ConfigProblem>) {
    let mut text = source.to_owned();
    let mut problems = Vec::new();
    let mut blanked_keys: Vec<String> = Vec::new();
    loop {
        let error = match toml::from_str::<Config>(&text) {
            // What is left parses: its cross-key checks can run too.
            Ok(config) => return (Some(config), problems),
            Err(error) => error,
        };
        let message = error.message().trim().to_owned();
        // A required key we blanked ourselves is reported already, as the problem it had.
        if let Some(missing) = missing_field(&message)
            && blanked_keys.iter().any(|key| key == missing)
        {
            return (None, problems);
        }
        problems.push(ConfigProblem {
            line: error.span().map(|span| line_of(source, span.start)),
            key: key_of_parse_error(&text, error.span()),
            message,
        });
        let next = error.span().and_then(|span| blank_offender(&text, span));
        match next {
            Some((next, key)) if problems.len() < MAX_PARSE_PROBLEMS => {
                blanked_keys.extend(key);
                text = next;
            }
            _ => return (None, problems),
        }
    }
}

/// `span` widened to whole characters: a parser's byte offsets may fall inside one.
fn char_span(text: &str, span: Range<usize>) -> Range<usize> {
    let mut start = span.start.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = span.end.clamp(start, text.len());
    while !text.is_char_boundary(end) {
        end += 1;
    }
    start..end
}

/// `X` of serde's "missing field `X`".
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.strip_suffix('`')
}

/// `text` with the entry at `span` replaced by spaces (newlines kept), and the key it held:
/// an array element with one neighbouring comma, a whole table when the span is its header, or
/// the whole lines of a `key = value`. `None` when nothing can be taken out (an empty span,
/// as syntax errors have).
fn blank_offender(text: &str, span: Range<usize>) -> Option<(String, Option<String>)> {
    if span.is_empty() || span.end > text.len() {
        return None;
    }
    let span = char_span(text, span);
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let before = text[line_start..span.start].trim_start();
    let header = text[line_start..].trim_start().starts_with('[')
        && before.chars().all(|c| c == '[' || c.is_whitespace());
    let (range, key) = if let Some(range) = array_element(text, &span).filter(|_| !header) {
        (range, None)
    } else if header {
        // A table's header (or its name in it): the table runs to the next header.
        let mut end = span.end;
        while end < text.len() {
            let next = text[end..].find('\n').map_or(text.len(), |i| end + i + 1);
            if text[next..].trim_start().starts_with('[') || next == text.len() {
                end = next;
                break;
            }
            end = next;
        }
        (line_start..end, None)
    } else {
        let line_end = |at: usize| text[at..].find('\n').map_or(text.len(), |i| at + i);
        // The line holding the span's last character, for values that run over lines.
        let last = char_span(text, span.end.saturating_sub(1).max(span.start)..span.end).start;
        let end = line_end(last);
        let key = text[line_start..end]
            .split_once('=')
            .map(|(key, _)| key.trim().to_owned());
        (line_start..end, key)
    };
    let blanked: String = text[range.clone()]
        .chars()
        .map(|c| if c == '\n' { c } else { ' ' })
        .collect();
    let mut next = text.to_owned();
    next.replace_range(range, &blanked);
    (next != text).then_some((next, key))
}

/// The element of an array at `span` with one neighbouring comma, if `span` is one.
fn array_element(text: &str, span: &Range<usize>) -> Option<Range<usize>> {
    let before = text[..span.start].trim_end();
    let after_start = span.end + (text[span.end..].len() - text[span.end..].trim_start().len());
    let after = &text[after_start..];
    if !(before.ends_with('[') || before.ends_with(',')) {
        return None;
    }
    if after.starts_with(',') {
        Some(span.start..after_start + 1)
    } else if after.starts_with(']') && before.ends_with(',') {
        Some(before.len() - 1..span.end)
    } else if after.starts_with(']') {
        Some(span.clone())
    } else {
        None
    }
}

/// How the problem of an upstream with neither `backends` nor `discover` starts.
const NEITHER: &str = "needs backends";

/// Collects problems, turning spans into lines of `source` (when there is a source and the
/// value came from it: defaults have the span `0..0`).
struct Report<'a> {
    source: Option<&'a str>,
    problems: Vec<ConfigProblem>,
}

impl Report<'_> {
    /// The span of the `[NAME]` header in the source, or `0..0` (no line) without one.
    fn table_header(&self, name: &str) -> Range<usize> {
        let header = format!("[{name}]");
        self.source
            .and_then(|source| source.find(&header))
            .map_or(0..0, |start| start..start + header.len())
    }

    fn add(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        self.problems
            .push(problem_at(self.source, span, key.into(), message.into()));
    }
}

/// A problem about the value at `span` of `source`, with its line when there is a source and
/// the value came from it (defaults have the span `0..0`).
pub(crate) fn problem_at(
    source: Option<&str>,
    span: Range<usize>,
    key: String,
    message: String,
) -> ConfigProblem {
    let line = source
        .filter(|_| span != (0..0))
        .map(|s| line_of(s, span.start));
    ConfigProblem { line, key, message }
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
    report.problems
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
    if server.handshake_timeout.get_ref().is_zero() {
        report.add(
            server.handshake_timeout.span(),
            "server.handshake_timeout",
            "must be above 0s: every client would time out at once",
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
    for (name, size) in [
        ("max_message_size", &config.limits.max_message_size),
        ("max_frame_size", &config.limits.max_frame_size),
    ] {
        if size.get_ref().0 == 0 {
            report.add(
                size.span(),
                format!("limits.{name}"),
                "must be above 0, e.g. \"1MiB\"",
            );
        }
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
    match (&upstream.backends, &upstream.discover) {
        (Some(_), Some(discover)) => report.add(
            discover.span(),
            key("discover"),
            "an upstream has either backends or discover, not both: remove one",
        ),
        (None, None) => {
            let header = report.table_header(&format!("upstream.{name}"));
            report.add(
                header,
                format!("upstream.{name}"),
                format!(
                    "{NEITHER} = [\"ws://host:port\", ...] or discover = {{ dns = \"name:port\" }}"
                ),
            );
        }
        (Some(backends), None) if backends.get_ref().is_empty() => report.add(
            backends.span(),
            key("backends"),
            "needs at least one backend",
        ),
        _ => {}
    }
    if let Some(discover) = &upstream.discover {
        discover_problems(name, discover, report);
    }
    let backends = upstream.configured_backends();
    for (index, backend) in backends.iter().enumerate() {
        if backends[..index]
            .iter()
            .any(|other| other.url == backend.url)
        {
            report.add(
                upstream.backends.as_ref().map_or(0..0, |list| list.span()),
                key("backends"),
                format!("{} is listed twice", backend.url),
            );
        }
    }
    if upstream.connect_timeout.get_ref().is_zero() {
        report.add(
            upstream.connect_timeout.span(),
            key("connect_timeout"),
            "must be above 0s",
        );
    }
    if let Some(links) = &upstream.mux_links
        && *links.get_ref() == 0
    {
        report.add(links.span(), key("mux_links"), "must be at least 1");
    }
    if let Some(tls) = &upstream.tls {
        tls_problems(name, upstream, tls, report);
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

fn discover_problems(name: &str, discover: &Spanned<DiscoverConfig>, report: &mut Report<'_>) {
    let key = format!("upstream.{name}.discover");
    let values = discover.get_ref();
    if values.refresh.is_zero() {
        report.add(
            discover.span(),
            &key,
            "refresh must be above 0s, e.g. \"5s\"",
        );
    }
    if !(values.path.is_empty() || values.path.starts_with('/')) {
        report.add(
            discover.span(),
            &key,
            format!("path {:?} must be empty or start with '/'", values.path),
        );
    } else {
        // Discovered URLs follow the rules of configured ones (schemes this build dials, no
        // query): one made from a sample address says what any of them would break.
        let sample = values.url_of(std::net::Ipv4Addr::LOCALHOST.into());
        if let Err(message) = BackendUrl::parse(&sample) {
            report.add(discover.span(), &key, message);
        }
    }
}

/// `cross` without the problems that only echo a parse problem: an upstream said to have
/// neither `backends` nor `discover` because the one it has was reported (and taken out) as
/// malformed.
pub(super) fn without_echoes(
    mut cross: Vec<ConfigProblem>,
    parse: &[ConfigProblem],
    source: &str,
) -> Vec<ConfigProblem> {
    let lines: Vec<&str> = source.lines().collect();
    cross.retain(|problem| {
        let Some(header) = problem
            .line
            .filter(|_| problem.message.starts_with(NEITHER))
        else {
            return true;
        };
        // The table runs from its header to the next one.
        let end = (header..lines.len())
            .find(|&index| lines[index].trim_start().starts_with('['))
            .map_or(usize::MAX, |index| index + 1);
        !parse.iter().any(|reported| {
            matches!(reported.key.as_str(), "backends" | "discover")
                && reported
                    .line
                    .is_some_and(|line| line > header && line < end)
        })
    });
    cross
}

/// An upstream's `tls`: it must serve some `wss://` backend, name its client certificate and
/// key together, and give a server name a certificate can hold. Its files are read when the
/// relay loads the configuration (`crate::tls`), not here.
fn tls_problems(
    name: &str,
    upstream: &UpstreamConfig,
    tls: &toml::Spanned<UpstreamTlsConfig>,
    report: &mut Report<'_>,
) {
    let key = |field: &str| format!("upstream.{name}.tls{field}");
    let values = tls.get_ref();
    if !upstream.has_wss_backends() {
        // An error, as every other key that can have no effect is: a file that says TLS while
        // every backend is plain text more likely has a mistyped URL than a spare table.
        report.add(
            tls.span(),
            key(""),
            "applies to wss:// backends only, and every backend here is ws://: write the backends as wss:// or remove tls",
        );
    }
    match (&values.client_cert, &values.client_key) {
        (Some(_), None) => report.add(
            tls.span(),
            key(".client_cert"),
            format!("needs upstream.{name}.tls.client_key too"),
        ),
        (None, Some(_)) => report.add(
            tls.span(),
            key(".client_key"),
            format!("needs upstream.{name}.tls.client_cert too"),
        ),
        _ => {}
    }
    if let Some(server_name) = &values.server_name
        && rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err()
    {
        report.add(
            tls.span(),
            key(".server_name"),
            format!("{server_name:?} is not a DNS name or IP address a certificate can hold"),
        );
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
    let start = char_span(source, span.start.min(source.len())..source.len()).start;
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

    fn messages(source: &str) -> Vec<(Option<usize>, String)> {
        let (_, mut problems) = parse_all(source);
        problems.sort_by_key(|problem| problem.line);
        problems.into_iter().map(|p| (p.line, p.message)).collect()
    }

    #[test]
    fn every_bad_value_of_a_file_is_reported_with_its_line() {
        let source = "[server]\nmax_connections = \"many\"\n\n[[route]]\npath = \"/\"\nupstream = \"u\"\nhash_key = \"bad\"\nmode = \"bogus\"\n\n[upstream.u]\nbackends = [\"http://x\", \"ws://a:1\", { url = \"ws://b:1\", weight = -1 }]\n";
        let found = messages(source);
        let lines: Vec<Option<usize>> = found.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines.len(), 5, "{found:?}");
        for line in [2, 7, 8, 11] {
            assert!(lines.contains(&Some(line)), "line {line} in {found:?}");
        }
        assert!(
            found.iter().any(|(_, m)| m.contains("http://x")),
            "{found:?}"
        );
        assert!(found.iter().any(|(_, m)| m.contains("weight")), "{found:?}");
    }

    #[test]
    fn an_unknown_table_and_keys_after_it_are_reported_once_each() {
        let found = messages("[srever]\nlisten = \"x\"\n\n[limits]\nmax_frame_size = \"big\"\n");
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].0, Some(1));
        assert_eq!(found[1].0, Some(5));
    }

    #[test]
    fn a_bad_required_value_is_not_reported_again_as_missing() {
        let found = messages("[[route]]\npath = \"/\"\nupstream = 5\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, Some(3));
    }

    #[test]
    fn a_typo_inside_a_multibyte_character_is_reported_not_panicked_on() {
        let found =
            messages("[[route]]\npath = \"/\"\nh\u{a5}sh_key = \"path\"\nupstream = \"u\"\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, Some(3));
    }

    #[test]
    fn a_syntax_error_ends_the_search() {
        let found = messages("[server]\nlisten = [1,\n");
        assert_eq!(found.len(), 1, "{found:?}");
    }

    #[test]
    fn blanking_keeps_offsets() {
        let text = "a = [1, \"x\", 3]\n";
        let span = text.find("\"x\"").unwrap();
        let (next, _) = blank_offender(text, span..span + 3).unwrap();
        assert_eq!(next.len(), text.len());
        assert!(toml::from_str::<toml::Table>(&next).is_ok(), "{next:?}");
        let last = "a = [1, \"x\"]\n";
        let span = last.find("\"x\"").unwrap();
        let (next, _) = blank_offender(last, span..span + 3).unwrap();
        assert!(toml::from_str::<toml::Table>(&next).is_ok(), "{next:?}");
    }
}

/// Arbitrary files never panic the checker, and every problem it reports names a line of the
/// file or none.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use crate::config::Config;

    const VALID: &str = "[server]\nlisten = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nupstream = \"u\"\nhash_key = \"query:user\"\n[upstream.u]\nbackends = [\"ws://127.0.0.1:1\", { url = \"ws://127.0.0.1:2\", weight = 2.0 }]\n";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_text_gets_problems_not_panics(source in "\\PC{0,400}") {
            if let Err(error) = Config::from_toml(&source, "fuzz") {
                let lines = source.lines().count().max(1);
                for problem in &error.problems {
                    prop_assert!(problem.line.is_none_or(|line| line >= 1 && line <= lines + 1));
                }
            }
        }

        #[test]
        fn a_valid_file_with_bytes_changed_gets_problems_not_panics(
            edits in proptest::collection::vec((0usize..200, any::<char>()), 1..6),
        ) {
            let mut chars: Vec<char> = VALID.chars().collect();
            for (at, with) in edits {
                let at = at % chars.len();
                chars[at] = with;
            }
            let source: String = chars.into_iter().collect();
            let _ = Config::from_toml(&source, "fuzz");
        }
    }
}
