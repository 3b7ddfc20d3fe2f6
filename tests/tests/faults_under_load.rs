//! Faults that only show under load, each with the answer it gets: a flood of Close frames and
//! of clients that connect and leave at once, backends killed with `kill -9` at random while
//! clients talk, and many clients that stop reading while their backends keep sending. (One
//! fault at a time: `faults.rs`, `limits.rs`, `handshake.rs`, `keepalive.rs`.)

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use wsrelay_testkit::{
    RawClient, RelayProcess, TempDir, TestBackend, TestRelay, WAIT, connect, echo_backend_binary,
    resident_bytes, round_trip, unused_addr, wait_until,
};

#[tokio::test]
async fn a_close_flood_is_answered_once_and_a_connect_and_leave_flood_leaves_nothing_behind() {
    let backend = TestBackend::start("echo").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let mut bystander = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut bystander, "before").await, "before");

    // One client writes a thousand Close frames without waiting for an answer.
    let mut flooder = RawClient::connect(relay.addr(), "/").await;
    for _ in 0..1000 {
        flooder.send_frame(0x88, &1000u16.to_be_bytes(), true).await;
    }
    assert_eq!(
        flooder.close_code().await,
        Some(1000),
        "one close answers the first"
    );

    // Three hundred clients connect and close at once.
    let url = relay.url("/");
    let leavers: Vec<_> = (0..300)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut client = connect(&url).await;
                client.close(None).await.unwrap();
                while let Some(Ok(_)) = client.next().await {}
            })
        })
        .collect();
    for leaver in leavers {
        leaver.await.unwrap();
    }
    assert_eq!(round_trip(&mut bystander, "after").await, "after");
    wait_until("only the bystander's backend leg to stay open", || {
        backend.open() == 1
    })
    .await;
}

/// An echo backend in a process of its own, killed with SIGKILL and started again on its port.
struct EchoProcess {
    addr: SocketAddr,
    child: Option<Child>,
}

impl EchoProcess {
    async fn start(addr: SocketAddr) -> EchoProcess {
        let mut echo = EchoProcess { addr, child: None };
        echo.restart().await;
        echo
    }

    async fn restart(&mut self) {
        let child = Command::new(echo_backend_binary())
            .args(["--listen", &self.addr.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the echo backend");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(self.addr).await.is_err() {
            assert!(Instant::now() < deadline, "echo backend never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-9", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// Sends `count` numbered messages one at a time, each sent again only by the relay's replay;
/// returns how many echoes arrived twice and the longest round trip (a move shows there).
/// Fails on a close or a missing echo.
async fn talk_numbered(url: String, count: u32) -> (u32, Duration) {
    let mut client = connect(&url).await;
    let mut duplicates = 0;
    let mut longest = Duration::ZERO;
    for n in 0..count {
        let sent = Instant::now();
        client.send(Message::text(n.to_string())).await.unwrap();
        loop {
            let message = tokio::time::timeout(WAIT, client.next())
                .await
                .unwrap_or_else(|_| panic!("{url}: the echo of {n} never came"));
            let echoed: u32 = match message {
                Some(Ok(Message::Text(text))) => text.parse().unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("{url}: the socket ended at message {n}: {other:?}"),
            };
            assert!(echoed <= n, "{url}: echo {echoed} before {n} was sent");
            if echoed == n {
                break;
            }
            duplicates += 1;
        }
        longest = longest.max(sent.elapsed());
    }
    client.close(None).await.unwrap();
    (duplicates, longest)
}

#[tokio::test]
async fn backends_killed_with_kill_9_at_random_under_load_lose_no_client_and_no_message() {
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(EchoProcess::start(unused_addr()).await);
    }
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{}\"", b.url()))
        .collect();
    let config = format!(
        r#"
[[route]]
path = "/"
upstream = "echo"
hash_key = "query:user"

[upstream.echo]
backends = [{}]
on_backend_loss = "reconnect"
connect_timeout = "1s"
health_check = {{ interval = "200ms", timeout = "500ms", unhealthy_after = 1, healthy_after = 1 }}
"#,
        list.join(", ")
    );
    let relay = TestRelay::start(&config, &[]).await;
    let clients: Vec<_> = (0..60)
        .map(|user| tokio::spawn(talk_numbered(relay.url(&format!("/?user=u{user}")), 300)))
        .collect();

    // One backend at a time dies and comes back, chosen by a seeded generator, until every
    // client is done: a client always has somewhere to move.
    let mut kills = 0;
    let mut rng = fastrand::Rng::with_seed(6455);
    while clients.iter().any(|c| !c.is_finished()) && kills < 20 {
        tokio::time::sleep(Duration::from_millis(rng.u64(200..600))).await;
        let victim = rng.usize(..backends.len());
        backends[victim].kill_9();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.u64(100..400))).await;
        backends[victim].restart().await;
    }
    let mut duplicates = 0;
    let mut longest = Vec::new();
    for client in clients {
        let (twice, slowest) = client.await.expect("a client lost its socket or a message");
        duplicates += twice;
        longest.push(slowest);
    }
    assert!(
        kills >= 3,
        "the clients finished before the backends were killed enough"
    );
    longest.sort();
    println!(
        "{kills} kills; 60 clients x 300 messages: 0 lost, {duplicates} echoed twice; each client's longest round trip (a move, for most): median {:?}, max {:?}",
        longest[longest.len() / 2],
        longest[longest.len() - 1]
    );
}

