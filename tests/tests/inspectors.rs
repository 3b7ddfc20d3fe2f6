//! Inspector chains on real connections: a library user's rewriting inspector, the built-in
//! JSON, rate and size inspectors, and chains that leave other routes alone.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsrelay::inspect::{
    ConnectionInfo, Direction, FrameContext, Inspector, InspectorFactory, Verdict,
};
use wsrelay_testkit::*;

/// Prefixes client text with the connection's route, and hides backend messages that say
/// "secret": the kind of inspector an application writes in a few lines.
struct Stamp;

impl Inspector for Stamp {
    fn on_message(&mut self, context: &FrameContext<'_>, message: &mut Message) -> Verdict {
        let Message::Text(text) = message else {
            return Verdict::Forward;
        };
        match context.direction {
            Direction::ClientToBackend => {
                *message =
                    Message::text(format!("[{}] {}", context.connection.route, text.as_str()));
                Verdict::Forward
            }
            Direction::BackendToClient if text.as_str().contains("secret") => Verdict::Drop,
            Direction::BackendToClient => Verdict::Forward,
        }
    }
}

struct StampFactory;

impl InspectorFactory for StampFactory {
    fn create(&self, _: &ConnectionInfo, _: Option<&str>) -> Box<dyn Inspector> {
        Box::new(Stamp)
    }
}

fn routes(chat_inspect: &str) -> String {
    format!(
        r#"
[[route]]
path = "/chat"
upstream = "main"
inspect = [{chat_inspect}]

[[route]]
path = "/"
upstream = "main"

[upstream.main]
backends = BACKENDS
"#
    )
}

#[tokio::test]
async fn a_custom_inspector_rewrites_what_the_backend_gets_and_drops_what_the_client_sees() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start_with(&routes("\"stamp\""), &[&backend], |builder| {
        builder.inspector("stamp", StampFactory)
    })
    .await;
    let mut client = connect(&relay.url("/chat/room")).await;
    // The backend gets the rewritten text and echoes it.
    assert_eq!(round_trip(&mut client, "hello").await, "[/chat] hello");
    assert_eq!(
        backend.messages().last().cloned(),
        Some(Message::text("[/chat] hello"))
    );
    // The echo of "secret" is dropped on its way back; the next message still flows.
    client.send(Message::text("secret")).await.unwrap();
    assert_eq!(round_trip(&mut client, "after").await, "[/chat] after");

    // A route without the inspector is untouched.
    let mut plain = connect(&relay.url("/other")).await;
    assert_eq!(round_trip(&mut plain, "hello").await, "hello");
}

#[tokio::test]
async fn an_unknown_inspector_name_is_refused_at_start() {
    let error = wsrelay::config::Config::from_toml(
        &routes("\"nonesuch\"").replace("BACKENDS", "[\"ws://127.0.0.1:1\"]"),
        "t.toml",
    )
    .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("route[0].inspect") && text.contains("unknown inspector"),
        "{text}"
    );
}

#[tokio::test]
async fn a_json_route_closes_1007_on_invalid_json_and_json_drop_drops_it() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&routes("\"json\""), &[&backend]).await;
    let mut client = connect(&relay.url("/chat")).await;
    assert_eq!(round_trip(&mut client, "{\"say\":1}").await, "{\"say\":1}");
    client.send(Message::text("not json")).await.unwrap();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Invalid);

    let relay = TestRelay::start(&routes("\"json:drop\""), &[&backend]).await;
    let mut client = connect(&relay.url("/chat")).await;
    client.send(Message::text("not json")).await.unwrap();
    client.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(round_trip(&mut client, "[1,2]").await, "[1,2]");
    assert!(
        !backend.messages().contains(&Message::text("not json")),
        "the invalid message reached the backend"
    );
}

#[tokio::test]
async fn a_client_over_the_message_rate_is_closed_1008() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&routes("\"rate:20\""), &[&backend]).await;
    let mut client = connect(&relay.url("/chat")).await;
    // A full bucket allows 20 at once; the rest of a burst of 100 trips the limit.
    for n in 0..100 {
        if client.send(Message::text(format!("{n}"))).await.is_err() {
            break;
        }
    }
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Policy);
    let forwarded = backend.messages().len();
    assert!((20..100).contains(&forwarded), "{forwarded} forwarded");
}

#[tokio::test]
async fn max_messages_per_second_applies_to_every_route() {
    let backend = TestBackend::start("b").await;
    let toml = format!("[limits]\nmax_messages_per_second = 10\n{}", routes(""));
    let relay = TestRelay::start(&toml, &[&backend]).await;
    let mut client = connect(&relay.url("/anything")).await;
    for n in 0..50 {
        if client.send(Message::text(format!("{n}"))).await.is_err() {
            break;
        }
    }
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Policy);
}

#[tokio::test]
async fn a_route_size_limit_closes_1009() {
    let backend = TestBackend::start("b").await;
    let relay = TestRelay::start(&routes("\"max_size:1KiB\""), &[&backend]).await;
    let mut client = connect(&relay.url("/chat")).await;
    assert_eq!(round_trip(&mut client, &"x".repeat(1024)).await.len(), 1024);
    client.send(Message::text("x".repeat(1025))).await.unwrap();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Size);
}
