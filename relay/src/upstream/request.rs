//! The request a backend sees for a client: the same path and query, the client's end-to-end
//! headers, and the forwarding headers a proxy adds. The same request opens a socket of its
//! own (per-client mode) or a stream on a mux link.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri};
use tungstenite::handshake::client::generate_key;
use wsrelay_protocol::OpenRequest;

use crate::ascii;
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
/// same fields costs a kilobyte of tables beside the values. Each dial's header values are
/// slices of the block, so a dial copies none of them.
#[derive(Debug, Clone, Default)]
struct HeaderBlock {
    block: Bytes,
    fields: u16,
}

/// Writes a [`HeaderBlock`], field by field, straight from the client's request: no header
/// map in between.
struct BlockWriter {
    block: Vec<u8>,
    fields: u16,
}

impl BlockWriter {
    fn with_capacity(bytes: usize) -> Self {
        BlockWriter {
            block: Vec::with_capacity(bytes),
            fields: 0,
        }
    }

    /// Adds `name: value`; `name` is a valid header name (no `:`), `value` a valid value (no
    /// line feed).
    fn field(&mut self, name: &str, value: &[u8]) {
        self.field_with(name, |out| out.extend_from_slice(value));
    }

    /// Adds `name` with the value `write` puts in the block.
    fn field_with(&mut self, name: &str, write: impl FnOnce(&mut Vec<u8>)) {
        self.block.extend_from_slice(name.as_bytes());
        self.block.push(b':');
        write(&mut self.block);
        self.block.push(b'\n');
        self.fields = self.fields.saturating_add(1);
    }

    /// The block, exactly its size: a session keeps it for as long as its client stays.
    fn finish(self) -> HeaderBlock {
        HeaderBlock {
            block: Bytes::from(self.block.into_boxed_slice()),
            fields: self.fields,
        }
    }
}

/// Room for the fields the relay adds (names, addresses, conn id), so writing the block
/// rarely grows it; `finish` cuts it to size anyway.
const RELAY_FIELDS_ROOM: usize = 160;

/// The header names the relay adds itself: a dial names them without allocating.
const RELAY_HEADERS: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "x-relay-conn-id",
];

impl HeaderBlock {
    /// How many fields it holds.
    fn len(&self) -> usize {
        usize::from(self.fields)
    }

