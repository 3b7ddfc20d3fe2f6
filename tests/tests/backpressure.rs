//! Bounded buffering: a side that stops reading stalls the side writing to
//! it through TCP back-pressure instead of making the relay buffer, other clients of the same
//! relay are unaffected, and once the slow side reads again everything arrives intact.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use wsrelay_testkit::{Client, TestBackend, TestRelay, WAIT, connect, resident_bytes, round_trip};

const MIB: u64 = 1 << 20;
const MESSAGE: usize = 256 * 1024;
/// 200 MiB in all: far more than any kernel buffering between the two ends.
const MESSAGES: usize = 800;
/// Kernel socket buffers on loopback (a few MiB per socket, four sockets on the path) plus a
/// message or two in each WebSocket: anything near this is back-pressure working.
const STALL_CEILING: u64 = 64 * MIB;
const RSS_CEILING: u64 = 100 * MIB;
/// 150 MiB through a backend that reads, but slower than the client sends.
const SLOW_MESSAGES: usize = 600;
/// No progress for this long counts as stalled.
const QUIET: Duration = Duration::from_secs(1);

/// The tests measure this process's memory, which the relay shares with every test of this
/// binary: they run one at a time so one's buffers don't count against the other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Pings off, so a stalled peer is not closed as dead; messages big enough for the test.
/// `/slow` goes to the test's own pushing or non-reading backend, `/` to an echoing one.
fn config(push_or_sink: &str, echo: &TestBackend) -> String {
    format!(
        r#"
[keepalive]
ping_interval = "0s"

[limits]
max_message_size = "1MiB"

[[route]]
path = "/"
upstream = "echo"

[[route]]
path = "/slow"
upstream = "slow"

[upstream.echo]
backends = ["{}"]

[upstream.slow]
backends = ["{push_or_sink}"]
"#,
        echo.url()
    )
}

/// Message `index` of a stream: every byte is the index mod 251, so a lost, repeated,
/// reordered or merged message shows in its first or last byte or its length.
fn numbered(index: usize) -> Message {
    Message::binary(vec![(index % 251) as u8; MESSAGE])
}

fn check_numbered(index: usize, message: &Message) {
    let Message::Binary(data) = message else {
        panic!("message {index} is not binary: {message:?}");
    };
    let expected = (index % 251) as u8;
    assert_eq!(data.len(), MESSAGE, "message {index} has the wrong length");
    assert!(
        data[0] == expected && data[MESSAGE / 2] == expected && data[MESSAGE - 1] == expected,
        "message {index} has the wrong content"
    );
}

/// What a reader of a numbered stream got so far.
#[derive(Default)]
struct Received {
    messages: usize,
    bytes: u64,
}

impl Received {
    /// Checks that `message` is the next of the stream and counts it.
    fn take(&mut self, message: &Message) {
        check_numbered(self.messages, message);
        self.messages += 1;
        self.bytes += message.len() as u64;
    }
}

fn big_messages() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MESSAGE * 2))
        .max_frame_size(Some(MESSAGE * 2))
}

/// Listens on a free port for the one connection a backend of these tests serves; returns its
/// URL and the accept, to await in the backend's task.
async fn listen_once() -> (String, impl Future<Output = WebSocketStream<TcpStream>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let accept = async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio_tungstenite::accept_async_with_config(tcp, Some(big_messages()))
            .await
            .unwrap()
    };
    (url, accept)
}

/// Reads and checks `count` numbered messages, pausing `pause` after each (if any); the
/// relay's pings (keepalive, delivery acks) are skipped.
async fn read_numbered(
    socket: &mut WebSocketStream<TcpStream>,
    count: usize,
    pause: Option<Duration>,
) -> Received {
    let mut received = Received::default();
    while received.messages < count {
        let message = socket.next().await.expect("stream ended").unwrap();
        if message.is_ping() || message.is_pong() {
            continue;
        }
        received.take(&message);
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    received
}

/// Fails if the relay took more than back-pressure allows (`sent_at_stall` bytes) or grew
/// its memory while `who` was stalled.
fn assert_bounded(pusher: &str, who: &str, sent_at_stall: u64, rss_before: u64, rss_during: u64) {
    assert!(
        sent_at_stall < STALL_CEILING,
        "{pusher} pushed {} MiB at {who} that reads nothing: the relay buffers",
        sent_at_stall / MIB
    );
    assert!(
        rss_during.saturating_sub(rss_before) < RSS_CEILING,
        "memory grew by {} MiB while {who} was stalled",
        (rss_during - rss_before) / MIB
    );
}

/// Waits until `progress` has not moved for [`QUIET`] and returns its value then.
async fn wait_for_stall(what: &str, progress: &AtomicU64) -> u64 {
    let deadline = Instant::now() + WAIT + WAIT;
    let mut last = progress.load(Ordering::SeqCst);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = progress.load(Ordering::SeqCst);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= QUIET {
            return now;
        }
        assert!(Instant::now() < deadline, "{what} never stalled");
    }
}

