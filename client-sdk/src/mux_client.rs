//! The client side of mux mode: [`MuxClient`] carries many logical WebSockets, each with its
//! own URL path, over one WebSocket to a relay route in mode "mux".
//!
//! The client is the link's initiator. [`MuxClient::connect`] dials and sets up the link and
//! spawns its driver; [`MuxClient::from_link`] wraps a link set up some other way, which is
//! the seam a reconnecting client builds on (dial again when [`MuxClient::closed`] resolves).

use std::time::Duration;

use tungstenite::client::IntoClientRequest;
use wsrelay_protocol::LINK_SUBPROTOCOL;
use wsrelay_protocol::link::{
    Link, LinkConfig, LinkError, LinkHandle, LinkRole, MuxStream, OpenError, OpenRequest,
};

/// How long [`MuxClient::connect`] may take: TCP connect, WebSocket handshake and `Hello`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why [`MuxClient::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection or the WebSocket handshake failed (an HTTP status from the relay, such
    /// as 404 for an unknown route, shows up here).
    #[error("connect {url}: {source}")]
    WebSocket {
        /// The URL dialled.
        url: String,
        /// What failed.
        source: Box<tungstenite::Error>,
    },
    /// The WebSocket opened but the mux link could not be set up.
    #[error("connect {url}: {source}")]
    Link {
        /// The URL dialled.
        url: String,
        /// What failed.
        source: LinkError,
    },
    /// Nothing completed within [`CONNECT_TIMEOUT`].
    #[error("connect {url}: timed out after {after:?}")]
    Timeout {
        /// The URL dialled.
        url: String,
        /// How long it waited.
        after: Duration,
    },
}

/// One mux link to a relay, from the client side: open any number of logical WebSockets on it.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use futures_util::{SinkExt, StreamExt};
/// use wsrelay_client::MuxClient;
///
/// let client = MuxClient::connect("ws://127.0.0.1:8080/mux").await?;
/// let mut room1 = client.open("/chat/room1?user=ann", Vec::new()).await?;
/// let mut room2 = client.open("/chat/room2?user=ann", Vec::new()).await?;
/// room1.send(tungstenite::Message::text("hi room 1")).await?;
/// room2.send(tungstenite::Message::text("hi room 2")).await?;
/// let reply = room1.next().await;
/// # Ok(()) }
/// ```
///
/// Cloning is cheap and shares the link. When every clone is dropped the link stays up until its
/// last stream ends.
#[derive(Debug, Clone)]
pub struct MuxClient {
    url: String,
    link: LinkHandle,
}

impl MuxClient {
    /// Connects to `url` (`ws://host:port/route`) with the default [`LinkConfig`].
    pub async fn connect(url: &str) -> Result<MuxClient, ConnectError> {
        MuxClient::connect_with_config(url, LinkConfig::default()).await
    }

    /// Connects to `url` with `config` for this end of the link.
    pub async fn connect_with_config(
        url: &str,
        config: LinkConfig,
    ) -> Result<MuxClient, ConnectError> {
        let setup = async {
            let mut request =
                url.into_client_request()
                    .map_err(|source| ConnectError::WebSocket {
                        url: url.to_owned(),
                        source: Box::new(source),
                    })?;
            // The relay tells a mux client from a plain one by this offer.
            request.headers_mut().insert(
                "sec-websocket-protocol",
                tungstenite::http::HeaderValue::from_static(LINK_SUBPROTOCOL),
            );
            let (ws, _response) = tokio_tungstenite::connect_async_with_config(request, None, true)
                .await
                .map_err(|source| ConnectError::WebSocket {
                    url: url.to_owned(),
                    source: Box::new(source),
                })?;
            Link::establish(ws, LinkRole::Initiator, config)
                .await
                .map_err(|source| ConnectError::Link {
                    url: url.to_owned(),
                    source,
                })
        };
        let (handle, driver) = tokio::time::timeout(CONNECT_TIMEOUT, setup)
            .await
            .map_err(|_| ConnectError::Timeout {
                url: url.to_owned(),
                after: CONNECT_TIMEOUT,
            })??;
        let shown = url.to_owned();
        tokio::spawn(async move {
            let why = driver.await;
            tracing::debug!(url = %shown, reason = %why, "mux client: link ended");
        });
        Ok(MuxClient::from_link(url, handle))
    }

    /// Wraps a link this end set up as initiator (its driver already spawned). `url` is only
    /// reported back by [`url`](Self::url).
    pub fn from_link(url: &str, link: LinkHandle) -> MuxClient {
        MuxClient {
            url: url.to_owned(),
            link,
        }
    }

    /// Opens a logical WebSocket for `path_and_query` (`/chat/room1?user=ann`) with extra
    /// request `headers` (names are sent in lowercase), and waits for the backend to accept it.
    ///
    /// A refusal carries the HTTP status the backend (or relay) answered with.
    pub async fn open(
        &self,
        path_and_query: &str,
        headers: Vec<(String, Vec<u8>)>,
    ) -> Result<MuxStream, OpenError> {
        let mut request = OpenRequest::new(path_and_query);
        request.headers = headers
            .into_iter()
            .map(|(name, value)| (name.to_ascii_lowercase(), value))
            .collect();
        self.open_request(request).await
    }

    /// Opens a logical WebSocket from a full [`OpenRequest`].
    pub async fn open_request(&self, request: OpenRequest) -> Result<MuxStream, OpenError> {
        self.link.open(request).await
    }

    /// The URL this client connected to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying link.
    pub fn link(&self) -> &LinkHandle {
        &self.link
    }

    /// Streams open on the link.
    pub fn open_streams(&self) -> usize {
        self.link.open_streams()
    }

    /// True once the link has ended; open a new client to continue.
    pub fn is_closed(&self) -> bool {
        self.link.is_closed()
    }

    /// Resolves when the link ends, with why.
    pub async fn closed(&self) -> LinkError {
        self.link.closed().await
    }

    /// Winds the link down: no new streams; it closes when the open ones end.
    pub fn go_away(&self, reason: &str) {
        self.link.go_away(reason);
    }
}
