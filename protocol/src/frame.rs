//! Frame types of the mux wire protocol and their sans-IO codec.
//!
//! A frame is one tag byte ([`FrameType`]) followed by its fields, encoded with bincode 2's
//! [`standard`](bincode::config::standard) configuration (little-endian, variable-length
//! integers). Frames are self-delimiting, so several may be concatenated in one binary WebSocket
//! message: [`encode_into`] appends one frame to a buffer and [`decode_all`] splits a message
//! back into frames. The layout is specified byte by byte in the crate's `README.md`.
//!
//! Decoding is strict and bounded: it never panics, checks every declared length against
//! [`Limits`] and against the bytes actually present *before* allocating, and reports the first
//! problem as a [`DecodeError`] that names the field and its byte offset in the message. A
//! [`Frame::Data`] payload is not copied: it is a [`Bytes::slice`] of the message.

use std::iter::FusedIterator;
use std::ops::Range;

use bincode::de::Decode;
use bincode::enc::write::{SizeWriter, Writer};
use bincode::enc::{Encode, Encoder};
use bincode::error::EncodeError;
use bytes::{BufMut, Bytes};

/// The bincode configuration of the wire format: [`bincode::config::standard`], that is
/// little-endian byte order and variable-length integer encoding, with no size limit (this
/// module's decoder enforces [`Limits`] itself).
pub const WIRE_CONFIG: bincode::config::Configuration = bincode::config::standard();

/// The stream id reserved for link-level frames ([`Frame::Hello`], [`Frame::GoAway`]).
///
/// A stream frame that carries this id is a decode error ([`DecodeError::ReservedStream`]).
pub const LINK_STREAM: u64 = 0;

/// Room in one binary WebSocket message beyond a maximal `Data` payload, for frame headers and
/// other frames batched with it. See [`max_message_len`].
pub const MESSAGE_SLACK: usize = 64 * 1024;

/// The largest binary WebSocket message that may be sent to a receiver whose `Hello.max_frame`
/// is `max_frame`, and that such a receiver must accept: `max_frame + MESSAGE_SLACK` bytes.
pub const fn max_message_len(max_frame: u32) -> usize {
    (max_frame as usize).saturating_add(MESSAGE_SLACK)
}

/// The kind of a frame: the first byte of every encoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// `0x01`: link parameters, the first frame each side sends on a link.
    Hello = 0x01,
    /// `0x02`: opens a new stream (one client WebSocket).
    Open = 0x02,
    /// `0x03`: accepts a stream opened with `Open`.
    Accept = 0x03,
    /// `0x04`: refuses a stream opened with `Open`.
    Reject = 0x04,
    /// `0x05`: one complete WebSocket message on a stream.
    Data = 0x05,
    /// `0x06`: returns flow-control credit for a stream.
    Window = 0x06,
    /// `0x07`: closes a stream.
    Close = 0x07,
    /// `0x08`: the sender is shutting the link down.
    GoAway = 0x08,
}

impl FrameType {
    /// Every frame type, in tag order.
    pub const ALL: [FrameType; 8] = [
        FrameType::Hello,
        FrameType::Open,
        FrameType::Accept,
        FrameType::Reject,
        FrameType::Data,
        FrameType::Window,
        FrameType::Close,
        FrameType::GoAway,
    ];

    /// The tag byte that starts a frame of this type.
    pub const fn tag(self) -> u8 {
        self as u8
    }

    /// The frame type whose tag is `tag`, or `None` for an unknown tag (including `0x00`, which
    /// is reserved and never valid).
    pub const fn from_tag(tag: u8) -> Option<FrameType> {
        Some(match tag {
            0x01 => FrameType::Hello,
            0x02 => FrameType::Open,
            0x03 => FrameType::Accept,
            0x04 => FrameType::Reject,
            0x05 => FrameType::Data,
            0x06 => FrameType::Window,
            0x07 => FrameType::Close,
            0x08 => FrameType::GoAway,
            _ => return None,
        })
    }

    /// The frame type's name, as used in error messages (`"Data"`, `"GoAway"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "Hello",
            FrameType::Open => "Open",
            FrameType::Accept => "Accept",
            FrameType::Reject => "Reject",
            FrameType::Data => "Data",
            FrameType::Window => "Window",
            FrameType::Close => "Close",
            FrameType::GoAway => "GoAway",
        }
    }
}

impl std::fmt::Display for FrameType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The fields of a [`Frame::Hello`]: what one side of a link speaks and accepts.
///
/// See [`negotiate`](crate::negotiate) for how two `Hello`s become the link's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hello {
    /// The highest protocol version the sender speaks.
    pub version: u16,
    /// The largest `Data` payload, in bytes, the sender accepts.
    pub max_frame: u32,
    /// The flow-control credit, in payload bytes, the sender grants its peer on every new stream.
    pub initial_window: u32,
}

