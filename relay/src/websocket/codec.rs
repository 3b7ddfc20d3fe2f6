//! The pure parts of RFC 6455 framing: frame headers read and written, which frames a peer may
//! send in which state, masking, Close payloads, and UTF-8 checked as a text message's
//! fragments arrive. No I/O; [`super::WebSocket`] wires these to a socket.

use bytes::Bytes;
use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::protocol::frame::coding::{CloseCode, Data};
use tungstenite::protocol::{CloseFrame, Role};
use tungstenite::{Error as WsError, Utf8Bytes};

/// Opcodes (RFC 6455 §5.2).
pub(crate) mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// A text message (or its first fragment).
    pub const TEXT: u8 = 0x1;
    /// A binary message (or its first fragment).
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// The longest frame header: 2 bytes, an 8-byte length and a 4-byte mask.
pub(crate) const MAX_HEADER: usize = 14;

/// Largest payload of a control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// Largest control frame, masked: a two-byte header, the key, the payload.
pub(crate) const MAX_CONTROL_FRAME: usize = 2 + 4 + MAX_CONTROL_PAYLOAD as usize;

/// A frame header as it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The FIN bit: the last frame of its message.
    pub fin: bool,
    /// RSV1-3, as the low three bits.
    pub reserved: u8,
    /// The opcode.
    pub opcode: u8,
    /// The masking key, if the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub payload_len: u64,
    /// Length of the header itself.
    pub len: usize,
}

impl Header {
    /// Header and payload together, when that fits in memory at all.
    pub fn frame_len(&self) -> Option<usize> {
        usize::try_from(self.payload_len)
            .ok()?
            .checked_add(self.len)
    }
}

/// Reads the header at the start of `buf`; `None` when `buf` ends before it does.
pub(crate) fn parse_header(buf: &[u8]) -> Option<Header> {
    let (&first, &second) = (buf.first()?, buf.get(1)?);
    let masked = second & 0x80 != 0;
    let (payload_len, mut len) = match second & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        short => (u64::from(short), 2),
    };
    let mask = if masked {
        let key: [u8; 4] = buf.get(len..len + 4)?.try_into().ok()?;
        len += 4;
        Some(key)
    } else {
        None
    };
    Some(Header {
        fin: first & 0x80 != 0,
        reserved: (first >> 4) & 0x7,
        opcode: first & 0x0F,
        mask,
        payload_len,
        len,
    })
}

/// Appends the header of a final frame with `opcode` and a payload of `payload_len` bytes.
pub(crate) fn write_header(
    out: &mut Vec<u8>,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload_len: usize,
) {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.push(0x80 | opcode);
    match payload_len {
        0..=125 => out.push(mask_bit | payload_len as u8),
        126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

/// Appends a whole final frame; masked with `mask` when it is given (a client's frames).
pub(crate) fn write_frame(out: &mut Vec<u8>, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) {
    write_header(out, opcode, mask, payload.len());
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key);
    }
}

/// XORs `data` with the masking key, as RFC 6455 §5.3 masks and unmasks a payload that starts
/// at `data[0]`. Eight bytes at a time, which the compiler turns into vector instructions.
pub(crate) fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("eight bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the key's phase starts at 0 again.
    for (index, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[index & 3];
    }
}

/// What a frame is, once its header passed [`check_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameKind {
    /// The first (or only) frame of a text message.
    Text,
    /// The first (or only) frame of a binary message.
    Binary,
    /// A later fragment of the message being collected.
    Continuation,
    /// Close.
    Close,
    /// Ping.
    Ping,
    /// Pong.
    Pong,
}

/// Where the reading side stands when a frame header arrives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadContext {
    /// Which end this is: a server takes only masked frames, a client only unmasked ones.
    pub role: Role,
    /// Data may still be read (no Close received, or only ours sent).
    pub can_read: bool,
    /// Bytes of a fragmented message collected so far, if one is being collected.
    pub collected: Option<usize>,
    /// Largest frame payload accepted.
    pub max_frame: usize,
    /// Largest message accepted.
    pub max_message: usize,
}

