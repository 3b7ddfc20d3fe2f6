//! `Client` against a real WebSocket backend on 127.0.0.1 (no relay): messages both ways,
//! what each close code does, abrupt losses, the heartbeat, both queue policies, closing and
//! dropping, refused handshakes, and the backoff timings under a paused clock.

mod common;

use std::time::Duration;

use common::*;
use tungstenite::protocol::CloseFrame;
use wsrelay_client::{
    Backoff, Client, CloseReason, ConnectError, Event, Heartbeat, Jitter, Message, QueuePolicy,
    Reconnect, SendError, State,
};
use wsrelay_testkit::{BackendBehavior, TestBackend, unused_addr, wait_until};

/// The close frame `code` and `reason` make, as a backend records it.
fn close_frame(code: u16, reason: &str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code: code.into(),
        reason: reason.into(),
    })
}

#[tokio::test]
async fn messages_go_both_ways_with_headers_and_a_subprotocol() {
    let backend = TestBackend::with_behavior("echo", BackendBehavior::picking("chat.v2")).await;
    let mut client = Client::builder(&backend.url())
        .header("X-User", "ann")
        .subprotocols(["chat.v2", "chat.v1"])
        .connect()
        .await
        .unwrap();
    match next_event(&mut client).await {
        Event::Connected(c) => {
            assert_eq!(c.protocol.as_deref(), Some("chat.v2"));
            assert_eq!(c.connection, 1);
            assert!(!c.is_reconnect());
        }
        other => panic!("expected Connected first, got {other:?}"),
    }
    assert_eq!(client.state(), State::Connected);
    client.send("hello").await.unwrap();
    client.send(vec![0u8, 1, 2]).await.unwrap();
    let sender = client.sender();
    sender.try_send(Message::text("from a sender")).unwrap();
    assert_eq!(next_text(&mut client).await, "hello");
    match next_event(&mut client).await {
        Event::Message(Message::Binary(data)) => assert_eq!(&data[..], [0, 1, 2]),
        other => panic!("expected the binary echo, got {other:?}"),
    }
    assert_eq!(next_text(&mut client).await, "from a sender");
    let headers = backend.connections()[0].headers.clone();
    assert_eq!(headers["x-user"], "ann");
    assert_eq!(headers["sec-websocket-protocol"], "chat.v2, chat.v1");
}

#[tokio::test]
async fn server_closes_with_1001_1012_1013_and_other_codes_reconnect() {
    for code in [1001u16, 1011, 1012, 1013, 4000] {
        let backend = TestBackend::start("echo").await;
        let mut client = reconnecting(&backend.url()).await;
        assert_eq!(connected(&mut client).await, 1);
        client.send(format!("close:{code}")).await.unwrap();
        assert_eq!(disconnected(&mut client).await.0, Some(code), "{code}");
        match next_event(&mut client).await {
            Event::Reconnecting {
                attempt: 1,
                error: None,
                ..
            } => {}
            other => panic!("{code}: expected Reconnecting, got {other:?}"),
        }
        assert_eq!(connected(&mut client).await, 2, "{code}");
        client.send("after").await.unwrap();
        assert_eq!(next_text(&mut client).await, "after");
        assert_eq!(backend.connections().len(), 2);
    }
}

