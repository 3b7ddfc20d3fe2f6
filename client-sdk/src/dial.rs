//! One dial: TCP connect, TLS for `wss://`, and the WebSocket handshake, all within the
//! connect timeout; and [`ConnectError`], which says which of those failed, for which URL.
//!
//! `DialOptions` is what the builders collect (URL, headers, subprotocols, timeouts, TLS,
//! message size). Turning it into a `Dialer` validates it once (a bad URL or header fails
//! before any socket is opened) and builds the TLS connector once; the dialer is then used for
//! the first connection and every reconnect.
//!
//! With [`Deflate`] the dial also offers `permessage-deflate` and reads the answer: no
//! extension is an uncompressed connection, an answer the client can honour a compressed one,
//! any other answer a [`ConnectError::Extension`].

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_util::either::Either;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::{Request, Response};
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::Role;
use tungstenite::protocol::WebSocketConfig;
use wsrelay_protocol::link::LinkError;

use crate::deflate::{Deflate, DeflateStream, ExtensionError, Negotiated, Rewind};
use crate::socket::Socket;
use crate::tls::{self, Tls, TlsError};

/// The default limit on one dial: TCP connect, TLS and WebSocket handshakes (and, for a
/// [`MuxClient`](crate::MuxClient), the link's `Hello` exchange).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket under a client's WebSocket: plain TCP for `ws://`, TLS over TCP for `wss://`.
pub(crate) type Transport = Either<TcpStream, TlsStream<TcpStream>>;

/// Why a connection attempt failed. Every variant names the URL it was for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL, a header or a subprotocol cannot be used; no socket was opened.
    #[error("connect {url}: invalid request: {reason}")]
    InvalidRequest {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The TCP connection could not be made (refused, unreachable, name not resolved...).
    #[error("connect {url}: TCP connect to {addr}: {source}")]
    Tcp {
        /// The URL.
        url: String,
        /// The `host:port` dialled.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// TLS could not be set up or its handshake failed.
    #[error("connect {url}: {source}")]
    Tls {
        /// The URL.
        url: String,
        /// What failed.
        source: TlsError,
    },
    /// The server answered the upgrade with an HTTP status instead of `101`: e.g. 401/403
    /// from a backend that wants credentials, 404 for an unknown route, 502/503 from a relay
    /// whose backends are down.
    #[error(
        "connect {url}: the server answered HTTP {status}{}",
        body_suffix(body)
    )]
    Http {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The response's `Retry-After`, when it gave one in seconds.
        retry_after: Option<Duration>,
        /// The start of the response body, if any (up to 200 bytes, lossy UTF-8).
        body: String,
    },
    /// The WebSocket handshake failed for another reason (a malformed response, a
    /// subprotocol the client did not offer or none when it offered some, the connection
    /// dropped mid-handshake...).
    #[error("connect {url}: WebSocket handshake: {source}")]
    Handshake {
        /// The URL.
        url: String,
        /// What tungstenite reported.
        source: Box<tungstenite::Error>,
    },
    /// The WebSocket opened but the mux link could not be set up ([`MuxClient`](crate::MuxClient)
    /// only).
    #[error("connect {url}: mux link setup: {source}")]
    Link {
        /// The URL.
        url: String,
        /// What failed.
        source: LinkError,
    },
    /// The client offered `permessage-deflate` ([`Deflate`]) and the server's answer names
    /// something the client did not offer or can't honour (RFC 6455 4.1 and RFC 7692 5: the
    /// client must fail the connection).
    #[error("connect {url}: the server's permessage-deflate answer {answer:?}: {source}")]
    Extension {
        /// The URL.
        url: String,
        /// The server's `Sec-WebSocket-Extensions`, as sent (values joined with `, `).
        answer: String,
        /// What is wrong with it.
        source: ExtensionError,
    },
    /// The attempt did not complete within the connect timeout.
    #[error("connect {url}: timed out after {after:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The connect timeout.
        after: Duration,
    },
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

impl ConnectError {
    /// The URL the attempt was for.
    pub fn url(&self) -> &str {
        match self {
            ConnectError::InvalidRequest { url, .. }
            | ConnectError::Tcp { url, .. }
            | ConnectError::Tls { url, .. }
            | ConnectError::Http { url, .. }
            | ConnectError::Handshake { url, .. }
            | ConnectError::Link { url, .. }
            | ConnectError::Extension { url, .. }
            | ConnectError::Timeout { url, .. } => url,
        }
    }

