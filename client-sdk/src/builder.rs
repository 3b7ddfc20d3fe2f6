//! [`ClientBuilder`]: how a [`Client`] is configured (request, TLS, reconnect policy,
//! heartbeat, queue policy, session restore) and started, which spawns its connection task.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio_rustls::rustls::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::client::{
    Client, DEFAULT_EVENT_CAPACITY, Heartbeat, OnConnect, QueuePolicy, Shared, State,
};
use crate::connection::ConnectionTask;
use crate::deflate::Deflate;
use crate::dial::{ConnectError, DialOptions, Dialer, Established};
use crate::event::{Connected, Message};
use crate::reconnect::{Reconnect, Retrier};
use crate::tls::Tls;

/// Configures a [`Client`]: request headers, subprotocols, timeouts, TLS, message size,
/// compression, reconnect policy, heartbeat, queue policy. Finish with
/// [`connect`](ClientBuilder::connect) or [`start`](ClientBuilder::start).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use wsrelay_client::{Client, Deflate, Heartbeat, QueuePolicy, Reconnect};
///
/// let client = Client::builder("wss://chat.example.com/chat")
///     .header("Authorization", "Bearer abc123")
///     .subprotocols(["chat.v2"])
///     .connect_timeout(Duration::from_secs(5))
///     .max_message_size(1 << 20)
///     .deflate(Deflate::default())
///     .reconnect(Reconnect::default().backoff(Duration::from_millis(250), Duration::from_secs(15)))
///     .heartbeat(Heartbeat { interval: Duration::from_secs(15), timeout: Duration::from_secs(5) })
///     .queue(QueuePolicy::Buffer { max_messages: 100 })
///     .on_connect(|_| vec![r#"{"type":"join","room":"rust"}"#.into()])
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until connect() or start()"]
pub struct ClientBuilder {
    dial: DialOptions,
    reconnect: Reconnect,
    heartbeat: Heartbeat,
    queue: QueuePolicy,
    event_capacity: usize,
    on_connect: Option<OnConnect>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("dial", &self.dial)
            .field("reconnect", &self.reconnect)
            .field("heartbeat", &self.heartbeat)
            .field("queue", &self.queue)
            .field("event_capacity", &self.event_capacity)
            .field("on_connect", &self.on_connect.is_some())
            .finish()
    }
}

impl ClientBuilder {
    /// A builder for `url` with the defaults: no extra headers, no subprotocols,
    /// [`CONNECT_TIMEOUT`](crate::CONNECT_TIMEOUT), system TLS roots, tungstenite's message
    /// size limit (64 MiB), [`Reconnect::default`], [`Heartbeat::default`],
    /// [`QueuePolicy::default`].
    pub fn new(url: &str) -> ClientBuilder {
        ClientBuilder {
            dial: DialOptions::new(url),
            reconnect: Reconnect::default(),
            heartbeat: Heartbeat::default(),
            queue: QueuePolicy::default(),
            event_capacity: DEFAULT_EVENT_CAPACITY,
            on_connect: None,
        }
    }

    /// Adds a request header to every handshake (e.g. `Authorization`, `Cookie`, `Origin`);
    /// a second value for the same name replaces the first. Invalid names or values make
    /// `connect`/`start` fail with [`ConnectError::InvalidRequest`].
    pub fn header(mut self, name: &str, value: &str) -> ClientBuilder {
        self.dial.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Offers these subprotocols (`Sec-WebSocket-Protocol`), in order of preference. The
    /// server must pick one of them ([`Connected::protocol`]); a server that picks none or
    /// another fails the handshake, and the client stops ([`ConnectError::is_permanent`]).
    pub fn subprotocols<S: Into<String>>(
        mut self,
        protocols: impl IntoIterator<Item = S>,
    ) -> ClientBuilder {
        self.dial.subprotocols = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// The limit on one dial (TCP, TLS and WebSocket handshakes).
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.dial.connect_timeout = timeout;
        self
    }

    /// The largest message (and frame) accepted from the server, in bytes. A larger one
    /// ends the connection, and the client reconnects.
    pub fn max_message_size(mut self, bytes: usize) -> ClientBuilder {
        self.dial.max_message_size = Some(bytes);
        self
    }

    /// Offers `permessage-deflate` (RFC 7692) on every dial, as `deflate` says; off by
    /// default (then the handshake and every frame are as without this call).
    ///
    /// A server that accepts compresses the connection: messages are the same to the
    /// application, and [`Connected::compression`] says what was agreed. A server that
    /// declines (its answer names no extension) gets an uncompressed connection. An answer
    /// the client can't honour (an extension or parameter it did not offer, a larger window
    /// than it asked for) fails the dial with [`ConnectError::Extension`], which is
    /// permanent. Reconnects offer it again.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use wsrelay_client::{Client, Deflate, Event};
    ///
    /// let mut client = Client::builder("wss://chat.example.com/chat")
    ///     .deflate(Deflate::default())
    ///     .connect()
    ///     .await?;
    /// if let Some(Event::Connected(connected)) = client.next_event().await {
    ///     println!("compressed: {}", connected.is_compressed());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn deflate(mut self, deflate: Deflate) -> ClientBuilder {
        self.dial.deflate = Some(deflate);
        self
    }