#[tokio::test]
async fn server_closes_with_1000_or_1008_end_the_client() {
    for code in [1000u16, 1008] {
        let backend = TestBackend::start("echo").await;
        let mut client = reconnecting(&backend.url()).await;
        client.send(format!("close:{code}")).await.unwrap();
        assert_eq!(disconnected(&mut client).await.0, Some(code));
        match closed(&mut client).await {
            CloseReason::Remote { code: got, reason } => {
                assert_eq!(got, code);
                assert_eq!(reason, "test close");
            }
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(client.state(), State::Closed);
        match client.send("too late").await {
            Err(SendError::Closed { message, .. }) => {
                assert_eq!(message, Message::text("too late"))
            }
            other => panic!("{other:?}"),
        }
        // The event stream ends after Closed: the connection task is gone, so nothing can
        // reconnect later.
        assert!(
            client.next_event().await.is_none(),
            "{code}: events after Closed"
        );
        assert_eq!(backend.connections().len(), 1, "{code}: no reconnect");
    }
}

#[tokio::test]
async fn an_abrupt_disconnect_reconnects() {
    let backend = TestBackend::start("echo").await;
    let mut client = reconnecting(&backend.url()).await;
    assert_eq!(connected(&mut client).await, 1);
    backend.kill_connections();
    let (code, reason) = disconnected(&mut client).await;
    assert_eq!(code, None, "{reason}");
    assert_eq!(connected(&mut client).await, 2);
    client.send("still there?").await.unwrap();
    assert_eq!(next_text(&mut client).await, "still there?");
}

#[tokio::test]
async fn a_message_over_max_message_size_drops_the_connection_with_1009_and_reconnects() {
    let backend = TestBackend::start("echo").await;
    let mut client = Client::builder(&backend.url())
        .reconnect(quick_reconnect())
        .max_message_size(1000)
        .connect()
        .await
        .unwrap();
    assert_eq!(connected(&mut client).await, 1);
    // The limit is on what arrives: the backend's echo of this is too big.
    client.send("x".repeat(2000)).await.unwrap();
    let (code, reason) = disconnected(&mut client).await;
    assert_eq!(code, None);
    assert!(
        reason.contains("the server sent something invalid"),
        "{reason}"
    );
    wait_until("the backend to see the 1009", || {
        backend.close_codes().first() == Some(&Some(1009))
    })
    .await;
    assert_eq!(connected(&mut client).await, 2);
    client.send("small").await.unwrap();
    assert_eq!(next_text(&mut client).await, "small");
}

#[tokio::test]
async fn the_heartbeat_finds_a_silent_server_dead_and_reconnects() {
    let backend = TestBackend::with_behavior("silent", BackendBehavior::silent()).await;
    let mut client = Client::builder(&backend.url())
        .reconnect(quick_reconnect())
        .heartbeat(Heartbeat {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(200),
        })
        .connect()
        .await
        .unwrap();
    assert_eq!(connected(&mut client).await, 1);
    let (code, reason) = disconnected(&mut client).await;
    assert_eq!(code, None);
    assert!(reason.contains("ping"), "{reason}");
    assert_eq!(connected(&mut client).await, 2);
    assert_eq!(backend.connections().len(), 2);
}

#[tokio::test]
async fn the_heartbeat_keeps_an_answering_server() {
    let backend = TestBackend::start("echo").await;
    let mut client = Client::builder(&backend.url())
        .heartbeat(Heartbeat {
            interval: Duration::from_millis(30),
            timeout: Duration::from_millis(500),
        })
        .connect()
        .await
        .unwrap();
    assert_eq!(connected(&mut client).await, 1);
    // Many ping rounds pass; the server answers each.
    tokio::time::sleep(Duration::from_millis(400)).await;
    client.send("alive").await.unwrap();
    assert_eq!(next_text(&mut client).await, "alive");
    assert_eq!(backend.connections().len(), 1);
}

#[tokio::test]
async fn a_buffer_queue_is_written_in_order_once_after_reconnecting_and_try_send_says_full() {
    let backend = TestBackend::start("echo").await;
    let mut client = Client::builder(&backend.url())
        .reconnect(quick_reconnect())
        .queue(QueuePolicy::Buffer { max_messages: 5 })
        .connect()
        .await
        .unwrap();
    client.send("before").await.unwrap();
    assert_eq!(next_text(&mut client).await, "before");
    let stopped = backend.stop();
    disconnected(&mut client).await;
    assert_ne!(client.state(), State::Connected);
    for n in 0..5 {
        client.try_send(format!("queued {n}")).unwrap();
    }
    match client.try_send("one too many") {
        Err(SendError::Full {
            capacity, message, ..
        }) => {
            assert_eq!(capacity, 5);
            assert_eq!(message.as_text(), Some("one too many"));
        }
        other => panic!("expected Full, got {other:?}"),
    }
    // The client keeps retrying; the backend comes back on the same port.
    let backend = stopped.restart().await;
    assert_eq!(connected(&mut client).await, 2);
    for n in 0..5 {
        assert_eq!(next_text(&mut client).await, format!("queued {n}"));
    }
    client.send("after").await.unwrap();
    assert_eq!(next_text(&mut client).await, "after");
    let expected: Vec<String> = std::iter::once("before".to_owned())
        .chain((0..5).map(|n| format!("queued {n}")))
        .chain(std::iter::once("after".to_owned()))
        .collect();
    assert_eq!(backend.texts(), expected, "each message once, in order");
}

#[tokio::test]
async fn on_connect_messages_go_first_on_every_connection() {
    let backend = TestBackend::start("echo").await;
    let mut client = Client::builder(&backend.url())
        .reconnect(quick_reconnect())
        .on_connect(|c| vec![Message::text(format!("hello #{}", c.connection))])
        .connect()
        .await
        .unwrap();
    assert_eq!(next_text(&mut client).await, "hello #1");
    let stopped = backend.stop();
    disconnected(&mut client).await;
    client.send("queued").await.unwrap();
    let backend = stopped.restart().await;
    assert_eq!(next_text(&mut client).await, "hello #2");
    assert_eq!(next_text(&mut client).await, "queued");
    assert_eq!(backend.texts(), ["hello #1", "hello #2", "queued"]);
}

#[tokio::test]
async fn fail_fast_refuses_while_disconnected() {
    let backend = TestBackend::start("echo").await;
    let mut client = Client::builder(&backend.url())
        .reconnect(quick_reconnect())
        .queue(QueuePolicy::FailFast)
        .connect()
        .await
        .unwrap();
    client.send("one").await.unwrap();
    assert_eq!(next_text(&mut client).await, "one");
    let stopped = backend.stop();
    disconnected(&mut client).await;
    match client.send("while down").await {
        Err(SendError::Disconnected { message, url }) => {
            assert_eq!(message.as_text(), Some("while down"));
            assert_eq!(&*url, client.url());
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(matches!(
        client.try_send("also while down"),
        Err(SendError::Disconnected { .. })
    ));
    let backend = stopped.restart().await;
    assert_eq!(connected(&mut client).await, 2);
    client.send("two").await.unwrap();
    assert_eq!(next_text(&mut client).await, "two");
    assert_eq!(backend.texts(), ["one", "two"]);
    assert_eq!(client.discarded_messages(), 0);
}

#[tokio::test]
async fn close_sends_its_code_and_stops_the_client() {
    let backend = TestBackend::start("echo").await;
    let mut client = Client::connect(&backend.url()).await.unwrap();
    assert_eq!(connected(&mut client).await, 1);
    client.close(4000, "done").await;
    assert_eq!(client.state(), State::Closed);
    match closed(&mut client).await {
        CloseReason::Local { code, reason } => assert_eq!((code, reason.as_str()), (4000, "done")),
        other => panic!("{other:?}"),
    }
    wait_until("the backend to see the close", || {
        backend.closes() == [close_frame(4000, "done")]
    })
    .await;
    assert!(matches!(
        client.send("x").await,
        Err(SendError::Closed { .. })
    ));
}

#[tokio::test]
async fn dropping_every_handle_closes_with_1000() {
    let backend = TestBackend::start("echo").await;
    let client = Client::connect(&backend.url()).await.unwrap();
    let sender = client.sender();
    drop(client);
    // A sender keeps the connection up.
    sender.send("still sending").await.unwrap();
    wait_until("the message", || backend.texts() == ["still sending"]).await;
    drop(sender);
    wait_until("the backend to see the close", || {
        backend.closes() == [close_frame(1000, "client dropped")]
    })
    .await;
}

#[tokio::test]
async fn a_4xx_refusal_is_final_and_a_5xx_is_retried_after_its_retry_after() {
    let forbidden = TestBackend::with_behavior("forbidden", BackendBehavior::refusing(403)).await;
    let error = Client::connect(&forbidden.url()).await.unwrap_err();
    assert_eq!(error.status(), Some(403));
    assert!(error.is_permanent());
    assert!(
        error.to_string().starts_with(&format!(
            "connect {}: the server answered HTTP 403",
            forbidden.url()
        )),
        "{error}"
    );

    // In the background: no retry on 403.
    let mut client = Client::builder(&forbidden.url())
        .reconnect(quick_reconnect())
        .start()
        .unwrap();
    match closed(&mut client).await {
        CloseReason::Refused(error) => assert_eq!(error.status(), Some(403)),
        other => panic!("{other:?}"),
    }

    // 503 with Retry-After: retried, the wait raised to the Retry-After (capped at max).
    let busy =
        TestBackend::with_behavior("busy", BackendBehavior::refusing(503).retry_after(1)).await;
    let mut client = Client::builder(&busy.url())
        .reconnect(
            Reconnect::default()
                .backoff(Duration::from_millis(10), Duration::from_millis(50))
                .max_attempts(Some(2)),
        )
        .start()
        .unwrap();
    for expected in 1..=2 {
        match next_event(&mut client).await {
            Event::Reconnecting {
                attempt,
                delay,
                error: Some(error),
            } => {
                assert_eq!(attempt, expected);
                assert_eq!(error.status(), Some(503));
                assert_eq!(error.retry_after(), Some(Duration::from_secs(1)));
                assert_eq!(delay, Duration::from_millis(50));
            }
            other => panic!("expected Reconnecting, got {other:?}"),
        }
    }
    match closed(&mut client).await {
        CloseReason::GaveUp {
            attempts: 2,
            last_error: Some(error),
        } => assert_eq!(error.status(), Some(503)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn reconnect_never_ends_the_client_with_the_first_loss() {
    let backend = TestBackend::start("echo").await;
    let mut client = Client::builder(&backend.url())
        .reconnect(Reconnect::never())
        .connect()
        .await
        .unwrap();
    assert_eq!(connected(&mut client).await, 1);
    backend.kill_connections();
    assert_eq!(disconnected(&mut client).await.0, None);
    assert!(matches!(
        closed(&mut client).await,
        CloseReason::Lost { .. }
    ));
}

#[tokio::test]
async fn a_bad_url_fails_before_any_socket() {
    for url in ["http://127.0.0.1:1/", "ws://"] {
        let error = Client::builder(url).start().unwrap_err();
        assert!(
            matches!(error, ConnectError::InvalidRequest { .. }),
            "{url}: {error}"
        );
    }
}

/// Reconnect attempts against an address nothing listens on, under a paused clock: each
/// attempt's delay is the seeded backoff's, within its bounds, and waited in full.
#[tokio::test(start_paused = true)]
async fn backoff_delays_follow_the_seeded_policy_under_a_paused_clock() {
    let addr = unused_addr();
    let connect_timeout = Duration::from_millis(50);
    let policy = Reconnect::default()
        .backoff(Duration::from_millis(100), Duration::from_secs(2))
        .max_attempts(Some(10))
        .seed(11);
    let backoff = policy.backoff;
    let mut jitter = Jitter::seeded(11);
    let expected: Vec<Duration> = (1..=10).map(|n| backoff.delay(n, &mut jitter)).collect();

    let mut client = Client::builder(&format!("ws://{addr}/"))
        .connect_timeout(connect_timeout)
        .reconnect(policy)
        .start()
        .unwrap();
    let mut seen = Vec::new();
    let why = loop {
        match next_event(&mut client).await {
            Event::Reconnecting {
                attempt,
                delay,
                error,
            } => {
                assert!(error.is_some(), "every attempt follows a failed dial");
                seen.push((attempt, delay, tokio::time::Instant::now()));
            }
            Event::Closed(why) => break why,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(
        matches!(
            why,
            CloseReason::GaveUp {
                attempts: 10,
                last_error: Some(_)
            }
        ),
        "{why}"
    );
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<u32>>()
    );
    assert_eq!(seen.iter().map(|s| s.1).collect::<Vec<_>>(), expected);
    for (attempt, delay, _) in &seen {
        let (low, high) = backoff.bounds(*attempt);
        assert!(
            low <= *delay && *delay <= high,
            "attempt {attempt}: {delay:?}"
        );
    }
    // The next attempt is reported after the whole delay plus one failed dial (refused at
    // once, or cut by the connect timeout).
    for pair in seen.windows(2) {
        let gap = pair[1].2 - pair[0].2;
        assert!(
            pair[0].1 <= gap && gap <= pair[0].1 + connect_timeout + Duration::from_millis(2),
            "attempt {}: waited {gap:?} for a delay of {:?}",
            pair[0].0,
            pair[0].1
        );
    }
}

/// Counting attempts in a minute of (paused) time: as many as the seeded delays allow,
/// whatever each failed dial took (0 to the connect timeout).
#[tokio::test(start_paused = true)]
async fn attempts_in_a_minute_are_as_many_as_the_backoff_allows() {
    let addr = unused_addr();
    let connect_timeout = Duration::from_millis(100);
    let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
    let policy = Reconnect {
        backoff,
        seed: Some(5),
        ..Reconnect::default()
    };
    let mut jitter = Jitter::seeded(5);
    let delays: Vec<Duration> = (1..=200).map(|n| backoff.delay(n, &mut jitter)).collect();
    let window = Duration::from_secs(60);
    // Attempt k is reported after the first dial and k-1 delays and failed dials.
    let reported_by = |dial: Duration| {
        let mut at = dial;
        delays
            .iter()
            .take_while(|delay| {
                let reported = at <= window;
                at += **delay + dial;
                reported
            })
            .count()
    };
    let (fewest, most) = (reported_by(connect_timeout), reported_by(Duration::ZERO));

    let start = tokio::time::Instant::now();
    let mut client = Client::builder(&format!("ws://{addr}/"))
        .connect_timeout(connect_timeout)
        .reconnect(policy)
        .start()
        .unwrap();
    let mut attempts = 0;
    while let Ok(event) = tokio::time::timeout_at(start + window, client.next_event()).await {
        match event {
            Some(Event::Reconnecting { attempt, .. }) => {
                attempts += 1;
                assert_eq!(attempt, attempts);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        fewest <= attempts as usize && attempts as usize <= most,
        "{attempts} attempts in {window:?}, expected {fewest}..={most}"
    );
    // Fewer than one attempt per `min`, and the later ones near `max` apart.
    assert!(most < 60 * 2, "{most}");
    assert!(fewest >= 10, "{fewest}");
}
