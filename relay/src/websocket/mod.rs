//! The relay's own WebSocket (RFC 6455) over a byte stream, for every socket the relay frames
//! itself: a client's connection, a per-client backend connection, and the mux links (to
//! backends, and from mux clients), which the protocol crate's link engine drives.
//!
//! It speaks tungstenite's [`Message`], [`CloseFrame`] and [`WsError`], and behaves as
//! tokio-tungstenite's `WebSocketStream` does (pongs and Close answers sent by itself, the same
//! errors for the same violations, the same end of stream), so the pump and the session can't
//! tell them apart. What differs is memory, which every idle client costs:
//!
//! - **Reading.** A read goes into a buffer each worker thread shares ([`scratch`]); what a
//!   connection keeps between reads is only what it could not use yet: the start of a frame,
//!   or frames behind the message it just delivered. An idle leg holds no read buffer.
//!   tungstenite keeps `read_buffer_size` bytes per leg from the moment it is made, idle or
//!   not, and zero-fills them before every read.
//! - **Writing.** Frames are gathered into a buffer until `write_buffer_size` (one write for a
//!   burst), and the buffer is let go once written. tungstenite keeps its largest size.
//! - **Payloads.** A frame that arrives whole in one read is copied out of the shared buffer
//!   (and unmasked on the way); one that spans reads is collected in the connection's own
//!   buffer and handed on without a copy.
//!
//! The rules of the protocol (which frames may come when, limits, UTF-8, the close handshake)
//! are pure functions in [`codec`].

mod codec;
mod scratch;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::error::ProtocolError;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, Utf8Bytes};

use codec::{FrameKind, Header, ReadContext, TextCheck, opcode};

/// Bytes a connection reserves for the rest of a frame whose header has not arrived whole, or
/// beyond the end of one that is nearly complete, so one read can bring the frames behind it.
const PARTIAL_READ: usize = 4 * 1024;

/// The write buffer's first size: a burst of small frames fits without growing it; it is let
/// go once written, so an idle leg holds none. At most glibc's per-thread cache's largest size
/// (1,032 bytes): a larger one, taken and freed at every burst, goes through the arena and
/// makes it consolidate its small free chunks each time.
const FIRST_WRITE_BUFFER: usize = 1024;

/// Where the close handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No Close sent or received.
    Active,
    /// We sent a Close; the peer may still send data before its answer.
    ClosedByUs,
    /// The peer sent a Close; its answer is owed or sent.
    ClosedByPeer,
    /// The peer answered our Close.
    CloseAcknowledged,
    /// Nothing more to read or write.
    Terminated,
}

impl State {
    fn can_read(self) -> bool {
        matches!(self, State::Active | State::ClosedByUs)
    }
}

/// A control frame owed to the peer, sent before anything else is read.
#[derive(Debug)]
enum Reply {
    Pong(Bytes),
    Close(Option<CloseFrame>),
}

/// A fragmented message being collected.
#[derive(Debug)]
struct Partial {
    text: bool,
    data: Vec<u8>,
    check: TextCheck,
}

/// A WebSocket over `S`, either end of it (`role`).
#[derive(Debug)]
pub struct WebSocket<S> {
    io: S,
    role: Role,
    state: State,
    /// The stream ended (gave `None` or an error); it gives `None` from then on.
    ended: bool,
    max_frame: usize,
    max_message: usize,
    write_batch: usize,
    /// Bytes read and not used yet: the start of a frame, or whole frames behind the last
    /// message delivered.
    unread: BytesMut,
    /// A fragmented message being collected; boxed, as few connections ever have one.
    partial: Option<Box<Partial>>,
    /// Frames formatted and not yet written, from `written` on.
    unwritten: Vec<u8>,
    written: usize,
    /// A control frame owed to the peer, not formatted yet.
    reply: Option<Reply>,
    /// A reply is in `unwritten`: reading writes it out first.
    reply_unwritten: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// A WebSocket over `io`, whose handshake is done, with the limits and write batch of
    /// `config`; `read_ahead` is what the peer sent behind its handshake, read with it.
    pub fn new(io: S, role: Role, config: &WebSocketConfig, read_ahead: &[u8]) -> Self {
        WebSocket {
            io,
            role,
            state: State::Active,
            ended: false,
            max_frame: config.max_frame_size.unwrap_or(usize::MAX),
            max_message: config.max_message_size.unwrap_or(usize::MAX),
            write_batch: config.write_buffer_size,
            unread: BytesMut::from(read_ahead),
            partial: None,
            unwritten: Vec::new(),
            written: 0,
            reply: None,
            reply_unwritten: false,
        }
    }