impl Hello {
    /// A `Hello` for this implementation's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
    pub const fn new(max_frame: u32, initial_window: u32) -> Hello {
        Hello {
            version: crate::PROTOCOL_VERSION,
            max_frame,
            initial_window,
        }
    }
}

/// One frame of the mux protocol.
///
/// Stream ids are `u64` on the wire as a varint, so small ids cost one byte. Id `0`
/// ([`LINK_STREAM`]) is reserved for link-level frames and invalid in stream frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Link parameters; the first frame each side sends on a link.
    Hello(Hello),
    /// Opens stream `stream` for a client WebSocket that asked for `path`.
    Open {
        /// The new stream's id: assigned by the opener, increasing, never reused on a link.
        stream: u64,
        /// The request path without the query, e.g. `/chat/room1`.
        path: String,
        /// The query string without the leading `?`; empty if there was none.
        query: String,
        /// Forwarded request headers as (name, raw value) pairs, in order.
        headers: Vec<(String, Vec<u8>)>,
        /// The client's address, e.g. `203.0.113.7:51234`.
        client_addr: String,
        /// True when this stream re-originates a client whose previous backend was lost.
        resumed: bool,
    },
    /// Accepts stream `stream`; data may flow both ways.
    Accept {
        /// The stream being accepted.
        stream: u64,
        /// The WebSocket subprotocol the backend selected, if any.
        protocol: Option<String>,
    },
    /// Refuses stream `stream`; the client's handshake is answered with `status`.
    Reject {
        /// The stream being refused.
        stream: u64,
        /// The HTTP status to answer the client with, e.g. 403.
        status: u16,
        /// A human-readable reason.
        reason: String,
    },
    /// One complete WebSocket message on stream `stream`.
    Data {
        /// The stream the message belongs to.
        stream: u64,
        /// True for a text message (payload is UTF-8), false for binary.
        text: bool,
        /// The message payload; when decoded, a zero-copy slice of the received message.
        payload: Bytes,
    },
    /// Grants `credit` more payload bytes to the peer on stream `stream`.
    Window {
        /// The stream the credit is for.
        stream: u64,
        /// Additional payload bytes the peer may send; never 0.
        credit: u32,
    },
    /// Closes stream `stream` with a WebSocket close code and reason.
    Close {
        /// The stream being closed.
        stream: u64,
        /// The WebSocket close code, e.g. 1000.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// The sender is shutting the link down: no new streams on it.
    GoAway {
        /// Why, e.g. `"shutting down"`.
        reason: String,
    },
}

impl From<Hello> for Frame {
    fn from(hello: Hello) -> Frame {
        Frame::Hello(hello)
    }
}

impl Frame {
    /// This frame's type.
    pub const fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Open { .. } => FrameType::Open,
            Frame::Accept { .. } => FrameType::Accept,
            Frame::Reject { .. } => FrameType::Reject,
            Frame::Data { .. } => FrameType::Data,
            Frame::Window { .. } => FrameType::Window,
            Frame::Close { .. } => FrameType::Close,
            Frame::GoAway { .. } => FrameType::GoAway,
        }
    }

    /// The stream this frame belongs to, or `None` for the link-level frames `Hello` and
    /// `GoAway`.
    pub const fn stream(&self) -> Option<u64> {
        match self {
            Frame::Hello(_) | Frame::GoAway { .. } => None,
            Frame::Open { stream, .. }
            | Frame::Accept { stream, .. }
            | Frame::Reject { stream, .. }
            | Frame::Data { stream, .. }
            | Frame::Window { stream, .. }
            | Frame::Close { stream, .. } => Some(*stream),
        }
    }

    /// The exact number of bytes [`encode_into`] appends for this frame.
    pub fn encoded_len(&self) -> usize {
        let mut size = SizeWriter::default();
        // Encoding into a SizeWriter cannot fail: it only counts.
        let _ = bincode::encode_into_writer(self, &mut size, WIRE_CONFIG);
        size.bytes_written
    }
}

/// Encodes a frame exactly as [`encode_into`] does, so `bincode::encode_to_vec(&frame,
/// WIRE_CONFIG)` is also a valid way to encode one.
impl Encode for Frame {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.frame_type().tag().encode(e)?;
        match self {
            Frame::Hello(h) => {
                h.version.encode(e)?;
                h.max_frame.encode(e)?;
                h.initial_window.encode(e)
            }
            Frame::Open {
                stream,
                path,
                query,
                headers,
                client_addr,
                resumed,
            } => {
                stream.encode(e)?;
                path.encode(e)?;
                query.encode(e)?;
                headers.encode(e)?;
                client_addr.encode(e)?;
                resumed.encode(e)
            }
            Frame::Accept { stream, protocol } => {
                stream.encode(e)?;
                protocol.encode(e)
            }
            Frame::Reject {
                stream,
                status,
                reason,
            } => {
                stream.encode(e)?;
                status.encode(e)?;
                reason.encode(e)
            }
            Frame::Data {
                stream,
                text,
                payload,
            } => {
                stream.encode(e)?;
                text.encode(e)?;
                payload[..].encode(e)
            }
            Frame::Window { stream, credit } => {
                stream.encode(e)?;
                credit.encode(e)
            }
            Frame::Close {
                stream,
                code,
                reason,
            } => {
                stream.encode(e)?;
                code.encode(e)?;
                reason.encode(e)
            }
            Frame::GoAway { reason } => reason.encode(e),
        }
    }
}

