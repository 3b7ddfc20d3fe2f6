//! The relay's WebSocket against tokio-tungstenite's over in-memory pipes: what one sends the
//! other reads, either end, whatever the sizes, fragments and splits; the automatic answers;
//! the close handshake from either side; and that nothing stays buffered between messages.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::{Frame, FrameHeader};

use super::*;

const PIPE: usize = 256 * 1024;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Ours as `role`, tungstenite's at the other end.
async fn pair(role: Role) -> (WebSocket<DuplexStream>, WebSocketStream<DuplexStream>) {
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let peer_role = match role {
        Role::Server => Role::Client,
        Role::Client => Role::Server,
    };
    let peer = WebSocketStream::from_raw_socket(theirs, peer_role, Some(config())).await;
    (WebSocket::new(ours, role, &config(), &[]), peer)
}

async fn next<S: Stream<Item = Result<Message, WsError>> + Unpin>(
    stream: &mut S,
) -> Option<Result<Message, WsError>> {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("nothing within 5 s")
}

fn payload(len: usize) -> Bytes {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn messages_cross_both_ways_at_every_size_in_either_role() {
    for role in [Role::Server, Role::Client] {
        let (mut ours, mut theirs) = pair(role).await;
        for len in [0, 1, 125, 126, 4096, 65_535, 65_536, 600_000] {
            let data = payload(len);
            // Sent and read at once: a message larger than the pipe needs both.
            let (sent, read) =
                tokio::join!(theirs.send(Message::Binary(data.clone())), next(&mut ours));
            sent.unwrap();
            assert_eq!(read.unwrap().unwrap(), Message::Binary(data.clone()));
            let (sent, read) =
                tokio::join!(ours.send(Message::Binary(data.clone())), next(&mut theirs));
            sent.unwrap();
            assert_eq!(read.unwrap().unwrap(), Message::Binary(data));
        }
        let text = Message::text("héllo wörld €");
        theirs.send(text.clone()).await.unwrap();
        assert_eq!(next(&mut ours).await.unwrap().unwrap(), text);
        ours.send(text.clone()).await.unwrap();
        assert_eq!(next(&mut theirs).await.unwrap().unwrap(), text);
    }
}

#[tokio::test]
async fn a_burst_in_one_read_arrives_whole_and_in_order() {
    let (mut ours, mut theirs) = pair(Role::Server).await;
    for index in 0..500u32 {
        theirs
            .feed(Message::Binary(Bytes::from(index.to_be_bytes().to_vec())))
            .await
            .unwrap();
    }
    theirs.flush().await.unwrap();
    for index in 0..500u32 {
        let message = next(&mut ours).await.unwrap().unwrap();
        assert_eq!(message.into_data().as_ref(), index.to_be_bytes());
    }
}

#[tokio::test]
async fn frames_split_anywhere_are_put_back_together() {
    // A client's masked frames written one byte at a time: every header and payload is cut.
    let (ours, mut raw) = tokio::io::duplex(PIPE);
    let mut ours = WebSocket::new(ours, Role::Server, &config(), &[]);
    let mut bytes = Vec::new();
    for len in [5usize, 200, 70_000] {
        let mut frame = Frame::message(payload(len), OpCode::Data(Data::Binary), true);
        frame.header_mut().mask = Some([9, 8, 7, 6]);
        frame.format(&mut bytes).unwrap();
    }
    let writer = tokio::spawn(async move {
        for (index, byte) in bytes.iter().enumerate() {
            raw.write_all(&[*byte]).await.unwrap();
            if index % 4096 == 0 {
                tokio::task::yield_now().await;
            }
        }
        raw
    });
    for len in [5usize, 200, 70_000] {
        assert_eq!(
            next(&mut ours).await.unwrap().unwrap(),
            Message::Binary(payload(len))
        );
    }
    drop(writer.await.unwrap());
}

#[tokio::test]
async fn fragments_become_one_message() {
    let (mut ours, mut theirs) = pair(Role::Server).await;
    let fragment = |opcode, data: &'static str, fin| {
        let mut frame = Frame::message(Bytes::from_static(data.as_bytes()), opcode, fin);
        frame.header_mut().is_final = fin;
        Message::Frame(frame)
    };
    theirs
        .feed(fragment(OpCode::Data(Data::Text), "frag", false))
        .await
        .unwrap();
    // A ping between fragments is answered and delivered on its own.
    theirs
        .feed(Message::Ping(Bytes::from_static(b"p")))
        .await
        .unwrap();
    theirs
        .feed(fragment(OpCode::Data(Data::Continue), "men", false))
        .await
        .unwrap();
    theirs
        .send(fragment(OpCode::Data(Data::Continue), "ted €", true))
        .await
        .unwrap();
    assert_eq!(
        next(&mut ours).await.unwrap().unwrap(),
        Message::Ping(Bytes::from_static(b"p"))
    );
    assert_eq!(
        next(&mut ours).await.unwrap().unwrap(),
        Message::text("fragmented €")
    );
    assert_eq!(
        next(&mut theirs).await.unwrap().unwrap(),
        Message::Pong(Bytes::from_static(b"p"))
    );
}

