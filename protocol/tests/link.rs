//! The link engine over real sockets: two ends of a mux link on 127.0.0.1, or one end and a
//! hand-driven raw WebSocket peer that sends exactly the bytes a test needs.
//!
//! No test asserts on elapsed time: waits are bounded by generous deadlines, and assertions are
//! about what arrived (progress), not how fast.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use wsrelay_protocol::link::{IncomingStream, MuxStream};
use wsrelay_protocol::{
    Frame, Hello, Limits, Link, LinkConfig, LinkError, LinkHandle, LinkRole, OpenError,
    OpenRequest, Side, decode_all, encode_into,
};

/// Every wait in these tests ends by this deadline; reaching it is a failure, not a timing
/// measurement.
const DEADLINE: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("gave up waiting for {what}"),
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// One end of a link: its handle and its spawned driver.
struct End {
    handle: LinkHandle,
    driver: JoinHandle<LinkError>,
}

impl End {
    async fn ended(self) -> LinkError {
        within("the link driver to end", self.driver)
            .await
            .expect("driver task")
    }
}

/// A raw WebSocket pair over 127.0.0.1: (client side, server side).
async fn ws_pair() -> (WebSocketStream<TcpStream>, WebSocketStream<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tokio_tungstenite::accept_async(tcp).await.unwrap()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (client, _) = tokio_tungstenite::client_async(format!("ws://{addr}/link"), tcp)
        .await
        .unwrap();
    (client, server.await.unwrap())
}

/// A link over real sockets: (initiator, acceptor).
async fn link_pair(initiator: LinkConfig, acceptor: LinkConfig) -> (End, End) {
    let (client, server) = ws_pair().await;
    let (a, b) = tokio::join!(
        Link::establish(client, LinkRole::Initiator, initiator),
        Link::establish(server, LinkRole::Acceptor, acceptor),
    );
    let (ih, id) = a.expect("initiator establishes");
    let (ah, ad) = b.expect("acceptor establishes");
    (
        End {
            handle: ih,
            driver: tokio::spawn(id),
        },
        End {
            handle: ah,
            driver: tokio::spawn(ad),
        },
    )
}

async fn default_pair() -> (End, End) {
    link_pair(LinkConfig::default(), LinkConfig::default()).await
}