/// Says whether a peer may send a frame with `header` now, before its payload arrives, with
/// tungstenite's errors in tungstenite's order, so every leg fails a broken peer with the
/// same close code: an unknown opcode, a frame over the size limit, a frame masked the wrong
/// way, data after the close handshake, reserved bits, a fragmented or oversized control
/// frame, a continuation with nothing to continue or a new message inside a fragmented one,
/// and a message over the size limit.
pub(crate) fn check_header(header: &Header, context: &ReadContext) -> Result<FrameKind, WsError> {
    let protocol = |error| Err(WsError::Protocol(error));
    let kind = match header.opcode {
        opcode::CONTINUATION => FrameKind::Continuation,
        opcode::TEXT => FrameKind::Text,
        opcode::BINARY => FrameKind::Binary,
        opcode::CLOSE => FrameKind::Close,
        opcode::PING => FrameKind::Ping,
        opcode::PONG => FrameKind::Pong,
        other => return protocol(ProtocolError::InvalidOpcode(other)),
    };
    let too_long = |size: u64, max_size: usize| {
        Err(WsError::Capacity(CapacityError::MessageTooLong {
            size: usize::try_from(size).unwrap_or(usize::MAX),
            max_size,
        }))
    };
    if header.payload_len > context.max_frame as u64 {
        return too_long(header.payload_len, context.max_frame);
    }
    match (context.role, header.mask.is_some()) {
        (Role::Server, false) => return protocol(ProtocolError::UnmaskedFrameFromClient),
        _ if !context.can_read => return protocol(ProtocolError::ReceivedAfterClosing),
        _ if header.reserved != 0 => return protocol(ProtocolError::NonZeroReservedBits),
        (Role::Client, true) => return protocol(ProtocolError::MaskedFrameFromServer),
        _ => {}
    }
    match kind {
        FrameKind::Close | FrameKind::Ping | FrameKind::Pong => {
            if !header.fin {
                return protocol(ProtocolError::FragmentedControlFrame);
            }
            if header.payload_len > MAX_CONTROL_PAYLOAD {
                return protocol(ProtocolError::ControlFrameTooBig);
            }
        }
        FrameKind::Continuation => {
            let Some(collected) = context.collected else {
                return protocol(ProtocolError::UnexpectedContinueFrame);
            };
            let size = collected as u64 + header.payload_len;
            if size > context.max_message as u64 {
                return too_long(size, context.max_message);
            }
        }
        FrameKind::Text | FrameKind::Binary => {
            if context.collected.is_some() {
                let data = if kind == FrameKind::Text {
                    Data::Text
                } else {
                    Data::Binary
                };
                return protocol(ProtocolError::ExpectedFragment(data));
            }
            if header.payload_len > context.max_message as u64 {
                return too_long(header.payload_len, context.max_message);
            }
        }
    }
    Ok(kind)
}

/// A Close frame's payload: none, or a code with a UTF-8 reason (RFC 6455 §5.5.1).
pub(crate) fn parse_close(payload: Bytes) -> Result<Option<CloseFrame>, WsError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WsError::Protocol(ProtocolError::InvalidCloseSequence)),
        _ => {
            let code = CloseCode::from(u16::from_be_bytes([payload[0], payload[1]]));
            let reason = Utf8Bytes::try_from(payload.slice(2..))?;
            Ok(Some(CloseFrame { code, reason }))
        }
    }
}

/// The Close a peer's Close is answered with, and reported as: its own, unless its code is
/// one an endpoint may not send, which becomes 1002 (as tungstenite answers it).
pub(crate) fn answerable_close(close: Option<CloseFrame>) -> Option<CloseFrame> {
    close.map(|frame| {
        if frame.code.is_allowed() {
            frame
        } else {
            CloseFrame {
                code: CloseCode::Protocol,
                reason: Utf8Bytes::from_static("Protocol violation"),
            }
        }
    })
}

