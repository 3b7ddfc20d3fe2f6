//! The test message: a header the load generator reads back (which connection sent it, its
//! sequence number, when it was *meant* to be sent and when it actually was), padded to the
//! requested size.
//!
//! Both times are nanoseconds since the run's [`Clock`] epoch, so one process can compute the
//! round trip of its own messages without trusting any peer's clock. Binary messages carry the
//! header as 28 little-endian bytes; text messages as 56 lowercase hex digits (pure ASCII, so
//! every proxy's UTF-8 validation runs on the whole message). The padding is `'x'`.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of the binary header.
pub const BINARY_HEADER: usize = 28;
/// Characters of the text header.
pub const TEXT_HEADER: usize = 56;

/// Monotonic time since a run's start, in nanoseconds; shared by every task of a run.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    /// A clock whose zero is now.
    pub fn start() -> Clock {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// Nanoseconds since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The instant `ns` nanoseconds after the epoch.
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }

    /// Nanoseconds from the epoch to `instant` (0 if before it).
    pub fn ns_of(&self, instant: Instant) -> u64 {
        instant.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// What a test message says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Index of the sending connection within the run.
    pub conn: u32,
    /// Per-connection sequence number, from 0.
    pub seq: u64,
    /// When the schedule meant the message to be sent (open loop); equals `sent_ns` in a
    /// closed loop.
    pub intended_ns: u64,
    /// When the message was handed to the socket.
    pub sent_ns: u64,
}

/// Why a received message is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Shorter than the header.
    #[error("message of {0} bytes is shorter than the header")]
    TooShort(usize),
    /// The text header is not hex.
    #[error("text header is not hexadecimal")]
    NotHex,
}

/// Smallest `--size` for the given message type.
pub fn min_size(text: bool) -> usize {
    if text { TEXT_HEADER } else { BINARY_HEADER }
}

/// Builds a binary message of exactly `size` bytes (at least [`BINARY_HEADER`]).
pub fn encode_binary(header: Header, size: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(size.max(BINARY_HEADER));
    out.put_u32_le(header.conn);
    out.put_u64_le(header.seq);
    out.put_u64_le(header.intended_ns);
    out.put_u64_le(header.sent_ns);
    out.resize(size.max(BINARY_HEADER), b'x');
    out.freeze()
}

/// Builds a text message of exactly `size` characters (at least [`TEXT_HEADER`]).
pub fn encode_text(header: Header, size: usize) -> String {
    let mut out = format!(
        "{:08x}{:016x}{:016x}{:016x}",
        header.conn, header.seq, header.intended_ns, header.sent_ns
    );
    let target = size.max(TEXT_HEADER);
    out.extend(std::iter::repeat_n('x', target - out.len()));
    out
}

/// Reads the header of a binary message.
pub fn decode_binary(data: &[u8]) -> Result<Header, PayloadError> {
    if data.len() < BINARY_HEADER {
        return Err(PayloadError::TooShort(data.len()));
    }
    let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
    Ok(Header {
        conn: u32::from_le_bytes(data[0..4].try_into().expect("4 bytes")),
        seq: u64_at(4),
        intended_ns: u64_at(12),
        sent_ns: u64_at(20),
    })
}

/// Reads the header of a text message.
pub fn decode_text(text: &str) -> Result<Header, PayloadError> {
    let bytes = text.as_bytes();
    if bytes.len() < TEXT_HEADER {
        return Err(PayloadError::TooShort(bytes.len()));
    }
    let hex = |range: std::ops::Range<usize>| {
        std::str::from_utf8(&bytes[range])
            .ok()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or(PayloadError::NotHex)
    };
    Ok(Header {
        conn: hex(0..8)? as u32,
        seq: hex(8..24)?,
        intended_ns: hex(24..40)?,
        sent_ns: hex(40..56)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: Header = Header {
        conn: 7,
        seq: 123_456,
        intended_ns: 9_000_000_001,
        sent_ns: 9_000_000_777,
    };

    #[test]
    fn binary_round_trip_and_size() {
        let message = encode_binary(HEADER, 64);
        assert_eq!(message.len(), 64);
        assert_eq!(decode_binary(&message).unwrap(), HEADER);
        assert_eq!(encode_binary(HEADER, 1).len(), BINARY_HEADER);
    }

    #[test]
    fn text_round_trip_and_size() {
        let message = encode_text(HEADER, 100);
        assert_eq!(message.len(), 100);
        assert_eq!(decode_text(&message).unwrap(), HEADER);
        assert_eq!(
            decode_text("short"),
            Err(PayloadError::TooShort("short".len()))
        );
    }
}
