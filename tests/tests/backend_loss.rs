//! A backend's death or departure (docs/operations.md, "Backend loss"): with `on_backend_loss = "reconnect"` the client
//! keeps its socket and moves to the next backend in its rank, with the messages the relay held
//! replayed; with `"close"` it is closed 1012.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsrelay_testkit::*;

fn config(policy: &str, urls: &[String]) -> String {
    format!(
        r#"
[keepalive]
ping_interval = "0s"

[[route]]
path = "/"
upstream = "main"
hash_key = "header:X-User"

[upstream.main]
backends = {}
connect_timeout = "2s"
on_backend_loss = "{policy}"
"#,
        backend_list(urls)
    )
}

/// A relay with `policy` over `backends` (in this order), and a user it ranks on the first.
async fn relay_and_user(policy: &str, backends: &[&TestBackend]) -> (TestRelay, String) {
    let urls: Vec<String> = backends.iter().map(|b| b.url()).collect();
    let relay = TestRelay::start(&config(policy, &urls), &[]).await;
    (relay, user_ranked_first(&urls, 0))
}

/// Connects to the relay's `/chat` as `user`.
async fn chat_as(relay: &TestRelay, user: &str) -> Client {
    connect_as(&relay.url("/chat"), user).await
}

#[tokio::test]
async fn a_crashed_backend_moves_the_client_to_the_next_in_rank() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let (relay, user) = relay_and_user("reconnect", &[&a, &b]).await;
    let mut client = chat_as(&relay, &user).await;
    assert_eq!(round_trip(&mut client, "whoami").await, "a");

    a.kill_connections();
    // Same socket, new backend. The first whoami may not have been acknowledged by "a" before
    // it died, so "b" may answer it again (at-least-once): every answer now says "b".
    assert_eq!(round_trip(&mut client, "whoami").await, "b");
    client.send(Message::text("still here")).await.unwrap();
    loop {
        match next_data(&mut client).await.into_text().unwrap().as_str() {
            "still here" => break,
            "b" => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    // The replacement leg carries the client's original request.
    let seen = &b.connections()[0];
    assert_eq!(seen.target, "/chat");
    assert_eq!(seen.headers["x-user"], user.as_str());
}

#[tokio::test]
async fn a_backend_that_stops_listening_moves_its_clients_and_new_ones_skip_it() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let (relay, user) = relay_and_user("reconnect", &[&a, &b]).await;
    let mut client = chat_as(&relay, &user).await;
    assert_eq!(round_trip(&mut client, "whoami").await, "a");
    a.stop();
    assert_eq!(round_trip(&mut client, "whoami").await, "b");
    // A new client of the same user can't reach a either and lands on b.
    let mut again = chat_as(&relay, &user).await;
    assert_eq!(round_trip(&mut again, "whoami").await, "b");
}

#[tokio::test]
async fn a_backend_going_away_with_1001_or_1012_moves_the_client() {
    for code in [1001, 1012, 1013] {
        // Closes each connection with `code` after its first message.
        let closing =
            TestBackend::with_behavior("closing", BackendBehavior::closing(code, "restarting"))
                .await;
        let b = TestBackend::start("b").await;
        let (relay, user) = relay_and_user("reconnect", &[&closing, &b]).await;
        let mut client = chat_as(&relay, &user).await;
        // The first backend takes this message, then says it is going away before it
        // acknowledged it: the message is replayed to "b" (at-least-once), which echoes it.
        client.send(Message::text("first")).await.unwrap();
        assert_eq!(
            next_data(&mut client).await,
            Message::text("first"),
            "close code {code}"
        );
        assert_eq!(
            round_trip(&mut client, "whoami").await,
            "b",
            "close code {code}"
        );
    }
}

#[tokio::test]
async fn with_on_backend_loss_close_the_client_gets_1012() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let (relay, user) = relay_and_user("close", &[&a, &b]).await;
    let mut client = chat_as(&relay, &user).await;
    assert_eq!(round_trip(&mut client, "whoami").await, "a");
    a.kill_connections();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Restart);
    assert!(b.connections().is_empty());
}

