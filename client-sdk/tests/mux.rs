//! MuxClient <-> MuxServer directly over 127.0.0.1, no relay in between.
//!
//! Waits are bounded by generous deadlines; nothing asserts on elapsed time.

mod common;

use common::stream_text;
use futures_util::{SinkExt, StreamExt};
use tungstenite::Message;
use wsrelay_client::{MuxClient, MuxServer, OpenError};
use wsrelay_testkit::{wait_until, within};

#[allow(dead_code)]
#[path = "../examples/mux_echo_backend.rs"]
mod mux_echo_backend;

/// A server that answers each stream's first message with "<path>?<query> <client_addr>
/// <header x-user>", then echoes; `/private/...` is rejected with 403.
async fn describing_server() -> MuxServer {
    MuxServer::bind("127.0.0.1:0").await.unwrap()
}

fn spawn_describer(server: MuxServer) {
    tokio::spawn(async move {
        while let Some(conn) = server.accept().await {
            if conn.path().starts_with("/private") {
                conn.reject(403, "private room");
                continue;
            }
            let description = format!(
                "{}?{} user={} resumed={}",
                conn.path(),
                conn.query(),
                String::from_utf8_lossy(conn.header("X-User").unwrap_or_default()),
                conn.resumed(),
            );
            let protocol = conn
                .header("sec-websocket-protocol")
                .map(|v| String::from_utf8_lossy(v).into_owned());
            let mut stream = conn.accept(protocol);
            tokio::spawn(async move {
                let mut first = true;
                while let Some(Ok(msg)) = stream.next().await {
                    let reply = match msg {
                        Message::Close(_) => break,
                        _ if first => Message::text(description.clone()),
                        msg => msg,
                    };
                    first = false;
                    if stream.send(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_with_their_own_paths_on_one_link() {
    let server = describing_server().await;
    let url = format!("ws://{}/mux", server.local_addr());
    spawn_describer(server);
    let client = MuxClient::connect(&url).await.unwrap();
    assert_eq!(client.url(), url);

    let mut tasks = Vec::new();
    for i in 0..200 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = client
                .open(
                    &format!("/room/{i}?n={i}"),
                    vec![("X-User".into(), format!("u{i}").into_bytes())],
                )
                .await
                .unwrap();
            stream.send(Message::text("describe")).await.unwrap();
            assert_eq!(
                stream_text(&mut stream).await,
                format!("/room/{i}?n={i} user=u{i} resumed=false")
            );
            for j in 0..10 {
                let m = format!("{i}/{j}");
                stream.send(Message::text(m.clone())).await.unwrap();
                assert_eq!(stream_text(&mut stream).await, m);
            }
            stream.close().await.unwrap();
        }));
    }
    for t in tasks {
        within("a stream", t).await.unwrap();
    }
    wait_until("every stream to finish", || client.open_streams() == 0).await;
    assert!(!client.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_with_a_protocol_and_reject_with_a_status() {
    let server = describing_server().await;
    let url = format!("ws://{}/mux", server.local_addr());
    spawn_describer(server);
    let client = MuxClient::connect(&url).await.unwrap();

    let err = client.open("/private/x", Vec::new()).await.unwrap_err();
    assert_eq!(
        err,
        OpenError::Rejected {
            status: 403,
            reason: "private room".into()
        }
    );

    let mut stream = client
        .open(
            "/public",
            vec![("Sec-WebSocket-Protocol".into(), b"chat.v2".to_vec())],
        )
        .await
        .unwrap();
    assert_eq!(stream.protocol(), Some("chat.v2"));
    stream.send(Message::text("first")).await.unwrap();
    assert_eq!(
        stream_text(&mut stream).await,
        "/public? user= resumed=false"
    );
    stream
        .send(Message::binary(b"\x00\x01".to_vec()))
        .await
        .unwrap();
    match within("binary echo", stream.next()).await {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], b"\x00\x01"),
        other => panic!("expected binary, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_backend_example_echoes_and_answers_whoami() {
    let server = MuxServer::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr();
    tokio::spawn(mux_echo_backend::serve(server, "b7".into()));
    let client = MuxClient::connect(&format!("ws://{addr}/")).await.unwrap();
    let mut a = client.open("/a", Vec::new()).await.unwrap();
    let mut b = client.open("/b?x=1", Vec::new()).await.unwrap();
    a.send(Message::text("hello")).await.unwrap();
    b.send(Message::text("whoami")).await.unwrap();
    assert_eq!(stream_text(&mut a).await, "hello");
    assert_eq!(stream_text(&mut b).await, "b7");
    a.send(Message::Close(None)).await.unwrap();
    match within("the close echo", a.next()).await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected a close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_from_several_clients_are_counted() {
    let server = MuxServer::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", server.local_addr());
    let server = std::sync::Arc::new(server);
    let acceptor = std::sync::Arc::clone(&server);
    tokio::spawn(async move {
        while let Some(conn) = acceptor.accept().await {
            let link = conn.link_id();
            let mut stream = conn.accept(None);
            tokio::spawn(async move {
                let _ = stream.send(Message::text(link.to_string())).await;
                while let Some(Ok(m)) = stream.next().await {
                    if m.is_close() {
                        break;
                    }
                }
            });
        }
    });
    let one = MuxClient::connect(&url).await.unwrap();
    let two = MuxClient::connect(&url).await.unwrap();
    wait_until("two links", || server.link_count() == 2).await;
    let mut s1 = one.open("/", Vec::new()).await.unwrap();
    let mut s2 = two.open("/", Vec::new()).await.unwrap();
    let (l1, l2) = (stream_text(&mut s1).await, stream_text(&mut s2).await);
    assert_ne!(l1, l2, "each client has its own link");
    // A client dropped with no stream left releases its link.
    drop(s1);
    drop(one);
    wait_until("the first link to go", || server.link_count() == 1).await;
    s2.send(Message::text("still up")).await.unwrap();
    assert!(!two.is_closed());
}