/// A backend that sends `message_size`-byte messages to every connection as fast as it is
/// let, counting the bytes it got rid of.
async fn pusher(message_size: usize, sent: Arc<AtomicU64>) -> String {
    // Small fixed send buffers (accepted sockets inherit them): what piles up is then in the
    // relay, not in this backend's kernel.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(32 << 10).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1024).unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let sent = sent.clone();
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let payload = vec![b'x'; message_size];
                // Bounded: a relay that buffered everything would still end the test.
                for _ in 0..4096 {
                    if socket.send(Message::binary(payload.clone())).await.is_err() {
                        return;
                    }
                    sent.fetch_add(message_size as u64, Ordering::Relaxed);
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn many_clients_that_stop_reading_hold_bounded_relay_memory_and_others_are_served() {
    const READERS: u64 = 100;
    const MESSAGE: usize = 16 << 10;
    let sent = Arc::new(AtomicU64::new(0));
    let push_url = pusher(MESSAGE, sent.clone()).await;
    let echo = TestBackend::start("echo").await;
    let dir = TempDir::new();
    let listen = unused_addr();
    let config = format!(
        r#"
[server]
listen = "{listen}"

[limits]
max_message_size = "64KiB"

[[route]]
path = "/push"
upstream = "push"

[[route]]
path = "/"
upstream = "echo"

[upstream.push]
backends = ["{push_url}"]

[upstream.echo]
backends = ["{}"]
"#,
        echo.url()
    );
    let path = dir.write("slow.toml", &config);
    let mut relay = RelayProcess::spawn(&["--config", path.to_str().unwrap()], "warn");
    relay.wait_listening(listen).await;
    let mut bystander = connect(&format!("ws://{listen}/")).await;
    assert_eq!(round_trip(&mut bystander, "warm").await, "warm");
    let pid = relay.pid();
    let baseline = resident_bytes(Some(pid));

    // Clients that upgrade and then never read a byte.
    let mut readers = Vec::new();
    for _ in 0..READERS {
        readers.push(RawClient::connect_with_receive_buffer(listen, "/push", 16 << 10).await);
    }
    // Wait until the pushers stall: the kernel buffers and the relay's bounded buffers are
    // full, and nothing moves any more.
    let deadline = Instant::now() + WAIT * 6;
    let mut last = sent.load(Ordering::Relaxed);
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_millis(750) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sent.load(Ordering::Relaxed);
        if now != last {
            (last, still_since) = (now, Instant::now());
        }
        assert!(Instant::now() < deadline, "the pushers never stalled");
    }
    let stalled = resident_bytes(Some(pid));
    let per_reader = stalled.saturating_sub(baseline) / READERS;
    let pushed_per_reader = last / READERS;
    println!(
        "{READERS} clients not reading: relay RSS {} KiB -> {} KiB, {} KiB per reader; \
         each pusher got {} KiB out before stalling",
        baseline >> 10,
        stalled >> 10,
        per_reader >> 10,
        pushed_per_reader >> 10
    );
    assert!(
        pushed_per_reader < 16 << 20,
        "the relay took {} KiB per non-reading client",
        pushed_per_reader >> 10
    );
    assert!(
        per_reader < 512 << 10,
        "the relay grew by {} KiB per non-reading client",
        per_reader >> 10
    );
    assert_eq!(round_trip(&mut bystander, "still").await, "still");
    drop(readers);
    relay.signal("TERM");
    assert!(relay.wait_exit().await.success());
}
