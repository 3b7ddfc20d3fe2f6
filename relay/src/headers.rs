//! HTTP header rules both legs share: comma-separated tokens, which headers describe one hop
//! only (RFC 9110 section 7.6.1) so that a proxy must not forward them, and how an HTTP/2
//! request's fields become HTTP/1.1's.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;

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

/// Gives an HTTP/2 request the header fields an HTTP/1.1 hop expects (RFC 9113 sections 8.3.1
/// and 8.2.3): a `Host` made from `:authority` when it has none, and its `Cookie` fields, which
/// HTTP/2 lets a client split, joined into one with `"; "`.
pub fn fold_http2_fields(authority: Option<&Authority>, headers: &mut HeaderMap) {
    if !headers.contains_key(header::HOST)
        && let Some(host) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        headers.insert(header::HOST, host);
    }
    if headers.get_all(header::COOKIE).iter().nth(1).is_some() {
        let joined = headers
            .get_all(header::COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect::<Vec<_>>()
            .join(&b"; "[..]);
        // Each part was a valid value, and "; " is too.
        if let Ok(joined) = HeaderValue::from_bytes(&joined) {
            headers.insert(header::COOKIE, joined);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http2_fields_fold_into_host_and_one_cookie() {
        let authority = Authority::from_static("chat.example:8443");
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        fold_http2_fields(Some(&authority), &mut headers);
        assert_eq!(headers[header::HOST], "chat.example:8443");
        assert_eq!(
            headers.get_all(header::COOKIE).iter().collect::<Vec<_>>(),
            ["a=1; b=2"]
        );
        // A Host the client sent stays; one cookie stays as it is.
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("given"));
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1"));
        fold_http2_fields(Some(&authority), &mut headers);
        assert_eq!(headers[header::HOST], "given");
        assert_eq!(headers[header::COOKIE], "a=1");
        let mut empty = HeaderMap::new();
        fold_http2_fields(None, &mut empty);
        assert!(empty.is_empty());
    }
}