    fn read_context(&self) -> ReadContext {
        ReadContext {
            role: self.role,
            can_read: self.state.can_read(),
            collected: self.partial.as_ref().map(|partial| partial.data.len()),
            max_frame: self.max_frame,
            max_message: self.max_message,
        }
    }

    /// The next message, answering pings and Closes on the way.
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<Message, WsError>> {
        if self.state == State::Terminated {
            return Poll::Ready(Err(WsError::AlreadyClosed));
        }
        loop {
            // What the peer is owed goes out before reading on, without waiting for it (a peer
            // that pings without reading gets at most a write batch of pongs buffered).
            if self.reply.is_some() || self.reply_unwritten {
                if self.reply.is_some() && self.unwritten.len() - self.written < self.write_batch {
                    self.format_reply();
                }
                if let Poll::Ready(Err(error)) = self.poll_write_out(cx) {
                    return Poll::Ready(Err(error));
                }
            }
            if self.role == Role::Server && !self.state.can_read() {
                // A server ends the connection once its Close answer is out (RFC 6455 §7.1.1:
                // the server closes TCP first).
                if self.has_unwritten() || self.reply.is_some() {
                    // Waits for the socket to take it (a Close of ours, or our answer to one).
                    ready!(self.poll_write_out(cx))?;
                }
                self.state = State::Terminated;
                return Poll::Ready(Err(WsError::ConnectionClosed));
            }
            if let Some(message) = self.message_from_unread()? {
                return Poll::Ready(Ok(message));
            }
            if let Some(message) = ready!(self.poll_read(cx))? {
                return Poll::Ready(Ok(message));
            }
        }
    }

