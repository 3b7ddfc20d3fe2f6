//! Opening client WebSockets: target URLs, loopback source addresses, timeouts, and errors
//! sorted into kinds the report can count.
//!
//! One source address gives a client at most ~28,000 connections to one destination (the
//! ephemeral port range). For more, the [`Connector`] spreads connections over several loopback
//! source addresses (`127.0.0.2`, `127.0.0.3`, ...; all of 127.0.0.0/8 reaches `lo` on Linux):
//! each socket is bound to its address with `IP_BIND_ADDRESS_NO_PORT`, so the kernel still
//! chooses the port at `connect` time and can share it between destinations.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use http::Uri;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Error as WsError};

/// A client WebSocket of the load generator.
pub type Ws = WebSocketStream<TcpStream>;

/// Why a target URL can't be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Not a `ws://host:port/path` URL.
    #[error("bad target URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The host name did not resolve.
    #[error("resolve {host}: {source}")]
    Resolve {
        /// The host as given.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The target is not on this machine and `--allow-remote` was not given.
    #[error(
        "target {url} resolves to {addr}, which is not a loopback address; load tests go to \
         127.0.0.0/8 or ::1 unless you pass --allow-remote"
    )]
    NotLoopback {
        /// The URL as given.
        url: String,
        /// Where it resolved.
        addr: SocketAddr,
    },
}

/// Why one connection attempt failed; [`ConnectError::kind`] is what the report counts.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Binding the source address failed.
    #[error("bind {source_addr}: {error}")]
    Bind {
        /// The source address.
        source_addr: IpAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// The TCP connect failed.
    #[error("connect {addr}: {error}")]
    Tcp {
        /// The destination.
        addr: SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// TCP connect and handshake together took longer than the connect timeout.
    #[error("connect {url}: timed out after {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// The server answered the upgrade with an HTTP status.
    #[error("handshake {url}: HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The WebSocket handshake failed otherwise.
    #[error("handshake {url}: {error}")]
    Handshake {
        /// The URL.
        url: String,
        /// tungstenite's error.
        error: WsError,
    },
}

impl ConnectError {
    /// A short stable name for counting: `bind`, `connect`, `connect-timeout`, `http-503`,
    /// `handshake`.
    pub fn kind(&self) -> String {
        match self {
            ConnectError::Bind { .. } => "bind".into(),
            ConnectError::Tcp { .. } => "connect".into(),
            ConnectError::Timeout { .. } => "connect-timeout".into(),
            ConnectError::Status { status, .. } => format!("http-{status}"),
            ConnectError::Handshake { .. } => "handshake".into(),
        }
    }
}

/// A parsed `ws://` target.
#[derive(Debug, Clone)]
pub struct TargetUrl {
    /// The URL as given.
    pub url: String,
    /// Where it resolved (the first address).
    pub addr: SocketAddr,
}

impl TargetUrl {
    /// Parses and resolves `url`; refuses non-loopback hosts unless `allow_remote`.
    pub async fn resolve(url: &str, allow_remote: bool) -> Result<TargetUrl, TargetError> {
        let bad = |reason: &str| TargetError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => return Err(bad("wss:// is not supported by the load generator")),
            _ => return Err(bad("the scheme must be ws://")),
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| TargetError::Resolve {
                host: host.to_owned(),
                source,
            })?
            .next()
            .ok_or_else(|| bad("the host has no address"))?;
        if !allow_remote && !addr.ip().is_loopback() {
            return Err(TargetError::NotLoopback {
                url: url.to_owned(),
                addr,
            });
        }
        Ok(TargetUrl {
            url: url.to_owned(),
            addr,
        })
    }

    /// The URL with `query` (`k=v&...`) added.
    pub fn with_query(&self, query: &str) -> String {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{separator}{query}", self.url)
    }
}

/// The WebSocket settings of load-generator clients: small buffers so 100,000 idle
/// connections fit, and writes gathered up to 16 KiB until an explicit flush.
pub fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// Opens client connections to one or more targets (spread round-robin by connection index),
/// from loopback source addresses when asked.
#[derive(Debug, Clone)]
pub struct Connector {
    targets: Vec<TargetUrl>,
    sources: Vec<Ipv4Addr>,
    timeout: Duration,
}

