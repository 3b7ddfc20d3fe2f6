//! The value types of the configuration, each parsed and checked while it is deserialized so
//! that `toml` reports a bad value with the span of its key: backend URLs, hash keys, listen
//! addresses, durations and sizes.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use http::uri::{Authority, PathAndQuery, Uri};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

/// One backend of an upstream: a `ws://` or `wss://` URL and a rendezvous weight.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// The backend's URL as written in the config.
    pub url: BackendUrl,
    /// Relative share of clients (rendezvous capacity); 1.0 unless set.
    pub weight: f64,
}

/// A parsed `ws[s]://host:port[/base]` backend address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendUrl {
    /// The URL exactly as configured; it is also the backend's identity for hashing. Shared:
    /// every session on the backend names it.
    pub original: Arc<str>,
    /// `wss://`: the backend is reached over TLS (the upstream's `tls` settings).
    pub secure: bool,
    /// The host as written, without the port (IPv6 addresses keep their brackets): the TLS
    /// server name unless the upstream's `tls.server_name` says otherwise.
    pub host: String,
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
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => {
                return Err(format!(
                    "backend URL {text:?} must start with ws:// or wss://"
                ));
            }
        };
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
        let port = authority
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        let base_path = match uri.path_and_query().map(PathAndQuery::path) {
            None | Some("/") | Some("") => String::new(),
            Some(path) => path.trim_end_matches('/').to_owned(),
        };
        Ok(BackendUrl {
            original: text.into(),
            secure,
            host: authority.host().to_owned(),
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
                f.write_str(r#"a backend URL "ws://host:port" (or wss://) or { url = "...", weight = 2.0 }"#)
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

/// The address of a DNS server (`[server] resolver`), e.g. `"127.0.0.1:53"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolverAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ResolverAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(ResolverAddr).map_err(|_| {
            de::Error::custom(format!(
                "invalid resolver {text:?}: expected the DNS server's IP:PORT such as \"127.0.0.1:53\"; remove the key to use /etc/resolv.conf"
            ))
        })
    }
}

/// The DNS name and port of a discovered upstream (`discover.dns = "name:port"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsTarget {
    /// The name whose A and AAAA records are the backends.
    pub name: String,
    /// The port every backend listens on.
    pub port: u16,
}

impl DnsTarget {
    /// Parses `name:port`: a DNS name (letters, digits, `-`, `_` and dots, at most 253
    /// characters) and a port from 1 to 65535.
    pub fn parse(text: &str) -> Result<DnsTarget, String> {
        let bad = |why: &str| {
            format!(
                "invalid discover.dns {text:?}: {why}; expected name:port such as \"chat.default.svc.cluster.local:9000\""
            )
        };
        let (name, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?;
        let name = name.strip_suffix('.').unwrap_or(name);
        let labels_ok = name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
        if name.is_empty() || name.len() > 253 || !labels_ok {
            return Err(bad("the name must be a DNS name"));
        }
        Ok(DnsTarget {
            name: name.to_owned(),
            port,
        })
    }
}

impl fmt::Display for DnsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.port)
    }
}

impl<'de> Deserialize<'de> for DnsTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        DnsTarget::parse(&text).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_targets() {
        let target = DnsTarget::parse("chat.default.svc.cluster.local:9000").unwrap();
        assert_eq!(target.name, "chat.default.svc.cluster.local");
        assert_eq!(target.port, 9000);
        assert_eq!(DnsTarget::parse("chat.:1").unwrap().name, "chat");
        for (bad, why) in [
            ("chat", "no port"),
            ("chat:0", "1 to 65535"),
            ("chat:http", "1 to 65535"),
            (":9000", "DNS name"),
            ("a..b:1", "DNS name"),
            ("127.0.0.1:99999", "1 to 65535"),
            ("[::1]:9000", "DNS name"),
            ("ws://chat:9000", "DNS name"),
        ] {
            let message = DnsTarget::parse(bad).unwrap_err();
            assert!(message.contains(why), "{bad}: {message}");
        }
    }
}
