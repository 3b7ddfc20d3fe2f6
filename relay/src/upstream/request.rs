//! The request a backend sees for a client: the same path and query, the client's end-to-end
//! headers, and the forwarding headers a proxy adds. The same request opens a socket of its
//! own (per-client mode) or a stream on a mux link.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri};
use tungstenite::handshake::client::generate_key;
use wsrelay_protocol::OpenRequest;

use crate::config::BackendUrl;
use crate::headers;

/// Everything needed to open (and re-open) a client's backend leg. A session keeps it for its
/// whole life, so it owns its bytes in one small block: header values parsed from the client's
/// request are slices of hyper's read buffer (8 KiB), which a kept clone would hold for as long
/// as the client stays.
#[derive(Debug, Clone)]
pub struct BackendRequest {
    /// Path and query exactly as the client sent them.
    pub path_and_query: String,
    /// The client's `Host`, sent on when `preserve_host` is set.
    pub client_host: Option<HeaderValue>,
    /// End-to-end headers to send, `X-Forwarded-*` and `X-Relay-Conn-Id` included.
    headers: HeaderBlock,
    /// Send the client's Host rather than the backend's authority.
    pub preserve_host: bool,
}

/// Header fields packed into one allocation, `name:value\n` each: a name never holds `:` and
/// a value never holds a line feed, so the block reads back unambiguously. A `HeaderMap` of the
/// same fields costs a kilobyte of tables beside the values.
#[derive(Debug, Clone, Default)]
struct HeaderBlock(Box<[u8]>);

impl HeaderBlock {
    fn pack(fields: &HeaderMap) -> Self {
        let size = fields
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 2)
            .sum();
        let mut block = Vec::with_capacity(size);
        for (name, value) in fields {
            block.extend_from_slice(name.as_str().as_bytes());
            block.push(b':');
            block.extend_from_slice(value.as_bytes());
            block.push(b'\n');
        }
        HeaderBlock(block.into_boxed_slice())
    }

    /// The fields in the order they were packed, as bytes.
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.0
            .split(|&byte| byte == b'\n')
            .filter(|line| !line.is_empty())
            .filter_map(|line| {
                let colon = line.iter().position(|&byte| byte == b':')?;
                Some((&line[..colon], &line[colon + 1..]))
            })
    }

    /// The fields as a header map, for a request.
    fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in self.fields() {
            // Both were valid when packed.
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                map.append(name, value);
            }
        }
        map
    }
}

