//! Routes and upstreams as the relay uses them at run time: longest-prefix route lookup, the
//! client's hash key, and each upstream's backend ranking.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use http::header::COOKIE;

use crate::config::{BackendUrl, Config, HashKey, HealthCheckConfig, Mode, OnBackendLoss};
use crate::hashing::Ranking;
use crate::inspect::{ChainTemplate, InspectorRegistry};

/// A group of backends that routes send clients to.
pub struct Upstream {
    /// The `[upstream.NAME]` name.
    pub name: String,
    /// Backends in configuration order; rankings refer to them by index.
    pub backends: Vec<BackendUrl>,
    /// Rendezvous ranking over `backends`.
    pub ranking: Ranking,
    /// Time allowed for one backend's connect plus handshake.
    pub connect_timeout: Duration,
    /// What a client experiences when its backend goes away.
    pub on_backend_loss: OnBackendLoss,
    /// Active health checking, if configured.
    pub health_check: Option<HealthCheckConfig>,
    /// Links per backend when a mux route uses this upstream.
    pub mux_links: usize,
}

impl Upstream {
    /// `(unhealthy_after, healthy_after)` when active checks are on.
    pub fn health_thresholds(&self) -> Option<(u32, u32)> {
        self.health_check
            .as_ref()
            .map(|check| (check.unhealthy_after.max(1), check.healthy_after.max(1)))
    }
}

/// One `[[route]]`, ready to serve.
pub struct Route {
    /// Path prefix the route serves.
    pub path: String,
    /// Where its clients go.
    pub upstream: Arc<Upstream>,
    /// What identifies a client for hashing.
    pub hash_key: HashKey,
    /// Send the client's Host to the backend.
    pub preserve_host: bool,
    /// How clients reach the backends.
    pub mode: Mode,
    /// The route's inspector chain; `None` costs the pump nothing.
    pub inspectors: Option<ChainTemplate>,
    /// Frame logs and taps show no payload bytes of this route.
    pub sensitive: bool,
}

/// All routes, longest path first.
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Builds the table from a validated configuration; inspector names resolve in `registry`.
    pub fn from_config(config: &Config, registry: &InspectorRegistry) -> RouteTable {
        let rate_limit = *config.limits.max_messages_per_second.get_ref();
        let upstreams: Vec<(String, Arc<Upstream>)> = config
            .upstreams
            .iter()
            .map(|(name, upstream)| {
                let backends = upstream.backends.get_ref();
                let upstream = Upstream {
                    name: name.clone(),
                    backends: backends.iter().map(|b| b.url.clone()).collect(),
                    ranking: Ranking::new(
                        backends.iter().map(|b| (b.url.original.as_str(), b.weight)),
                    ),
                    connect_timeout: upstream.connect_timeout.0,
                    on_backend_loss: upstream.on_backend_loss,
                    health_check: upstream.health_check.as_ref().map(|c| c.get_ref().clone()),
                    mux_links: upstream
                        .mux_links
                        .as_ref()
                        .map_or(2, |n| *n.get_ref() as usize),
                };
                (name.clone(), Arc::new(upstream))
            })
            .collect();
        let mut routes: Vec<Route> = config
            .routes
            .iter()
            .filter_map(|route| {
                let upstream = upstreams
                    .iter()
                    .find(|(name, _)| name == route.upstream.get_ref())?
                    .1
                    .clone();
                let mut entries: Vec<String> = route
                    .inspect
                    .get_ref()
                    .iter()
                    .map(|entry| match entry.trim() {
                        "rate" => format!("rate:{rate_limit}"),
                        // A sensitive route's frame log shows no payload unless asked to.
                        "log" if route.sensitive => "log:redact".to_owned(),
                        other => other.to_owned(),
                    })
                    .collect();
                if rate_limit > 0 && !entries.iter().any(|e| e.starts_with("rate")) {
                    entries.push(format!("rate:{rate_limit}"));
                }
                Some(Route {
                    path: route.path.get_ref().clone(),
                    upstream,
                    hash_key: route.hash_key.clone(),
                    preserve_host: route.preserve_host,
                    mode: *route.mode.get_ref(),
                    inspectors: registry.chain_template(&entries),
                    sensitive: route.sensitive,
                })
            })
            .collect();
        routes.sort_by_key(|route| std::cmp::Reverse(route.path.len()));
        RouteTable { routes }
    }

    /// Routes configured.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when no route is configured.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Every route's upstream with the route's mode (an upstream may appear once per mode).
    pub fn upstream_modes(&self) -> Vec<(Arc<Upstream>, Mode)> {
        self.routes
            .iter()
            .map(|route| (route.upstream.clone(), route.mode))
            .collect()
    }

    /// Every upstream some route uses, once each.
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        let mut seen: Vec<Arc<Upstream>> = Vec::new();
        for route in &self.routes {
            if !seen.iter().any(|u| u.name == route.upstream.name) {
                seen.push(route.upstream.clone());
            }
        }
        seen
    }

    /// The upstream named `name`, as some route uses it.
    pub fn upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        self.routes
            .iter()
            .find(|route| route.upstream.name == name)
            .map(|route| route.upstream.clone())
    }

    /// The route whose path is the longest prefix of `path`, matching whole segments
    /// (`/chat` serves `/chat` and `/chat/room`, not `/chatter`).
    pub fn find(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|route| prefix_matches(&route.path, path))
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// The bytes a client is hashed by. A missing header, cookie or query parameter falls back
/// to the client's IP address, so such clients still spread over the backends.
pub fn client_hash_key(
    key: &HashKey,
    headers: &HeaderMap,
    path: &str,
    query: Option<&str>,
    client: SocketAddr,
) -> Vec<u8> {
    let found: Option<&[u8]> = match key {
        HashKey::RemoteAddr => None,
        HashKey::Path => Some(path.as_bytes()),
        HashKey::Header(name) => headers.get(name).map(|v| v.as_bytes()),
        HashKey::Cookie(name) => cookie_value(headers, name).map(str::as_bytes),
        HashKey::Query(name) => query.and_then(|q| query_value(q, name)).map(str::as_bytes),
    };
    match found {
        Some(bytes) => bytes.to_vec(),
        None => client.ip().to_string().into_bytes(),
    }
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

/// A query parameter's raw (still percent-encoded) value.
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/chat", "/chat"));
        assert!(prefix_matches("/chat", "/chat/room"));
        assert!(!prefix_matches("/chat", "/chatter"));
        assert!(prefix_matches("/chat/", "/chat/x"));
    }

    #[test]
    fn hash_keys() {
        let client: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-user", HeaderValue::from_static("ann"));
        headers.insert("cookie", HeaderValue::from_static("a=1; sid=\"xyz\"; b=2"));
        let key = |k: &str, query| {
            client_hash_key(&HashKey::parse(k).unwrap(), &headers, "/p", query, client)
        };
        assert_eq!(key("remote_addr", None), b"10.1.2.3");
        assert_eq!(key("header:X-User", None), b"ann");
        assert_eq!(key("cookie:sid", None), b"xyz");
        assert_eq!(key("query:room", Some("x=1&room=42")), b"42");
        assert_eq!(key("query:room", Some("x=1")), b"10.1.2.3");
        assert_eq!(key("path", None), b"/p");
        assert_eq!(key("header:X-Missing", None), b"10.1.2.3");
    }
}
