//! HTTP header rules both legs share: comma-separated tokens, and which headers describe one
//! hop only (RFC 9110 section 7.6.1) so that a proxy must not forward them.

use http::header::{self, HeaderMap, HeaderName};

/// Headers that describe one hop only, besides those the `Connection` header names.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authenticate",
];

/// True when a comma-separated header contains `token` (case-insensitive), in any of its lines.
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// True for a header that must not cross the relay: a hop-by-hop header, any `Proxy-*`, or one
/// that `connection_headers`' `Connection` header names.
pub fn is_hop_by_hop(name: &HeaderName, connection_headers: &HeaderMap) -> bool {
    let name = name.as_str();
    HOP_BY_HOP.contains(&name)
        || name.starts_with("proxy-")
        || has_token(connection_headers, &header::CONNECTION, name)
}