#[tokio::test]
async fn when_no_backend_is_left_the_client_gets_1012() {
    let a = TestBackend::start("a").await;
    let relay = TestRelay::start(&config("reconnect", &[a.url()]), &[]).await;
    let mut client = chat_as(&relay, "anyone").await;
    assert_eq!(round_trip(&mut client, "whoami").await, "a");
    a.stop();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Restart);
}

/// The sequence numbers of the `"NNNNNN ..."` messages a backend logged, in order.
fn numbers(backend: &TestBackend) -> Vec<u32> {
    backend
        .messages()
        .iter()
        .filter_map(|m| m.to_text().ok()?.get(..6)?.parse().ok())
        .collect()
}

#[tokio::test]
async fn messages_in_flight_when_a_backend_crashes_reach_the_replacement() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let (relay, user) = relay_and_user("reconnect", &[&a, &b]).await;
    let client = chat_as(&relay, &user).await;
    let (mut sink, mut stream) = client.split();
    // Echoes must be read or back-pressure would stall the backends.
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });

    const TOTAL: u32 = 400;
    for n in 0..TOTAL {
        sink.send(Message::text(format!("{n:06} payload")))
            .await
            .unwrap();
        if n == TOTAL / 4 {
            // Crash "a" while messages are streaming at it.
            a.wait_for("a to get some messages", |log| {
                !log.messages.lock().unwrap().is_empty()
            })
            .await;
            a.kill_connections();
        }
        if n % 16 == 0 {
            tokio::task::yield_now().await;
        }
    }
    b.wait_for("the last message at b", |_| {
        numbers(&b).last() == Some(&(TOTAL - 1))
    })
    .await;

    let at_a = numbers(&a);
    let at_b = numbers(&b);
    // Every message reached a backend (at least once)...
    for n in 0..TOTAL {
        assert!(
            at_a.contains(&n) || at_b.contains(&n),
            "message {n} lost; a has {} b has {}",
            at_a.len(),
            at_b.len()
        );
    }
    // ...each backend saw them in order, and b continued where a's acknowledged part ended.
    assert!(at_a.windows(2).all(|w| w[1] == w[0] + 1));
    assert!(
        at_b.windows(2).all(|w| w[1] == w[0] + 1),
        "b saw gaps or reordering"
    );
    assert!(at_b[0] <= *at_a.last().unwrap() + 1);
    assert!(!reader.is_finished(), "the client was disconnected");
}

#[tokio::test]
async fn a_stuck_backend_that_dies_closes_its_client_1012_rather_than_lose_messages() {
    // Backend "a" accepts and then never reads: it acknowledges nothing, the client's
    // messages pile up in kernel buffers, and the relay can't know what "a" would have read.
    let stuck = TestBackend::with_behavior("stuck", BackendBehavior::silent()).await;
    let b = TestBackend::start("b").await;
    let (relay, user) = relay_and_user("reconnect", &[&stuck, &b]).await;
    let mut client = chat_as(&relay, &user).await;

    let payload = "x".repeat(64 * 1024);
    let mut sent = 0u32;
    // Send until back-pressure stops the client.
    loop {
        let message = Message::text(format!("{sent:06} {payload}"));
        match tokio::time::timeout(Duration::from_millis(500), client.send(message)).await {
            Ok(result) => result.unwrap(),
            Err(_) => break,
        }
        sent += 1;
        assert!(sent < 10_000, "no back-pressure");
    }
    // "a" dies: its connection drops and its port closes.
    stuck.stop();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Restart);
    assert_eq!(b.open(), 0);
}

