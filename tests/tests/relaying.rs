//! A client talks to its backend through the relay as if directly (issue point 3): text stays
//! text, binary stays binary, boundaries are kept, large messages arrive whole, close codes and
//! reasons cross both ways.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsrelay_tests::*;

#[tokio::test]
async fn text_stays_text_and_binary_stays_binary_in_order() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let mut client = connect(&relay.url("/chat")).await;
    for n in 0..50u32 {
        client
            .send(Message::text(format!("text {n}")))
            .await
            .unwrap();
        client
            .send(Message::binary(n.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    for n in 0..50u32 {
        assert_eq!(
            next_data(&mut client).await,
            Message::text(format!("text {n}"))
        );
        assert_eq!(
            next_data(&mut client).await,
            Message::binary(n.to_be_bytes().to_vec())
        );
    }
    // Empty messages are messages too.
    client.send(Message::text("")).await.unwrap();
    assert_eq!(next_data(&mut client).await, Message::text(""));
    client.send(Message::binary(Vec::new())).await.unwrap();
    assert_eq!(next_data(&mut client).await, Message::binary(Vec::new()));
}

#[tokio::test]
async fn a_message_at_the_size_limit_arrives_whole_even_when_fragmented() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let mut raw = RawClient::connect(relay.addr(), "/").await;
    // 1 MiB (the default max_message_size) in four fragments: the backend gets one message.
    let quarter = vec![b'q'; 256 * 1024];
    raw.send_frame(0x01, &quarter, true).await;
    raw.send_frame(0x00, &quarter, true).await;
    raw.send_frame(0x00, &quarter, true).await;
    raw.send_frame(0x80, &quarter, true).await;
    backend
        .wait_for("the reassembled message", |log| {
            log.messages
                .lock()
                .unwrap()
                .iter()
                .any(|m| m.len() == 1 << 20)
        })
        .await;
    let messages = backend.log.messages.lock().unwrap().clone();
    assert_eq!(messages.len(), 1, "one message, not four");
    assert!(messages[0].is_text());

    let mut client = connect(&relay.url("/")).await;
    let payload: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    client.send(Message::binary(payload.clone())).await.unwrap();
    assert_eq!(next_data(&mut client).await, Message::binary(payload));
}

#[tokio::test]
async fn the_clients_close_code_and_reason_reach_the_backend() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let mut client = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut client, "hi").await, "hi");
    client
        .close(Some(CloseFrame {
            code: CloseCode::Library(4001),
            reason: "bye now".into(),
        }))
        .await
        .unwrap();
    // The relay completes the client's close handshake...
    let echoed = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(echoed.code, CloseCode::Library(4001));
    // ...and the backend sees the same code and reason.
    backend
        .wait_for("the backend to see the close", |log| {
            !log.closes.lock().unwrap().is_empty()
        })
        .await;
    let seen = backend.log.closes.lock().unwrap()[0]
        .clone()
        .expect("a close frame");
    assert_eq!(seen.code, CloseCode::Library(4001));
    assert_eq!(seen.reason.as_str(), "bye now");
    backend
        .wait_for("the backend leg to end", |log| {
            log.open.load(std::sync::atomic::Ordering::SeqCst) == 0
        })
        .await;
}

#[tokio::test]
async fn a_close_without_status_crosses_as_no_status() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let mut client = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut client, "hi").await, "hi");
    client.close(None).await.unwrap();
    backend
        .wait_for("the backend to see the close", |log| {
            !log.closes.lock().unwrap().is_empty()
        })
        .await;
    assert_eq!(backend.log.closes.lock().unwrap()[0], None);
}

/// A backend that closes every connection with a given code after the first message.
async fn closing_backend(
    code: u16,
    reason: &'static str,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
                let _ = socket.next().await;
                let _ = socket
                    .close(Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    }))
                    .await;
                while let Some(Ok(_)) = socket.next().await {}
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn the_backends_close_code_and_reason_reach_the_client() {
    let (addr, _backend) = closing_backend(4403, "kicked by admin").await;
    let toml = SIMPLE.replace("BACKENDS", &format!("[\"ws://{addr}\"]"));
    let relay = TestRelay::start(&toml, &[]).await;
    let mut client = connect(&relay.url("/")).await;
    client.send(Message::text("hello")).await.unwrap();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Library(4403));
    assert_eq!(frame.reason.as_str(), "kicked by admin");
}

#[tokio::test]
async fn a_normal_backend_close_is_forwarded_not_reconnected() {
    // 1000 means "this conversation is over": the client must see it, not be moved.
    let (addr, _backend) = closing_backend(1000, "done").await;
    let other = TestBackend::start("other").await;
    let urls = [format!("ws://{addr}"), other.url()];
    let toml = SIMPLE
        .replace("BACKENDS", &format!("[\"{}\", \"{}\"]", urls[0], urls[1]))
        .replace(
            "upstream = \"main\"",
            "upstream = \"main\"\nhash_key = \"header:X-User\"",
        );
    let relay = TestRelay::start(&toml, &[]).await;
    let user = user_ranked_first(&urls, 0);
    let mut request = relay.url("/").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-user", user.parse().unwrap());
    let mut client = connect_request(request).await.unwrap();
    client.send(Message::text("whoami")).await.unwrap();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Normal);
    assert_eq!(frame.reason.as_str(), "done");
    assert!(
        other.connections().is_empty(),
        "the client was moved to another backend"
    );
}

#[tokio::test]
async fn many_clients_at_once_each_get_their_own_answers() {
    let backends = [TestBackend::start("a").await, TestBackend::start("b").await];
    let relay = TestRelay::start(
        &SIMPLE.replace(
            "upstream = \"main\"",
            "upstream = \"main\"\nhash_key = \"query:user\"",
        ),
        &[&backends[0], &backends[1]],
    )
    .await;
    let mut tasks = Vec::new();
    for n in 0..100 {
        let url = relay.url(&format!("/chat?user=u{n}"));
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            for i in 0..20 {
                let text = format!("client {n} message {i}");
                assert_eq!(round_trip(&mut client, &text).await, text);
            }
            round_trip(&mut client, "whoami").await
        }));
    }
    let mut served = std::collections::BTreeMap::new();
    for task in tasks {
        *served.entry(task.await.unwrap()).or_insert(0) += 1;
    }
    // Hashing by user spreads them over both backends.
    assert_eq!(served.len(), 2, "{served:?}");
}
