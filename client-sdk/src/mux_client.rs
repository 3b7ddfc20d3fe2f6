//! The client side of mux mode: [`MuxClient`] carries many logical WebSockets, each with its
//! own URL path, over one WebSocket link to a relay route in mode "mux", and re-dials the
//! link when it is lost, with the same [`Reconnect`] policy and retry loop as
//! [`Client`](crate::Client).
//!
//! Shape: a supervisor task holds the current link (a [`LinkHandle`]; the link's driver runs
//! in a task of its own), waits for it to end, and dials a new one through
//! [`reconnect::redial`](crate::reconnect). The handles read the current link from a `watch`
//! channel: [`MuxClient::open`] waits there, up to the open timeout, while a new link is being
//! dialed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::ClientConfig;
use tokio_util::sync::CancellationToken;
use wsrelay_protocol::LINK_SUBPROTOCOL;
use wsrelay_protocol::link::{
    Link, LinkConfig, LinkDriver, LinkError, LinkHandle, LinkRole, MuxStream, OpenError,
    OpenRequest,
};
use wsrelay_protocol::version::Side;

pub use crate::dial::{CONNECT_TIMEOUT, ConnectError};
use crate::dial::{DialOptions, Dialer};
use crate::reconnect::{self, Reconnect, Retrier, Retry};
use crate::tls::Tls;

/// How long [`MuxClient::open`] waits for a link by default while the client re-dials.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// One mux link to a relay, from the client side, kept up by re-dialing: open any number of
/// logical WebSockets on it.
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
/// **When the link is lost** (the relay restarts, the network drops, a heartbeat times out,
/// the relay sends `GoAway` because it is draining): every stream open on it ends with an error
/// (its `Stream` yields an `io::ErrorKind::ConnectionAborted` error naming why; nothing is
/// resumed on the client side), and the client dials a new link by its [`Reconnect`] policy,
/// waiting the backoff delay before each attempt. Meanwhile [`open`](MuxClient::open) waits
/// for the new link, up to the open timeout ([`OPEN_TIMEOUT`] by default). Re-open your streams
/// when they end: a chat app opens its room again and sends whatever restores its session.
///
/// The client stops for good (and [`closed`](MuxClient::closed) resolves) when the relay
/// closes the link with a stop code of the policy (1000, 1005, 1008 by default), when a dial
/// fails permanently (e.g. HTTP 404: no such route) or the attempts run out, or after
/// [`go_away`](MuxClient::go_away).
///
/// Cloning is cheap and shares the link. When every clone is dropped the client stops
/// re-dialing, and the current link stays up until its last stream ends.
#[derive(Debug, Clone)]
pub struct MuxClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    url: String,
    /// The current link, as the supervisor publishes it.
    slot: watch::Receiver<Slot>,
    /// Asks the supervisor to dial a new link while the current one is going away.
    redial: Arc<Notify>,
    /// Cancelled by `go_away`: the supervisor stops after the current link.
    stop: CancellationToken,
    /// False for [`MuxClient::from_link`]: its link is not re-dialed.
    reconnects: bool,
    open_timeout: Duration,
    supervisor: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The supervisor holds a handle to the current link; without it the link is released
        // once its streams end.
        self.supervisor.abort();
    }
}

/// The client's link, as handles see it.
#[derive(Debug, Clone)]
enum Slot {
    /// A link is up; `generation` counts the links so far (1 for the first).
    Up { link: LinkHandle, generation: u64 },
    /// The link was lost and the supervisor is re-dialing.
    Down { generation: u64, status: String },
    /// The client has stopped for good, with why, after `generation` links.
    Stopped { error: LinkError, generation: u64 },
}

impl MuxClient {
    /// Connects to `url` (`ws://host:port/route`) with the default [`LinkConfig`] and
    /// [`Reconnect`] policy. The first dial is not retried: its error is returned.
    pub async fn connect(url: &str) -> Result<MuxClient, ConnectError> {
        MuxClient::builder(url).connect().await
    }

    /// Connects to `url` with `config` for this end of the link.
    pub async fn connect_with_config(
        url: &str,
        config: LinkConfig,
    ) -> Result<MuxClient, ConnectError> {
        MuxClient::builder(url).link_config(config).connect().await
    }

    /// Starts configuring a client for `url`.
    pub fn builder(url: &str) -> MuxClientBuilder {
        MuxClientBuilder::new(url)
    }