impl BackendRequest {
    /// The backend's view of a client's request: path and query kept, end-to-end headers
    /// forwarded, hop-by-hop and the client's own WebSocket keys dropped, `X-Forwarded-*`,
    /// `X-Real-IP` and `X-Relay-Conn-Id` added.
    pub fn from_client(
        uri: &Uri,
        client_headers: &HeaderMap,
        client_addr: SocketAddr,
        conn_id: u64,
        preserve_host: bool,
        scheme: &str,
    ) -> BackendRequest {
        let mut headers = HeaderMap::with_capacity(client_headers.len() + 5);
        for (name, value) in client_headers {
            let websocket_own = matches!(
                name.as_str(),
                "sec-websocket-key"
                    | "sec-websocket-accept"
                    | "sec-websocket-extensions"
                    | "sec-websocket-version"
            );
            if websocket_own
                || name == header::HOST
                || name.as_str() == "x-forwarded-for"
                || headers::is_hop_by_hop(name, client_headers)
            {
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        let client_ip = client_addr.ip().to_string();
        let forwarded_for = client_headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .chain(std::iter::once(client_ip.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let insert = |headers: &mut HeaderMap, name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        insert(&mut headers, "x-forwarded-for", &forwarded_for);
        insert(&mut headers, "x-forwarded-proto", scheme);
        if let Some(host) = client_headers.get(header::HOST) {
            headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
        }
        insert(&mut headers, "x-real-ip", &client_ip);
        insert(&mut headers, "x-relay-conn-id", &conn_id.to_string());
        BackendRequest {
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
            // Copied: a clone would share hyper's read buffer.
            client_host: client_headers
                .get(header::HOST)
                .and_then(|host| HeaderValue::from_bytes(host.as_bytes()).ok()),
            headers: HeaderBlock::pack(&headers),
            preserve_host,
        }
    }

    /// The request of an active health check: `/` with `User-Agent: wsrelay-health-check`.
    pub fn health_probe() -> BackendRequest {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("wsrelay-health-check"),
        );
        BackendRequest {
            path_and_query: "/".into(),
            client_host: None,
            headers: HeaderBlock::pack(&headers),
            preserve_host: false,
        }
    }

    /// The handshake request of a mux link: the backend's base path, the mux subprotocol.
    pub fn mux_link() -> BackendRequest {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("wsrelay-mux-link"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(wsrelay_protocol::LINK_SUBPROTOCOL),
        );
        BackendRequest {
            path_and_query: "/".into(),
            client_host: None,
            headers: HeaderBlock::pack(&headers),
            preserve_host: false,
        }
    }

    /// The HTTP request for one backend, with a fresh `Sec-WebSocket-Key`.
    pub(super) fn for_backend(&self, backend: &BackendUrl) -> Result<Request<()>, String> {
        let uri = format!(
            "ws://{}{}{}",
            backend.authority, backend.base_path, self.path_and_query
        );
        let mut request = Request::get(&uri)
            .body(())
            .map_err(|e| format!("bad backend URI {uri:?}: {e}"))?;
        let host = match (&self.client_host, self.preserve_host) {
            (Some(host), true) => host.clone(),
            _ => HeaderValue::from_str(&backend.authority)
                .map_err(|e| format!("bad backend authority: {e}"))?,
        };
        let headers = request.headers_mut();
        *headers = self.headers.to_map();
        headers.insert(header::HOST, host);
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_str(&generate_key()).expect("base64 key"),
        );
        Ok(request)
    }
    /// The mux `Open` of this request for the backend at `authority`: the same path, query
    /// and headers a socket of its own would get, and the client's address; `resumed` marks
    /// a client moved here from a lost backend.
    pub fn to_open(&self, authority: &str, peer: SocketAddr, resumed: bool) -> OpenRequest {
        let mut open = OpenRequest::new(&self.path_and_query);
        let host = match (&self.client_host, self.preserve_host) {
            (Some(host), true) => host.as_bytes().to_vec(),
            _ => authority.as_bytes().to_vec(),
        };
        open.headers.push((header::HOST.as_str().to_owned(), host));
        for (name, value) in self.headers.fields() {
            let name = String::from_utf8_lossy(name).into_owned();
            open.headers.push((name, value.to_vec()));
        }
        open.client_addr = peer.to_string();
        open.resumed = resumed;
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers() {
        let mut client = HeaderMap::new();
        client.insert("host", HeaderValue::from_static("chat.example:8080"));
        client.insert(
            "connection",
            HeaderValue::from_static("Upgrade, X-Secret-Hop"),
        );
        client.insert("upgrade", HeaderValue::from_static("websocket"));
        client.insert("x-secret-hop", HeaderValue::from_static("1"));
        client.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        client.insert("proxy-authorization", HeaderValue::from_static("x"));
        client.insert(
            "sec-websocket-key",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        client.insert(
            "sec-websocket-extensions",
            HeaderValue::from_static("permessage-deflate"),
        );
        client.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("chat, superchat"),
        );
        client.insert("cookie", HeaderValue::from_static("sid=1"));
        client.insert("authorization", HeaderValue::from_static("Bearer t"));
        client.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        client.insert("x-custom", HeaderValue::from_static("kept"));
        let uri: Uri = "/chat/room?x=1".parse().unwrap();
        let addr: SocketAddr = "10.0.0.9:4444".parse().unwrap();
        let request = BackendRequest::from_client(&uri, &client, addr, 42, true, "http");
        let backend = BackendUrl::parse("ws://127.0.0.1:9001").unwrap();
        let http = request.for_backend(&backend).unwrap();
        let h = http.headers();
        assert_eq!(http.uri(), "ws://127.0.0.1:9001/chat/room?x=1");
        assert_eq!(h["host"], "chat.example:8080");
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "chat.example:8080");
        assert_eq!(h["x-real-ip"], "10.0.0.9");
        assert_eq!(h["x-relay-conn-id"], "42");
        assert_eq!(h["sec-websocket-protocol"], "chat, superchat");
        assert_eq!(h["cookie"], "sid=1");
        assert_eq!(h["authorization"], "Bearer t");
        assert_eq!(h["x-custom"], "kept");
        assert_eq!(h["connection"], "Upgrade");
        assert_ne!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        for gone in [
            "x-secret-hop",
            "keep-alive",
            "proxy-authorization",
            "sec-websocket-extensions",
        ] {
            assert!(!h.contains_key(gone), "{gone} was forwarded");
        }
        let plain = BackendRequest::from_client(&uri, &client, addr, 42, false, "http");
        let backend = BackendUrl::parse("ws://127.0.0.1:9001/base").unwrap();
        let http = plain.for_backend(&backend).unwrap();
        assert_eq!(http.headers()["host"], "127.0.0.1:9001");
        assert_eq!(http.uri(), "ws://127.0.0.1:9001/base/chat/room?x=1");
    }

    #[test]
    fn a_kept_request_holds_none_of_the_clients_read_buffer() {
        // hyper parses header values as slices of its connection's read buffer.
        let read_buffer = bytes::Bytes::from(b"chat.example:8080 sid=1 kept".repeat(100));
        let value = |range: std::ops::Range<usize>| {
            HeaderValue::from_maybe_shared(read_buffer.slice(range)).unwrap()
        };
        let mut client = HeaderMap::new();
        client.insert("host", value(0..17));
        client.insert("cookie", value(18..23));
        client.append("x-custom", value(24..28));
        client.append("x-custom", value(0..17));
        let uri: Uri = "/chat".parse().unwrap();
        let addr: SocketAddr = "10.0.0.9:4444".parse().unwrap();
        let request = BackendRequest::from_client(&uri, &client, addr, 7, true, "http");
        drop(client);
        assert!(
            read_buffer.is_unique(),
            "the request still shares the read buffer"
        );
        let backend = BackendUrl::parse("ws://127.0.0.1:9001").unwrap();
        let http = request.for_backend(&backend).unwrap();
        let h = http.headers();
        assert_eq!(h["host"], "chat.example:8080");
        assert_eq!(h["x-forwarded-host"], "chat.example:8080");
        assert_eq!(h["cookie"], "sid=1");
        let custom: Vec<_> = h.get_all("x-custom").iter().collect();
        assert_eq!(
            custom,
            ["kept", "chat.example:8080"],
            "order or repeats lost"
        );
        let open = request.to_open("127.0.0.1:9001", addr, false);
        let custom: Vec<_> = open
            .headers
            .iter()
            .filter(|(name, _)| name == "x-custom")
            .map(|(_, value)| value.as_slice())
            .collect();
        assert_eq!(custom, [&b"kept"[..], &b"chat.example:8080"[..]]);
    }
}