    /// The HTTP status the server refused the upgrade with, if that is what happened.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when trying again cannot help, so a reconnecting client stops instead:
    /// an invalid request; an HTTP 4xx answer other than 408 (timeout) and 429 (too many
    /// requests), i.e. the server understood and refused (bad credentials, unknown route,
    /// forbidden origin); a server that ignored or changed the offered subprotocols; a
    /// `permessage-deflate` answer the client can't honour; a TLS setup that cannot work (no
    /// trust roots, bad CA file, a host that is no TLS name).
    ///
    /// Everything else (refused or dropped connections, timeouts, TLS handshake failures,
    /// 5xx answers, mux link errors) is retried.
    pub fn is_permanent(&self) -> bool {
        match self {
            ConnectError::InvalidRequest { .. } | ConnectError::Extension { .. } => true,
            ConnectError::Http { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
            ConnectError::Handshake { source, .. } => matches!(
                **source,
                tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(_)
                )
            ),
            ConnectError::Tls { source, .. } => !matches!(source, TlsError::Handshake { .. }),
            ConnectError::Tcp { .. } | ConnectError::Link { .. } | ConnectError::Timeout { .. } => {
                false
            }
        }
    }

    /// How long the server asked clients to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ConnectError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Everything a builder collects about how to dial. See [`ClientBuilder`](crate::ClientBuilder)
/// for what each setting means.
#[derive(Debug, Clone)]
pub(crate) struct DialOptions {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub subprotocols: Vec<String>,
    pub connect_timeout: Duration,
    pub tls: Tls,
    pub max_message_size: Option<usize>,
    /// Offer `permessage-deflate` ([`Client`](crate::Client) only).
    pub deflate: Option<Deflate>,
}

impl DialOptions {
    pub fn new(url: &str) -> DialOptions {
        DialOptions {
            url: url.to_owned(),
            headers: Vec::new(),
            subprotocols: Vec::new(),
            connect_timeout: CONNECT_TIMEOUT,
            tls: Tls::default(),
            max_message_size: None,
            deflate: None,
        }
    }

