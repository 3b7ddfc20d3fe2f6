//! A backend's death or departure (DESIGN 4.5): with `on_backend_loss = "reconnect"` the client
//! keeps its socket and moves to the next backend in its rank, with the messages the relay held
//! replayed; with `"close"` it is closed 1012.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsrelay_tests::*;

fn config(policy: &str, urls: &[String]) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        r#"
[keepalive]
ping_interval = "0s"

[[route]]
path = "/"
upstream = "main"
hash_key = "header:X-User"

[upstream.main]
backends = [{}]
connect_timeout = "2s"
on_backend_loss = "{policy}"
"#,
        list.join(", ")
    )
}

async fn connect_as(relay: &TestRelay, user: &str) -> Client {
    let mut request = relay.url("/chat").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-user", user.parse().unwrap());
    connect_request(request).await.unwrap()
}

#[tokio::test]
async fn a_crashed_backend_moves_the_client_to_the_next_in_rank() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let urls = [a.url(), b.url()];
    let relay = TestRelay::start(&config("reconnect", &urls), &[]).await;
    let user = user_ranked_first(&urls, 0);
    let mut client = connect_as(&relay, &user).await;
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
    let urls = [a.url(), b.url()];
    let relay = TestRelay::start(&config("reconnect", &urls), &[]).await;
    let user = user_ranked_first(&urls, 0);
    let mut client = connect_as(&relay, &user).await;
    assert_eq!(round_trip(&mut client, "whoami").await, "a");
    a.stop();
    assert_eq!(round_trip(&mut client, "whoami").await, "b");
    // A new client of the same user can't reach a either and lands on b.
    let mut again = connect_as(&relay, &user).await;
    assert_eq!(round_trip(&mut again, "whoami").await, "b");
}

/// A backend that closes each connection with `code` after its first message.
async fn closing_backend(code: u16) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
                let _ = socket.next().await;
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: "restarting".into(),
                };
                let _ = socket.close(Some(frame)).await;
                while let Some(Ok(_)) = socket.next().await {}
            });
        }
    });
    (url, task)
}

#[tokio::test]
async fn a_backend_going_away_with_1001_or_1012_moves_the_client() {
    for code in [1001, 1012, 1013] {
        let (closing, _task) = closing_backend(code).await;
        let b = TestBackend::start("b").await;
        let urls = [closing, b.url()];
        let relay = TestRelay::start(&config("reconnect", &urls), &[]).await;
        let user = user_ranked_first(&urls, 0);
        let mut client = connect_as(&relay, &user).await;
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
    let urls = [a.url(), b.url()];
    let relay = TestRelay::start(&config("close", &urls), &[]).await;
    let mut client = connect_as(&relay, &user_ranked_first(&urls, 0)).await;
    assert_eq!(round_trip(&mut client, "whoami").await, "a");
    a.kill_connections();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Restart);
    assert!(b.connections().is_empty());
}

#[tokio::test]
async fn when_no_backend_is_left_the_client_gets_1012() {
    let a = TestBackend::start("a").await;
    let urls = [a.url()];
    let relay = TestRelay::start(&config("reconnect", &urls), &[]).await;
    let mut client = connect_as(&relay, "anyone").await;
    assert_eq!(round_trip(&mut client, "whoami").await, "a");
    a.stop();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Restart);
}

/// The sequence numbers of the `"NNNNNN ..."` messages a backend logged, in order.
fn numbers(backend: &TestBackend) -> Vec<u32> {
    backend
        .log
        .messages
        .lock()
        .unwrap()
        .iter()
        .filter_map(|m| m.to_text().ok()?.get(..6)?.parse().ok())
        .collect()
}

#[tokio::test]
async fn messages_in_flight_when_a_backend_crashes_reach_the_replacement() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let urls = [a.url(), b.url()];
    let relay = TestRelay::start(&config("reconnect", &urls), &[]).await;
    let client = connect_as(&relay, &user_ranked_first(&urls, 0)).await;
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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stuck_url = format!("ws://{}", listener.local_addr().unwrap());
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let stuck = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let _ = kill_rx.await;
        drop(socket);
    });
    let b = TestBackend::start("b").await;
    let urls = [stuck_url, b.url()];
    let relay = TestRelay::start(&config("reconnect", &urls), &[]).await;
    let mut client = connect_as(&relay, &user_ranked_first(&urls, 0)).await;

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
    let _ = kill_tx.send(());
    stuck.await.unwrap();
    let frame = expect_close(&mut client).await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Restart);
    assert_eq!(b.log.open.load(Ordering::SeqCst), 0);
}