/// A backend that accepts one connection and sends [`MESSAGES`] numbered messages as fast as
/// the relay takes them, until told to stop.
struct Pusher {
    url: String,
    /// Bytes of the messages whose `send` completed.
    sent_bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Ends once sending stops; yields the socket (kept open) and the messages sent.
    task: JoinHandle<(WebSocketStream<TcpStream>, usize)>,
}

async fn pusher() -> Pusher {
    let (url, accept) = listen_once().await;
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (bytes, stopped) = (sent_bytes.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut socket = accept.await;
        let mut sent = 0;
        while sent < MESSAGES && !stopped.load(Ordering::SeqCst) {
            socket.send(numbered(sent)).await.unwrap();
            sent += 1;
            bytes.fetch_add(MESSAGE as u64, Ordering::SeqCst);
        }
        (socket, sent)
    });
    Pusher {
        url,
        sent_bytes,
        stop,
        task,
    }
}

/// A backend that accepts one connection and does not read it until told how many
/// messages to expect; then reads and checks them and returns how many bytes it got.
struct Sink {
    url: String,
    start_reading: oneshot::Sender<usize>,
    task: JoinHandle<u64>,
}

async fn sink() -> Sink {
    let (url, accept) = listen_once().await;
    let (start_reading, expected) = oneshot::channel::<usize>();
    let task = tokio::spawn(async move {
        let mut socket = accept.await;
        let expected = expected.await.unwrap();
        read_numbered(&mut socket, expected, None).await.bytes
    });
    Sink {
        url,
        start_reading,
        task,
    }
}

/// A backend that reads [`SLOW_MESSAGES`] numbered messages slower than a client can send
/// them, and returns the bytes it got.
async fn slow_reader() -> (String, JoinHandle<u64>) {
    let (url, accept) = listen_once().await;
    let task = tokio::spawn(async move {
        let mut socket = accept.await;
        let pause = Duration::from_millis(2);
        read_numbered(&mut socket, SLOW_MESSAGES, Some(pause))
            .await
            .bytes
    });
    (url, task)
}