    /// Validates the options and builds the TLS connector (for `wss://`).
    pub fn dialer(self) -> Result<Dialer, ConnectError> {
        let url = self.url;
        let invalid = |reason: String| ConnectError::InvalidRequest {
            url: url.clone(),
            reason,
        };
        let template = url
            .as_str()
            .into_client_request()
            .map_err(|e| invalid(e.to_string()))?;
        let secure = match template.uri().scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            other => {
                return Err(invalid(format!(
                    "the scheme must be ws or wss, not {}",
                    other.unwrap_or("(none)")
                )));
            }
        };
        let host = template
            .uri()
            .host()
            .ok_or_else(|| invalid("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = template
            .uri()
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        let mut headers = Vec::with_capacity(self.headers.len() + 1);
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| invalid(format!("header name {name:?}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| invalid(format!("header {name} value {value:?}: {e}")))?;
            headers.push((name, value));
        }
        if !self.subprotocols.is_empty() {
            let offer = self.subprotocols.join(", ");
            let value = HeaderValue::from_str(&offer)
                .map_err(|e| invalid(format!("subprotocols {offer:?}: {e}")))?;
            headers.push((HeaderName::from_static("sec-websocket-protocol"), value));
        }
        let tls = if secure {
            let server_name =
                ServerName::try_from(host.clone()).map_err(|_| ConnectError::Tls {
                    url: url.clone(),
                    source: TlsError::ServerName { host: host.clone() },
                })?;
            let connector = tls::connector(&self.tls).map_err(|source| ConnectError::Tls {
                url: url.clone(),
                source,
            })?;
            Some((connector, server_name))
        } else {
            None
        };
        let mut ws_config = WebSocketConfig::default();
        if let Some(max) = self.max_message_size {
            ws_config = ws_config
                .max_message_size(Some(max))
                .max_frame_size(Some(max));
        }
        let deflate = match self.deflate {
            Some(deflate) => {
                let value = HeaderValue::from_str(&deflate.offer())
                    .map_err(|e| invalid(format!("permessage-deflate offer: {e}")))?;
                Some((deflate, value))
            }
            None => None,
        };
        Ok(Dialer {
            url: url.as_str().into(),
            host,
            port,
            headers,
            tls,
            connect_timeout: self.connect_timeout,
            ws_config,
            deflate,
        })
    }
}

/// A validated way to reach one URL; cheap to clone.
#[derive(Clone)]
pub(crate) struct Dialer {
    url: Arc<str>,
    host: String,
    port: u16,
    /// Extra request headers, the subprotocol offer included.
    headers: Vec<(HeaderName, HeaderValue)>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    ws_config: WebSocketConfig,
    /// What to offer for compression, and the offer as a header value.
    deflate: Option<(Deflate, HeaderValue)>,
}

/// A dial that succeeded, for a [`Client`](crate::Client).
pub(crate) struct Established {
    /// The connection's WebSocket, compressed or not.
    pub socket: Socket,
    /// The server's handshake response.
    pub response: Response,
    /// What compression was agreed, if any.
    pub compression: Option<Negotiated>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field(
                "deflate",
                &self.deflate.as_ref().map(|(deflate, _)| deflate),
            )
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// The URL dialled.
    pub fn url(&self) -> &Arc<str> {
        &self.url
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Dials once: TCP, TLS, WebSocket handshake, all within the connect timeout.
    pub async fn dial(&self) -> Result<(WebSocketStream<Transport>, Response), ConnectError> {
        tokio::time::timeout(self.connect_timeout, self.dial_unbounded())
            .await
            .map_err(|_| ConnectError::Timeout {
                url: self.url.to_string(),
                after: self.connect_timeout,
            })?
    }

    /// Dials once for a [`Client`](crate::Client): like [`Dialer::dial`], offering
    /// `permessage-deflate` when it is on.
    pub async fn open(&self) -> Result<Established, ConnectError> {
        let open = async {
            let Some((deflate, offer)) = &self.deflate else {
                let (socket, response) = self.dial_unbounded().await?;
                return Ok(Established {
                    socket: Socket::Plain(socket),
                    response,
                    compression: None,
                });
            };
            self.open_compressed(deflate, offer).await
        };
        tokio::time::timeout(self.connect_timeout, open)
            .await
            .map_err(|_| ConnectError::Timeout {
                url: self.url.to_string(),
                after: self.connect_timeout,
            })?
    }

    /// A dial that offers `permessage-deflate`. The handshake is tungstenite's, over a socket
    /// that gives back what tungstenite read past the response, so either socket can take
    /// over from there.
    async fn open_compressed(
        &self,
        deflate: &Deflate,
        offer: &HeaderValue,
    ) -> Result<Established, ConnectError> {
        let url = || self.url.to_string();
        let mut request = self.request()?;
        request
            .headers_mut()
            .insert("sec-websocket-extensions", offer.clone());
        let stream = Rewind::new(self.transport().await?);
        let (socket, response) = self.handshake(request, stream).await?;
        let mut stream = socket.into_inner();
        let tail = stream.finish_handshake().to_vec();
        let answers = response.headers().get_all("sec-websocket-extensions");
        let agreed = deflate
            .read_answer(answers.iter().map(HeaderValue::as_bytes))
            .map_err(|source| ConnectError::Extension {
                url: url(),
                answer: answers
                    .iter()
                    .map(|value| String::from_utf8_lossy(value.as_bytes()))
                    .collect::<Vec<_>>()
                    .join(", "),
                source,
            })?;
        let Some(agreed) = agreed else {
            // Declined: tungstenite again, given what it had read past the response.
            let socket = WebSocketStream::from_partially_read(
                stream.into_inner(),
                tail,
                Role::Client,
                Some(self.ws_config),
            )
            .await;
            return Ok(Established {
                socket: Socket::Plain(socket),
                response,
                compression: None,
            });
        };
        let max_message = self.ws_config.max_message_size.unwrap_or(usize::MAX);
        let socket = DeflateStream::new(
            stream,
            yawc::Role::Client,
            &agreed.to_string(),
            deflate.options(&self.ws_config),
            max_message,
        )
        .map_err(|error| ConnectError::Handshake {
            url: url(),
            source: Box::new(tungstenite::Error::Io(std::io::Error::other(
                error.to_string(),
            ))),
        })?;
        Ok(Established {
            socket: Socket::Deflate(socket),
            response,
            compression: Some(agreed),
        })
    }

    async fn dial_unbounded(&self) -> Result<(WebSocketStream<Transport>, Response), ConnectError> {
        let request = self.request()?;
        let stream = self.transport().await?;
        self.handshake(request, stream).await
    }

    /// TCP, and TLS for `wss://`.
    async fn transport(&self) -> Result<Transport, ConnectError> {
        let url = || self.url.to_string();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ConnectError::Tcp {
                url: url(),
                addr: format!("{}:{}", self.host, self.port),
                source,
            })?;
        // Chat traffic is many small messages: don't hold them back for coalescing.
        let _ = tcp.set_nodelay(true);
        Ok(match &self.tls {
            None => Either::Left(tcp),
            Some((connector, server_name)) => {
                Either::Right(connector.connect(server_name.clone(), tcp).await.map_err(
                    |source| ConnectError::Tls {
                        url: url(),
                        source: TlsError::Handshake {
                            host: self.host.clone(),
                            source,
                        },
                    },
                )?)
            }
        })
    }

    /// The WebSocket handshake over `stream`.
    async fn handshake<S>(
        &self,
        request: Request,
        stream: S,
    ) -> Result<(WebSocketStream<S>, Response), ConnectError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let url = || self.url.to_string();
        tokio_tungstenite::client_async_with_config(request, stream, Some(self.ws_config))
            .await
            .map_err(|error| match error {
                tungstenite::Error::Http(response) => http_refusal(url(), &response),
                other => ConnectError::Handshake {
                    url: url(),
                    source: Box::new(other),
                },
            })
    }

    /// A fresh upgrade request (each has its own `Sec-WebSocket-Key`).
    fn request(&self) -> Result<Request, ConnectError> {
        let mut request =
            self.url
                .as_ref()
                .into_client_request()
                .map_err(|e| ConnectError::InvalidRequest {
                    url: self.url.to_string(),
                    reason: e.to_string(),
                })?;
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        Ok(request)
    }
}

fn http_refusal(
    url: String,
    response: &tungstenite::http::Response<Option<Vec<u8>>>,
) -> ConnectError {
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = response
        .body()
        .as_deref()
        .map(|b| {
            String::from_utf8_lossy(&b[..b.len().min(200)])
                .trim()
                .to_owned()
        })
        .unwrap_or_default();
    ConnectError::Http {
        url,
        status: response.status().as_u16(),
        retry_after,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialer(url: &str) -> Result<Dialer, ConnectError> {
        DialOptions::new(url).dialer()
    }

    #[test]
    fn bad_urls_and_headers_are_refused_before_any_socket() {
        for url in ["http://example.com/", "not a url", "ws://"] {
            let error = dialer(url).unwrap_err();
            assert!(
                matches!(error, ConnectError::InvalidRequest { .. }),
                "{url}: {error}"
            );
            assert!(error.is_permanent());
            assert_eq!(error.url(), url);
        }
        let mut options = DialOptions::new("ws://127.0.0.1:1/");
        options.headers.push(("bad header".into(), "x".into()));
        let error = options.dialer().unwrap_err();
        assert!(error.to_string().contains("bad header"), "{error}");
    }

    #[test]
    fn hosts_and_ports_come_from_the_url() {
        let plain = dialer("ws://example.com/chat").unwrap();
        assert_eq!((plain.host.as_str(), plain.port), ("example.com", 80));
        let v6 = dialer("ws://[::1]:9000/").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
    }

    #[test]
    fn which_failures_are_worth_retrying() {
        let http = |status| ConnectError::Http {
            url: "ws://x/".into(),
            status,
            retry_after: None,
            body: String::new(),
        };
        for status in [400, 401, 403, 404] {
            assert!(http(status).is_permanent(), "{status}");
        }
        for status in [408, 429, 500, 502, 503] {
            assert!(!http(status).is_permanent(), "{status}");
        }
        let timeout = ConnectError::Timeout {
            url: "ws://x/".into(),
            after: Duration::from_secs(1),
        };
        assert!(!timeout.is_permanent());
        assert_eq!(timeout.to_string(), "connect ws://x/: timed out after 1s");
    }
}