#[tokio::test]
async fn pings_are_answered_while_reading() {
    for role in [Role::Server, Role::Client] {
        let (mut ours, mut theirs) = pair(role).await;
        theirs
            .send(Message::Ping(Bytes::from_static(b"are you there")))
            .await
            .unwrap();
        let ping = next(&mut ours).await.unwrap().unwrap();
        assert_eq!(ping, Message::Ping(Bytes::from_static(b"are you there")));
        // The pong goes out with the next read, before anything else arrives.
        let reading = tokio::spawn(async move {
            let _ = next(&mut ours).await;
        });
        let pong = next(&mut theirs).await.unwrap().unwrap();
        assert_eq!(pong, Message::Pong(Bytes::from_static(b"are you there")));
        reading.abort();
    }
}

#[tokio::test]
async fn a_close_from_the_peer_is_answered_and_ends_the_stream() {
    for role in [Role::Server, Role::Client] {
        let (mut ours, mut theirs) = pair(role).await;
        let bye = CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        };
        theirs
            .send(Message::Close(Some(bye.clone())))
            .await
            .unwrap();
        assert_eq!(
            next(&mut ours).await.unwrap().unwrap(),
            Message::Close(Some(bye.clone()))
        );
        // Sending is over, as with tungstenite; closing only flushes the answer.
        let refused = ours.send(Message::text("late")).await.unwrap_err();
        assert!(matches!(
            refused,
            WsError::Protocol(ProtocolError::SendAfterClosing)
        ));
        ours.close().await.unwrap();
        assert_eq!(
            next(&mut theirs).await.unwrap().unwrap(),
            Message::Close(Some(bye))
        );
        if role == Role::Server {
            // The server's side ends once its answer is out.
            assert!(next(&mut ours).await.is_none());
        } else {
            drop(theirs);
            assert!(next(&mut ours).await.is_none());
        }
    }
}

#[tokio::test]
async fn a_close_we_start_waits_for_the_answer_and_data_still_arrives() {
    let (mut ours, mut theirs) = pair(Role::Client).await;
    theirs.send(Message::text("in flight")).await.unwrap();
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    };
    ours.send(Message::Close(Some(bye.clone()))).await.unwrap();
    assert_eq!(
        next(&mut ours).await.unwrap().unwrap(),
        Message::text("in flight")
    );
    assert_eq!(
        next(&mut theirs).await.unwrap().unwrap(),
        Message::Close(Some(bye.clone()))
    );
    // tungstenite answered on its own; our side sees the answer, then the end.
    theirs.flush().await.unwrap();
    assert_eq!(
        next(&mut ours).await.unwrap().unwrap(),
        Message::Close(Some(bye))
    );
    drop(theirs);
    assert!(next(&mut ours).await.is_none());
}

#[tokio::test]
async fn a_peer_gone_without_a_close_is_a_reset() {
    let (mut ours, theirs) = pair(Role::Server).await;
    drop(theirs);
    let error = next(&mut ours).await.unwrap().unwrap_err();
    assert!(matches!(
        error,
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
    ));
    assert!(
        next(&mut ours).await.is_none(),
        "the stream goes on after its error"
    );
}

