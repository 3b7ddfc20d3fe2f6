//! WebSocket clients as the tests use them, and the hash keys that land on a given backend.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsrelay::hashing::Ranking;

use crate::wait::WAIT;

/// A WebSocket client connection as the tests use it.
pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects a WebSocket client, failing the test if the handshake fails.
pub async fn connect(url: &str) -> Client {
    connect_request(url.into_client_request().unwrap())
        .await
        .unwrap()
}

/// An upgrade request for `url` carrying `X-User: user` (what the tests hash on).
pub fn request_as(url: &str, user: &str) -> Request {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-user", user.parse().unwrap());
    request
}

/// Connects to `url` as `user` (`X-User: user`), failing the test if the handshake fails.
pub async fn connect_as(url: &str, user: &str) -> Client {
    connect_request(request_as(url, user)).await.unwrap()
}

/// Connects with a prepared request; the error carries the HTTP response on refusal.
pub async fn connect_request(request: Request) -> Result<Client, WsError> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(512 << 20))
        .max_frame_size(Some(512 << 20));
    tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async_with_config(request, Some(config), true),
    )
    .await
    .expect("connect timed out")
    .map(|(client, _)| client)
}

/// The status a refused handshake got.
pub async fn refused_status(url: &str) -> StatusCode {
    match connect_request(url.into_client_request().unwrap()).await {
        Err(WsError::Http(response)) => response.status(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got a WebSocket"),
    }
}

/// Sends a text message and returns the next data message's text.
pub async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut WebSocketStream<S>,
    text: &str,
) -> String {
    client.send(Message::text(text)).await.unwrap();
    match next_data(client).await {
        Message::Text(reply) => reply.as_str().to_owned(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// The next text or binary message (skipping pings and pongs).
pub async fn next_data<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut WebSocketStream<S>,
) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("no message in time")
            .expect("connection ended")
            .expect("read failed");
        if message.is_text() || message.is_binary() {
            return message;
        }
        if let Message::Close(frame) = message {
            panic!("closed while waiting for data: {frame:?}");
        }
    }
}

/// Reads until the peer closes; returns its close frame (`None` if it closed without one).
pub async fn expect_close<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut WebSocketStream<S>,
) -> Option<CloseFrame> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let next = tokio::time::timeout_at(deadline, client.next())
            .await
            .expect("no close in time");
        match next {
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// `count` hash keys (`user-N`, for `hash_key = "header:..."` and friends) that rendezvous
/// hashing ranks first onto `urls[wanted]`, given the upstream's backend list in config order.
pub fn users_ranked_first(urls: &[String], wanted: usize, count: usize) -> Vec<String> {
    let ranking = Ranking::new(urls.iter().map(|u| (u.as_str(), 1.0)));
    let users: Vec<String> = (0..100_000)
        .map(|n| format!("user-{n}"))
        .filter(|user| ranking.rank(user.as_bytes())[0] == wanted)
        .take(count)
        .collect();
    assert_eq!(users.len(), count, "too few users rank first on {wanted}");
    users
}

/// A hash key that rendezvous hashing ranks first onto `urls[wanted]` (see
/// [`users_ranked_first`]).
pub fn user_ranked_first(urls: &[String], wanted: usize) -> String {
    users_ranked_first(urls, wanted, 1).remove(0)
}
