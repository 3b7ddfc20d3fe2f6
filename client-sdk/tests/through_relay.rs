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

#[allow(dead_code)]
#[path = "../examples/chat_backend.rs"]
mod chat_backend;
#[allow(dead_code)]
#[path = "../examples/chat_cli.rs"]
mod chat_cli;
#[allow(dead_code)]
#[path = "../examples/mux_echo_backend.rs"]
mod mux_echo_backend;

/// A relay with one route `/` in per-client mode over `backend`.
fn per_client(listen: &str, backend: &str, on_backend_loss: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
shutdown_grace = "2s"

[[route]]
path = "/"
upstream = "main"

[upstream.main]
backends = ["{backend}"]
on_backend_loss = "{on_backend_loss}"
"#
    )
}

/// A relay with one route `path` in mux mode over the mux backend at `backend`.
fn mux_route(listen: SocketAddr, path: &str, backend: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
shutdown_grace = "2s"

[[route]]
path = "{path}"
upstream = "mux"
mode = "mux"

[upstream.mux]
backends = ["{backend}"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_relay_restarts_on_its_port_the_client_reconnects_and_sends_its_queue_once_in_order()
 {
    let backend = Backend::start().await;
    let relay = quick_relay("127.0.0.1:0".parse().unwrap(), &backend.url()).await;
    let addr = relay.local_addr();
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
    relay.shutdown().await;
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

    let relay = quick_relay(addr, &backend.url()).await;
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
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_its_backend_dies_behind_the_relay_the_client_is_closed_1012_and_reconnects() {
    let backend = Backend::start().await;
    let relay = start_relay(&per_client("127.0.0.1:0", &backend.url(), "close")).await;
    let mut client = Client::builder(&format!("ws://{}/", relay.local_addr()))
        .reconnect(quick_reconnect())
        .connect()
        .await
        .unwrap();
    assert_eq!(connected(&mut client).await, 1);
    client.send("one").await.unwrap();
    assert_eq!(next_text(&mut client).await, "one");

    // The backend process dies; it comes back on the same port a little later.
    let (backend_addr, log) = backend.stop();
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
    let listener = tokio::net::TcpListener::bind(backend_addr).await.unwrap();
    let backend = Backend::on(listener, Mode::default(), log);
    assert_eq!(connected(&mut client).await, 2);
    client.send("two").await.unwrap();
    assert_eq!(next_text(&mut client).await, "two");
    assert_eq!(backend.texts(), ["one", "two"]);
    relay.shutdown().await;
}

/// A self-signed certificate for `localhost`, as PEM files in a fresh temp dir.
struct Certificate {
    dir: std::path::PathBuf,
    der: rustls_pki_types::CertificateDer<'static>,
}

impl Certificate {
    fn new() -> Certificate {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = std::env::temp_dir().join(format!("wsrelay-client-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), generated.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), generated.signing_key.serialize_pem()).unwrap();
        Certificate {
            dir,
            der: generated.cert.der().clone(),
        }
    }
}

impl Drop for Certificate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_through_the_relay_trusts_the_given_ca_and_only_it() {
    let certificate = Certificate::new();
    let backend = Backend::start().await;
    let toml = per_client("127.0.0.1:0", &backend.url(), "reconnect").replace(
        "[server]\n",
        &format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            certificate.dir.join("cert.pem").display(),
            certificate.dir.join("key.pem").display()
        ),
    );
    let relay = start_relay(&toml).await;
    let url = format!("wss://localhost:{}/secure", relay.local_addr().port());

    let mut client = Client::builder(&url)
        .tls_root_certificates(vec![certificate.der.clone()])
        .connect()
        .await
        .unwrap();
    client.send("over tls").await.unwrap();
    assert_eq!(next_text(&mut client).await, "over tls");
    client.close(1000, "").await;

    let mut from_file = Client::builder(&url)
        .tls_ca_file(certificate.dir.join("cert.pem"))
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
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mux_client_redials_after_the_relay_restarts_and_open_waits_for_the_new_link() {
    let server = MuxServer::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("ws://{}", server.local_addr());
    tokio::spawn(mux_echo_backend::serve(server, "echo".into()));
    let relay = start_relay(&mux_route("127.0.0.1:0".parse().unwrap(), "/", &backend)).await;
    let addr = relay.local_addr();
    let client = MuxClient::builder(&format!("ws://{addr}/"))
        .reconnect(quick_reconnect())
        .open_timeout(WAIT)
        .connect()
        .await
        .unwrap();
    assert_eq!(client.links_established(), 1);
    let mut stream = open_when_ready(&client, "/a").await;
    stream.send(tungstenite::Message::text("hi")).await.unwrap();
    assert_eq!(next_stream_text(&mut stream).await, "hi");

    relay.shutdown().await;
    // The stream ends: a close from the draining relay, or an error when the link went.
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match stream.next().await {
                Some(Ok(tungstenite::Message::Close(frame))) => break format!("close {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(error)) => break format!("error {error}"),
                None => break "end".to_owned(),
            }
        }
    })
    .await
    .expect("the stream did not end");
    assert!(!end.is_empty());
    eventually("the link to go", || !client.is_connected()).await;
    assert!(!client.is_closed(), "a lost link is re-dialed, not the end");

    let relay = start_relay(&mux_route(addr, "/", &backend)).await;
    // `open` waits for the new link (and the relay's own link to the backend).
    let mut stream = open_when_ready(&client, "/b").await;
    assert_eq!(client.links_established(), 2);
    stream
        .send(tungstenite::Message::text("whoami"))
        .await
        .unwrap();
    assert_eq!(next_stream_text(&mut stream).await, "echo");
    client.go_away("test over");
    drop(stream);
    tokio::time::timeout(WAIT, client.closed())
        .await
        .expect("the client did not stop after go_away");
    relay.shutdown().await;
}

/// Opens `path`, retrying while the relay's own link to the backend comes up (502).
async fn open_when_ready(client: &MuxClient, path: &str) -> wsrelay_client::MuxStream {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match client.open(path, Vec::new()).await {
            Ok(stream) => return stream,
            Err(error) => {
                assert!(tokio::time::Instant::now() < deadline, "{path}: {error}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn next_stream_text(stream: &mut wsrelay_client::MuxStream) -> String {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(tungstenite::Message::Text(text)))) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_cli_restores_its_session_after_a_relay_restart() {
    let server = MuxServer::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("ws://{}", server.local_addr());
    tokio::spawn(chat_backend::serve(server));
    let relay = start_relay(&mux_route(
        "127.0.0.1:0".parse().unwrap(),
        "/chat",
        &backend,
    ))
    .await;
    let addr = relay.local_addr();
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

    relay.shutdown().await;
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

    let relay = start_relay(&mux_route(addr, "/chat", &backend)).await;
    // Ann hears her own queued line in her room, under her nick: the session came back
    // before the queue was sent.
    let line = wait_for(&mut ann, "ann's queued line", |event| {
        let line = chat_cli::render(event, &ann_session)?;
        line.starts_with("[").then_some(line)
    })
    .await;
    assert_eq!(line, "[rust] ann: anyone still here?");
    say_until_heard(&bob, &bob_session, &mut ann, "[rust] bob: yes, back too").await;
    relay.shutdown().await;
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
