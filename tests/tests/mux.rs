//! Mux mode end to end: clients carried as streams over a few shared links.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsrelay::hashing::Ranking;
use wsrelay_client::{MuxClient, OpenError};
use wsrelay_testkit::*;
use wsrelay_tests::MuxBackend;

fn config(backends: &[&MuxBackend], policy: &str) -> String {
    let urls: Vec<String> = backends.iter().map(|b| b.url()).collect();
    format!(
        r#"
[server]
admin = "127.0.0.1:0"

[keepalive]
ping_interval = "0s"

[[route]]
path = "/"
upstream = "mux"
mode = "mux"
hash_key = "header:X-User"

[upstream.mux]
backends = {}
mux_links = 2
connect_timeout = "2s"
on_backend_loss = "{policy}"
"#,
        backend_list(&urls)
    )
}

async fn wait_links(backends: &[&MuxBackend], per_backend: usize) {
    wait_until("mux links", || {
        backends.iter().all(|b| b.links_open() == per_backend)
    })
    .await;
}

/// A relay over `backends` (see [`config`]), once its two links to each are up.
async fn mux_relay(backends: &[&MuxBackend], policy: &str) -> TestRelay {
    let relay = TestRelay::start(&config(backends, policy), &[]).await;
    wait_links(backends, 2).await;
    relay
}