    /// The fields in the order they were packed, as bytes.
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.block
            .split(|&byte| byte == b'\n')
            .filter(|line| !line.is_empty())
            .filter_map(|line| {
                let colon = line.iter().position(|&byte| byte == b':')?;
                Some((&line[..colon], &line[colon + 1..]))
            })
    }

    /// Appends the fields to `map`, in order.
    fn append_to(&self, map: &mut HeaderMap) {
        for (name, value) in self.fields() {
            let name = match RELAY_HEADERS.iter().find(|own| own.as_bytes() == name) {
                Some(own) => Ok(HeaderName::from_static(own)),
                None => HeaderName::from_bytes(name),
            };
            // Both were valid when packed.
            let value = HeaderValue::from_maybe_shared(self.block.slice_ref(value));
            if let (Ok(name), Ok(value)) = (name, value) {
                map.append(name, value);
            }
        }
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
        let mut block = BlockWriter::with_capacity(
            client_headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 2)
                .sum::<usize>()
                + RELAY_FIELDS_ROOM,
        );
        for (name, value) in client_headers {
            let replaced = matches!(
                name.as_str(),
                "sec-websocket-key"
                    | "sec-websocket-accept"
                    | "sec-websocket-extensions"
                    | "sec-websocket-version"
                    | "host"
            ) || RELAY_HEADERS.contains(&name.as_str());
            if replaced || headers::is_hop_by_hop(name, client_headers) {
                continue;
            }
            block.field(name.as_str(), value.as_bytes());
        }
        let client_ip = client_addr.ip();
        block.field_with("x-forwarded-for", |out| {
            for earlier in client_headers.get_all("x-forwarded-for") {
                if let Ok(earlier) = earlier.to_str() {
                    out.extend_from_slice(earlier.as_bytes());
                    out.extend_from_slice(b", ");
                }
            }
            ascii::push_ip(out, client_ip);
        });
        block.field("x-forwarded-proto", scheme.as_bytes());
        if let Some(host) = client_headers.get(header::HOST) {
            block.field("x-forwarded-host", host.as_bytes());
        }
        block.field_with("x-real-ip", |out| ascii::push_ip(out, client_ip));
        block.field_with("x-relay-conn-id", |out| ascii::push_decimal(out, conn_id));
        BackendRequest {
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
            // Copied: a clone would share hyper's read buffer.
            client_host: client_headers
                .get(header::HOST)
                .and_then(|host| HeaderValue::from_bytes(host.as_bytes()).ok()),
            headers: block.finish(),
            preserve_host,
        }
    }

    /// The request of an active health check: `/` with `User-Agent: wsrelay-health-check`.
    pub fn health_probe() -> BackendRequest {
        let mut block = BlockWriter::with_capacity(40);
        block.field("user-agent", b"wsrelay-health-check");
        BackendRequest {
            path_and_query: "/".into(),
            client_host: None,
            headers: block.finish(),
            preserve_host: false,
        }
    }

    /// The handshake request of a mux link: the backend's base path, the mux subprotocol.
    pub fn mux_link() -> BackendRequest {
        let mut block = BlockWriter::with_capacity(80);
        block.field("user-agent", b"wsrelay-mux-link");
        block.field(
            "sec-websocket-protocol",
            wsrelay_protocol::LINK_SUBPROTOCOL.as_bytes(),
        );
        BackendRequest {
            path_and_query: "/".into(),
            client_host: None,
            headers: block.finish(),
            preserve_host: false,
        }
    }

    /// The HTTP request for one backend, with a fresh `Sec-WebSocket-Key`, as it goes out:
    /// in origin form (`/base/path?query`, which is what an HTTP/1.1 client sends to an origin
    /// server; the authority travels in `Host`), with the handshake's own headers first, in
    /// the order the relay has always sent them (backends that read the handshake naively
    /// find them where tungstenite's clients put them), then the kept ones.
    pub(super) fn for_backend(&self, backend: &BackendUrl) -> Result<Request<()>, String> {
        let mut target =
            String::with_capacity(backend.base_path.len() + self.path_and_query.len() + 1);
        target.push_str(&backend.base_path);
        target.push_str(&self.path_and_query);
        if !target.starts_with('/') {
            target.insert(0, '/');
        }
        let uri = Uri::try_from(target)
            .map_err(|e| format!("bad backend path {:?}: {e}", backend.base_path))?;
        let host = match (&self.client_host, self.preserve_host) {
            (Some(host), true) => host.clone(),
            _ => HeaderValue::from_str(&backend.authority)
                .map_err(|e| format!("bad backend authority: {e}"))?,
        };
        let mut request = Request::new(());
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.reserve(self.headers.len() + 5);
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
        self.headers.append_to(headers);
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
        assert_eq!(http.uri(), "/chat/room?x=1");
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
        assert_eq!(http.uri(), "/base/chat/room?x=1");
    }

    #[test]
    fn the_request_goes_out_in_origin_form_with_the_handshake_headers_first() {
        let mut client = HeaderMap::new();
        client.insert("host", HeaderValue::from_static("chat.example"));
        client.insert("x-custom", HeaderValue::from_static("kept"));
        client.append("cookie", HeaderValue::from_static("a=1"));
        client.append("cookie", HeaderValue::from_static("b=2"));
        let uri: Uri = "/chat?x=1".parse().unwrap();
        let addr: SocketAddr = "10.0.0.9:4444".parse().unwrap();
        let request = BackendRequest::from_client(&uri, &client, addr, 3, true, "http");
        let backend = BackendUrl::parse("ws://127.0.0.1:9001/base/").unwrap();
        let http = request.for_backend(&backend).unwrap();
        assert_eq!(http.uri(), "/base/chat?x=1");
        assert_eq!(http.uri().authority(), None);
        let names: Vec<&str> = http.headers().keys().map(|name| name.as_str()).collect();
        assert_eq!(
            names[..5],
            [
                "host",
                "connection",
                "upgrade",
                "sec-websocket-version",
                "sec-websocket-key"
            ]
        );
        let order: Vec<(&str, &str)> = http
            .headers()
            .iter()
            .skip(5)
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            order,
            [
                ("x-custom", "kept"),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
                ("x-forwarded-for", "10.0.0.9"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", "chat.example"),
                ("x-real-ip", "10.0.0.9"),
                ("x-relay-conn-id", "3"),
            ]
        );
        let bare = BackendRequest::health_probe()
            .for_backend(&BackendUrl::parse("ws://127.0.0.1:9001").unwrap())
            .unwrap();
        assert_eq!(bare.uri(), "/");
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