/// A bincode [`Writer`] that appends to a [`BufMut`].
struct BufMutWriter<'a, B: BufMut>(&'a mut B);

impl<B: BufMut> Writer for BufMutWriter<'_, B> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        if self.0.remaining_mut() < bytes.len() {
            return Err(EncodeError::UnexpectedEnd);
        }
        self.0.put_slice(bytes);
        Ok(())
    }
}

/// Appends the encoding of `frame` to `out` (a `Vec<u8>` or `BytesMut`, typically), after any
/// frames already there, so a whole batch can be sent as one binary WebSocket message.
///
/// Encoding does not check [`Limits`] or stream ids: the caller must not send what its peer's
/// limits forbid.
///
/// # Panics
///
/// If `out` cannot grow to hold the frame, which only happens with a fixed-capacity buffer
/// such as `&mut [u8]`; `Vec<u8>` and `BytesMut` always grow.
pub fn encode_into<B: BufMut>(frame: &Frame, out: &mut B) {
    if let Err(e) = bincode::encode_into_writer(frame, BufMutWriter(out), WIRE_CONFIG) {
        panic!(
            "output buffer too small for a {} frame: {e}",
            frame.frame_type()
        );
    }
}

/// Encodes one frame into a new buffer.
pub fn encode(frame: &Frame) -> Bytes {
    let mut out = Vec::with_capacity(frame.encoded_len());
    encode_into(frame, &mut out);
    Bytes::from(out)
}

/// Per-frame bounds the decoder enforces before it allocates anything.
///
/// Together they bound the memory one decoded frame can hold; a declared length is also never
/// trusted beyond the bytes actually present in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// The largest `Data` payload, in bytes (this side's `Hello.max_frame`).
    pub max_frame: usize,
    /// The largest string or byte-string field, in bytes: each of `Open.path`, `Open.query`,
    /// `Open.client_addr`, every header name and every header value, `Accept.protocol`, and
    /// every `reason`.
    pub max_string: usize,
    /// The largest number of headers in one `Open`.
    pub max_headers: usize,
}

