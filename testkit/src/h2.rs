//! [`H2Connection`]: an HTTP/2 client for the RFC 8441 tests, over plain TCP (h2c with prior
//! knowledge) or TLS (h2 by ALPN), that opens WebSockets by extended CONNECT; many share the
//! one connection, each its own stream.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper::ext::Protocol;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::files::TestCertificate;
use crate::wait::{WAIT, within};

/// A WebSocket carried by one stream of an HTTP/2 connection.
pub type H2WebSocket = WebSocketStream<TokioIo<Upgraded>>;

/// An HTTP answer other than `200` to an extended CONNECT (or any answer to a plain request).
#[derive(Debug)]
pub struct H2Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body, as text.
    pub body: String,
}

/// One HTTP/2 client connection to a relay.
pub struct H2Connection {
    send: SendRequest<Empty<Bytes>>,
    driver: JoinHandle<Result<(), hyper::Error>>,
    scheme: &'static str,
    authority: String,
}

impl H2Connection {
    /// Connects to `addr` over plain TCP, speaking HTTP/2 at once (h2c with prior knowledge).
    pub async fn connect(addr: SocketAddr) -> Result<H2Connection, hyper::Error> {
        let tcp = within("TCP connect", TcpStream::connect(addr))
            .await
            .unwrap();
        H2Connection::handshake(tcp, "http", addr.to_string()).await
    }

    /// Connects to `addr` over TLS trusting `certificate` alone, offering only `h2` by ALPN;
    /// fails the test unless the server agrees on it.
    pub async fn connect_tls(
        addr: SocketAddr,
        certificate: &TestCertificate,
    ) -> Result<H2Connection, hyper::Error> {
        let tcp = within("TCP connect", TcpStream::connect(addr))
            .await
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(certificate.der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tls = within(
            "TLS handshake",
            TlsConnector::from(Arc::new(config)).connect("localhost".try_into().unwrap(), tcp),
        )
        .await
        .expect("TLS handshake");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "the server agreed on h2 by ALPN"
        );
        H2Connection::handshake(tls, "https", format!("localhost:{}", addr.port())).await
    }

    async fn handshake<I>(
        io: I,
        scheme: &'static str,
        authority: String,
    ) -> Result<H2Connection, hyper::Error>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, connection) = within(
            "HTTP/2 handshake",
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)),
        )
        .await?;
        Ok(H2Connection {
            send,
            driver: tokio::spawn(connection),
            scheme,
            authority,
        })
    }

    /// Opens a WebSocket to `path` (path and query) by extended CONNECT with `headers`; the
    /// relay's or backend's refusal comes back as the answer it got.
    pub async fn websocket(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<H2WebSocket, H2Answer> {
        let upgraded = self.websocket_stream(path, headers).await?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(512 << 20))
            .max_frame_size(Some(512 << 20));
        Ok(WebSocketStream::from_raw_socket(upgraded, Role::Client, Some(config)).await)
    }

    /// Like [`websocket`](Self::websocket), but the stream's bytes as they are, for hand-made
    /// frames.
    pub async fn websocket_stream(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<TokioIo<Upgraded>, H2Answer> {
        let mut request = self.request(Method::CONNECT, path);
        request
            .extensions_mut()
            .insert(Protocol::from_static("websocket"));
        request
            .headers_mut()
            .insert("sec-websocket-version", "13".parse().unwrap());
        for (name, value) in headers {
            request.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                value.parse().expect("a header value"),
            );
        }
        let response = self.send(request).await;
        if response.status() != StatusCode::OK {
            return Err(answer(response).await);
        }
        let upgraded = within("the stream to open", hyper::upgrade::on(response))
            .await
            .expect("upgraded stream");
        Ok(TokioIo::new(upgraded))
    }

    /// Like [`websocket`](Self::websocket), failing the test on a refusal.
    pub async fn open(&mut self, path: &str) -> H2WebSocket {
        match self.websocket(path, &[]).await {
            Ok(socket) => socket,
            Err(refused) => panic!("extended CONNECT {path} refused: {refused:?}"),
        }
    }

    /// Sends a plain request (`GET /healthz`, ...) and returns its answer.
    pub async fn plain(&mut self, method: Method, path: &str) -> H2Answer {
        let request = self.request(method, path);
        let response = self.send(request).await;
        answer(response).await
    }

    /// Waits for the server to end the connection; its error, if it ended with one.
    pub async fn closed(self) -> Result<(), hyper::Error> {
        within("the HTTP/2 connection to end", self.driver)
            .await
            .expect("the connection task")
    }

    fn request(&self, method: Method, path: &str) -> Request<Empty<Bytes>> {
        let uri = format!("{}://{}{path}", self.scheme, self.authority);
        Request::builder()
            .method(method)
            .version(Version::HTTP_2)
            .uri(uri)
            .body(Empty::new())
            .expect("a request")
    }

    async fn send(
        &mut self,
        request: Request<Empty<Bytes>>,
    ) -> http::Response<hyper::body::Incoming> {
        within("the connection to take a request", self.send.ready())
            .await
            .expect("the HTTP/2 connection is open");
        within("an answer", self.send.send_request(request))
            .await
            .expect("an HTTP/2 answer")
    }
}

/// A response read whole.
async fn answer(response: http::Response<hyper::body::Incoming>) -> H2Answer {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("the body in time")
        .map(|collected| String::from_utf8_lossy(&collected.to_bytes()).into_owned())
        .unwrap_or_default();
    H2Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}