/// Sends `user:0` .. `user:{count-1}` in bursts of 5 every 5 ms or more (400 messages take at
/// least 400 ms, longer than a 200 ms grace, however fast the relay) while reading the
/// echoes; returns the echoes.
async fn stream_numbered(url: String, user: String, count: u32) -> Vec<String> {
    let client = connect_as(&url, &user).await;
    let (mut write, mut read) = client.split();
    let writer = async {
        for n in 0..count {
            write
                .send(Message::text(format!("{user}:{n}")))
                .await
                .unwrap();
            if n % 5 == 4 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let reader = async {
        let mut echoes = Vec::new();
        while echoes.len() < count as usize {
            match tokio::time::timeout(WAIT, read.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => echoes.push(text.as_str().to_owned()),
                Ok(Some(Ok(_))) => {}
                other => panic!(
                    "{user}: the socket ended after {} echoes: {other:?}",
                    echoes.len()
                ),
            }
        }
        echoes
    };
    let ((), echoes) = tokio::join!(writer, reader);
    echoes
}

#[tokio::test]
async fn a_move_the_relay_decides_delivers_every_message_exactly_once_and_in_order() {
    let leaving = TestBackend::start("leaving").await;
    let staying = TestBackend::start("staying").await;
    let urls = [leaving.url(), staying.url()];
    let with = |backends: &[String]| {
        format!(
            r#"
[server]
shutdown_grace = "200ms"
{}"#,
            config("reconnect", backends)
        )
    };
    let relay = TestRelay::start(&with(&urls), &[]).await;
    let users = users_ranked_first(&urls, 0, 20);
    const COUNT: u32 = 400;
    let clients: Vec<_> = users
        .iter()
        .map(|user| tokio::spawn(stream_numbered(relay.url("/chat"), user.clone(), COUNT)))
        .collect();
    wait_until("traffic on the leaving backend", || {
        leaving.texts().len() > 500
    })
    .await;
    // The reload removes the backend while its clients talk: after the grace they move.
    let report = relay
        .handle
        .reload(wsrelay::config::Config::from_toml(&with(&urls[1..]), "reload").unwrap())
        .await
        .unwrap();
    println!("{report}");

    for (user, client) in users.iter().zip(clients) {
        let echoes = client.await.unwrap();
        let expected: Vec<String> = (0..COUNT).map(|n| format!("{user}:{n}")).collect();
        assert_eq!(echoes, expected, "{user}: every echo once, in order");
    }
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for text in leaving.texts().into_iter().chain(staying.texts()) {
        *seen.entry(text).or_default() += 1;
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "{} messages reached the backends twice, e.g. {:?}",
        duplicates.len(),
        duplicates.first()
    );
    assert_eq!(
        seen.len(),
        users.len() * COUNT as usize,
        "every message reached a backend"
    );
    assert!(!staying.texts().is_empty(), "the clients moved");
}

#[tokio::test]
async fn messages_replayed_to_a_replacement_that_dies_too_reach_the_next_one() {
    // "a" and "b" take the client's messages and acknowledge none; both die in turn.
    let a = TestBackend::with_behavior("a", BackendBehavior::silent()).await;
    let b = TestBackend::with_behavior("b", BackendBehavior::silent()).await;
    let c = TestBackend::start("c").await;
    let urls = [a.url(), b.url(), c.url()];
    let ranking = wsrelay::hashing::Ranking::new(urls.iter().map(|u| (u.as_str(), 1.0)));
    let user = (0..10_000)
        .map(|n| format!("user-{n}"))
        .find(|user| ranking.rank(user.as_bytes()) == [0, 1, 2])
        .expect("a user ranked a, b, c");
    let relay = TestRelay::start(&config("reconnect", &urls), &[]).await;
    let mut client = chat_as(&relay, &user).await;
    for n in 0..10 {
        client.send(Message::text(format!("{n:06}"))).await.unwrap();
    }
    wait_until("the relay to send them to a", || a.open() == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Gone for good, so that the next move can't go back to it.
    let _a = a.stop();
    wait_until("the move to b", || b.open() == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.kill_connections();
    c.wait_for("all ten messages at c", |_| numbers(&c).len() == 10)
        .await;
    assert_eq!(
        numbers(&c),
        (0..10).collect::<Vec<_>>(),
        "in order, once each"
    );
    for n in 0..10 {
        let echo = next_data(&mut client).await;
        assert_eq!(
            echo.to_text().unwrap(),
            format!("{n:06}"),
            "c's echoes reach the client"
        );
    }
    assert_eq!(round_trip(&mut client, "still here").await, "still here");
}