impl Limits {
    /// The defaults: 1 MiB payloads, 16 KiB strings, 128 headers.
    pub const DEFAULT: Limits = Limits {
        max_frame: 1 << 20,
        max_string: 16 << 10,
        max_headers: 128,
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

/// Why a message could not be decoded. Every variant carries the byte offset, counted from the
/// start of the message, where the offending field (or tag) starts.
///
/// Any `DecodeError` is a protocol error: the receiver closes the link with WebSocket close
/// code 1002 ([`PROTOCOL_ERROR`](crate::PROTOCOL_ERROR)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message ends inside a frame, or a declared length runs past its end.
    #[error("truncated frame: {field} at byte {offset} runs past the end of the message")]
    Truncated {
        /// Where the incomplete field starts.
        offset: usize,
        /// The field, e.g. `"Data.payload"`.
        field: &'static str,
    },
    /// The tag byte is not a known [`FrameType`].
    #[error("unknown frame type tag 0x{tag:02x} at byte {offset}")]
    UnknownTag {
        /// Where the tag byte is.
        offset: usize,
        /// The tag byte.
        tag: u8,
    },
    /// A varint has a reserved first byte or does not fit the field's integer type.
    #[error("invalid integer encoding for {field} at byte {offset}")]
    BadInteger {
        /// Where the integer starts.
        offset: usize,
        /// The field.
        field: &'static str,
    },
    /// A `bool` or `Option` tag byte is neither 0 nor 1.
    #[error("invalid {field} at byte {offset}: 0x{value:02x} is neither 0 nor 1")]
    BadFlag {
        /// Where the byte is.
        offset: usize,
        /// The field.
        field: &'static str,
        /// The byte found.
        value: u8,
    },
    /// A string field is not valid UTF-8.
    #[error("{field} at byte {offset} is not valid UTF-8")]
    BadUtf8 {
        /// Where the string's bytes start (after its length).
        offset: usize,
        /// The field.
        field: &'static str,
    },
    /// A string, byte string or payload declares more bytes than [`Limits`] allow.
    #[error("{field} at byte {offset} declares {len} bytes, over the limit of {limit}")]
    TooLong {
        /// Where the length prefix starts.
        offset: usize,
        /// The field.
        field: &'static str,
        /// The declared length.
        len: u64,
        /// The limit it exceeds.
        limit: usize,
    },
    /// An `Open` declares more headers than [`Limits::max_headers`].
    #[error("Open.headers at byte {offset} declares {count} headers, over the limit of {limit}")]
    TooManyHeaders {
        /// Where the header count starts.
        offset: usize,
        /// The declared count.
        count: u64,
        /// The limit it exceeds.
        limit: usize,
    },
    /// A stream frame uses the reserved stream id 0.
    #[error("{frame} at byte {offset} uses the reserved stream id 0")]
    ReservedStream {
        /// Where the stream id starts.
        offset: usize,
        /// The frame type.
        frame: FrameType,
    },
    /// A `Window` frame grants no credit.
    #[error("Window.credit at byte {offset} is 0")]
    ZeroCredit {
        /// Where the credit starts.
        offset: usize,
    },
}

impl DecodeError {
    /// The byte offset in the message where the problem starts.
    pub const fn offset(&self) -> usize {
        match self {
            DecodeError::Truncated { offset, .. }
            | DecodeError::UnknownTag { offset, .. }
            | DecodeError::BadInteger { offset, .. }
            | DecodeError::BadFlag { offset, .. }
            | DecodeError::BadUtf8 { offset, .. }
            | DecodeError::TooLong { offset, .. }
            | DecodeError::TooManyHeaders { offset, .. }
            | DecodeError::ReservedStream { offset, .. }
            | DecodeError::ZeroCredit { offset } => *offset,
        }
    }
}

/// The largest value bincode's `standard` variable-length integers (the wire format's) encode
/// as that one byte; larger ones are a marker byte (251 and up) and 2, 4 or 8 bytes.
const SINGLE_BYTE_VARINT_MAX: u8 = 250;

/// A read position in a message. Every read checks bounds and reports absolute offsets.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// A single raw byte.
    fn byte(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(DecodeError::Truncated {
            offset: self.pos,
            field,
        })?;
        self.pos += 1;
        Ok(b)
    }

    /// A `bool` or an `Option` tag: one byte, 0 or 1.
    fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        let offset = self.pos;
        match self.byte(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::BadFlag {
                offset,
                field,
                value,
            }),
        }
    }

    /// A varint-encoded unsigned integer, decoded by bincode unless it is a single byte, as
    /// stream ids and small lengths nearly always are (a 64 B `Data` frame decodes about a
    /// tenth faster in `cargo bench -p wsrelay-protocol -- mux/decode`).
    fn uint<T: Decode<()> + From<u8>>(&mut self, field: &'static str) -> Result<T, DecodeError> {
        let offset = self.pos;
        if let Some(&byte) = self.buf.get(offset)
            && byte <= SINGLE_BYTE_VARINT_MAX
        {
            self.pos += 1;
            return Ok(T::from(byte));
        }
        let rest = self.buf.get(offset..).unwrap_or_default();
        match bincode::decode_from_slice::<T, _>(rest, WIRE_CONFIG) {
            Ok((value, used)) => {
                self.pos += used;
                Ok(value)
            }
            Err(bincode::error::DecodeError::UnexpectedEnd { .. }) => {
                Err(DecodeError::Truncated { offset, field })
            }
            Err(_) => Err(DecodeError::BadInteger { offset, field }),
        }
    }

    /// A stream id of a stream frame: nonzero.
    fn stream(&mut self, frame: FrameType) -> Result<u64, DecodeError> {
        let offset = self.pos;
        let stream = self.uint::<u64>("stream")?;
        if stream == LINK_STREAM {
            return Err(DecodeError::ReservedStream { offset, frame });
        }
        Ok(stream)
    }

    /// A length-prefixed byte run of at most `limit` bytes; returns its range in the message.
    fn run(&mut self, field: &'static str, limit: usize) -> Result<Range<usize>, DecodeError> {
        let offset = self.pos;
        let len = self.uint::<u64>(field)?;
        if len > limit as u64 {
            return Err(DecodeError::TooLong {
                offset,
                field,
                len,
                limit,
            });
        }
        if len > self.remaining() as u64 {
            return Err(DecodeError::Truncated { offset, field });
        }
        let start = self.pos;
        self.pos += len as usize;
        Ok(start..self.pos)
    }

    /// A length-prefixed byte vector of at most `limit` bytes.
    fn byte_vec(&mut self, field: &'static str, limit: usize) -> Result<Vec<u8>, DecodeError> {
        let range = self.run(field, limit)?;
        Ok(self.buf[range].to_vec())
    }

    /// A length-prefixed UTF-8 string of at most `limit` bytes.
    fn string(&mut self, field: &'static str, limit: usize) -> Result<String, DecodeError> {
        let range = self.run(field, limit)?;
        let offset = range.start;
        match std::str::from_utf8(&self.buf[range]) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(DecodeError::BadUtf8 { offset, field }),
        }
    }
}