/// Loopback source addresses `127.0.0.1 ..= 127.0.0.N`, first at `first` (e.g. 2 for workers
/// that should not share the default address).
pub fn loopback_sources(count: usize, first: u32) -> Vec<Ipv4Addr> {
    (0..count as u32)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + first + i))
        .collect()
}

impl Connector {
    /// A connector for `targets`; `sources` may be empty (the kernel picks the address).
    pub fn new(targets: Vec<TargetUrl>, sources: Vec<Ipv4Addr>, timeout: Duration) -> Connector {
        assert!(!targets.is_empty(), "a connector needs a target");
        Connector {
            targets,
            sources,
            timeout,
        }
    }

    /// The target URLs, in order.
    pub fn urls(&self) -> Vec<String> {
        self.targets.iter().map(|t| t.url.clone()).collect()
    }

    /// The target connection `index` goes to.
    pub fn target(&self, index: usize) -> &TargetUrl {
        &self.targets[index % self.targets.len()]
    }

    /// Opens connection `index`, with `query` appended to its URL if given.
    pub async fn connect(&self, index: usize, query: Option<&str>) -> Result<Ws, ConnectError> {
        let target = self.target(index);
        let url = match query {
            Some(q) => target.with_query(q),
            None => target.url.clone(),
        };
        let source = (!self.sources.is_empty() && target.addr.is_ipv4())
            .then(|| self.sources[index % self.sources.len()]);
        match tokio::time::timeout(self.timeout, open(&url, target.addr, source)).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout {
                url,
                timeout: self.timeout,
            }),
        }
    }
}

async fn open(url: &str, addr: SocketAddr, source: Option<Ipv4Addr>) -> Result<Ws, ConnectError> {
    let tcp_error = |error| ConnectError::Tcp { addr, error };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(tcp_error)?;
    if let Some(ip) = source {
        bind_no_port(&socket, ip).map_err(|error| ConnectError::Bind {
            source_addr: IpAddr::V4(ip),
            error,
        })?;
    }
    let tcp = socket.connect(addr).await.map_err(tcp_error)?;
    let _ = tcp.set_nodelay(true);
    let request = url
        .into_client_request()
        .map_err(|error| ConnectError::Handshake {
            url: url.to_owned(),
            error,
        })?;
    match tokio_tungstenite::client_async_with_config(request, tcp, Some(client_ws_config())).await
    {
        Ok((ws, _response)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err(ConnectError::Status {
            url: url.to_owned(),
            status: response.status().as_u16(),
        }),
        Err(error) => Err(ConnectError::Handshake {
            url: url.to_owned(),
            error,
        }),
    }
}

/// Binds `socket` to `ip` without reserving a port (`IP_BIND_ADDRESS_NO_PORT`).
fn bind_no_port(socket: &TcpSocket, ip: Ipv4Addr) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_sources_count_up() {
        let s = loopback_sources(3, 2);
        assert_eq!(
            s,
            vec![
                Ipv4Addr::new(127, 0, 0, 2),
                Ipv4Addr::new(127, 0, 0, 3),
                Ipv4Addr::new(127, 0, 0, 4)
            ]
        );
        assert_eq!(loopback_sources(1, 256)[0], Ipv4Addr::new(127, 0, 1, 0));
    }

    #[tokio::test]
    async fn refuses_remote_and_bad_urls() {
        assert!(matches!(
            TargetUrl::resolve("ws://10.1.2.3:80/", false).await,
            Err(TargetError::NotLoopback { .. })
        ));
        assert!(matches!(
            TargetUrl::resolve("http://127.0.0.1:80/", false).await,
            Err(TargetError::BadUrl { .. })
        ));
        let ok = TargetUrl::resolve("ws://127.0.0.1:9/x?a=1", false)
            .await
            .unwrap();
        assert_eq!(ok.with_query("room=r"), "ws://127.0.0.1:9/x?a=1&room=r");
    }
}