/// Echoes every message of `stream` until it closes.
async fn echo(mut stream: MuxStream) {
    while let Some(Ok(msg)) = stream.next().await {
        match msg {
            Message::Close(_) => break,
            msg => {
                if stream.send(msg).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Accepts every stream on `handle` and echoes it.
fn spawn_echo_acceptor(handle: LinkHandle) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(incoming) = handle.accept().await {
            tokio::spawn(echo(incoming.accept(None)));
        }
    })
}

fn text(s: &str) -> Message {
    Message::text(s.to_owned())
}

async fn next_msg(stream: &mut MuxStream) -> Message {
    within("a message", stream.next())
        .await
        .expect("stream ended early")
        .expect("stream failed")
}

fn close_code(msg: &Message) -> Option<u16> {
    match msg {
        Message::Close(Some(f)) => Some(f.code.into()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_accept_reject_round_trip() {
    let (init, acc) = default_pair().await;
    let acceptor = acc.handle.clone();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(incoming) = acceptor.accept().await {
            seen.push((
                incoming.id,
                incoming.path.clone(),
                incoming.query.clone(),
                incoming.headers.clone(),
                incoming.client_addr.clone(),
                incoming.resumed,
            ));
            if incoming.path == "/forbidden" {
                incoming.reject(403, "not for you");
            } else {
                assert_eq!(incoming.header("X-Token"), Some(&b"t\xff"[..]));
                tokio::spawn(echo(incoming.accept(Some("chat.v1".into()))));
            }
            if seen.len() == 2 {
                return seen;
            }
        }
        seen
    });

    let mut req = OpenRequest::new("/chat/room1?user=ann");
    req.headers = vec![("x-token".into(), b"t\xff".to_vec())];
    req.client_addr = "203.0.113.7:51234".into();
    req.resumed = true;
    let mut stream = init.handle.open(req).await.expect("accepted");
    assert_eq!(stream.protocol(), Some("chat.v1"));
    stream.send(text("hello")).await.unwrap();
    stream
        .send(Message::binary(Bytes::from_static(&[0, 1, 2])))
        .await
        .unwrap();
    // Ping/Pong are link-level: accepted and ignored on a stream.
    stream.send(Message::Ping(Bytes::new())).await.unwrap();
    assert_eq!(next_msg(&mut stream).await, text("hello"));
    assert_eq!(
        next_msg(&mut stream).await,
        Message::binary(Bytes::from_static(&[0, 1, 2]))
    );

    let rejected = init.handle.open(OpenRequest::new("/forbidden")).await;
    assert_eq!(
        rejected.unwrap_err(),
        OpenError::Rejected {
            status: 403,
            reason: "not for you".into()
        }
    );

    let seen = within("the acceptor", server).await.unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].1, "/chat/room1");
    assert_eq!(seen[0].2, "user=ann");
    assert_eq!(seen[0].3, vec![("x-token".to_owned(), b"t\xff".to_vec())]);
    assert_eq!(seen[0].4, "203.0.113.7:51234");
    assert!(seen[0].5);
    assert_eq!(seen[1].1, "/forbidden");
    assert!(!seen[1].5);
    assert!(seen[1].0 > seen[0].0);

    // Close with a code: the echo side answers with the same code, then the stream ends.
    stream
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    let closing = next_msg(&mut stream).await;
    assert_eq!(close_code(&closing), Some(1001));
    assert!(within("end of stream", stream.next()).await.is_none());
    assert!(matches!(
        stream.send(text("late")).await,
        Err(tungstenite::Error::AlreadyClosed)
    ));
    eventually("both ends to retire the streams", || {
        init.handle.open_streams() == 0 && acc.handle.open_streams() == 0
    })
    .await;
    assert!(!init.handle.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_streams_each_get_their_messages_once_and_in_order() {
    const STREAMS: usize = 1000;
    const MESSAGES: usize = 20;
    let (init, acc) = default_pair().await;
    spawn_echo_acceptor(acc.handle.clone());

    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let handle = init.handle.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = handle
                .open(OpenRequest::new(&format!("/s/{i}")))
                .await
                .expect("open");
            let id = stream.id();
            let (mut tx, mut rx) = (&mut stream).split();
            let writer = async {
                for j in 0..MESSAGES {
                    tx.send(text(&format!("{i}:{j}"))).await.unwrap();
                }
            };
            let reader = async {
                let mut got = Vec::new();
                while got.len() < MESSAGES {
                    match rx.next().await {
                        Some(Ok(Message::Text(t))) => got.push(t.to_string()),
                        other => panic!("stream {i}: unexpected {other:?}"),
                    }
                }
                got
            };
            let ((), got) = tokio::join!(writer, reader);
            let want: Vec<String> = (0..MESSAGES).map(|j| format!("{i}:{j}")).collect();
            assert_eq!(got, want, "stream {i}");
            tx.close().await.unwrap();
            id
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(
            within("a stream's exchange", task)
                .await
                .expect("stream task"),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), STREAMS, "every stream got its own id");
    assert!(ids[0] >= 1);
    eventually("all streams to retire", || {
        init.handle.open_streams() == 0 && acc.handle.open_streams() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_is_not_read_stops_only_itself() {
    const WINDOW: u32 = 64 << 10;
    const MSG: usize = 1024;
    let config = LinkConfig {
        max_frame: 16 << 10,
        initial_window: WINDOW,
        ..LinkConfig::default()
    };
    let (init, acc) = link_pair(config.clone(), config).await;

    let acceptor = acc.handle.clone();
    let (stuck_tx, stuck_rx) = tokio::sync::oneshot::channel::<MuxStream>();
    tokio::spawn(async move {
        let mut stuck_tx = Some(stuck_tx);
        while let Some(incoming) = acceptor.accept().await {
            if incoming.path == "/stuck" {
                // Accepted but not read until the test says so.
                let _ = stuck_tx.take().unwrap().send(incoming.accept(None));
            } else {
                tokio::spawn(echo(incoming.accept(None)));
            }
        }
    });

    let mut stuck = init.handle.open(OpenRequest::new("/stuck")).await.unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let sent2 = Arc::clone(&sent);
    let total = 3 * WINDOW as usize / MSG;
    let writer = tokio::spawn(async move {
        for _ in 0..total {
            stuck
                .send(Message::binary(vec![7u8; MSG]))
                .await
                .expect("send on the stuck stream");
            sent2.fetch_add(1, Ordering::SeqCst);
        }
        stuck
    });
    let window_msgs = WINDOW as usize / MSG;
    eventually("the stuck stream to use its whole window", || {
        sent.load(Ordering::SeqCst) >= window_msgs
    })
    .await;

    // Another stream on the same link moves far more than a window meanwhile.
    let mut other = init.handle.open(OpenRequest::new("/other")).await.unwrap();
    for i in 0..(4 * window_msgs) {
        other.send(Message::binary(vec![1u8; MSG])).await.unwrap();
        let back = next_msg(&mut other).await;
        assert_eq!(back.len(), MSG, "round trip {i}");
    }
    assert_eq!(
        sent.load(Ordering::SeqCst),
        window_msgs,
        "the unread stream sent exactly its window and waits for credit"
    );

    // Reading the stuck stream returns credit and lets its writer finish.
    let mut stuck_server = within("the stuck stream", stuck_rx).await.unwrap();
    let mut received = 0;
    while received < total {
        let msg = next_msg(&mut stuck_server).await;
        assert_eq!(msg.len(), MSG);
        received += 1;
    }
    within("the stuck writer", writer).await.unwrap();
    assert_eq!(sent.load(Ordering::SeqCst), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_bigger_than_the_remaining_credit_waits_for_the_window() {
    // max_frame == initial_window: after one small message the credit is below a maximal
    // message until the receiver returns it all.
    let config = LinkConfig {
        max_frame: 64 << 10,
        initial_window: 64 << 10,
        ..LinkConfig::default()
    };
    let (init, acc) = link_pair(config.clone(), config).await;
    spawn_echo_acceptor(acc.handle.clone());
    let mut stream = init.handle.open(OpenRequest::new("/big")).await.unwrap();
    for round in 0..5 {
        stream.send(Message::binary(vec![1u8; 1])).await.unwrap();
        stream
            .send(Message::binary(vec![2u8; 64 << 10]))
            .await
            .unwrap();
        assert_eq!(next_msg(&mut stream).await.len(), 1, "round {round}");
        assert_eq!(next_msg(&mut stream).await.len(), 64 << 10, "round {round}");
    }
    // A message over the peer's max_frame is refused locally.
    let err = stream
        .send(Message::binary(vec![0u8; (64 << 10) + 1]))
        .await
        .unwrap_err();
    assert!(matches!(err, tungstenite::Error::Capacity(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_link_fails_every_stream_and_open() {
    let (init, acc) = default_pair().await;
    spawn_echo_acceptor(acc.handle.clone());
    let mut streams = Vec::new();
    for i in 0..10 {
        let mut s = init
            .handle
            .open(OpenRequest::new(&format!("/k/{i}")))
            .await
            .unwrap();
        s.send(text("ping")).await.unwrap();
        assert_eq!(next_msg(&mut s).await, text("ping"));
        streams.push(s);
    }
    // Kill the acceptor's end: its driver (and socket) is dropped without a close frame.
    acc.driver.abort();
    assert_eq!(acc.handle.closed().await, LinkError::Aborted);

    for s in &mut streams {
        match within("the stream's error", s.next()).await {
            Some(Err(tungstenite::Error::Io(e))) => {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
                assert!(e.to_string().contains("link"), "{e}");
            }
            other => panic!("expected an aborted stream, got {other:?}"),
        }
        assert!(within("end of stream", s.next()).await.is_none());
        assert!(s.send(text("late")).await.is_err());
    }
    let err = init
        .handle
        .open(OpenRequest::new("/after"))
        .await
        .unwrap_err();
    assert!(matches!(err, OpenError::Link(_)), "{err:?}");
    assert!(init.handle.is_closed());
    let why = init.ended().await;
    assert!(matches!(why, LinkError::Io { .. }), "{why:?}");
}

/// A hand-driven peer: a raw WebSocket that has exchanged Hellos with a real link end.
struct RawPeer {
    ws: WebSocketStream<TcpStream>,
}

impl RawPeer {
    async fn send_frames(&mut self, frames: &[Frame]) {
        let mut buf = Vec::new();
        for f in frames {
            encode_into(f, &mut buf);
        }
        self.ws.send(Message::binary(buf)).await.unwrap();
    }

    /// Reads until a close frame and returns its code (and reason); frames are collected.
    async fn read_until_close(&mut self) -> (Vec<Frame>, u16, String) {
        let mut frames = Vec::new();
        loop {
            match within("a message from the link", self.ws.next()).await {
                Some(Ok(Message::Binary(b))) => {
                    for f in decode_all(b, &Limits::DEFAULT) {
                        frames.push(f.unwrap());
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    // Send the reply tungstenite queued, completing the closing handshake.
                    let _ = self.ws.flush().await;
                    let f = f.expect("close frame with a code");
                    return (frames, f.code.into(), f.reason.to_string());
                }
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// The next batch of frames, `Window`s included.
    async fn next_frames_with_windows(&mut self) -> Vec<Frame> {
        loop {
            match within("frames from the link", self.ws.next()).await {
                Some(Ok(Message::Binary(b))) => {
                    return decode_all(b, &Limits::DEFAULT)
                        .map(Result::unwrap)
                        .collect();
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected frames, got {other:?}"),
            }
        }
    }

    /// The next batch of frames other than `Window`: a consumer returns credit whenever it
    /// catches up, so when one comes depends on the scheduler.
    async fn next_frames(&mut self) -> Vec<Frame> {
        loop {
            let frames: Vec<Frame> = self
                .next_frames_with_windows()
                .await
                .into_iter()
                .filter(|f| !matches!(f, Frame::Window { .. }))
                .collect();
            if !frames.is_empty() {
                return frames;
            }
        }
    }
}

/// Reads the peer's next batch of frames and asserts that it matches `pattern`.
macro_rules! assert_next_frames {
    ($peer:expr, $pattern:pat $(if $guard:expr)?) => {{
        let frames = $peer.next_frames().await;
        assert!(matches!(&frames[..], $pattern $(if $guard)?), "{frames:?}");
    }};
}

/// A real acceptor end and a raw initiator peer.
async fn raw_initiator(config: LinkConfig) -> (RawPeer, End) {
    let (client, server) = ws_pair().await;
    let accept = tokio::spawn(Link::establish(server, LinkRole::Acceptor, config));
    let mut peer = RawPeer { ws: client };
    peer.send_frames(&[Frame::Hello(Hello::new(1 << 20, 4 << 20))])
        .await;
    assert_next_frames!(peer, [Frame::Hello(_)]);
    let (handle, driver) = accept.await.unwrap().expect("acceptor establishes");
    (
        peer,
        End {
            handle,
            driver: tokio::spawn(driver),
        },
    )
}

fn open_frame(stream: u64, path: &str) -> Frame {
    Frame::Open {
        stream,
        path: path.into(),
        query: String::new(),
        headers: Vec::new(),
        client_addr: "127.0.0.1:1".into(),
        resumed: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bytes_close_the_link_with_1002() {
    let (mut peer, end) = raw_initiator(LinkConfig::default()).await;
    // Open a stream and accept it, so we can watch a stream learn about the failure.
    peer.send_frames(&[open_frame(1, "/x")]).await;
    let incoming: IncomingStream = within("the Open", end.handle.accept()).await.unwrap();
    let mut stream = incoming.accept(None);
    assert_next_frames!(peer, [Frame::Accept { stream: 1, .. }]);

    peer.ws
        .send(Message::binary(vec![0x42, 0x00, 0x01]))
        .await
        .unwrap();
    let (_, code, reason) = peer.read_until_close().await;
    assert_eq!(code, 1002);
    assert!(reason.contains("unknown frame type tag 0x42"), "{reason}");
    let why = end.handle.closed().await;
    match within("the stream's error", stream.next()).await {
        Some(Err(tungstenite::Error::Io(e))) => {
            assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
            assert!(e.to_string().contains("unknown frame type tag 0x42"), "{e}");
        }
        other => panic!("expected the stream to fail, got {other:?}"),
    }
    assert!(
        within("the next accept", end.handle.accept())
            .await
            .is_none()
    );
    drop(peer);
    let returned = end.ended().await;
    assert_eq!(returned, why);
    assert!(
        matches!(&returned, LinkError::Protocol { reason } if reason.contains("0x42")),
        "{returned:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_are_named_in_the_1002_reason() {
    async fn violation(frames: Vec<Message>, expect: &str) {
        let (mut peer, end) = raw_initiator(LinkConfig {
            initial_window: 1 << 20,
            ..LinkConfig::default()
        })
        .await;
        let acceptor = end.handle.clone();
        tokio::spawn(async move {
            while let Some(s) = acceptor.accept().await {
                // Accept and hold without reading.
                let s = s.accept(None);
                tokio::spawn(async move {
                    let _s = s;
                    std::future::pending::<()>().await;
                });
            }
        });
        for m in frames {
            peer.ws.send(m).await.unwrap();
        }
        let (_, code, reason) = peer.read_until_close().await;
        assert_eq!(code, 1002, "{expect}");
        assert!(
            reason.contains(expect),
            "{reason:?} should mention {expect:?}"
        );
        let why = end.ended().await;
        assert!(matches!(why, LinkError::Protocol { .. }), "{why:?}");
    }
    fn msg(frames: &[Frame]) -> Message {
        let mut buf = Vec::new();
        for f in frames {
            encode_into(f, &mut buf);
        }
        Message::binary(buf)
    }
    let data = |stream, n: usize| Frame::Data {
        stream,
        text: false,
        payload: Bytes::from(vec![0u8; n]),
    };
    violation(vec![Message::text("hi")], "text message").await;
    violation(vec![msg(&[data(5, 1)])], "never opened").await;
    violation(
        vec![msg(&[open_frame(3, "/a")]), msg(&[open_frame(3, "/b")])],
        "does not increase",
    )
    .await;
    violation(
        vec![msg(&[open_frame(1, "/a")]), msg(&[open_frame(1, "/b")])],
        "does not increase",
    )
    .await;
    // Credit overrun: the acceptor granted 1 MiB; 1 MiB + 1 byte crosses it.
    let mut frames = vec![msg(&[open_frame(1, "/a")])];
    // Give the acceptor time to accept before data arrives: data before Accept is an error of
    // its own, so wait for the Accept frame in the helper instead.
    frames.push(msg(&[data(1, 1 << 20)]));
    frames.push(msg(&[data(1, 1)]));
    let (mut peer, end) = raw_initiator(LinkConfig {
        initial_window: 1 << 20,
        ..LinkConfig::default()
    })
    .await;
    let acceptor = end.handle.clone();
    let hold = tokio::spawn(async move {
        let s = acceptor.accept().await.unwrap().accept(None);
        std::future::pending::<()>().await;
        drop(s);
    });
    peer.ws.send(frames.remove(0)).await.unwrap();
    assert_next_frames!(peer, [Frame::Accept { stream: 1, .. }]);
    for m in frames {
        peer.ws.send(m).await.unwrap();
    }
    let (_, code, reason) = peer.read_until_close().await;
    assert_eq!(code, 1002);
    assert!(reason.contains("exceeds its remaining credit"), "{reason}");
    hold.abort();
    assert!(matches!(end.ended().await, LinkError::Protocol { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_refuses_new_streams_and_lets_existing_ones_finish() {
    let (init, acc) = default_pair().await;
    spawn_echo_acceptor(acc.handle.clone());
    let mut s = init.handle.open(OpenRequest::new("/keep")).await.unwrap();

    acc.handle.go_away("maintenance");
    eventually("the initiator to see GoAway", || {
        init.handle.is_going_away()
    })
    .await;
    assert_eq!(
        init.handle
            .open(OpenRequest::new("/new"))
            .await
            .unwrap_err(),
        OpenError::GoingAway
    );
    // The existing stream still works.
    s.send(text("still here")).await.unwrap();
    assert_eq!(next_msg(&mut s).await, text("still here"));
    assert!(!init.handle.is_closed());

    // When it ends, the link closes by itself.
    s.close().await.unwrap();
    assert_eq!(close_code(&next_msg(&mut s).await), Some(1000));
    let acc_why = acc.ended().await;
    let init_why = init.ended().await;
    assert_eq!(
        acc_why,
        LinkError::GoAway {
            side: Side::Local,
            reason: "maintenance".into()
        }
    );
    assert_eq!(
        init_why,
        LinkError::GoAway {
            side: Side::Remote,
            reason: "maintenance".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_after_goaway_is_rejected_with_503() {
    let (mut peer, end) = raw_initiator(LinkConfig::default()).await;
    peer.send_frames(&[open_frame(1, "/one")]).await;
    let one = within("the first Open", end.handle.accept())
        .await
        .unwrap()
        .accept(None);
    assert_next_frames!(peer, [Frame::Accept { stream: 1, .. }]);
    end.handle.go_away("draining");
    assert_next_frames!(peer, [Frame::GoAway { reason }] if reason == "draining");
    peer.send_frames(&[open_frame(2, "/two")]).await;
    assert_next_frames!(
        peer,
        [Frame::Reject {
            stream: 2,
            status: 503,
            ..
        }]
    );
    // Dropping the last stream closes it (1001); the peer's answering Close ends the link.
    drop(one);
    assert_next_frames!(
        peer,
        [Frame::Close {
            stream: 1,
            code: 1001,
            ..
        }]
    );
    peer.send_frames(&[Frame::Close {
        stream: 1,
        code: 1001,
        reason: String::new(),
    }])
    .await;
    let (_, code, _) = peer.read_until_close().await;
    assert_eq!(code, 1001);
    assert!(matches!(
        end.ended().await,
        LinkError::GoAway {
            side: Side::Local,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_ids_increase_and_are_never_reused() {
    let (init, acc) = default_pair().await;
    let acceptor = acc.handle.clone();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Some(incoming) = acceptor.accept().await {
            seen2.lock().unwrap().push(incoming.id);
            if incoming.path.ends_with("/no") {
                incoming.reject(404, "no");
            } else {
                tokio::spawn(echo(incoming.accept(None)));
            }
        }
    });
    let mut ids = Vec::new();
    for i in 0..60 {
        let path = if i % 3 == 0 { "/x/no" } else { "/x/yes" };
        match init.handle.open(OpenRequest::new(path)).await {
            Ok(mut s) => {
                ids.push(s.id());
                s.send(text("x")).await.unwrap();
                assert_eq!(next_msg(&mut s).await, text("x"));
                // Alternate a clean close and a drop (Close 1001).
                if i % 2 == 0 {
                    s.close().await.unwrap();
                    assert!(close_code(&next_msg(&mut s).await).is_some());
                }
            }
            Err(OpenError::Rejected { status: 404, .. }) => {}
            Err(e) => panic!("open {i}: {e}"),
        }
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    eventually("the acceptor to see all 60 opens", || {
        seen.lock().unwrap().len() == 60
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen[0], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_closes_it_with_1001() {
    let (init, acc) = default_pair().await;
    let acceptor = acc.handle.clone();
    let server = tokio::spawn(async move { acceptor.accept().await.unwrap().accept(None) });
    let s = within("open", init.handle.open(OpenRequest::new("/drop")))
        .await
        .unwrap();
    let mut server_side = within("accept", server).await.unwrap();
    drop(s);
    let msg = next_msg(&mut server_side).await;
    assert_eq!(close_code(&msg), Some(1001), "{msg:?}");
    assert!(within("end of stream", server_side.next()).await.is_none());
    eventually("both ends to retire the stream", || {
        init.handle.open_streams() == 0 && acc.handle.open_streams() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_keeps_the_link_until_the_last_stream_ends() {
    let (init, acc) = default_pair().await;
    spawn_echo_acceptor(acc.handle.clone());
    let mut s = init.handle.open(OpenRequest::new("/last")).await.unwrap();
    let End { handle, driver } = init;
    drop(handle);
    // The stream still works without any handle.
    for i in 0..10 {
        s.send(text(&format!("m{i}"))).await.unwrap();
        assert_eq!(next_msg(&mut s).await, text(&format!("m{i}")));
    }
    assert!(!driver.is_finished());
    s.close().await.unwrap();
    assert_eq!(close_code(&next_msg(&mut s).await), Some(1000));
    let why = within("the released link", driver).await.unwrap();
    assert_eq!(why, LinkError::Released);
    let acc_why = acc.ended().await;
    assert_eq!(
        acc_why,
        LinkError::Closed {
            code: 1000,
            reason: "link no longer used".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_times_out() {
    let config = LinkConfig {
        ping_interval: Duration::from_millis(100),
        pong_timeout: Duration::from_millis(200),
        ..LinkConfig::default()
    };
    let (peer, end) = raw_initiator(config).await;
    // The raw peer never reads again, so it never answers the link's pings.
    let why = end.ended().await;
    assert_eq!(why, LinkError::Timeout);
    drop(peer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_hello_is_refused() {
    let (mut client, server) = ws_pair().await;
    let accept = tokio::spawn(Link::establish(
        server,
        LinkRole::Acceptor,
        LinkConfig::default(),
    ));
    let mut buf = Vec::new();
    encode_into(&open_frame(1, "/x"), &mut buf);
    client.send(Message::binary(buf)).await.unwrap();
    // Keep reading, so the acceptor's close (1002) is answered.
    let reader = tokio::spawn(async move {
        let mut close = None;
        while let Some(Ok(msg)) = client.next().await {
            if let Message::Close(Some(f)) = msg {
                close = Some(u16::from(f.code));
            }
        }
        close
    });
    let err = within("establish", accept).await.unwrap().unwrap_err();
    assert_eq!(within("the close", reader).await.unwrap(), Some(1002));
    assert!(
        matches!(&err, LinkError::Protocol { reason } if reason.contains("not Hello")),
        "{err:?}"
    );
    // A bad local config is refused before anything is sent.
    let (client, _server) = ws_pair().await;
    let err = Link::establish(
        client,
        LinkRole::Initiator,
        LinkConfig {
            max_frame: 2048,
            initial_window: 1024,
            ..LinkConfig::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, LinkError::Config { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_text_message_closes_only_that_stream_with_1007() {
    let (mut peer, end) = raw_initiator(LinkConfig::default()).await;
    peer.send_frames(&[open_frame(1, "/bad"), open_frame(2, "/good")])
        .await;
    let mut bad = within("the first Open", end.handle.accept())
        .await
        .unwrap()
        .accept(None);
    let mut good = within("the second Open", end.handle.accept())
        .await
        .unwrap()
        .accept(None);
    let mut accepted = Vec::new();
    while accepted.len() < 2 {
        accepted.extend(peer.next_frames().await);
    }
    let text_data = |stream, payload: &'static [u8]| Frame::Data {
        stream,
        text: true,
        payload: Bytes::from_static(payload),
    };
    peer.send_frames(&[
        text_data(1, b"ok"),
        text_data(1, b"\xff\xfe"),
        text_data(2, b"fine"),
    ])
    .await;
    assert_eq!(next_msg(&mut bad).await, text("ok"));
    assert_eq!(close_code(&next_msg(&mut bad).await), Some(1007));
    assert!(within("end of stream", bad.next()).await.is_none());
    assert_eq!(next_msg(&mut good).await, text("fine"));
    assert_next_frames!(
        peer,
        [Frame::Close {
            stream: 1,
            code: 1007,
            ..
        }]
    );
    assert!(!end.handle.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_catches_up_returns_all_its_credit_at_once() {
    // A 4 MiB window: small messages never reach the half-window batch, yet a sender must
    // learn that they were consumed (a relay moving a client waits for exactly that).
    let (mut peer, end) = raw_initiator(LinkConfig::default()).await;
    peer.send_frames(&[open_frame(1, "/chat")]).await;
    let mut stream = within("the Open", end.handle.accept())
        .await
        .unwrap()
        .accept(None);
    assert_next_frames!(peer, [Frame::Accept { stream: 1, .. }]);
    let data = |payload: &'static [u8]| Frame::Data {
        stream: 1,
        text: true,
        payload: Bytes::from_static(payload),
    };
    peer.send_frames(&[data(b"hello"), data(b"world!")]).await;
    assert_eq!(next_msg(&mut stream).await, text("hello"));
    assert_eq!(next_msg(&mut stream).await, text("world!"));
    // Nothing more to read: the poll that finds the queue empty returns the 11 bytes.
    let nothing = stream.next().now_or_never();
    assert!(nothing.is_none(), "{nothing:?}");
    let mut returned = 0;
    while returned < 11 {
        for frame in peer.next_frames_with_windows().await {
            match frame {
                Frame::Window { stream: 1, credit } => returned += credit,
                other => panic!("expected a Window, got {other:?}"),
            }
        }
    }
    assert_eq!(returned, 11);
}

#[tokio::test]
async fn a_burst_of_data_goes_out_in_messages_of_at_most_16_kib() {
    // 8 streams queue 8 KiB each before the driver runs (one thread: it runs when this task
    // waits), so the driver finds 64 KiB to send at once.
    let (mut peer, end) = raw_initiator(LinkConfig::default()).await;
    let streams: Vec<u64> = (1..=8).collect();
    let opens: Vec<Frame> = streams.iter().map(|&id| open_frame(id, "/chat")).collect();
    peer.send_frames(&opens).await;
    let mut accepted = Vec::new();
    for _ in &streams {
        let incoming = within("an Open", end.handle.accept()).await.unwrap();
        accepted.push(incoming.accept(None));
    }
    let mut accepts = 0;
    while accepts < streams.len() {
        accepts += peer
            .next_frames()
            .await
            .iter()
            .filter(|f| matches!(f, Frame::Accept { .. }))
            .count();
    }
    for stream in &mut accepted {
        for _ in 0..8 {
            stream.feed(Message::binary(vec![7u8; 1024])).await.unwrap();
        }
        // Every message is queued for the driver; none has been sent.
        stream
            .flush()
            .now_or_never()
            .expect("queued at once")
            .unwrap();
    }
    let mut received = 0;
    while received < 64 * 1024 {
        match within("frames from the link", peer.ws.next()).await {
            Some(Ok(Message::Binary(message))) => {
                assert!(message.len() <= 16 * 1024, "a {} byte batch", message.len());
                for frame in decode_all(message, &Limits::DEFAULT) {
                    if let Frame::Data { payload, .. } = frame.unwrap() {
                        received += payload.len();
                    }
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected frames, got {other:?}"),
        }
    }
    // A frame larger than a batch goes in a message of its own, between the small ones.
    accepted[0]
        .feed(Message::binary(vec![1u8; 100]))
        .await
        .unwrap();
    accepted[1]
        .feed(Message::binary(vec![2u8; 40_000]))
        .await
        .unwrap();
    accepted[2]
        .feed(Message::binary(vec![3u8; 100]))
        .await
        .unwrap();
    for stream in &mut accepted[..3] {
        stream
            .flush()
            .now_or_never()
            .expect("queued at once")
            .unwrap();
    }
    let mut sizes = Vec::new();
    while sizes.len() < 3 {
        match within("frames from the link", peer.ws.next()).await {
            Some(Ok(Message::Binary(message))) => {
                let data: Vec<(u64, usize)> = decode_all(message.clone(), &Limits::DEFAULT)
                    .filter_map(|frame| match frame.unwrap() {
                        Frame::Data {
                            stream, payload, ..
                        } => Some((stream, payload.len())),
                        _ => None,
                    })
                    .collect();
                if data.iter().any(|&(_, len)| len == 40_000) {
                    assert_eq!(data, [(2, 40_000)], "the large frame shares its message");
                    assert!(message.len() < 40_100, "a {} byte message", message.len());
                }
                sizes.extend(data);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected frames, got {other:?}"),
        }
    }
    assert_eq!(sizes, [(1, 100), (2, 40_000), (3, 100)]);
}
