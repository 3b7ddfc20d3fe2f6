//! A client talks to its backend through the relay as if directly (issue point 3): text stays
//! text, binary stays binary, boundaries are kept, large messages arrive whole, close codes and
//! reasons cross both ways.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsrelay_testkit::*;

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
    wait_until("the reassembled message", || {
        backend.messages().iter().any(|m| m.len() == 1 << 20)
    })
    .await;
    let messages = backend.messages();
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
    wait_until("the backend to see the close", || {
        !backend.closes().is_empty()
    })
    .await;
    let seen = backend.closes()[0].clone().expect("a close frame");
    assert_eq!(seen.code, CloseCode::Library(4001));
    assert_eq!(seen.reason.as_str(), "bye now");
    wait_until("the backend leg to end", || backend.open() == 0).await;
}

#[tokio::test]
async fn a_close_without_status_crosses_as_no_status() {
    let backend = TestBackend::start("b1").await;
    let relay = TestRelay::simple(&[&backend]).await;
    let mut client = connect(&relay.url("/")).await;
    assert_eq!(round_trip(&mut client, "hi").await, "hi");
    client.close(None).await.unwrap();
    wait_until("the backend to see the close", || {
        !backend.closes().is_empty()
    })
    .await;
    assert_eq!(backend.closes()[0], None);
}

#[tokio::test]
async fn the_backends_close_code_and_reason_reach_the_client() {
    let closing =
        TestBackend::with_behavior("closing", BackendBehavior::closing(4403, "kicked by admin"))
            .await;
    let relay = TestRelay::simple(&[&closing]).await;
    let mut client = connect(&relay.url("/")).await;
    client.send(Message::text("hello")).await.unwrap();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Library(4403));
    assert_eq!(frame.reason.as_str(), "kicked by admin");
}

#[tokio::test]
async fn a_normal_backend_close_is_forwarded_not_reconnected() {
    // 1000 means "this conversation is over": the client must see it, not be moved.
    let closing =
        TestBackend::with_behavior("closing", BackendBehavior::closing(1000, "done")).await;
    let other = TestBackend::start("other").await;
    let relay = TestRelay::start(&simple_hashed("header:X-User"), &[&closing, &other]).await;
    let user = user_ranked_first(&[closing.url(), other.url()], 0);
    let mut client = connect_as(&relay.url("/"), &user).await;
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
    let relay = TestRelay::start(&simple_hashed("query:user"), &[&backends[0], &backends[1]]).await;
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