    /// Takes the frames at the start of `unread` until one completes a message; `None` when
    /// `unread` holds no whole frame any more.
    fn message_from_unread(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            let Some(header) = codec::parse_header(&self.unread) else {
                return Ok(None);
            };
            let kind = codec::check_header(&header, &self.read_context())?;
            let Some(frame_len) = header.frame_len().filter(|len| *len <= self.unread.len()) else {
                // The rest of the frame is yet to come: room for all of it at once (checked
                // against the limits, so it fits in memory).
                let missing = header.frame_len().unwrap_or(usize::MAX) - self.unread.len();
                if self.unread.capacity() - self.unread.len() < missing {
                    self.unread.reserve(missing.max(PARTIAL_READ));
                }
                return Ok(None);
            };
            let mut payload = self.take_payload(header.len, frame_len);
            if let Some(key) = header.mask {
                codec::apply_mask(&mut payload, key);
            }
            if let Some(message) = self.on_frame(kind, &header, payload.freeze())? {
                return Ok(Some(message));
            }
        }
    }

    /// Takes the frame of `frame_len` bytes at the start of `unread` and returns its payload
    /// (from `header_len` on), without a copy. The last frame kept takes the whole buffer
    /// with it: an idle leg holds none, and a buffer that is not split stays unshared (no
    /// reference count to keep). Copying small frames out of a burst instead was measured
    /// (perf, 64-byte echo): one allocation per message cost more than the sharing it saved.
    fn take_payload(&mut self, header_len: usize, frame_len: usize) -> BytesMut {
        let mut payload = if frame_len == self.unread.len() {
            std::mem::take(&mut self.unread)
        } else {
            self.unread.split_to(frame_len)
        };
        payload.advance(header_len);
        payload
    }

    /// Reads from the socket: into the thread's shared buffer when nothing is kept, taking
    /// what it can from there and keeping the rest; into `unread` when a frame is under way.
    /// `Some` when a message completed.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Message>, WsError>> {
        if !self.unread.is_empty() {
            if self.unread.capacity() == self.unread.len() {
                self.unread.reserve(PARTIAL_READ);
            }
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.unread
            ));
            return Poll::Ready(match self.read_result(read)? {
                0 => Err(self.ended_early()),
                _ => Ok(None),
            });
        }
        scratch::with(|buffer| {
            let mut read_buf = ReadBuf::new(buffer);
            let read = ready!(Pin::new(&mut self.io).poll_read(cx, &mut read_buf));
            let filled = read_buf.filled().len();
            if self.read_result(read.map(|()| filled))? == 0 {
                return Poll::Ready(Err(self.ended_early()));
            }
            Poll::Ready(self.messages_from_read(&buffer[..filled]))
        })
    }

    /// The bytes of a read as a count, or what its error means in this state.
    fn read_result(&self, read: io::Result<usize>) -> Result<usize, WsError> {
        read.map_err(|error| self.io_error(error))
    }

    /// What an I/O error means: a reset after the close handshake started is just the end.
    fn io_error(&self, error: io::Error) -> WsError {
        if !self.state.can_read() && error.kind() == io::ErrorKind::ConnectionReset {
            WsError::ConnectionClosed
        } else {
            WsError::Io(error)
        }
    }

    /// The peer's side of the connection ended: the end, after a close handshake; a reset
    /// without one otherwise.
    fn ended_early(&mut self) -> WsError {
        match std::mem::replace(&mut self.state, State::Terminated) {
            State::ClosedByPeer | State::CloseAcknowledged => WsError::ConnectionClosed,
            _ => WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
        }
    }

    /// Takes whole frames from `read` (the shared buffer) until one completes a message, and
    /// keeps what is left in `unread`.
    fn messages_from_read(&mut self, read: &[u8]) -> Result<Option<Message>, WsError> {
        let mut at = 0;
        while let Some(header) = codec::parse_header(&read[at..]) {
            let kind = codec::check_header(&header, &self.read_context())?;
            let Some(frame_len) = header.frame_len().filter(|len| at + len <= read.len()) else {
                // A frame that the next reads complete: room for all of it.
                self.unread
                    .reserve(header.frame_len().unwrap_or(usize::MAX));
                break;
            };
            let mut payload = BytesMut::from(&read[at + header.len..at + frame_len]);
            if let Some(key) = header.mask {
                codec::apply_mask(&mut payload, key);
            }
            at += frame_len;
            if let Some(message) = self.on_frame(kind, &header, payload.freeze())? {
                self.unread.extend_from_slice(&read[at..]);
                return Ok(Some(message));
            }
        }
        self.unread.extend_from_slice(&read[at..]);
        Ok(None)
    }

    /// What a whole frame, checked and unmasked, means: a message, or `None` for a fragment
    /// or a Close after ours was answered.
    fn on_frame(
        &mut self,
        kind: FrameKind,
        header: &Header,
        payload: Bytes,
    ) -> Result<Option<Message>, WsError> {
        match kind {
            FrameKind::Ping => {
                // No pings answered once a Close went either way.
                if self.state == State::Active {
                    self.set_reply(Reply::Pong(payload.clone()));
                }
                Ok(Some(Message::Ping(payload)))
            }
            FrameKind::Pong => Ok(Some(Message::Pong(payload))),
            FrameKind::Close => {
                let close = codec::parse_close(payload)?;
                Ok(self.on_close(close).map(Message::Close))
            }
            FrameKind::Text | FrameKind::Binary if header.fin => Ok(Some(match kind {
                FrameKind::Text => Message::Text(Utf8Bytes::try_from(payload)?),
                _ => Message::Binary(payload),
            })),
            FrameKind::Text | FrameKind::Binary => {
                let mut partial = Box::new(Partial {
                    text: kind == FrameKind::Text,
                    data: Vec::from(payload),
                    check: TextCheck::default(),
                });
                if partial.text {
                    partial.check.check(&partial.data, false)?;
                }
                self.partial = Some(partial);
                Ok(None)
            }
            FrameKind::Continuation => {
                let partial = self
                    .partial
                    .as_mut()
                    .expect("checked: a message is collected");
                partial.data.extend_from_slice(&payload);
                if partial.text {
                    partial.check.check(&partial.data, header.fin)?;
                }
                if !header.fin {
                    return Ok(None);
                }
                let partial = self.partial.take().expect("checked above");
                let data = Bytes::from(partial.data);
                Ok(Some(if partial.text {
                    Message::Text(Utf8Bytes::try_from(data)?)
                } else {
                    Message::Binary(data)
                }))
            }
        }
    }

    /// A Close from the peer: answered, if it starts the handshake; the end of it, if it
    /// answers ours. `None` for one after the handshake, which is ignored.
    #[allow(clippy::option_option)]
    fn on_close(&mut self, close: Option<CloseFrame>) -> Option<Option<CloseFrame>> {
        match self.state {
            State::Active => {
                self.state = State::ClosedByPeer;
                let close = codec::answerable_close(close);
                self.set_reply(Reply::Close(close.clone()));
                Some(close)
            }
            State::ClosedByUs => {
                self.state = State::CloseAcknowledged;
                Some(close)
            }
            State::ClosedByPeer | State::CloseAcknowledged | State::Terminated => None,
        }
    }

    /// An error if nothing more may be sent.
    fn check_sendable(&self) -> Result<(), WsError> {
        match self.state {
            State::Terminated => Err(WsError::AlreadyClosed),
            State::Active => Ok(()),
            _ => Err(WsError::Protocol(ProtocolError::SendAfterClosing)),
        }
    }

    /// `start_send` of a message the caller keeps: its frame is written from the borrow (a
    /// Pong or a raw frame, which the socket keeps, is cloned).
    pub fn send_borrowed(&mut self, message: &Message) -> Result<(), WsError> {
        self.check_sendable()?;
        match message {
            Message::Text(text) => self.format(opcode::TEXT, text.as_bytes()),
            Message::Binary(data) => self.format(opcode::BINARY, data),
            Message::Ping(data) => self.format(opcode::PING, data),
            Message::Close(close) => {
                self.state = State::ClosedByUs;
                let payload = codec::close_payload(close.as_ref());
                self.format(opcode::CLOSE, &payload);
            }
            Message::Pong(_) | Message::Frame(_) => {
                return Pin::new(self).start_send(message.clone());
            }
        }
        Ok(())
    }

    /// Owes the peer `reply`; a newer pong replaces one not sent yet, nothing replaces a Close.
    fn set_reply(&mut self, reply: Reply) {
        if matches!(self.reply, None | Some(Reply::Pong(_))) {
            self.reply = Some(reply);
        }
    }

    fn mask(&self) -> Option<[u8; 4]> {
        // A client masks every frame with a fresh key (RFC 6455 §5.3).
        (self.role == Role::Client).then(rand::random)
    }

    fn format(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.mask();
        // Room for the frame and a control frame behind it: the pump follows a burst with an
        // ack ping, and a buffer filled exactly by large frames would double, copying them
        // all, for the ping's few bytes. The first buffer holds a burst of small frames; it
        // lives until it is written.
        let room = payload.len() + codec::MAX_HEADER + codec::MAX_CONTROL_FRAME;
        if self.unwritten.capacity() - self.unwritten.len() < room {
            self.unwritten.reserve(room.max(FIRST_WRITE_BUFFER));
        }
        codec::write_frame(&mut self.unwritten, opcode, mask, payload);
    }

    /// Moves the owed control frame into the write buffer.
    fn format_reply(&mut self) {
        self.reply_unwritten |= self.reply.is_some();
        match self.reply.take() {
            Some(Reply::Pong(payload)) => self.format(opcode::PONG, &payload),
            Some(Reply::Close(close)) => {
                let payload = codec::close_payload(close.as_ref());
                self.format(opcode::CLOSE, &payload);
            }
            None => {}
        }
    }

    fn has_unwritten(&self) -> bool {
        self.written < self.unwritten.len()
    }

    /// Writes everything formatted, the owed reply included; the buffer is let go once empty.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        loop {
            if !self.has_unwritten() {
                if self.reply.is_some() {
                    self.format_reply();
                    continue;
                }
                self.unwritten = Vec::new();
                self.written = 0;
                self.reply_unwritten = false;
                return Poll::Ready(Ok(()));
            }
            let written =
                ready!(Pin::new(&mut self.io).poll_write(cx, &self.unwritten[self.written..]))
                    .map_err(|error| self.io_error(error))?;
            if written == 0 {
                return Poll::Ready(Err(WsError::Io(io::ErrorKind::WriteZero.into())));
            }
            self.written += written;
        }
    }

    /// Writes and flushes everything; a server whose close handshake is over is then done.
    fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.state == State::Terminated {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_write_out(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx)).map_err(|error| self.io_error(error))?;
        if self.role == Role::Server && !self.state.can_read() {
            self.state = State::Terminated;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for WebSocket<S> {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match ready!(this.poll_message(cx)) {
            Ok(message) => Poll::Ready(Some(Ok(message))),
            Err(error) => {
                this.ended = true;
                match error {
                    WsError::ConnectionClosed | WsError::AlreadyClosed => Poll::Ready(None),
                    error => Poll::Ready(Some(Err(error))),
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Message> for WebSocket<S> {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        if this.unwritten.len() - this.written >= this.write_batch {
            ready!(this.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        let this = self.get_mut();
        match message {
            Message::Pong(data) => {
                this.check_sendable()?;
                this.set_reply(Reply::Pong(data));
                Ok(())
            }
            Message::Frame(mut frame) => {
                this.check_sendable()?;
                if let Some(mask) = this.mask() {
                    frame.header_mut().mask = Some(mask);
                }
                frame.format(&mut this.unwritten)?;
                Ok(())
            }
            message => this.send_borrowed(&message),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.get_mut().poll_flush_all(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        if this.state == State::Active {
            this.state = State::ClosedByUs;
            this.format(opcode::CLOSE, &[]);
        }
        this.poll_flush_all(cx)
    }
}

#[cfg(test)]
mod tests;
