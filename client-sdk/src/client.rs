//! [`Client`]: a WebSocket client that reconnects by itself (set up by
//! [`ClientBuilder`]), its policies, and its handles.
//!
//! Shape (see the crate docs for the user's view): one task owns the socket
//! (the private `connection` module); the application talks to it through two bounded
//! channels, the outgoing queue ([`Client::send`]) and the event queue
//! ([`Client::next_event`]), plus a small shared state (connection state, stop signal). The
//! task runs until the client is closed, gives up, or every handle is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::builder::ClientBuilder;
use crate::connection::Outgoing;
use crate::dial::ConnectError;
use crate::event::{Connected, Event, Message};

/// Outgoing messages queued by default ([`QueuePolicy::default`]).
pub const DEFAULT_QUEUE: usize = 1024;

/// Events a client holds for the application by default before it stops reading the socket.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// How long [`Client::close`] (and a dropped client) waits for the server to answer its
/// close frame before dropping the connection.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What happens to messages the application sends while the client is not connected.
///
/// Either way the outgoing queue is bounded, messages leave in the order they were queued,
/// and the guarantee is **at most once**: no message is ever written twice. Precisely:
/// - A message still waiting in the queue when a connection ends stays there (`Buffer`) and
///   is written on the next connection, after that connection's
///   [`on_connect`](ClientBuilder::on_connect) messages, in order: exactly once, unless the
///   client stops for good first (then it is dropped).
/// - A message the client has taken from the queue to write on a connection is never written
///   on another, even if that connection then fails. Whether it reached the server, TCP cannot
///   tell: messages written in the last moments before a loss is noticed may be lost with the
///   socket's buffers (for a peer that vanished silently, up to the heartbeat's
///   `interval + timeout`, bounded by the socket's send buffer); so may messages that
///   crossed the server's close frame on the wire.
/// - Applications that need every message delivered number them and have the server
///   acknowledge them, and re-send the unacknowledged ones from `on_connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueuePolicy {
    /// Queue up to `max_messages` while disconnected and write them in order once
    /// reconnected. [`Client::send`] waits for room when the queue is full (at any time, also
    /// while connected, which is how a slow server slows the sender);
    /// [`Client::try_send`] returns [`SendError::Full`] instead.
    Buffer {
        /// The queue's capacity (at least 1).
        max_messages: usize,
    },
    /// Refuse messages while disconnected: `send` and `try_send` return
    /// [`SendError::Disconnected`] at once. A message is only ever written on the connection
    /// that was open when it was accepted: if that connection ends first, the message is
    /// discarded (counted by [`Client::discarded_messages`]). The queue holds
    /// [`DEFAULT_QUEUE`] messages.
    FailFast,
}

impl Default for QueuePolicy {
    /// `Buffer` with [`DEFAULT_QUEUE`] messages.
    fn default() -> QueuePolicy {
        QueuePolicy::Buffer {
            max_messages: DEFAULT_QUEUE,
        }
    }
}

impl QueuePolicy {
    pub(crate) fn capacity(&self) -> usize {
        match self {
            QueuePolicy::Buffer { max_messages } => (*max_messages).max(1),
            QueuePolicy::FailFast => DEFAULT_QUEUE,
        }
    }
}

/// Keepalive from the client's side: after `interval` without receiving anything, the
/// client sends a ping; if nothing at all (pong or otherwise) arrives within `timeout` after
/// it, the connection is declared dead and the client reconnects.
///
/// This finds half-open connections (a peer that vanished without a FIN, a NAT that dropped
/// the mapping) that TCP alone would notice only much later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Heartbeat {
    /// Quiet time before a ping; zero turns the heartbeat off.
    pub interval: Duration,
    /// How long to wait for any frame after the ping.
    pub timeout: Duration,
}

impl Default for Heartbeat {
    /// A ping after 20 s of quiet, dead after 10 s more (wsrelay's own keepalive defaults).
    fn default() -> Heartbeat {
        Heartbeat {
            interval: Duration::from_secs(20),
            timeout: Duration::from_secs(10),
        }
    }
}

impl Heartbeat {
    /// No pings: a dead connection is found only by TCP (or the server's keepalive).
    pub fn off() -> Heartbeat {
        Heartbeat {
            interval: Duration::ZERO,
            timeout: Duration::ZERO,
        }
    }

    /// True when pings are sent.
    pub fn is_on(&self) -> bool {
        !self.interval.is_zero()
    }
}

/// Where a client is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Never connected yet: [`ClientBuilder::start`] is dialing, or waiting to retry.
    Connecting,
    /// A connection is open.
    Connected,
    /// The connection was lost; the client is waiting out a backoff delay or dialing.
    Reconnecting,
    /// The client stopped for good.
    Closed,
}