/// A Close frame's payload for `close`.
pub(crate) fn close_payload(close: Option<&CloseFrame>) -> Vec<u8> {
    let Some(close) = close else {
        return Vec::new();
    };
    let mut payload = Vec::with_capacity(2 + close.reason.len());
    payload.extend_from_slice(&u16::from(close.code).to_be_bytes());
    payload.extend_from_slice(close.reason.as_bytes());
    payload
}

/// UTF-8 checked as a text message's fragments arrive, so a message that can never be valid
/// fails at the fragment that breaks it (Autobahn's "fail fast" cases), each byte read once.
#[derive(Debug, Default)]
pub(crate) struct TextCheck {
    /// Bytes known to be valid, or the start of a character the next fragment completes.
    checked: usize,
}

impl TextCheck {
    /// Checks what `text` gained since the last call; `last` when no fragment follows, so a
    /// character cut off at the end is an error too.
    pub fn check(&mut self, text: &[u8], last: bool) -> Result<(), WsError> {
        match std::str::from_utf8(&text[self.checked..]) {
            Ok(_) => {
                self.checked = text.len();
                Ok(())
            }
            Err(error) if error.error_len().is_none() && !last => {
                self.checked += error.valid_up_to();
                Ok(())
            }
            Err(error) => Err(WsError::Utf8(error.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(role: Role) -> ReadContext {
        ReadContext {
            role,
            can_read: true,
            collected: None,
            max_frame: 1 << 20,
            max_message: 4 << 20,
        }
    }

    fn header(bytes: &[u8]) -> Header {
        parse_header(bytes).expect("a whole header")
    }

    #[test]
    fn headers_round_trip_at_every_length_format() {
        for len in [0usize, 1, 125, 126, 127, 0xFFFF, 0x1_0000, 5 << 20] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = Vec::new();
                write_header(&mut out, opcode::BINARY, mask, len);
                let parsed = header(&out);
                assert_eq!(parsed.len, out.len(), "{len} {mask:?}");
                assert_eq!(parsed.payload_len, len as u64);
                assert_eq!(parsed.mask, mask);
                assert!(parsed.fin);
                assert_eq!(parsed.opcode, opcode::BINARY);
                assert_eq!(parsed.reserved, 0);
                for cut in 0..out.len() {
                    assert_eq!(parse_header(&out[..cut]), None, "cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn masking_twice_gives_the_payload_back_whatever_its_length() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut masked = data.clone();
            apply_mask(&mut masked, key);
            for (index, byte) in masked.iter().enumerate() {
                assert_eq!(*byte, data[index] ^ key[index % 4]);
            }
            apply_mask(&mut masked, key);
            assert_eq!(masked, data);
        }
    }

    #[test]
    fn rfc_6455_examples_decode() {
        // §5.7: a single-frame masked text message "Hello".
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let parsed = header(&frame);
        assert_eq!(
            check_header(&parsed, &context(Role::Server)).unwrap(),
            FrameKind::Text
        );
        let mut payload = frame[parsed.len..].to_vec();
        apply_mask(&mut payload, parsed.mask.unwrap());
        assert_eq!(payload, b"Hello");
        // An unmasked fragmented text message, first fragment.
        let parsed = header(&[0x01, 0x03, b'H', b'e', b'l']);
        assert!(!parsed.fin);
        assert_eq!(
            check_header(&parsed, &context(Role::Client)).unwrap(),
            FrameKind::Text
        );
    }

    #[test]
    fn frames_a_peer_may_not_send_are_refused_with_tungstenites_errors() {
        let server = context(Role::Server);
        let masked = |first: u8, len: u8| header(&[first, 0x80 | len, 0, 0, 0, 0]);
        let refused = |header: Header, context: &ReadContext| {
            check_header(&header, context)
                .expect_err("accepted")
                .to_string()
        };
        assert!(refused(masked(0x83, 0), &server).contains("opcode"));
        assert_eq!(
            refused(header(&[0x82, 0x00]), &server),
            WsError::Protocol(ProtocolError::UnmaskedFrameFromClient).to_string()
        );
        assert_eq!(
            refused(masked(0xC2, 0), &server),
            WsError::Protocol(ProtocolError::NonZeroReservedBits).to_string()
        );
        assert_eq!(
            refused(masked(0x09, 0), &server),
            WsError::Protocol(ProtocolError::FragmentedControlFrame).to_string()
        );
        let mut big_ping = Vec::new();
        write_header(&mut big_ping, opcode::PING, Some([0; 4]), 126);
        assert_eq!(
            refused(header(&big_ping), &server),
            WsError::Protocol(ProtocolError::ControlFrameTooBig).to_string()
        );
        assert_eq!(
            refused(masked(0x80, 1), &server),
            WsError::Protocol(ProtocolError::UnexpectedContinueFrame).to_string()
        );
        let collecting = ReadContext {
            collected: Some(10),
            ..server
        };
        assert_eq!(
            check_header(&masked(0x80, 1), &collecting).unwrap(),
            FrameKind::Continuation
        );
        assert!(matches!(
            check_header(&masked(0x81, 1), &collecting),
            Err(WsError::Protocol(ProtocolError::ExpectedFragment(
                Data::Text
            )))
        ));
        assert_eq!(
            refused(header(&[0x82, 0x80, 0, 0, 0, 0]), &context(Role::Client)),
            WsError::Protocol(ProtocolError::MaskedFrameFromServer).to_string()
        );
        let closed = ReadContext {
            can_read: false,
            ..server
        };
        assert_eq!(
            refused(masked(0x82, 1), &closed),
            WsError::Protocol(ProtocolError::ReceivedAfterClosing).to_string()
        );
    }

    #[test]
    fn size_limits_hold_for_frames_and_for_fragmented_messages() {
        let small = ReadContext {
            max_frame: 100,
            max_message: 150,
            ..context(Role::Client)
        };
        let frame = |first: u8, len: u16| {
            let mut out = Vec::new();
            write_header(&mut out, 0, None, usize::from(len));
            out[0] = first;
            header(&out)
        };
        assert!(check_header(&frame(0x82, 100), &small).is_ok());
        let too_big = check_header(&frame(0x82, 101), &small).unwrap_err();
        assert!(matches!(too_big, WsError::Capacity(_)), "{too_big}");
        let collecting = ReadContext {
            collected: Some(100),
            ..small
        };
        assert!(check_header(&frame(0x80, 50), &collecting).is_ok());
        let too_big = check_header(&frame(0x80, 51), &collecting).unwrap_err();
        assert!(matches!(too_big, WsError::Capacity(_)), "{too_big}");
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close(Bytes::new()).unwrap(), None);
        assert!(parse_close(Bytes::from_static(&[3])).is_err());
        let close = parse_close(Bytes::from_static(b"\x03\xe8bye"))
            .unwrap()
            .unwrap();
        assert_eq!(close.code, CloseCode::Normal);
        assert_eq!(close.reason.as_str(), "bye");
        assert!(matches!(
            parse_close(Bytes::from_static(b"\x03\xe8\xff")),
            Err(WsError::Utf8(_))
        ));
        assert_eq!(close_payload(Some(&close)), b"\x03\xe8bye");
        assert_eq!(close_payload(None), b"");
        let reserved = CloseFrame {
            code: CloseCode::from(1005),
            reason: "".into(),
        };
        assert_eq!(
            answerable_close(Some(reserved)).unwrap().code,
            CloseCode::Protocol
        );
        assert_eq!(answerable_close(Some(close.clone())), Some(close));
    }

    #[test]
    fn text_fails_at_the_fragment_that_breaks_it() {
        let euro = "€".as_bytes();
        let mut check = TextCheck::default();
        let mut text = b"price: ".to_vec();
        check.check(&text, false).unwrap();
        text.push(euro[0]);
        check
            .check(&text, false)
            .expect("a character cut between fragments");
        text.extend_from_slice(&euro[1..]);
        check.check(&text, true).unwrap();

        let mut check = TextCheck::default();
        check.check(&[b'a', euro[0]], false).unwrap();
        assert!(
            check.check(&[b'a', euro[0]], true).is_err(),
            "cut at the end"
        );
        let mut check = TextCheck::default();
        assert!(check.check(&[b'a', 0xff], false).is_err(), "never valid");
    }
}