    /// Wraps a link this end set up as initiator (its driver already spawned). `url` is only
    /// reported back by [`url`](Self::url). Such a client does not re-dial: when the link
    /// ends, the client is closed. Must be called within a tokio runtime.
    pub fn from_link(url: &str, link: LinkHandle) -> MuxClient {
        MuxClient::supervised(url, link, None, OPEN_TIMEOUT)
    }

    fn supervised(
        url: &str,
        link: LinkHandle,
        redialer: Option<Redialer>,
        open_timeout: Duration,
    ) -> MuxClient {
        let (slot_tx, slot_rx) = watch::channel(Slot::Up {
            link: link.clone(),
            generation: 1,
        });
        let redial = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let reconnects = redialer.is_some();
        let supervisor = tokio::spawn(supervise(
            link,
            redialer,
            slot_tx,
            Arc::clone(&redial),
            stop.clone(),
        ));
        MuxClient {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                slot: slot_rx,
                redial,
                stop,
                reconnects,
                open_timeout,
                supervisor,
            }),
        }
    }

    /// Opens a logical WebSocket for `path_and_query` (`/chat/room1?user=ann`) with extra
    /// request `headers` (names are sent in lowercase), and waits for the backend to accept it.
    ///
    /// A refusal carries the HTTP status the backend (or relay) answered with. While the
    /// client is re-dialing, this waits for the new link up to the open timeout, then fails
    /// with [`OpenError::Link`] saying what the re-dial is going through; an open that fails
    /// because its link ended or is going away is tried again on the next link, within the
    /// same timeout.
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

    /// Opens a logical WebSocket from a full [`OpenRequest`]; see [`open`](Self::open).
    pub async fn open_request(&self, request: OpenRequest) -> Result<MuxStream, OpenError> {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.open_timeout;
        let mut slot = inner.slot.clone();
        // A link that failed this open: wait for a newer one.
        let mut failed: Option<u64> = None;
        loop {
            let ready = |s: &Slot| match s {
                Slot::Up { generation, .. } => Some(*generation) != failed,
                Slot::Stopped { .. } => true,
                Slot::Down { .. } => false,
            };
            let waited = tokio::time::timeout_at(deadline, slot.wait_for(ready))
                .await
                .map(|current| current.map(|s| s.clone()));
            let (link, generation) = match waited {
                Ok(Ok(current)) => match current {
                    Slot::Up { link, generation } => (link, generation),
                    Slot::Stopped { error, .. } => return Err(OpenError::Link(error)),
                    Slot::Down { .. } => unreachable!("wait_for returned a slot it refused"),
                },
                Ok(Err(_)) => return Err(OpenError::Link(LinkError::Aborted)),
                Err(_) => {
                    let status = match &*slot.borrow() {
                        Slot::Down { status, .. } => status.clone(),
                        _ => "the link kept failing".to_owned(),
                    };
                    return Err(OpenError::Link(LinkError::Io {
                        reason: format!(
                            "no mux link to {} within {:?}: {status}",
                            inner.url, inner.open_timeout
                        ),
                    }));
                }
            };
            let retry = inner.reconnects && !inner.stop.is_cancelled();
            match link.open(request.clone()).await {
                Ok(stream) => return Ok(stream),
                Err(OpenError::GoingAway) if retry => {
                    inner.redial.notify_one();
                    failed = Some(generation);
                }
                Err(OpenError::Link(_)) if retry => failed = Some(generation),
                Err(error) => return Err(error),
            }
        }
    }

    /// The URL this client connects to.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The current link, if one is up.
    pub fn link(&self) -> Option<LinkHandle> {
        match &*self.inner.slot.borrow() {
            Slot::Up { link, .. } => Some(link.clone()),
            _ => None,
        }
    }

    /// Streams open on the current link (0 while re-dialing).
    pub fn open_streams(&self) -> usize {
        self.link().map_or(0, |link| link.open_streams())
    }

    /// True while a link is up (it may be going away).
    pub fn is_connected(&self) -> bool {
        matches!(&*self.inner.slot.borrow(), Slot::Up { link, .. } if !link.is_closed())
    }

    /// Links established so far: 1 for the first, one more for every re-dial that succeeded.
    pub fn links_established(&self) -> u64 {
        match &*self.inner.slot.borrow() {
            Slot::Up { generation, .. }
            | Slot::Down { generation, .. }
            | Slot::Stopped { generation, .. } => *generation,
        }
    }

    /// True once the client has stopped for good (see the type's docs); open a new client to
    /// continue.
    pub fn is_closed(&self) -> bool {
        matches!(&*self.inner.slot.borrow(), Slot::Stopped { .. })
    }

    /// Resolves when the client stops for good, with why: the last link's end, or (when a
    /// re-dial gave up) an [`LinkError::Io`] naming the URL and the last dial error.
    pub async fn closed(&self) -> LinkError {
        let mut slot = self.inner.slot.clone();
        match slot.wait_for(|s| matches!(s, Slot::Stopped { .. })).await {
            Ok(current) => match &*current {
                Slot::Stopped { error, .. } => error.clone(),
                _ => LinkError::Aborted,
            },
            Err(_) => LinkError::Aborted,
        }
    }

    /// Winds the client down: sends `GoAway` on the current link (no new streams; it closes
    /// when the open ones end) and stops re-dialing.
    pub fn go_away(&self, reason: &str) {
        self.inner.stop.cancel();
        if let Some(link) = self.link() {
            link.go_away(reason);
        }
    }
}