/// Why a message was not queued. Each variant gives the message back.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// [`QueuePolicy::FailFast`] and the client is not connected.
    #[error("send to {url}: not connected (queue policy FailFast)")]
    Disconnected {
        /// The client's URL.
        url: Arc<str>,
        /// The message, not sent.
        message: Message,
    },
    /// The queue is full ([`Client::try_send`] only; `send` waits for room).
    #[error("send to {url}: the outgoing queue is full ({capacity} messages)")]
    Full {
        /// The client's URL.
        url: Arc<str>,
        /// The queue's capacity.
        capacity: usize,
        /// The message, not sent.
        message: Message,
    },
    /// The client has stopped for good.
    #[error("send to {url}: the client is closed")]
    Closed {
        /// The client's URL.
        url: Arc<str>,
        /// The message, not sent.
        message: Message,
    },
}

impl SendError {
    /// The message that was not queued.
    pub fn into_message(self) -> Message {
        match self {
            SendError::Disconnected { message, .. }
            | SendError::Full { message, .. }
            | SendError::Closed { message, .. } => message,
        }
    }
}

/// Builds the messages written first on every connection, before the queue: see
/// [`ClientBuilder::on_connect`].
pub(crate) type OnConnect = Arc<dyn Fn(&Connected) -> Vec<Message> + Send + Sync>;

/// State shared by a client's handles and its task.
pub(crate) struct Shared {
    pub url: Arc<str>,
    pub policy: QueuePolicy,
    pub capacity: usize,
    /// Written by the task only.
    pub state: watch::Sender<State>,
    /// The number of the connection open now (or last open): [`Connected::connection`].
    pub connection: AtomicU64,
    /// Messages discarded by `FailFast`.
    pub discarded: AtomicU64,
    /// Cancelled to make the task close and stop.
    pub stop: CancellationToken,
    /// The close frame to send when `stop` is cancelled; the first request wins.
    pub close_frame: Mutex<Option<(u16, String)>>,
}

impl Shared {
    fn request_stop(&self, code: u16, reason: &str) {
        {
            let mut frame = self.close_frame.lock().unwrap_or_else(|e| e.into_inner());
            if frame.is_none() {
                *frame = Some((sendable_close_code(code), reason.to_owned()));
            }
        }
        self.stop.cancel();
    }
}

/// Close codes an endpoint may send (RFC 6455 7.4); others become 1000.
fn sendable_close_code(code: u16) -> u16 {
    match code {
        1000..=1003 | 1007..=1014 | 3000..=4999 => code,
        _ => 1000,
    }
}

/// Stops the task when the last handle goes away.
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.request_stop(1000, "client dropped");
    }
}

/// A WebSocket client that keeps itself connected: it reconnects with exponential backoff
/// and jitter when the server goes away, pings a quiet connection to find a dead one, and
/// queues what the application sends while it is disconnected.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use wsrelay_client::{Client, Event};
///
/// let mut client = Client::connect("ws://127.0.0.1:8080/chat").await?;
/// client.send("hello").await?;
/// while let Some(event) = client.next_event().await {
///     match event {
///         Event::Message(message) => println!("got {message:?}"),
///         Event::Disconnected { code, reason } => println!("lost ({code:?} {reason})"),
///         Event::Closed(why) => println!("done: {why}"),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
///
/// The `Client` is the one handle that reads events; [`Client::sender`] gives cloneable
/// handles that only send, for other tasks. The connection task runs until
/// [`close`](Client::close), until the client stops for good (see [`CloseReason`](crate::CloseReason)),
/// or until the `Client` and every [`ClientSender`] are dropped, which closes the connection
/// with 1000.
///
/// Read the events: when [`DEFAULT_EVENT_CAPACITY`] (see [`ClientBuilder::event_capacity`])
/// are waiting, the client stops reading the socket, so a server's messages wait in TCP
/// buffers and slow the server down instead of filling memory. (Heartbeat timeouts do not run
/// while the client waits for the application.) Events are dropped only when the `Client`
/// itself has been dropped.
#[derive(Debug)]
pub struct Client {
    sender: ClientSender,
    events: mpsc::Receiver<Event>,
}

/// A cloneable handle that sends on a [`Client`]'s connection; see [`Client::sender`].
#[derive(Clone)]
pub struct ClientSender {
    queue: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
    _alive: Arc<Alive>,
}

