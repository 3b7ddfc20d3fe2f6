//! The client tests' own helpers: waits on a [`Client`]'s events and a [`MuxStream`]'s
//! messages, bounded by deadlines (nothing asserts on elapsed real time). The backends, the relay and the generic waits they run
//! against are `wsrelay-testkit`'s.

#![allow(dead_code)] // each test file uses its own subset

use std::time::Duration;

use futures_util::StreamExt;
use tungstenite::Message;
use wsrelay_client::{Client, CloseReason, Event, MuxStream, Reconnect};
use wsrelay_testkit::{WAIT, within};

/// A reconnect policy quick enough for tests: 20 ms to 200 ms, forever.
pub fn quick_reconnect() -> Reconnect {
    Reconnect::default().backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// A client of `url` with [`quick_reconnect`], once its first dial has succeeded.
pub async fn reconnecting(url: &str) -> Client {
    Client::builder(url)
        .reconnect(quick_reconnect())
        .connect()
        .await
        .unwrap()
}

/// The next event, within [`WAIT`]; panics if the client ended.
pub async fn next_event(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("no event in time")
        .expect("the client ended")
}

/// Reads events until `pick` returns something; panics on `Closed` (unless picked) and on
/// the deadline.
pub async fn wait_for<T>(
    client: &mut Client,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .unwrap_or_else(|_| panic!("gave up waiting for {what}"))
            .unwrap_or_else(|| panic!("the client ended while waiting for {what}"));
        if let Some(found) = pick(&event) {
            return found;
        }
        if let Event::Closed(why) = event {
            panic!("the client closed ({why}) while waiting for {what}");
        }
    }
}

/// The next text message (skipping other events).
pub async fn next_text(client: &mut Client) -> String {
    wait_for(client, "a text message", |event| match event {
        Event::Message(message) => message.as_text().map(str::to_owned),
        _ => None,
    })
    .await
}

/// Waits for a `Connected` event; returns its connection number.
pub async fn connected(client: &mut Client) -> u64 {
    wait_for(client, "Connected", |event| match event {
        Event::Connected(c) => Some(c.connection),
        _ => None,
    })
    .await
}

/// Waits for `Disconnected`; returns its code and reason.
pub async fn disconnected(client: &mut Client) -> (Option<u16>, String) {
    wait_for(client, "Disconnected", |event| match event {
        Event::Disconnected { code, reason } => Some((*code, reason.clone())),
        _ => None,
    })
    .await
}

/// Waits for the final `Closed` event and checks that no event follows it.
pub async fn closed(client: &mut Client) -> CloseReason {
    let why = wait_for(client, "Closed", |event| match event {
        Event::Closed(why) => Some(why.clone()),
        _ => None,
    })
    .await;
    let after = tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("the event stream did not end after Closed");
    assert!(after.is_none(), "an event after Closed: {after:?}");
    why
}

/// The next message of a mux stream, which must be text.
pub async fn stream_text(stream: &mut MuxStream) -> String {
    match within("a message", stream.next()).await {
        Some(Ok(Message::Text(text))) => text.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}
