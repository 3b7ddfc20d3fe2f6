//! The clients through a real wsrelay started in this process: the relay restarts on the
//! same port, a backend dies behind it, wss:// with a given CA, a MuxClient re-dials, and the
//! chat CLI restores its session after a restart.
//!
//! Waits are bounded by generous deadlines; nothing asserts on elapsed time.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use wsrelay_client::{Client, ConnectError, Event, MuxClient, MuxServer, QueuePolicy, TlsError};
use wsrelay_testkit::{TestBackend, TestCertificate, TestRelay, WAIT, retry, wait_until, within};

#[allow(dead_code)]
#[path = "../examples/chat_backend.rs"]
mod chat_backend;
#[allow(dead_code)]
#[path = "../examples/chat_cli.rs"]
mod chat_cli;
#[allow(dead_code)]
#[path = "../examples/mux_echo_backend.rs"]
mod mux_echo_backend;

/// A relay on `listen` with one route `path` in `mode` over `backend`; `upstream_extra` goes
/// into the upstream's table.
fn one_route(
    listen: SocketAddr,
    path: &str,
    mode: &str,
    backend: &str,
    upstream_extra: &str,
) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
shutdown_grace = "2s"

[[route]]
path = "{path}"
upstream = "main"
mode = "{mode}"

[upstream.main]
backends = ["{backend}"]
{upstream_extra}
"#
    )
}

/// A relay on a free port with one route `/` in per-client mode over `backend`.
fn per_client(backend: &str, on_backend_loss: &str) -> String {
    let policy = format!("on_backend_loss = \"{on_backend_loss}\"");
    one_route(any_port(), "/", "per-client", backend, &policy)
}

/// A relay with one route `path` in mux mode over the mux backend at `backend`.
fn mux_route(listen: SocketAddr, path: &str, backend: &str) -> String {
    one_route(listen, path, "mux", backend, "")
}

