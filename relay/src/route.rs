//! Routes as the relay uses them at run time: longest-prefix lookup, each route's upstream and
//! inspector chain, and the bytes a client is hashed by.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderMap;
use http::header::COOKIE;

use crate::config::{Compression, Config, HashKey, Mode};
use crate::inspect::{ChainTemplate, InspectorRegistry};
use crate::upstream::{BackendSets, BackendTls, Upstream};

/// One `[[route]]`, ready to serve.
pub(crate) struct Route {
    /// Path prefix the route serves.
    pub path: Arc<str>,
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
    /// Whether the route's clients may get `permessage-deflate`.
    pub compression: Compression,
}

/// All routes, longest path first.
pub(crate) struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table from a validated configuration; inspector names resolve in `registry`,
    /// upstreams with `wss://` backends get their settings from `tls` (by upstream name).
    pub fn from_config(
        config: &Config,
        sets: &BackendSets,
        registry: &InspectorRegistry,
        tls: &BTreeMap<String, Arc<BackendTls>>,
    ) -> RouteTable {
        let rate_limit = *config.limits.max_messages_per_second.get_ref();
        let upstreams: Vec<(String, Arc<Upstream>)> = config
            .upstreams
            .iter()
            .map(|(name, upstream)| {
                (
                    name.clone(),
                    Arc::new(Upstream::from_config(
                        name,
                        upstream,
                        sets.get(name).map_or(&[][..], Vec::as_slice),
                        tls.get(name).cloned(),
                    )),
                )
            })
            .collect();
        let mut routes: Vec<Arc<Route>> = config
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
                Some(Arc::new(Route {
                    path: route.path.get_ref().as_str().into(),
                    upstream,
                    hash_key: route.hash_key.clone(),
                    preserve_host: route.preserve_host,
                    mode: *route.mode.get_ref(),
                    inspectors: registry.chain_template(&entries),
                    sensitive: route.sensitive,
                    compression: route.compression,
                }))
            })
            .collect();
        routes.sort_by_key(|route| std::cmp::Reverse(route.path.len()));
        RouteTable { routes }
    }

    /// Routes configured.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Every route, longest path first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }

    /// Every upstream a mux route uses, once each.
    pub fn mux_upstreams(&self) -> Vec<Arc<Upstream>> {
        let mut seen: Vec<Arc<Upstream>> = Vec::new();
        for route in self.routes.iter().filter(|route| route.mode == Mode::Mux) {
            if !seen.iter().any(|u| u.name == route.upstream.name) {
                seen.push(route.upstream.clone());
            }
        }
        seen
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
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
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
        None => {
            // The longest form of each (a session keeps its key): 15 bytes, and 45 for IPv6.
            let ip = client.ip();
            let mut text = Vec::with_capacity(if ip.is_ipv4() { 15 } else { 45 });
            crate::ascii::push_ip(&mut text, ip);
            text
        }
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