/// Samples this process's resident memory until aborted; the peak is in the counter.
fn sample_peak_rss() -> (Arc<AtomicU64>, JoinHandle<()>) {
    let peak = Arc::new(AtomicU64::new(resident_bytes(None)));
    let writer = peak.clone();
    let task = tokio::spawn(async move {
        loop {
            writer.fetch_max(resident_bytes(None), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (peak, task)
}

/// A relay whose `/slow` goes to `slow_url` and `/` to `echo`, and a bystander client already
/// served through `/`.
async fn relay_with_bystander(slow_url: &str, echo: &TestBackend) -> (TestRelay, Client) {
    let relay = TestRelay::start(&config(slow_url, echo), &[]).await;
    let mut bystander = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut bystander, "warm up").await, "warm up");
    (relay, bystander)
}

/// Echo round trips through the same relay while the other connection is stalled.
async fn bystander_round_trips(client: &mut Client) {
    for i in 0..100 {
        let text = format!("echo {i}");
        let reply = tokio::time::timeout(WAIT, round_trip(client, &text))
            .await
            .expect("a bystander's round trip hung while another connection was stalled");
        assert_eq!(reply, text);
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_stalls_its_backend_without_relay_buffering() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let echo = TestBackend::start("echo").await;
    let pusher = pusher().await;
    let (relay, mut bystander) = relay_with_bystander(&pusher.url, &echo).await;
    let rss_before = resident_bytes(None);

    // Handshake done, then never polled until the end of the test.
    let mut stalled = connect(&relay.url("/slow")).await;
    let sent_at_stall = wait_for_stall("the pushing backend", &pusher.sent_bytes).await;
    let rss_during = resident_bytes(None);

    assert_bounded(
        "the backend",
        "a client",
        sent_at_stall,
        rss_before,
        rss_during,
    );
    bystander_round_trips(&mut bystander).await;

    // Now read everything: what the backend sent arrives whole, in order, nothing lost.
    pusher.stop.store(true, Ordering::SeqCst);
    let mut received = Received::default();
    let sending = pusher.task;
    tokio::pin!(sending);
    let (_socket, sent) = loop {
        tokio::select! {
            done = &mut sending => break done.unwrap(),
            message = tokio::time::timeout(WAIT, stalled.next()) => {
                let message = message
                    .expect("the stalled client got nothing once it read again")
                    .expect("stream ended")
                    .unwrap();
                received.take(&message);
            }
        }
    };
    while received.messages < sent {
        let message = tokio::time::timeout(WAIT, stalled.next())
            .await
            .expect("messages the backend sent did not all arrive")
            .expect("stream ended")
            .unwrap();
        received.take(&message);
    }
    assert_eq!(received.messages, sent);
    assert_eq!(received.bytes, pusher.sent_bytes.load(Ordering::SeqCst));
    assert!(sent < MESSAGES, "the stop came too late to test anything");
}

#[tokio::test]
async fn a_backend_that_stops_reading_stalls_its_client_without_relay_buffering() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let echo = TestBackend::start("echo").await;
    let sink = sink().await;
    let (relay, mut bystander) = relay_with_bystander(&sink.url, &echo).await;
    let rss_before = resident_bytes(None);

    let mut pushing = connect(&relay.url("/slow")).await;
    let mut handed_over = 0;
    let mut completed = 0;
    while handed_over < MESSAGES {
        // `feed` only queues; the flush is what waits for the relay to take the bytes.
        pushing.feed(numbered(handed_over)).await.unwrap();
        handed_over += 1;
        match tokio::time::timeout(QUIET, pushing.flush()).await {
            Ok(flushed) => flushed.unwrap(),
            Err(_) => break,
        }
        completed += 1;
    }
    let rss_during = resident_bytes(None);

    let sent_at_stall = (completed * MESSAGE) as u64;
    assert_bounded(
        "the client",
        "a backend",
        sent_at_stall,
        rss_before,
        rss_during,
    );
    bystander_round_trips(&mut bystander).await;

    // Now the backend reads: every message handed over, the one cut short too, arrives whole.
    sink.start_reading.send(handed_over).unwrap();
    tokio::time::timeout(WAIT, pushing.flush())
        .await
        .expect("the client's last message never left once the backend read again")
        .unwrap();
    let received = tokio::time::timeout(WAIT, sink.task)
        .await
        .expect("the backend did not get every message the client sent")
        .unwrap();
    assert_eq!(received, (handed_over * MESSAGE) as u64);
}

#[tokio::test]
async fn a_backend_slower_than_its_client_keeps_relay_memory_bounded() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let echo = TestBackend::start("echo").await;
    let (url, reading) = slow_reader().await;
    let relay = TestRelay::start(&config(&url, &echo), &[]).await;
    let rss_before = resident_bytes(None);
    let (peak, sampler) = sample_peak_rss();

    // The relay is back-pressured the whole time: whatever it keeps per message it has
    // passed on (copies for a replay, say) must not pile up.
    let mut client = connect(&relay.url("/slow")).await;
    for index in 0..SLOW_MESSAGES {
        tokio::time::timeout(WAIT, client.send(numbered(index)))
            .await
            .expect("a send hung although the backend keeps reading")
            .unwrap();
    }
    let received = tokio::time::timeout(WAIT, reading)
        .await
        .expect("the backend did not get every message")
        .unwrap();
    sampler.abort();

    assert_eq!(received, (SLOW_MESSAGES * MESSAGE) as u64);
    let growth = peak.load(Ordering::SeqCst).saturating_sub(rss_before);
    assert!(
        growth < STALL_CEILING,
        "memory grew by {} MiB while {} MiB went through a slow backend",
        growth / MIB,
        received / MIB
    );
}
