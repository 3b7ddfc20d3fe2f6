//! The task behind a [`Client`](crate::Client): it owns the socket, and it is the only thing
//! that ever touches it.
//!
//! Its life: serve a connection (deliver what arrives as events, write what the application
//! queued, ping when quiet) until it ends; say so (`Disconnected`); decide by the close code
//! and the [`Reconnect`](crate::Reconnect) policy whether to go on; if so, dial again through
//! the shared retry loop ([`reconnect::redial`](crate::reconnect)), reporting each attempt
//! (`Reconnecting`), and serve the new connection. The life ends with `Closed` when the
//! application closes the client or drops every handle, when the server closes with a stop
//! code, or when the retry loop gives up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tungstenite::error::ProtocolError;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::client::{CLOSE_TIMEOUT, Heartbeat, OnConnect, QueuePolicy, Shared, State};
use crate::dial::{ConnectError, Dialer, Established};
use crate::event::{CloseReason, Connected, Event, Message};
use crate::reconnect::{self, GiveUp, Retrier, Retry};
use crate::socket::Socket;

type Sink = SplitSink<Socket, tungstenite::Message>;
type Source = SplitStream<Socket>;

/// A message on the outgoing queue.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub message: Message,
    /// The connection that was open (or last open) when it was queued; `FailFast` writes it
    /// only on that one.
    pub connection: u64,
}

/// Everything the task owns.
pub(crate) struct ConnectionTask {
    pub shared: Arc<Shared>,
    pub dialer: Dialer,
    pub retrier: Retrier,
    pub heartbeat: Heartbeat,
    pub on_connect: Option<OnConnect>,
    pub queue: mpsc::Receiver<Outgoing>,
    pub events: mpsc::Sender<Event>,
    /// Connections opened so far.
    pub connections: u64,
}

/// How one connection ended.
enum Ended {
    /// The application asked the client to stop; the socket was closed.
    Stopped,
    /// The server sent a close frame (1005: it had no code).
    Remote { code: u16, reason: String },
    /// The connection ended without a close frame.
    Lost { reason: String },
}

impl ConnectionTask {
    /// Runs the client's whole life; `first` is the connection [`ClientBuilder::connect`]
    /// already made (none for [`ClientBuilder::start`]).
    ///
    /// [`ClientBuilder::connect`]: crate::ClientBuilder::connect
    /// [`ClientBuilder::start`]: crate::ClientBuilder::start
    pub async fn run(mut self, first: Option<Established>) {
        let why = self.life(first).await;
        tracing::debug!(url = %self.shared.url, reason = %why, "client stopped");
        self.set_state(State::Closed);
        // Senders get `Closed` from now on; what is still queued is dropped.
        self.queue.close();
        // The last event. If the application never reads it, this waits until the `Client`
        // is dropped, holding nothing but the task.
        let _ = self.events.send(Event::Closed(why)).await;
    }

    async fn life(&mut self, first: Option<Established>) -> CloseReason {
        let mut next = first;
        let mut never_connected = next.is_none();
        loop {
            let established = match next.take() {
                Some(established) => established,
                None => match self.reconnect(never_connected).await {
                    Ok(established) => established,
                    Err(why) => return why,
                },
            };
            never_connected = false;
            let connected = Connected {
                protocol: established
                    .response
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                connection: self.connections + 1,
                compression: established.compression,
            };
            self.connections = connected.connection;
            // Before the state says Connected, so `FailFast` sends tag the new connection.
            self.shared
                .connection
                .store(connected.connection, Ordering::Release);
            tracing::debug!(url = %self.shared.url, connection = connected.connection, "client connected");
            self.set_state(State::Connected);
            self.emit(Event::Connected(connected.clone())).await;
            let (code, reason) = match self.serve(established.socket, &connected).await {
                Ended::Stopped => return self.local_close(),
                Ended::Remote { code, reason } => (Some(code), reason),
                Ended::Lost { reason } => (None, reason),
            };
            tracing::debug!(url = %self.shared.url, ?code, %reason, "client disconnected");
            let policy = self.retrier.policy();
            let again = match code {
                Some(code) => policy.reconnects_after_close(code),
                None => policy.is_enabled(),
            };
            if again {
                self.set_state(State::Reconnecting);
            }
            if self.shared.policy == QueuePolicy::FailFast {
                let mut dropped = 0;
                while self.queue.try_recv().is_ok() {
                    dropped += 1;
                }
                self.shared.discarded.fetch_add(dropped, Ordering::Relaxed);
            }
            self.emit(Event::Disconnected {
                code,
                reason: reason.clone(),
            })
            .await;
            if !again {
                return match code {
                    Some(code) => CloseReason::Remote { code, reason },
                    None => CloseReason::Lost { reason },
                };
            }
        }
    }