/// Decodes the frame that starts at byte `offset` of `message`, and returns it with the offset
/// just past it (where the next frame, if any, starts).
///
/// A `Data` payload is a zero-copy [`Bytes::slice`] of `message`.
pub fn decode_frame(
    message: &Bytes,
    offset: usize,
    limits: &Limits,
) -> Result<(Frame, usize), DecodeError> {
    let mut c = Cursor {
        buf: message,
        pos: offset,
    };
    let tag_offset = c.pos;
    let tag = c.byte("frame type tag")?;
    let ty = FrameType::from_tag(tag).ok_or(DecodeError::UnknownTag {
        offset: tag_offset,
        tag,
    })?;
    let frame = match ty {
        FrameType::Hello => Frame::Hello(Hello {
            version: c.uint("Hello.version")?,
            max_frame: c.uint("Hello.max_frame")?,
            initial_window: c.uint("Hello.initial_window")?,
        }),
        FrameType::Open => {
            let stream = c.stream(ty)?;
            let path = c.string("Open.path", limits.max_string)?;
            let query = c.string("Open.query", limits.max_string)?;
            let count_offset = c.pos;
            let count = c.uint::<u64>("Open.headers")?;
            if count > limits.max_headers as u64 {
                return Err(DecodeError::TooManyHeaders {
                    offset: count_offset,
                    count,
                    limit: limits.max_headers,
                });
            }
            // Each header takes at least two bytes (two empty length prefixes), so never reserve
            // more entries than the remaining bytes could hold.
            let mut headers = Vec::with_capacity((count as usize).min(c.remaining() / 2));
            for _ in 0..count {
                let name = c.string("Open header name", limits.max_string)?;
                let value = c.byte_vec("Open header value", limits.max_string)?;
                headers.push((name, value));
            }
            Frame::Open {
                stream,
                path,
                query,
                headers,
                client_addr: c.string("Open.client_addr", limits.max_string)?,
                resumed: c.flag("Open.resumed")?,
            }
        }
        FrameType::Accept => Frame::Accept {
            stream: c.stream(ty)?,
            protocol: if c.flag("Accept.protocol option tag")? {
                Some(c.string("Accept.protocol", limits.max_string)?)
            } else {
                None
            },
        },
        FrameType::Reject => Frame::Reject {
            stream: c.stream(ty)?,
            status: c.uint("Reject.status")?,
            reason: c.string("Reject.reason", limits.max_string)?,
        },
        FrameType::Data => {
            let stream = c.stream(ty)?;
            let text = c.flag("Data.text")?;
            let range = c.run("Data.payload", limits.max_frame)?;
            Frame::Data {
                stream,
                text,
                payload: message.slice(range),
            }
        }
        FrameType::Window => {
            let stream = c.stream(ty)?;
            let credit_offset = c.pos;
            let credit = c.uint("Window.credit")?;
            if credit == 0 {
                return Err(DecodeError::ZeroCredit {
                    offset: credit_offset,
                });
            }
            Frame::Window { stream, credit }
        }
        FrameType::Close => Frame::Close {
            stream: c.stream(ty)?,
            code: c.uint("Close.code")?,
            reason: c.string("Close.reason", limits.max_string)?,
        },
        FrameType::GoAway => Frame::GoAway {
            reason: c.string("GoAway.reason", limits.max_string)?,
        },
    };
    Ok((frame, c.pos))
}

/// Splits one binary WebSocket message into its frames; see [`decode_all`].
///
/// Yields `Ok(frame)` for each frame in order, then stops; or yields `Err` for the first bad
/// frame and stops there (after an error the rest of the message cannot be framed).
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    message: Bytes,
    pos: usize,
    limits: Limits,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder over the frames of `message`.
    pub fn new(message: Bytes, limits: Limits) -> FrameDecoder {
        FrameDecoder {
            message,
            pos: 0,
            limits,
            failed: false,
        }
    }

    /// The offset in the message where the next frame starts.
    pub fn offset(&self) -> usize {
        self.pos
    }
}