/// What the supervisor needs to dial new links.
struct Redialer {
    dialer: Dialer,
    config: LinkConfig,
    retrier: Retrier,
}

/// Dials one link: WebSocket (offering the link subprotocol), then the `Hello` exchange, all
/// within the connect timeout. Spawns the link's driver.
async fn dial_link(dialer: &Dialer, config: LinkConfig) -> Result<LinkHandle, ConnectError> {
    let url = dialer.url().to_string();
    let setup = async {
        let (ws, _response) = dialer.dial().await?;
        Link::establish(ws, LinkRole::Initiator, config)
            .await
            .map_err(|source| ConnectError::Link {
                url: url.clone(),
                source,
            })
    };
    let (handle, driver) = tokio::time::timeout(dialer.connect_timeout(), setup)
        .await
        .map_err(|_| ConnectError::Timeout {
            url: url.clone(),
            after: dialer.connect_timeout(),
        })??;
    spawn_driver(url, driver);
    Ok(handle)
}

fn spawn_driver(url: String, driver: LinkDriver) {
    tokio::spawn(async move {
        let why = driver.await;
        tracing::debug!(%url, reason = %why, "mux client: link ended");
    });
}

/// Keeps the client's link up: waits for it to end (or to be going away when an open needs a
/// new one), then re-dials by the policy, publishing each state in `slot`.
async fn supervise(
    mut link: LinkHandle,
    mut redialer: Option<Redialer>,
    slot: watch::Sender<Slot>,
    redial: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut generation = 1;
    loop {
        // `None`: the link is going away and an open wants a new one; it drains on its own.
        let ended = loop {
            tokio::select! {
                why = link.closed() => break Some(why),
                () = redial.notified() => {
                    if link.is_going_away() && !stop.is_cancelled() && redialer.is_some() {
                        break None;
                    }
                }
            }
        };
        let Some(Redialer {
            dialer,
            config,
            retrier,
        }) = redialer.as_mut()
        else {
            slot.send_replace(Slot::Stopped {
                error: ended.unwrap_or(LinkError::Aborted),
                generation,
            });
            return;
        };
        let final_close = match &ended {
            Some(LinkError::Closed { code, .. }) => !retrier.policy().reconnects_after_close(*code),
            _ => !retrier.policy().is_enabled(),
        };
        if stop.is_cancelled() || final_close {
            let why = ended.unwrap_or(LinkError::GoAway {
                side: Side::Local,
                reason: "stopped".into(),
            });
            slot.send_replace(Slot::Stopped {
                error: why,
                generation,
            });
            return;
        }
        let why = ended.map_or_else(|| "the link is going away".to_owned(), |e| e.to_string());
        tracing::debug!(url = %dialer.url(), reason = %why, "mux client: re-dialing");
        slot.send_replace(Slot::Down {
            generation,
            status: format!("link lost ({why}); re-dialing"),
        });
        let report = |retry: Retry| {
            let status = match &retry.error {
                Some(error) => format!("re-dialing, attempt {} after: {error}", retry.attempt),
                None => format!("link lost ({why}); re-dialing, attempt {}", retry.attempt),
            };
            slot.send_modify(|s| {
                if let Slot::Down {
                    status: current, ..
                } = s
                {
                    *current = status;
                }
            });
            std::future::ready(())
        };
        let dialed = tokio::select! {
            dialed = reconnect::redial(retrier, None, || dial_link(dialer, config.clone()), report) => dialed,
            () = stop.cancelled() => {
                slot.send_replace(Slot::Stopped {
                    error: LinkError::GoAway {
                        side: Side::Local,
                        reason: "stopped while re-dialing".into(),
                    },
                    generation,
                });
                return;
            }
        };
        match dialed {
            Ok(new_link) => {
                generation += 1;
                link = new_link;
                slot.send_replace(Slot::Up {
                    link: link.clone(),
                    generation,
                });
            }
            Err(give_up) => {
                slot.send_replace(Slot::Stopped {
                    error: LinkError::Io {
                        reason: format!("mux client for {}: {give_up}", dialer.url()),
                    },
                    generation,
                });
                return;
            }
        }
    }
}