#[tokio::test]
async fn violations_get_tungstenites_errors() {
    // Unmasked frame to a server.
    let (ours, mut raw) = tokio::io::duplex(PIPE);
    let mut ours = WebSocket::new(ours, Role::Server, &config(), &[]);
    raw.write_all(&[0x82, 0x01, 0x00]).await.unwrap();
    let error = next(&mut ours).await.unwrap().unwrap_err();
    assert!(matches!(
        error,
        WsError::Protocol(ProtocolError::UnmaskedFrameFromClient)
    ));

    // Invalid UTF-8 in a text message: 1007's error.
    let (mut ours, mut theirs) = pair(Role::Client).await;
    let mut frame = Frame::message(
        Bytes::from_static(&[0xff, 0xfe]),
        OpCode::Data(Data::Text),
        true,
    );
    *frame.header_mut() = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    theirs.send(Message::Frame(frame)).await.unwrap();
    assert!(matches!(
        next(&mut ours).await.unwrap().unwrap_err(),
        WsError::Utf8(_)
    ));

    // A message over the limit: 1009's error, before its payload arrives.
    let small = WebSocketConfig::default()
        .max_message_size(Some(1000))
        .max_frame_size(Some(1000));
    let (ours, mut raw) = tokio::io::duplex(PIPE);
    let mut ours = WebSocket::new(ours, Role::Client, &small, &[]);
    raw.write_all(&[0x82, 126, 0x10, 0x00]).await.unwrap();
    assert!(matches!(
        next(&mut ours).await.unwrap().unwrap_err(),
        WsError::Capacity(_)
    ));
}

#[tokio::test]
async fn bytes_read_with_the_handshake_come_first() {
    let (ours, mut theirs) = tokio::io::duplex(PIPE);
    let mut ahead = Vec::new();
    Frame::message(Bytes::from_static(b"early"), OpCode::Data(Data::Text), true)
        .format(&mut ahead)
        .unwrap();
    // Half of the next frame came with the handshake too.
    let mut next_frame = Vec::new();
    Frame::message(Bytes::from_static(b"later"), OpCode::Data(Data::Text), true)
        .format(&mut next_frame)
        .unwrap();
    ahead.extend_from_slice(&next_frame[..3]);
    let mut ours = WebSocket::new(ours, Role::Client, &config(), &ahead);
    theirs.write_all(&next_frame[3..]).await.unwrap();
    assert_eq!(
        next(&mut ours).await.unwrap().unwrap(),
        Message::text("early")
    );
    assert_eq!(
        next(&mut ours).await.unwrap().unwrap(),
        Message::text("later")
    );
}

#[tokio::test]
async fn nothing_stays_buffered_between_messages() {
    let (mut ours, mut theirs) = pair(Role::Server).await;
    for len in [64, 4096, 200_000] {
        let (sent, read) =
            tokio::join!(theirs.send(Message::Binary(payload(len))), next(&mut ours));
        sent.unwrap();
        let message = read.unwrap().unwrap();
        let (sent, read) = tokio::join!(ours.send(message), next(&mut theirs));
        sent.unwrap();
        assert_eq!(read.unwrap().unwrap().len(), len);
        assert_eq!(ours.unread.capacity(), 0, "read buffer kept after {len}");
        assert_eq!(
            ours.unwritten.capacity(),
            0,
            "write buffer kept after {len}"
        );
        assert!(ours.partial.is_none());
    }
}

#[tokio::test]
async fn a_client_masks_every_frame_with_its_own_key() {
    let (ours, mut raw) = tokio::io::duplex(PIPE);
    let mut ours = WebSocket::new(ours, Role::Client, &config(), &[]);
    ours.feed(Message::text("same")).await.unwrap();
    ours.send(Message::text("same")).await.unwrap();
    let mut wire = [0u8; 20];
    raw.read_exact(&mut wire).await.unwrap();
    let first = codec::parse_header(&wire).unwrap();
    let second = codec::parse_header(&wire[10..]).unwrap();
    assert!(first.mask.is_some() && second.mask.is_some());
    assert_ne!(first.mask, second.mask, "one key for two frames");
    assert_ne!(&wire[6..10], b"same", "sent in clear");
}

mod properties {
    //! Whatever a peer sends, in whatever pieces, the WebSocket gives messages or an error and
    //! then ends: it never panics, never loops, and never hands on more than the limits allow.

    use proptest::prelude::*;

    use super::*;