    /// Dials until a connection opens, the policy gives up, or the client is stopped.
    /// `at_once`: make the first attempt without a delay (a background start).
    async fn reconnect(&mut self, at_once: bool) -> Result<Established, CloseReason> {
        let mut last_error: Option<Arc<ConnectError>> = None;
        let stop = self.shared.stop.clone();
        let events = self.events.clone();
        let dialer = &self.dialer;
        let retrier = &mut self.retrier;
        let work = async move {
            if at_once {
                match dialer.open().await {
                    Ok(established) => return Ok(established),
                    Err(error) => {
                        tracing::debug!(%error, "client: first dial failed");
                        last_error = Some(Arc::new(error));
                    }
                }
            }
            let report = |retry: Retry| {
                let events = events.clone();
                async move {
                    let _ = events
                        .send(Event::Reconnecting {
                            attempt: retry.attempt,
                            delay: retry.delay,
                            error: retry.error,
                        })
                        .await;
                }
            };
            reconnect::redial(retrier, last_error, || dialer.open(), report).await
        };
        tokio::select! {
            result = work => result.map_err(|give_up| match give_up {
                GiveUp::Permanent(error) => CloseReason::Refused(error),
                GiveUp::Exhausted { attempts, last_error } => CloseReason::GaveUp { attempts, last_error },
            }),
            () = stop.cancelled() => Err(self.local_close()),
        }
    }

    /// Serves one connection until it ends.
    async fn serve(&mut self, socket: Socket, connected: &Connected) -> Ended {
        let (mut sink, mut source) = socket.split();
        let mut writer = Writer {
            control: VecDeque::new(),
            unflushed: false,
            queue_open: true,
            connection: connected.connection,
            fail_fast: self.shared.policy == QueuePolicy::FailFast,
            discarded: 0,
        };
        if let Some(build) = &self.on_connect {
            writer
                .control
                .extend(build(connected).into_iter().map(tungstenite::Message::from));
        }
        // A message read from the socket, waiting for room in the event queue. While one
        // waits, the socket is not read: the application's pace is the server's.
        let mut pending: Option<Event> = None;
        let heartbeat = self.heartbeat;
        let mut last_heard = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        let timer = tokio::time::sleep(heartbeat.interval);
        tokio::pin!(timer);

        let ended = loop {
            tokio::select! {
                () = self.shared.stop.cancelled() => {
                    let (code, reason) = self.close_frame();
                    close_socket(&mut sink, &mut source, code, reason, CLOSE_TIMEOUT).await;
                    break Ended::Stopped;
                }
                permit = self.events.reserve(), if pending.is_some() => {
                    if let (Ok(permit), Some(event)) = (permit, pending.take()) {
                        permit.send(event);
                    }
                    // Time spent waiting for the application is not the peer's fault.
                    if ping_sent.is_some() {
                        ping_sent = Some(Instant::now());
                    }
                }
                incoming = source.next(), if pending.is_none() => {
                    last_heard = Instant::now();
                    ping_sent = None;
                    match incoming {
                        Some(Ok(tungstenite::Message::Text(text))) => {
                            pending = Some(Event::Message(Message::Text(text)));
                        }
                        Some(Ok(tungstenite::Message::Binary(data))) => {
                            pending = Some(Event::Message(Message::Binary(data)));
                        }
                        Some(Ok(tungstenite::Message::Close(frame))) => {
                            let (code, reason) = frame.map_or((1005, String::new()), |f| {
                                (u16::from(f.code), f.reason.to_string())
                            });
                            finish_close(&mut sink, &mut source).await;
                            break Ended::Remote { code, reason };
                        }
                        // Pings are answered by the socket (tungstenite or yawc) on the next
                        // read or write.
                        Some(Ok(_)) => {}
                        Some(Err(error)) => {
                            if let Some((code, why)) = close_for_read_error(&error) {
                                close_socket(&mut sink, &mut source, code, why.into(), ERROR_CLOSE_TIMEOUT)
                                    .await;
                            }
                            break Ended::Lost { reason: read_failure(&error) };
                        }
                        None => break Ended::Lost { reason: NO_CLOSE_FRAME.into() },
                    }
                }
                next = writer.next(&mut sink, &mut self.queue) => match next {
                    Ok(message) => {
                        if let Err(error) = sink.start_send_unpin(message) {
                            break Ended::Lost { reason: format!("write failed: {error}") };
                        }
                        writer.unflushed = true;
                    }
                    Err(error) => break Ended::Lost { reason: format!("write failed: {error}") },
                },
                () = &mut timer, if heartbeat.is_on() && pending.is_none() => {
                    let now = Instant::now();
                    match ping_sent {
                        Some(at) if now >= at + heartbeat.timeout => {
                            break Ended::Lost {
                                reason: format!(
                                    "no answer to a ping within {:?} (heartbeat)",
                                    heartbeat.timeout
                                ),
                            };
                        }
                        Some(at) => timer.as_mut().reset(at + heartbeat.timeout),
                        None if now >= last_heard + heartbeat.interval => {
                            writer.control.push_back(tungstenite::Message::Ping(Bytes::new()));
                            ping_sent = Some(now);
                            timer.as_mut().reset(now + heartbeat.timeout);
                        }
                        None => timer.as_mut().reset(last_heard + heartbeat.interval),
                    }
                }
            }
        };
        self.shared
            .discarded
            .fetch_add(writer.discarded, Ordering::Relaxed);
        ended
    }