impl std::fmt::Debug for ClientSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSender")
            .field("url", &self.shared.url)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Wraps the application's ends of a new client's channels.
    pub(crate) fn from_parts(
        queue: mpsc::Sender<Outgoing>,
        events: mpsc::Receiver<Event>,
        shared: Arc<Shared>,
    ) -> Client {
        Client {
            sender: ClientSender {
                queue,
                _alive: Arc::new(Alive(Arc::clone(&shared))),
                shared,
            },
            events,
        }
    }

    /// Starts configuring a client for `url` (`ws://host:port/path?query` or `wss://...`).
    pub fn builder(url: &str) -> ClientBuilder {
        ClientBuilder::new(url)
    }

    /// Connects to `url` with the default settings: see [`ClientBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Client, ConnectError> {
        ClientBuilder::new(url).connect().await
    }

    /// Queues `message` for the server, waiting for room in the queue if it is full.
    ///
    /// Returns once the message is queued, not once it is written; see [`QueuePolicy`] for
    /// what happens to it across a reconnect. While disconnected with
    /// [`QueuePolicy::Buffer`] and a full queue this waits until the client reconnects and
    /// drains it (or stops): wrap it in a timeout, or use [`try_send`](Client::try_send),
    /// if that is too long.
    pub async fn send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        self.sender.send(message).await
    }

    /// Queues `message` if there is room right now.
    pub fn try_send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        self.sender.try_send(message)
    }

    /// The next event; `None` after [`Event::Closed`].
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Closes the connection with `code` and `reason` and stops the client: no reconnect.
    /// Waits until the server answers the close (at most [`CLOSE_TIMEOUT`]).
    ///
    /// Messages still queued are dropped. Codes that may not be sent on the wire (such as
    /// 1005 or 1006) are replaced by 1000. The last event is
    /// [`Event::Closed`]`(`[`CloseReason::Local`](crate::CloseReason::Local)`)`.
    pub async fn close(&self, code: u16, reason: &str) {
        self.sender.close(code, reason).await;
    }

    /// A cloneable handle for sending from other tasks.
    pub fn sender(&self) -> ClientSender {
        self.sender.clone()
    }

    /// Where the client is in its life right now.
    pub fn state(&self) -> State {
        self.sender.state()
    }

    /// True while a connection is open.
    pub fn is_connected(&self) -> bool {
        self.state() == State::Connected
    }

    /// The URL the client connects to.
    pub fn url(&self) -> &str {
        &self.sender.shared.url
    }

    /// Messages [`QueuePolicy::FailFast`] accepted but discarded because their connection
    /// ended before they were written.
    pub fn discarded_messages(&self) -> u64 {
        self.sender.shared.discarded.load(Ordering::Relaxed)
    }
}

impl ClientSender {
    /// See [`Client::send`].
    pub async fn send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        let message = message.into();
        let outgoing = match self.admit(message) {
            Ok(outgoing) => outgoing,
            Err(error) => return Err(error),
        };
        self.queue
            .send(outgoing)
            .await
            .map_err(|rejected| SendError::Closed {
                url: Arc::clone(&self.shared.url),
                message: rejected.0.message,
            })
    }

    /// See [`Client::try_send`].
    pub fn try_send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        let outgoing = self.admit(message.into())?;
        self.queue.try_send(outgoing).map_err(|error| match error {
            mpsc::error::TrySendError::Full(rejected) => SendError::Full {
                url: Arc::clone(&self.shared.url),
                capacity: self.shared.capacity,
                message: rejected.message,
            },
            mpsc::error::TrySendError::Closed(rejected) => SendError::Closed {
                url: Arc::clone(&self.shared.url),
                message: rejected.message,
            },
        })
    }

    /// See [`Client::close`].
    pub async fn close(&self, code: u16, reason: &str) {
        self.shared.request_stop(code, reason);
        let mut state = self.shared.state.subscribe();
        let _ = state.wait_for(|s| *s == State::Closed).await;
    }

    /// See [`Client::state`].
    pub fn state(&self) -> State {
        *self.shared.state.borrow()
    }

    /// Applies the queue policy to a message about to be queued.
    fn admit(&self, message: Message) -> Result<Outgoing, SendError> {
        let state = self.state();
        let url = || Arc::clone(&self.shared.url);
        if state == State::Closed {
            return Err(SendError::Closed {
                url: url(),
                message,
            });
        }
        if self.shared.policy == QueuePolicy::FailFast && state != State::Connected {
            return Err(SendError::Disconnected {
                url: url(),
                message,
            });
        }
        Ok(Outgoing {
            message,
            connection: self.shared.connection.load(Ordering::Acquire),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsendable_close_codes_become_1000() {
        for code in [1000, 1001, 1008, 1011, 1012, 1013, 1014, 3000, 4999] {
            assert_eq!(sendable_close_code(code), code);
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 2000, 5000] {
            assert_eq!(sendable_close_code(code), 1000, "{code}");
        }
    }

    #[test]
    fn fail_fast_holds_a_default_queue_and_buffer_at_least_one() {
        assert_eq!(QueuePolicy::FailFast.capacity(), DEFAULT_QUEUE);
        assert_eq!(QueuePolicy::Buffer { max_messages: 0 }.capacity(), 1);
    }
}