/// Configures a [`MuxClient`]: headers, timeouts, TLS, reconnect policy, link settings.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use wsrelay_client::{MuxClient, Reconnect};
///
/// let client = MuxClient::builder("wss://relay.example.com/mux")
///     .header("Authorization", "Bearer abc123")
///     .reconnect(Reconnect::default().backoff(Duration::from_millis(250), Duration::from_secs(15)))
///     .open_timeout(Duration::from_secs(30))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until connect()"]
pub struct MuxClientBuilder {
    dial: DialOptions,
    config: LinkConfig,
    reconnect: Reconnect,
    open_timeout: Duration,
}

impl MuxClientBuilder {
    /// A builder for `url` with the defaults: [`CONNECT_TIMEOUT`], system TLS roots,
    /// [`LinkConfig::default`] (its keepalive pings a quiet link), [`Reconnect::default`],
    /// [`OPEN_TIMEOUT`].
    pub fn new(url: &str) -> MuxClientBuilder {
        let mut dial = DialOptions::new(url);
        // The relay tells a mux client from a plain one by this offer.
        dial.subprotocols = vec![LINK_SUBPROTOCOL.to_owned()];
        MuxClientBuilder {
            dial,
            config: LinkConfig::default(),
            reconnect: Reconnect::default(),
            open_timeout: OPEN_TIMEOUT,
        }
    }

    /// Adds a request header to the link's handshake (the relay sees it on the link, not on
    /// each stream: give streams their own headers in [`MuxClient::open`]).
    pub fn header(mut self, name: &str, value: &str) -> MuxClientBuilder {
        self.dial.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The limit on one dial: TCP, TLS, WebSocket handshake and the link's `Hello` exchange.
    pub fn connect_timeout(mut self, timeout: Duration) -> MuxClientBuilder {
        self.dial.connect_timeout = timeout;
        self
    }

    /// Which servers `wss://` trusts; see [`Tls`].
    pub fn tls(mut self, tls: Tls) -> MuxClientBuilder {
        self.dial.tls = tls;
        self
    }

    /// Trusts exactly these certificates for `wss://`.
    pub fn tls_root_certificates(self, roots: Vec<CertificateDer<'static>>) -> MuxClientBuilder {
        self.tls(Tls::Roots(roots))
    }

    /// Trusts exactly the certificates in this PEM file for `wss://`.
    pub fn tls_ca_file(self, path: impl Into<PathBuf>) -> MuxClientBuilder {
        self.tls(Tls::CaFile(path.into()))
    }

    /// Uses this rustls configuration for `wss://` as is.
    pub fn tls_config(self, config: Arc<ClientConfig>) -> MuxClientBuilder {
        self.tls(Tls::Config(config))
    }

    /// This end's link settings (frame size, window, keepalive, stream limit).
    pub fn link_config(mut self, config: LinkConfig) -> MuxClientBuilder {
        self.config = config;
        self
    }

    /// When and how to re-dial a lost link; see [`Reconnect`].
    pub fn reconnect(mut self, policy: Reconnect) -> MuxClientBuilder {
        self.reconnect = policy;
        self
    }

    /// How long [`MuxClient::open`] waits for a link while the client re-dials.
    pub fn open_timeout(mut self, timeout: Duration) -> MuxClientBuilder {
        self.open_timeout = timeout;
        self
    }

    /// Dials the first link (not retried: its error is returned) and starts the supervisor
    /// that re-dials it.
    pub async fn connect(self) -> Result<MuxClient, ConnectError> {
        let dialer = self.dial.dialer()?;
        let link = dial_link(&dialer, self.config.clone()).await?;
        let url = dialer.url().to_string();
        let redialer = Redialer {
            dialer,
            config: self.config,
            retrier: Retrier::new(self.reconnect),
        };
        Ok(MuxClient::supervised(
            &url,
            link,
            Some(redialer),
            self.open_timeout,
        ))
    }
}
