//! The chat backend example over real sockets, driven by MuxClient streams.
//!
//! Waits are bounded by generous deadlines; nothing asserts on elapsed time.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tungstenite::Message;
use wsrelay_client::{LinkConfig, MuxClient, MuxServer, MuxStream};
use wsrelay_testkit::within;

#[allow(dead_code)]
#[path = "../examples/chat_backend.rs"]
mod chat_backend;

async fn chat_server() -> String {
    let server = MuxServer::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/chat", server.local_addr());
    tokio::spawn(chat_backend::serve(server));
    url
}

async fn send(stream: &mut MuxStream, value: Value) {
    stream.send(Message::text(value.to_string())).await.unwrap();
}

async fn recv(stream: &mut MuxStream) -> Value {
    match within("a chat event", stream.next()).await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a chat event, got {other:?}"),
    }
}

fn said(room: &str, nick: &str, text: &str) -> Value {
    json!({"type": "said", "room": room, "nick": nick, "text": text})
}

/// A user who set a nick, joined `room`, and said hello there (waiting for its own hello, so
/// the join has taken effect).
async fn user(client: &MuxClient, nick: &str, room: &str) -> MuxStream {
    let mut s = client.open("/chat", Vec::new()).await.unwrap();
    send(&mut s, json!({"type": "nick", "name": nick})).await;
    send(&mut s, json!({"type": "join", "room": room})).await;
    let hello = format!("{nick} here");
    send(&mut s, json!({"type": "say", "text": hello})).await;
    assert_eq!(recv(&mut s).await, said(room, nick, &hello));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_users_in_two_rooms_see_exactly_their_rooms_messages() {
    let url = chat_server().await;
    let client = MuxClient::connect(&url).await.unwrap();
    let mut ann = user(&client, "ann", "rust").await;
    let mut bob = user(&client, "bob", "rust").await;
    // ann was in "rust" when bob said hello.
    assert_eq!(recv(&mut ann).await, said("rust", "bob", "bob here"));
    let mut cat = user(&client, "cat", "go").await;

    send(&mut ann, json!({"type": "say", "text": "hello rust"})).await;
    assert_eq!(recv(&mut ann).await, said("rust", "ann", "hello rust"));
    assert_eq!(recv(&mut bob).await, said("rust", "ann", "hello rust"));
    send(&mut cat, json!({"type": "say", "text": "hello go"})).await;
    assert_eq!(recv(&mut cat).await, said("go", "cat", "hello go"));
    send(&mut bob, json!({"type": "say", "text": "hi ann"})).await;
    assert_eq!(recv(&mut bob).await, said("rust", "bob", "hi ann"));
    assert_eq!(recv(&mut ann).await, said("rust", "bob", "hi ann"));

    // Nothing else is on its way: a last message in each room is the next each member sees.
    send(&mut ann, json!({"type": "say", "text": "end rust"})).await;
    send(&mut cat, json!({"type": "say", "text": "end go"})).await;
    assert_eq!(recv(&mut ann).await, said("rust", "ann", "end rust"));
    assert_eq!(recv(&mut bob).await, said("rust", "ann", "end rust"));
    assert_eq!(recv(&mut cat).await, said("go", "cat", "end go"));

    // A stream starts in the lobby as anon-<id>; bad input gets an error, not a disconnect.
    let mut anon = client.open("/chat", Vec::new()).await.unwrap();
    send(&mut anon, json!({"type": "dance"})).await;
    assert_eq!(recv(&mut anon).await["type"], "error");
    send(&mut anon, json!({"type": "say", "text": "hey"})).await;
    let event = recv(&mut anon).await;
    assert_eq!(event["room"], "lobby");
    assert!(
        event["nick"].as_str().unwrap().starts_with("anon-"),
        "{event}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_never_reads_is_closed_and_the_room_keeps_talking() {
    let url = chat_server().await;
    // A small receive window, so the unread stream's credit runs out after a few hundred
    // events and its queue fills soon after.
    let client = MuxClient::connect_with_config(
        &url,
        LinkConfig {
            max_frame: 16 << 10,
            initial_window: 16 << 10,
            ..LinkConfig::default()
        },
    )
    .await
    .unwrap();
    let mut slow = user(&client, "slow", "busy").await;
    let mut fast = user(&client, "fast", "busy").await;
    // The fast user talks far more than the slow one's window plus its queue of
    // USER_QUEUE events can hold, and hears every one of its own messages.
    const SAID: usize = 3000;
    for i in 0..SAID {
        let text = format!("message {i}");
        send(&mut fast, json!({"type": "say", "text": text})).await;
        assert_eq!(recv(&mut fast).await, said("busy", "fast", &text));
    }
    // The slow user finally reads: some events, then a policy close.
    let mut events = 0;
    loop {
        match within("the slow user's stream", slow.next()).await {
            Some(Ok(Message::Text(_))) => events += 1,
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1008, "{f:?}");
                break;
            }
            other => panic!("expected events then a close, got {other:?}"),
        }
    }
    assert!(
        events < 1500,
        "the slow user was dropped, not buffered without bound"
    );
}