#[tokio::test]
async fn two_thousand_clients_share_four_links_and_every_message_arrives_in_order() {
    let a = MuxBackend::start("a").await;
    let b = MuxBackend::start("b").await;
    let relay = mux_relay(&[&a, &b], "reconnect").await;
    let urls = [a.url(), b.url()];
    let ranking = Ranking::new(urls.iter().map(|u| (u.as_str(), 1.0)));

    let mut tasks = Vec::new();
    for n in 0..2_000 {
        let url = relay.url(&format!("/chat/{n}?x=1"));
        let user = format!("user-{n}");
        let expected = ["a", "b"][ranking.rank(user.as_bytes())[0]];
        tasks.push(tokio::spawn(async move {
            let mut client = connect_as(&url, &user).await;
            for i in 0..5 {
                client
                    .send(Message::text(format!("{n}:{i}")))
                    .await
                    .unwrap();
            }
            for i in 0..5 {
                assert_eq!(
                    next_data(&mut client).await,
                    Message::text(format!("{n}:{i}"))
                );
            }
            assert_eq!(round_trip(&mut client, "whoami").await, expected);
            client
        }));
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    // The backends saw 2,000 streams, and only the four link sockets.
    assert_eq!(a.streams().len() + b.streams().len(), 2_000);
    assert_eq!(a.links_accepted(), 2);
    assert_eq!(b.links_accepted(), 2);
    assert_eq!(a.messages() + b.messages(), 2_000 * 6);
    // The Open carried the path, query, forwarded headers and client address.
    let seen = &a.streams()[0];
    assert!(seen.path.starts_with("/chat/"), "{seen:?}");
    assert_eq!(seen.query, "x=1");
    assert!(seen.header("x-user").unwrap().starts_with("user-"));
    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert!(seen.header("x-relay-conn-id").is_some());
    assert!(seen.client_addr.starts_with("127.0.0.1:"));
    assert!(!seen.resumed);

    for mut client in clients {
        client.close(None).await.unwrap();
    }
    wait_until("streams to close", || {
        a.streams_open() + b.streams_open() == 0
    })
    .await;
    wait_until("sessions to end", || relay.handle.open_sessions() == 0).await;
}

#[tokio::test]
async fn a_client_that_never_reads_stops_only_its_own_stream() {
    let a = MuxBackend::start("a").await;
    let relay = mux_relay(&[&a], "reconnect").await;
    // One stuck client: it sends a lot and never reads the echoes.
    let mut stuck = connect_as(&relay.url("/stuck"), "stuck").await;
    let payload = "s".repeat(64 * 1024);
    let mut sent = 0;
    while let Ok(Ok(())) = tokio::time::timeout(
        Duration::from_millis(300),
        stuck.send(Message::text(payload.clone())),
    )
    .await
    {
        sent += 1;
        assert!(sent < 100_000, "never stalled");
    }
    // The 1,999 others, on the very same two links, keep going.
    let mut tasks = Vec::new();
    for n in 0..1_999 {
        let relay_url = relay.url("/busy");
        tasks.push(tokio::spawn(async move {
            let mut client = connect_as(&relay_url, &format!("busy-{n}")).await;
            for i in 0..5 {
                let text = format!("{n}/{i}");
                assert_eq!(round_trip(&mut client, &text).await, text);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // The stuck client gets all its echoes once it reads.
    for _ in 0..sent {
        assert_eq!(next_data(&mut stuck).await.len(), payload.len());
    }
}

#[tokio::test]
async fn a_lost_link_moves_its_streams_to_the_next_backend_flagged_resumed() {
    let a = MuxBackend::start("a").await;
    let b = MuxBackend::start("b").await;
    let relay = mux_relay(&[&a, &b], "reconnect").await;
    let mut clients = Vec::new();
    for user in users_ranked_first(&[a.url(), b.url()], 0, 20) {
        let mut client = connect_as(&relay.url("/room"), &user).await;
        assert_eq!(round_trip(&mut client, "whoami").await, "a");
        clients.push(client);
    }
    a.kill_links();
    for client in &mut clients {
        // Same socket, now on b (the first answers may still be a's replays being echoed).
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if round_trip(client, "whoami").await == "b" {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never moved");
        }
    }
    assert!(
        b.streams().iter().any(|s| s.resumed),
        "no resumed Open reached b"
    );
    // a's links come back (re-dialed with backoff) for new clients.
    wait_links(&[&a], 2).await;
}

#[tokio::test]
async fn with_on_backend_loss_close_a_lost_link_closes_its_clients_1012() {
    let a = MuxBackend::start("a").await;
    let relay = mux_relay(&[&a], "close").await;
    let mut client = connect_as(&relay.url("/room"), "u").await;
    assert_eq!(round_trip(&mut client, "whoami").await, "a");
    a.kill_links();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Restart);
}

#[tokio::test]
async fn a_backend_reject_reaches_the_client_as_its_status() {
    let a = MuxBackend::start("a").await;
    let relay = mux_relay(&[&a], "reconnect").await;
    a.reject_with(Some(403));
    assert_eq!(refused_status(&relay.url("/private")).await, 403);
    a.reject_with(None);
    let mut client = connect(&relay.url("/public")).await;
    assert_eq!(round_trip(&mut client, "hi").await, "hi");
}

#[tokio::test]
async fn malformed_frames_from_a_backend_close_that_link_1002_and_the_relay_keeps_serving() {
    // A "backend" that completes the WebSocket handshake, then sends garbage as its Hello.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bad_url = format!("ws://{}", listener.local_addr().unwrap());
    let (codes_tx, mut codes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let codes_tx = codes_tx.clone();
            tokio::spawn(async move {
                let mut socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
                let _ = socket
                    .send(Message::binary(vec![0xEE, 0xFF, 0x00, 0x13]))
                    .await;
                while let Some(Ok(message)) = socket.next().await {
                    if let Message::Close(frame) = message {
                        let _ = codes_tx.send(frame.map(|f| u16::from(f.code)));
                        break;
                    }
                }
            });
        }
    });
    let good = MuxBackend::start("good").await;
    let toml = config(&[&good], "reconnect").replace(
        &format!("backends = [\"{}\"]", good.url()),
        &format!("backends = [\"{bad_url}\", \"{}\"]", good.url()),
    );
    let relay = TestRelay::start(&toml, &[]).await;
    let code = tokio::time::timeout(WAIT, codes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, Some(1002));
    wait_links(&[&good], 2).await;
    // Clients whatever their rank are served by the good backend.
    for n in 0..10 {
        let mut client = connect_as(&relay.url("/x"), &format!("user-{n}")).await;
        assert_eq!(round_trip(&mut client, "whoami").await, "good");
    }
}

#[tokio::test]
async fn link_and_stream_metrics_follow_the_clients() {
    let a = MuxBackend::start("a").await;
    let relay = mux_relay(&[&a], "reconnect").await;
    let scrape = || relay.admin_get("/metrics");
    let links = format!("wsrelay_mux_links{{backend=\"{}\"}} 2", a.url());
    let streams = |n: usize| format!("wsrelay_mux_streams{{backend=\"{}\"}} {n}", a.url());
    let mut clients = Vec::new();
    for n in 0..3 {
        let mut client = connect_as(&relay.url("/m"), &format!("u{n}")).await;
        assert_eq!(round_trip(&mut client, "hi").await, "hi");
        clients.push(client);
    }
    let metrics = scrape().await;
    assert!(metrics.contains(&links), "{metrics}");
    assert!(metrics.contains(&streams(3)), "{metrics}");
    for mut client in clients {
        client.close(None).await.unwrap();
    }
    wait_until("sessions to end", || relay.handle.open_sessions() == 0).await;
    let metrics = scrape().await;
    assert!(metrics.contains(&streams(0)), "{metrics}");
}

#[tokio::test]
async fn one_mux_client_socket_carries_streams_to_three_paths_on_two_upstreams() {
    let one = TestBackend::start("one").await;
    let two = MuxBackend::start("two").await;
    let toml = format!(
        r#"
[[route]]
path = "/"
upstream = "muxed"
mode = "mux"

[[route]]
path = "/a"
upstream = "plain"

[[route]]
path = "/b"
upstream = "muxed"
mode = "mux"

[upstream.plain]
backends = ["{}"]

[upstream.muxed]
backends = ["{}"]
"#,
        one.url(),
        two.url()
    );
    let relay = TestRelay::start(&toml, &[]).await;
    wait_links(&[&two], 2).await;
    let link = MuxClient::connect(&relay.url("/")).await.unwrap();

    let mut streams = Vec::new();
    for (path, expected) in [("/a/x?n=1", "one"), ("/b/y", "two"), ("/c", "two")] {
        let stream = link
            .open(path, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        streams.push((path, expected, stream));
    }
    for (path, expected, stream) in &mut streams {
        stream.send(Message::text("whoami")).await.unwrap();
        let reply = within("a reply", stream.next()).await.unwrap().unwrap();
        assert_eq!(reply.to_text().unwrap(), *expected, "{path}");
        stream.send(Message::binary(vec![1, 2, 3])).await.unwrap();
        let echo = within("a reply", stream.next()).await.unwrap().unwrap();
        assert_eq!(echo, Message::binary(vec![1, 2, 3]), "{path}");
    }
    // The per-client backend saw its stream as an ordinary WebSocket, with its path; the mux
    // backend saw the other two as streams.
    let targets: Vec<String> = one.connections().iter().map(|c| c.target.clone()).collect();
    assert_eq!(targets, ["/a/x?n=1"]);
    let paths: Vec<String> = two.streams().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/b/y", "/c"]);
    // The relay's connections API lists three sessions over the single client socket.
    wait_until("three sessions", || relay.handle.open_sessions() == 3).await;

    // A path no route serves is rejected like an HTTP 404.
    let short = TestRelay::start(&toml.replace("path = \"/\"\n", "path = \"/only\"\n"), &[]).await;
    let link = MuxClient::connect(&short.url("/only")).await.unwrap();
    match link.open("/nowhere", Vec::new()).await {
        Err(OpenError::Rejected { status, .. }) => assert_eq!(status, 404),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn the_sdk_mux_server_and_mux_client_talk_through_the_relay() {
    let server = wsrelay_client::MuxServer::bind("127.0.0.1:0")
        .await
        .unwrap();
    let backend_url = format!("ws://{}", server.local_addr());
    tokio::spawn(async move {
        while let Some(connection) = server.accept().await {
            tokio::spawn(async move {
                let greeting = format!(
                    "hello {} from {}",
                    connection.path(),
                    connection.client_addr()
                );
                let mut stream = connection.accept(None);
                stream.send(Message::text(greeting)).await.unwrap();
                while let Some(Ok(message)) = stream.next().await {
                    if (message.is_text() || message.is_binary())
                        && stream.send(message).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    let toml = format!(
        "[[route]]\npath = \"/\"\nupstream = \"sdk\"\nmode = \"mux\"\n\n[upstream.sdk]\nbackends = [\"{backend_url}\"]\n"
    );
    let relay = TestRelay::start(&toml, &[]).await;
    let client = MuxClient::connect(&relay.url("/")).await.unwrap();
    let mut streams = Vec::new();
    for room in ["/room/1", "/room/2", "/room/3"] {
        // The relay's link to the backend may still be coming up: retry while it says 502.
        let stream = retry(room, || client.open(room, Vec::new())).await;
        streams.push((room, stream));
    }
    for (room, stream) in &mut streams {
        let greeting = within("a reply", stream.next()).await.unwrap().unwrap();
        let greeting = greeting.to_text().unwrap().to_owned();
        assert!(
            greeting.starts_with(&format!("hello {room} from 127.0.0.1:")),
            "{greeting}"
        );
        stream
            .send(Message::text(format!("echo {room}")))
            .await
            .unwrap();
        let echo = within("a reply", stream.next()).await.unwrap().unwrap();
        assert_eq!(echo.to_text().unwrap(), format!("echo {room}"));
    }
}