/// Port 0: any free one.
fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_relay_restarts_on_its_port_the_client_reconnects_and_sends_its_queue_once_in_order()
 {
    let backend = TestBackend::start("echo").await;
    let relay = TestRelay::quick(any_port(), &backend.url()).await;
    let addr = relay.addr();
    let mut client = Client::builder(&format!("ws://{addr}/chat"))
        .reconnect(quick_reconnect())
        .queue(QueuePolicy::Buffer { max_messages: 100 })
        .connect()
        .await
        .unwrap();
    assert_eq!(connected(&mut client).await, 1);
    client.send("before").await.unwrap();
    assert_eq!(next_text(&mut client).await, "before");

    // The relay drains: the client is closed with 1001 and starts reconnecting.
    relay.handle.shutdown().await;
    let (code, reason) = disconnected(&mut client).await;
    assert_eq!(code, Some(1001), "{reason}");
    // While the relay is down, messages wait in the queue.
    for n in 0..20 {
        client.send(format!("queued {n}")).await.unwrap();
    }
    let retrying = wait_for(
        &mut client,
        "a failed reconnect attempt",
        |event| match event {
            Event::Reconnecting {
                attempt,
                error: Some(error),
                ..
            } => Some((*attempt, error.to_string())),
            _ => None,
        },
    )
    .await;
    assert!(retrying.1.contains("TCP connect"), "{retrying:?}");

    let relay = TestRelay::quick(addr, &backend.url()).await;
    assert_eq!(connected(&mut client).await, 2);
    for n in 0..20 {
        assert_eq!(next_text(&mut client).await, format!("queued {n}"));
    }
    client.send("after").await.unwrap();
    assert_eq!(next_text(&mut client).await, "after");
    let expected: Vec<String> = std::iter::once("before".to_owned())
        .chain((0..20).map(|n| format!("queued {n}")))
        .chain(std::iter::once("after".to_owned()))
        .collect();
    assert_eq!(backend.texts(), expected, "each message once, in order");
    client.close(1000, "done").await;
    relay.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_its_backend_dies_behind_the_relay_the_client_is_closed_1012_and_reconnects() {
    let backend = TestBackend::start("echo").await;
    let relay = TestRelay::start(&per_client(&backend.url(), "close"), &[]).await;
    let mut client = reconnecting(&relay.url("/")).await;
    assert_eq!(connected(&mut client).await, 1);
    client.send("one").await.unwrap();
    assert_eq!(next_text(&mut client).await, "one");

    // The backend process dies; it comes back on the same port a little later.
    let stopped = backend.stop();
    let (code, reason) = disconnected(&mut client).await;
    assert_eq!(code, Some(1012), "{reason}");
    // Until it is back the relay answers 502: retried.
    let refused = wait_for(&mut client, "a 502 from the relay", |event| match event {
        Event::Reconnecting {
            error: Some(error), ..
        } => error.status(),
        _ => None,
    })
    .await;
    assert_eq!(refused, 502);
    let backend = stopped.restart().await;
    assert_eq!(connected(&mut client).await, 2);
    client.send("two").await.unwrap();
    assert_eq!(next_text(&mut client).await, "two");
    assert_eq!(backend.texts(), ["one", "two"]);
    relay.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_through_the_relay_trusts_the_given_ca_and_only_it() {
    let certificate = TestCertificate::new();
    let backend = TestBackend::start("echo").await;
    let toml = per_client(&backend.url(), "reconnect").replace(
        "[server]\n",
        &format!("[server]\n{}", certificate.server_lines()),
    );
    let relay = TestRelay::start(&toml, &[]).await;
    let url = format!("wss://localhost:{}/secure", relay.addr().port());

    let mut client = Client::builder(&url)
        .tls_root_certificates(vec![certificate.der()])
        .connect()
        .await
        .unwrap();
    client.send("over tls").await.unwrap();
    assert_eq!(next_text(&mut client).await, "over tls");
    client.close(1000, "").await;

    let mut from_file = Client::builder(&url)
        .tls_ca_file(certificate.cert_path())
        .connect()
        .await
        .unwrap();
    from_file.send("ca file").await.unwrap();
    assert_eq!(next_text(&mut from_file).await, "ca file");

    // The system's roots do not include a self-signed test certificate (or there are none).
    match Client::connect(&url).await {
        Err(ConnectError::Tls {
            source: TlsError::Handshake { .. } | TlsError::NoSystemRoots { .. },
            ..
        }) => {}
        other => panic!("expected a TLS error, got {:?}", other.map(|_| ())),
    }
    relay.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mux_client_redials_after_the_relay_restarts_and_open_waits_for_the_new_link() {
    let server = MuxServer::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("ws://{}", server.local_addr());
    tokio::spawn(mux_echo_backend::serve(server, "echo".into()));
    let relay = TestRelay::start(&mux_route(any_port(), "/", &backend), &[]).await;
    let addr = relay.addr();
    let client = MuxClient::builder(&format!("ws://{addr}/"))
        .reconnect(quick_reconnect())
        .open_timeout(WAIT)
        .connect()
        .await
        .unwrap();
    assert_eq!(client.links_established(), 1);
    let mut stream = open_when_ready(&client, "/a").await;
    stream.send(tungstenite::Message::text("hi")).await.unwrap();
    assert_eq!(stream_text(&mut stream).await, "hi");

    relay.handle.shutdown().await;
    // The stream ends: a close from the draining relay, or an error when the link went.
    let end = within("the stream's end", async {
        loop {
            match stream.next().await {
                Some(Ok(tungstenite::Message::Close(frame))) => break format!("close {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(error)) => break format!("error {error}"),
                None => break "end".to_owned(),
            }
        }
    })
    .await;
    assert!(!end.is_empty());
    wait_until("the link to go", || !client.is_connected()).await;
    assert!(!client.is_closed(), "a lost link is re-dialed, not the end");

    let relay = TestRelay::start(&mux_route(addr, "/", &backend), &[]).await;
    // `open` waits for the new link (and the relay's own link to the backend).
    let mut stream = open_when_ready(&client, "/b").await;
    assert_eq!(client.links_established(), 2);
    stream
        .send(tungstenite::Message::text("whoami"))
        .await
        .unwrap();
    assert_eq!(stream_text(&mut stream).await, "echo");
    client.go_away("test over");
    drop(stream);
    tokio::time::timeout(WAIT, client.closed())
        .await
        .expect("the client did not stop after go_away");
    relay.handle.shutdown().await;
}

/// Opens `path`, retrying while the relay's own link to the backend comes up (502).
async fn open_when_ready(client: &MuxClient, path: &str) -> wsrelay_client::MuxStream {
    retry(path, || client.open(path, Vec::new())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_cli_restores_its_session_after_a_relay_restart() {
    let server = MuxServer::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("ws://{}", server.local_addr());
    tokio::spawn(chat_backend::serve(server));
    let relay = TestRelay::start(&mux_route(any_port(), "/chat", &backend), &[]).await;
    let addr = relay.addr();
    let url = format!("ws://{addr}/chat");

    let ann_session = chat_cli::Session::shared("ann", "rust");
    let bob_session = chat_cli::Session::shared("bob", "lobby");
    let mut ann = chat_cli::builder(&url, &ann_session)
        .reconnect(quick_reconnect())
        .start()
        .unwrap();
    let mut bob = chat_cli::builder(&url, &bob_session)
        .reconnect(quick_reconnect())
        .start()
        .unwrap();
    // Bob changes room like a user would.
    match chat_cli::input("/join rust", &bob_session) {
        chat_cli::Input::Send(message) => bob.send(message).await.unwrap(),
        other => panic!("{other:?}"),
    }
    // Each says hello until the other hears it: both are connected and in "rust".
    say_until_heard(&ann, &ann_session, &mut bob, "[rust] ann: hi bob").await;
    say_until_heard(&bob, &bob_session, &mut ann, "[rust] bob: hi ann").await;

    relay.handle.shutdown().await;
    for client in [&mut ann, &mut bob] {
        let line = wait_for(client, "the disconnect", |event| match event {
            Event::Disconnected { .. } => chat_cli::render(event, &ann_session),
            _ => None,
        })
        .await;
        assert!(
            line.starts_with("* disconnected by the server (1001"),
            "{line}"
        );
    }
    // Typed while the relay is down: queued, said once the session is restored.
    let note = match chat_cli::input("anyone still here?", &ann_session) {
        chat_cli::Input::Send(message) => chat_cli::send(&ann, message),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        note.as_deref(),
        Some("* not connected: queued, will be sent on reconnect")
    );

    let relay = TestRelay::start(&mux_route(addr, "/chat", &backend), &[]).await;
    // Ann hears her own queued line in her room, under her nick: the session came back
    // before the queue was sent.
    let line = wait_for(&mut ann, "ann's queued line", |event| {
        let line = chat_cli::render(event, &ann_session)?;
        line.starts_with("[").then_some(line)
    })
    .await;
    assert_eq!(line, "[rust] ann: anyone still here?");
    say_until_heard(&bob, &bob_session, &mut ann, "[rust] bob: yes, back too").await;
    relay.handle.shutdown().await;
}

/// Sends `expected`'s text from `speaker` until `listener` renders it (the listener may still
/// be joining the room).
async fn say_until_heard(
    speaker: &Client,
    session: &chat_cli::SharedSession,
    listener: &mut Client,
    expected: &str,
) {
    let text = expected.split_once(": ").unwrap().1;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never heard {expected:?}"
        );
        if let chat_cli::Input::Send(message) = chat_cli::input(text, session) {
            speaker.send(message).await.unwrap();
        }
        let heard = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                let event = listener.next_event().await.expect("the listener ended");
                if chat_cli::render(&event, session).as_deref() == Some(expected) {
                    return;
                }
            }
        })
        .await;
        if heard.is_ok() {
            return;
        }
    }
}