impl Iterator for FrameDecoder {
    type Item = Result<Frame, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.message.len() {
            return None;
        }
        match decode_frame(&self.message, self.pos, &self.limits) {
            Ok((frame, next)) => {
                self.pos = next;
                Some(Ok(frame))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl FusedIterator for FrameDecoder {}

/// Splits one binary WebSocket message into its frames, in order.
///
/// An empty message yields nothing. Collect into `Result<Vec<Frame>, DecodeError>` to get all
/// frames or the first error.
pub fn decode_all(message: Bytes, limits: &Limits) -> FrameDecoder {
    FrameDecoder::new(message, *limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello::new(1 << 20, 4 << 20)),
            Frame::Hello(Hello {
                version: u16::MAX,
                max_frame: u32::MAX,
                initial_window: 0,
            }),
            Frame::Open {
                stream: 1,
                path: "/chat/room1".into(),
                query: "token=abc&x=1".into(),
                headers: vec![
                    ("origin".into(), b"https://example.com".to_vec()),
                    ("cookie".into(), vec![0xff, 0x00, 0x80]),
                    (String::new(), Vec::new()),
                ],
                client_addr: "[2001:db8::1]:443".into(),
                resumed: true,
            },
            Frame::Open {
                stream: u64::MAX,
                path: String::new(),
                query: String::new(),
                headers: Vec::new(),
                client_addr: String::new(),
                resumed: false,
            },
            Frame::Accept {
                stream: 2,
                protocol: Some("chat.v2".into()),
            },
            Frame::Accept {
                stream: 250,
                protocol: None,
            },
            Frame::Reject {
                stream: 251,
                status: 403,
                reason: "forbidden ✋".into(),
            },
            Frame::Data {
                stream: 65_536,
                text: true,
                payload: Bytes::from_static("héllo".as_bytes()),
            },
            Frame::Data {
                stream: 1 << 40,
                text: false,
                payload: Bytes::from(vec![7u8; 300]),
            },
            Frame::Data {
                stream: 3,
                text: false,
                payload: Bytes::new(),
            },
            Frame::Window {
                stream: 3,
                credit: 65_535,
            },
            Frame::Window {
                stream: 3,
                credit: u32::MAX,
            },
            Frame::Close {
                stream: 4,
                code: 1000,
                reason: String::new(),
            },
            Frame::Close {
                stream: 5,
                code: 4000,
                reason: "bye".into(),
            },
            Frame::GoAway {
                reason: "shutting down".into(),
            },
        ]
    }

    fn one(bytes: &Bytes) -> Result<Frame, DecodeError> {
        let (frame, end) = decode_frame(bytes, 0, &Limits::DEFAULT)?;
        assert_eq!(end, bytes.len(), "frame did not consume the whole buffer");
        Ok(frame)
    }

    #[test]
    fn every_frame_type_round_trips() {
        let samples = samples();
        for ty in FrameType::ALL {
            assert!(
                samples.iter().any(|f| f.frame_type() == ty),
                "{ty} untested"
            );
            assert_eq!(FrameType::from_tag(ty.tag()), Some(ty));
        }
        for frame in samples {
            let bytes = encode(&frame);
            assert_eq!(bytes.len(), frame.encoded_len());
            assert_eq!(bytes[0], frame.frame_type().tag());
            assert_eq!(one(&bytes).unwrap(), frame);
            // The Encode impl and encode_into agree.
            assert_eq!(
                bincode::encode_to_vec(&frame, WIRE_CONFIG).unwrap(),
                bytes.to_vec()
            );
        }
    }

    #[test]
    fn fields_are_plain_bincode() {
        // Each frame is its tag followed by bincode's own encoding of its fields in order.
        let cases: Vec<(Frame, Vec<u8>)> = vec![
            (
                Frame::Reject {
                    stream: 300,
                    status: 503,
                    reason: "busy".into(),
                },
                bincode::encode_to_vec((4u8, 300u64, 503u16, "busy"), WIRE_CONFIG).unwrap(),
            ),
            (
                Frame::Accept {
                    stream: 9,
                    protocol: Some("p".into()),
                },
                bincode::encode_to_vec((3u8, 9u64, Some("p")), WIRE_CONFIG).unwrap(),
            ),
            (
                Frame::Data {
                    stream: 70_000,
                    text: true,
                    payload: Bytes::from_static(b"xyz"),
                },
                bincode::encode_to_vec((5u8, 70_000u64, true, b"xyz".to_vec()), WIRE_CONFIG)
                    .unwrap(),
            ),
        ];
        for (frame, expected) in cases {
            assert_eq!(encode(&frame).to_vec(), expected, "{frame:?}");
        }
    }

    #[test]
    fn batch_of_frames_in_one_message() {
        let samples = samples();
        let mut buf = bytes::BytesMut::new();
        for f in &samples {
            encode_into(f, &mut buf);
        }
        let decoded: Vec<Frame> = decode_all(buf.freeze(), &Limits::DEFAULT)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(decoded, samples);
        assert_eq!(decode_all(Bytes::new(), &Limits::DEFAULT).count(), 0);
    }

    #[test]
    fn data_payload_is_zero_copy() {
        let frame = Frame::Data {
            stream: 1,
            text: false,
            payload: Bytes::from(vec![1u8; 1000]),
        };
        let mut buf = Vec::new();
        encode_into(&Frame::GoAway { reason: "x".into() }, &mut buf);
        encode_into(&frame, &mut buf);
        let message = Bytes::from(buf);
        let frames: Vec<_> = decode_all(message.clone(), &Limits::DEFAULT)
            .collect::<Result<_, _>>()
            .unwrap();
        let Frame::Data { payload, .. } = &frames[1] else {
            panic!("expected Data")
        };
        let inside = message.as_ptr_range();
        assert!(inside.contains(&payload.as_ptr()));
        assert_eq!(payload.as_ptr() as usize + 1000, inside.end as usize);
    }

    #[test]
    fn every_truncation_is_an_error() {
        for frame in samples() {
            let bytes = encode(&frame);
            for cut in 0..bytes.len() {
                let short = bytes.slice(..cut);
                match decode_frame(&short, 0, &Limits::DEFAULT) {
                    Err(DecodeError::Truncated { offset, .. }) => assert!(offset <= cut),
                    other => panic!("{frame:?} cut at {cut}: {other:?}"),
                }
            }
        }
        // A truncated second frame reports its offset within the message.
        let mut buf = encode(&Frame::GoAway { reason: "a".into() }).to_vec();
        let first = buf.len();
        buf.extend_from_slice(
            &encode(&Frame::Close {
                stream: 1,
                code: 1000,
                reason: "done".into(),
            })[..5],
        );
        let mut it = decode_all(Bytes::from(buf), &Limits::DEFAULT);
        assert!(matches!(it.next(), Some(Ok(Frame::GoAway { .. }))));
        let err = it.next().unwrap().unwrap_err();
        assert_eq!(
            err,
            DecodeError::Truncated {
                offset: first + 5,
                field: "Close.reason"
            }
        );
        assert!(it.next().is_none());
    }

    #[test]
    fn unknown_tags_are_errors() {
        for tag in [0x00u8, 0x09, 0x7f, 0xff] {
            let msg = Bytes::from(vec![tag, 1, 2, 3]);
            assert_eq!(
                one(&msg).unwrap_err(),
                DecodeError::UnknownTag { offset: 0, tag }
            );
        }
        let mut buf = encode(&Frame::GoAway { reason: "".into() }).to_vec();
        buf.push(0x42);
        let err = decode_all(Bytes::from(buf), &Limits::DEFAULT)
            .find_map(Result::err)
            .unwrap();
        assert_eq!(
            err,
            DecodeError::UnknownTag {
                offset: 2,
                tag: 0x42
            }
        );
        assert_eq!(
            err.to_string(),
            "unknown frame type tag 0x42 at byte 2",
            "message names the tag and the offset"
        );
    }

    #[test]
    fn malformed_fields_are_errors() {
        let err = |bytes: &[u8]| one(&Bytes::copy_from_slice(bytes)).unwrap_err();
        // Stream id 0 is reserved.
        assert_eq!(
            err(&[0x05, 0x00, 0x00, 0x00]),
            DecodeError::ReservedStream {
                offset: 1,
                frame: FrameType::Data
            }
        );
        // bool must be 0 or 1.
        assert_eq!(
            err(&[0x05, 0x01, 0x02, 0x00]),
            DecodeError::BadFlag {
                offset: 2,
                field: "Data.text",
                value: 2
            }
        );
        // Option tag must be 0 or 1.
        assert!(matches!(
            err(&[0x03, 0x01, 0x05]),
            DecodeError::BadFlag { offset: 2, .. }
        ));
        // Invalid UTF-8 in a string.
        assert_eq!(
            err(&[0x08, 0x02, 0xc3, 0x28]),
            DecodeError::BadUtf8 {
                offset: 2,
                field: "GoAway.reason"
            }
        );
        // A u16 field given a u32-sized varint, and a reserved varint byte.
        assert_eq!(
            err(&[0x07, 0x01, 0xfc, 0, 0, 1, 0, 0x00]),
            DecodeError::BadInteger {
                offset: 2,
                field: "Close.code"
            }
        );
        assert!(matches!(
            err(&[0x06, 0xff, 0x01]),
            DecodeError::BadInteger { offset: 1, .. }
        ));
        // Zero credit.
        assert_eq!(
            err(&[0x06, 0x01, 0x00]),
            DecodeError::ZeroCredit { offset: 2 }
        );
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            max_frame: 4,
            max_string: 3,
            max_headers: 1,
        };
        let dec = |f: &Frame| decode_frame(&encode(f), 0, &limits).map(|(f, _)| f);
        let data = |n: usize| Frame::Data {
            stream: 1,
            text: false,
            payload: Bytes::from(vec![0; n]),
        };
        assert!(dec(&data(4)).is_ok());
        assert_eq!(
            dec(&data(5)).unwrap_err(),
            DecodeError::TooLong {
                offset: 3,
                field: "Data.payload",
                len: 5,
                limit: 4
            }
        );
        let open = |headers: Vec<(String, Vec<u8>)>, path: &str| Frame::Open {
            stream: 1,
            path: path.into(),
            query: String::new(),
            headers,
            client_addr: String::new(),
            resumed: false,
        };
        assert!(dec(&open(vec![("abc".into(), b"xyz".to_vec())], "/ab")).is_ok());
        assert!(matches!(
            dec(&open(vec![], "/abc")).unwrap_err(),
            DecodeError::TooLong {
                field: "Open.path",
                len: 4,
                ..
            }
        ));
        assert!(matches!(
            dec(&open(vec![("a".into(), b"long".to_vec())], "/")).unwrap_err(),
            DecodeError::TooLong {
                field: "Open header value",
                ..
            }
        ));
        assert!(matches!(
            dec(&open(vec![("a".into(), vec![]), ("b".into(), vec![])], "/")).unwrap_err(),
            DecodeError::TooManyHeaders {
                offset: 5,
                count: 2,
                limit: 1
            }
        ));
        assert!(matches!(
            dec(&Frame::GoAway {
                reason: "four".into()
            })
            .unwrap_err(),
            DecodeError::TooLong { offset: 1, .. }
        ));
    }