    /// Which servers `wss://` trusts; see [`Tls`].
    pub fn tls(mut self, tls: Tls) -> ClientBuilder {
        self.dial.tls = tls;
        self
    }

    /// Trusts exactly these certificates for `wss://` (your CA, or a self-signed server
    /// certificate) instead of the system's roots.
    pub fn tls_root_certificates(self, roots: Vec<CertificateDer<'static>>) -> ClientBuilder {
        self.tls(Tls::Roots(roots))
    }

    /// Trusts exactly the certificates in this PEM file for `wss://`.
    pub fn tls_ca_file(self, path: impl Into<PathBuf>) -> ClientBuilder {
        self.tls(Tls::CaFile(path.into()))
    }

    /// Uses this rustls configuration for `wss://` as is.
    pub fn tls_config(self, config: Arc<ClientConfig>) -> ClientBuilder {
        self.tls(Tls::Config(config))
    }

    /// When and how to reconnect; see [`Reconnect`].
    pub fn reconnect(mut self, policy: Reconnect) -> ClientBuilder {
        self.reconnect = policy;
        self
    }

    /// The client's keepalive; see [`Heartbeat`].
    pub fn heartbeat(mut self, heartbeat: Heartbeat) -> ClientBuilder {
        self.heartbeat = heartbeat;
        self
    }

    /// What happens to messages sent while disconnected; see [`QueuePolicy`].
    pub fn queue(mut self, policy: QueuePolicy) -> ClientBuilder {
        self.queue = policy;
        self
    }

    /// How many events wait for the application before the client stops reading the socket
    /// (at least 1).
    pub fn event_capacity(mut self, events: usize) -> ClientBuilder {
        self.event_capacity = events.max(1);
        self
    }

    /// Messages to write first on every connection, before anything queued: the place to
    /// restore a session after a reconnect (log in, re-join rooms, re-subscribe), so that
    /// queued messages reach a server that knows who is talking.
    ///
    /// `build` is called on the client's task each time a connection opens, the first one
    /// included; it can read the application's current session from shared state.
    pub fn on_connect(
        mut self,
        build: impl Fn(&Connected) -> Vec<Message> + Send + Sync + 'static,
    ) -> ClientBuilder {
        self.on_connect = Some(Arc::new(build));
        self
    }

    /// Dials once and returns the connected client, or why the dial failed (nothing is
    /// retried here, so a wrong URL or refused credentials show up at once). From then on the
    /// client reconnects by itself. The first event is [`Event::Connected`](crate::Event::Connected).
    pub async fn connect(self) -> Result<Client, ConnectError> {
        let dialer = self.dial.clone().dialer()?;
        let connection = dialer.open().await?;
        Ok(self.spawn(dialer, Some(connection)))
    }

    /// Returns at once and connects in the background, retrying by the reconnect policy
    /// (the first attempt right away): for applications that start before their server does.
    /// Only an invalid request (URL, header, TLS setup) fails here. Must be called within a
    /// tokio runtime.
    pub fn start(self) -> Result<Client, ConnectError> {
        let dialer = self.dial.clone().dialer()?;
        Ok(self.spawn(dialer, None))
    }

    fn spawn(self, dialer: Dialer, connection: Option<Established>) -> Client {
        let capacity = self.queue.capacity();
        let (queue_tx, queue_rx) = mpsc::channel(capacity);
        let (events_tx, events_rx) = mpsc::channel(self.event_capacity);
        // With a connection already open (`connect`), sends before the task has started are
        // for connection 1.
        let (initial, number) = if connection.is_some() {
            (State::Connected, 1)
        } else {
            (State::Connecting, 0)
        };
        let shared = Arc::new(Shared {
            url: Arc::clone(dialer.url()),
            policy: self.queue,
            capacity,
            state: watch::Sender::new(initial),
            connection: AtomicU64::new(number),
            discarded: AtomicU64::new(0),
            stop: CancellationToken::new(),
            close_frame: Mutex::new(None),
        });
        let task = ConnectionTask {
            shared: Arc::clone(&shared),
            dialer,
            retrier: Retrier::new(self.reconnect),
            heartbeat: self.heartbeat,
            on_connect: self.on_connect,
            queue: queue_rx,
            events: events_tx,
            connections: 0,
        };
        tokio::spawn(task.run(connection));
        Client::from_parts(queue_tx, events_rx, shared)
    }
}