    fn set_state(&self, state: State) {
        self.shared.state.send_replace(state);
    }

    /// Sends `event` unless the client is being stopped.
    async fn emit(&self, event: Event) {
        tokio::select! {
            _ = self.events.send(event) => {}
            () = self.shared.stop.cancelled() => {}
        }
    }

    fn close_frame(&self) -> (u16, String) {
        self.shared
            .close_frame
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or((1000, String::new()))
    }

    fn local_close(&self) -> CloseReason {
        let (code, reason) = self.close_frame();
        CloseReason::Local { code, reason }
    }
}

/// The writing half's bookkeeping for one connection.
struct Writer {
    /// Written before the queue: `on_connect` messages, then heartbeat pings.
    control: VecDeque<tungstenite::Message>,
    /// Messages were written since the last flush.
    unflushed: bool,
    /// False once every sender is gone (the client is stopping).
    queue_open: bool,
    /// This connection's number.
    connection: u64,
    fail_fast: bool,
    /// `FailFast` messages dropped for being queued on an earlier connection.
    discarded: u64,
}

impl Writer {
    /// The next message to write, once the sink can take it; flushes when there is nothing
    /// more to write right now. Cancel-safe: a message is taken from a queue only in the same
    /// poll that returns it.
    async fn next(
        &mut self,
        sink: &mut Sink,
        queue: &mut mpsc::Receiver<Outgoing>,
    ) -> Result<tungstenite::Message, tungstenite::Error> {
        loop {
            std::future::poll_fn(|cx| sink.poll_ready_unpin(cx)).await?;
            if let Some(message) = self.control.pop_front() {
                return Ok(message);
            }
            if self.queue_open {
                match queue.try_recv() {
                    Ok(outgoing) => match self.admit(outgoing) {
                        Some(message) => return Ok(message),
                        None => continue,
                    },
                    Err(mpsc::error::TryRecvError::Empty) => {}
                    Err(mpsc::error::TryRecvError::Disconnected) => self.queue_open = false,
                }
            }
            if self.unflushed {
                sink.flush().await?;
                self.unflushed = false;
                continue;
            }
            if !self.queue_open {
                return std::future::pending().await;
            }
            match queue.recv().await {
                Some(outgoing) => {
                    if let Some(message) = self.admit(outgoing) {
                        // The sink was ready before the wait and nothing wrote since.
                        return Ok(message);
                    }
                }
                None => self.queue_open = false,
            }
        }
    }

    /// Applies `FailFast`: a message queued while another connection was open is dropped.
    fn admit(&mut self, outgoing: Outgoing) -> Option<tungstenite::Message> {
        if self.fail_fast && outgoing.connection != self.connection {
            self.discarded += 1;
            return None;
        }
        Some(outgoing.message.into())
    }
}

/// Why a connection that simply went away ended.
const NO_CLOSE_FRAME: &str = "the connection ended without a close frame";

/// How long to try telling a misbehaving server why it is being dropped.
const ERROR_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The close code to answer a failed read with: the server sent something this end refuses.
/// `None` when the connection itself failed (nothing to answer on).
fn close_for_read_error(error: &tungstenite::Error) -> Option<(u16, &'static str)> {
    match error {
        tungstenite::Error::Capacity(_) => Some((1009, "message too big")),
        tungstenite::Error::Utf8(_) => Some((1007, "invalid UTF-8")),
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        tungstenite::Error::Protocol(_) => Some((1002, "protocol error")),
        _ => None,
    }
}

/// What to tell the application about a failed read.
fn read_failure(error: &tungstenite::Error) -> String {
    match error {
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            NO_CLOSE_FRAME.into()
        }
        tungstenite::Error::Io(io) => format!("read failed: {io}"),
        other => format!("the server sent something invalid: {other}"),
    }
}

/// Sends a close frame and waits (at most `limit`) for the server's answer.
async fn close_socket(
    sink: &mut Sink,
    source: &mut Source,
    code: u16,
    reason: String,
    limit: std::time::Duration,
) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(limit, async {
        if sink
            .send(tungstenite::Message::Close(Some(frame)))
            .await
            .is_ok()
        {
            while let Some(Ok(_)) = source.next().await {}
        }
    })
    .await;
}

/// After the server's close frame: sends tungstenite's queued reply and waits (at most
/// [`CLOSE_TIMEOUT`]) for the server to end the TCP connection.
async fn finish_close(sink: &mut Sink, source: &mut Source) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = sink.flush().await;
        while let Some(Ok(_)) = source.next().await {}
    })
    .await;
}