    /// Frames close to valid ones (so the fuzzing reaches past the header checks), cut at
    /// random points, with random bytes between.
    fn wire() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
        let frame = (
            0u8..16,
            any::<bool>(),
            any::<bool>(),
            0usize..300,
            any::<[u8; 4]>(),
        )
            .prop_map(|(opcode, fin, masked, len, key)| {
                let mut out = Vec::new();
                codec::write_header(&mut out, opcode, masked.then_some(key), len);
                if !fin {
                    out[0] &= 0x7F;
                }
                out.extend((0..len).map(|i| (i * 31 % 256) as u8));
                out
            });
        let piece = prop_oneof![
            4 => frame,
            1 => proptest::collection::vec(any::<u8>(), 0..20),
        ];
        (
            proptest::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat()),
            proptest::collection::vec(1usize..64, 1..8),
        )
    }

    proptest! {
        #[test]
        fn any_bytes_give_messages_or_an_error_then_the_end((bytes, cuts) in wire(), server in any::<bool>()) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let (ours, mut raw) = tokio::io::duplex(1 << 16);
                let role = if server { Role::Server } else { Role::Client };
                let limits = WebSocketConfig::default()
                    .max_message_size(Some(500))
                    .max_frame_size(Some(200));
                let mut ours = WebSocket::new(ours, role, &limits, &[]);
                let writer = async move {
                    let mut rest = &bytes[..];
                    for cut in cuts.iter().cycle() {
                        if rest.is_empty() {
                            break;
                        }
                        let (piece, tail) = rest.split_at((*cut).min(rest.len()));
                        if raw.write_all(piece).await.is_err() {
                            break;
                        }
                        rest = tail;
                        tokio::task::yield_now().await;
                    }
                    drop(raw);
                };
                let reader = async {
                    let mut errors = 0;
                    while let Some(item) = next(&mut ours).await {
                        match item {
                            Ok(message) => prop_assert!(message.len() <= 500, "{} bytes", message.len()),
                            Err(_) => errors += 1,
                        }
                    }
                    prop_assert!(errors <= 1, "{errors} errors before the end");
                    Ok(())
                };
                let ((), read) = tokio::join!(writer, reader);
                read
            })?;
        }
    }
}

/// What the replay log keeps is written from a borrow: the peer reads each kind as it was sent
/// (masked, as a client's frames are), and a borrowed send after our Close is refused as an
/// owned one is.
#[tokio::test]
async fn a_borrowed_send_reads_like_an_owned_one() {
    for role in [Role::Server, Role::Client] {
        let (mut ours, mut theirs) = pair(role).await;
        let sent = [
            Message::Text("kept".into()),
            Message::Binary(payload(4096)),
            Message::Binary(Bytes::new()),
        ];
        for message in &sent {
            ours.send_borrowed(message).unwrap();
        }
        ours.flush().await.unwrap();
        for message in &sent {
            assert_eq!(&next(&mut theirs).await.unwrap().unwrap(), message);
        }
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        }));
        ours.send_borrowed(&close).unwrap();
        ours.flush().await.unwrap();
        assert_eq!(next(&mut theirs).await.unwrap().unwrap(), close);
        assert!(matches!(
            ours.send_borrowed(&Message::Text("late".into())),
            Err(WsError::Protocol(ProtocolError::SendAfterClosing))
        ));
    }
}

#[tokio::test]
async fn a_ping_behind_a_burst_of_large_frames_does_not_grow_the_write_buffer() {
    // The pump follows a burst with an ack ping; a buffer the frames filled exactly would
    // double (copying them) for the ping's few bytes.
    for role in [Role::Server, Role::Client] {
        let (mut ours, mut theirs) = pair(role).await;
        let burst: Vec<Message> = (0..4).map(|_| Message::Binary(payload(4096))).collect();
        for message in &burst {
            ours.send_borrowed(message).unwrap();
        }
        let (buffer, room) = (ours.unwritten.as_ptr(), ours.unwritten.capacity());
        // The largest control frame: the room left by the frames' own headers is smaller.
        let ping = Message::Ping(Bytes::from_static(&[7; 125]));
        ours.send_borrowed(&ping).unwrap();
        assert_eq!(
            (ours.unwritten.as_ptr(), ours.unwritten.capacity()),
            (buffer, room),
            "{role:?}: the ping grew the write buffer"
        );
        ours.flush().await.unwrap();
        for message in burst.iter().chain([&ping]) {
            assert_eq!(&next(&mut theirs).await.unwrap().unwrap(), message);
        }
    }
}