    #[test]
    fn huge_declared_lengths_error_before_allocating() {
        let huge = (1u64 << 60).to_le_bytes();
        let unlimited = Limits {
            max_frame: usize::MAX,
            max_string: usize::MAX,
            max_headers: usize::MAX,
        };
        // Data payload of 2^60 bytes.
        let mut data = vec![0x05, 0x01, 0x00, 0xfd];
        data.extend_from_slice(&huge);
        let data = Bytes::from(data);
        assert!(matches!(
            decode_frame(&data, 0, &Limits::DEFAULT).unwrap_err(),
            DecodeError::TooLong {
                offset: 3,
                len: 0x1000_0000_0000_0000,
                ..
            }
        ));
        assert_eq!(
            decode_frame(&data, 0, &unlimited).unwrap_err(),
            DecodeError::Truncated {
                offset: 3,
                field: "Data.payload"
            }
        );
        // 2^60 headers.
        let mut open = vec![0x02, 0x01, 0x00, 0x00, 0xfd];
        open.extend_from_slice(&huge);
        let open = Bytes::from(open);
        assert!(matches!(
            decode_frame(&open, 0, &Limits::DEFAULT).unwrap_err(),
            DecodeError::TooManyHeaders { offset: 4, .. }
        ));
        assert!(matches!(
            decode_frame(&open, 0, &unlimited).unwrap_err(),
            DecodeError::Truncated { .. }
        ));
    }

    #[test]
    fn decode_frame_at_or_past_the_end() {
        let msg = encode(&Frame::GoAway { reason: "".into() });
        for offset in [2, 3, usize::MAX] {
            assert!(matches!(
                decode_frame(&msg, offset, &Limits::DEFAULT),
                Err(DecodeError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn integers_read_as_bincode_reads_them_at_every_boundary() {
        let mut values = vec![0, 1, u64::MAX];
        for edge in [250, 251, 65_535, 65_536, 4_294_967_295, 4_294_967_296] {
            values.extend([edge - 1, edge, edge + 1]);
        }
        for value in values {
            let bytes = bincode::encode_to_vec(value, WIRE_CONFIG).unwrap();
            let mut cursor = Cursor {
                buf: &bytes,
                pos: 0,
            };
            assert_eq!(cursor.uint::<u64>("value").unwrap(), value);
            assert_eq!(cursor.pos, bytes.len());
        }
    }

    proptest::proptest! {
        /// Any unsigned integer reads back the same through the single-byte fast path and
        /// through bincode, for every width the frames use.
        #[test]
        fn integers_read_as_bincode_reads_them(value: u64, narrow: u16) {
            for bytes in [
                bincode::encode_to_vec(value, WIRE_CONFIG).unwrap(),
                bincode::encode_to_vec(u32::from(narrow), WIRE_CONFIG).unwrap(),
            ] {
                let mut cursor = Cursor { buf: &bytes, pos: 0 };
                let ours: u64 = cursor.uint("value").unwrap();
                let (theirs, used): (u64, usize) =
                    bincode::decode_from_slice(&bytes, WIRE_CONFIG).unwrap();
                proptest::prop_assert_eq!(ours, theirs);
                proptest::prop_assert_eq!(cursor.pos, used);
            }
            let bytes = bincode::encode_to_vec(narrow, WIRE_CONFIG).unwrap();
            let mut cursor = Cursor { buf: &bytes, pos: 0 };
            proptest::prop_assert_eq!(cursor.uint::<u16>("value").unwrap(), narrow);
        }
    }
}
