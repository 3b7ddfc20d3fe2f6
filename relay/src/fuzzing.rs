//! Entry points for the fuzz targets in `relay/fuzz/`, compiled only with the `fuzzing`
//! feature and hidden from the documentation: they are not part of the API.
//!
//! Each feeds bytes a peer might send into the relay's own code over an in-memory stream
//! (`tokio::io::duplex`) instead of a socket, so libFuzzer exercises exactly what a client or
//! a backend reaches: the client accept path (hyper's HTTP/1.1 server, admission, the upgrade
//! checks, routing, the answers) and the backend handshake (hyper's HTTP/1.1 client, the
//! `101` checks, the refusal body, the first frames after the upgrade).

use std::net::SocketAddr;

use futures_util::StreamExt;
use http::{Request, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Duration, Instant};
use tungstenite::protocol::WebSocketConfig;

use crate::RelayHandle;
use crate::upstream::handshake::{self, Failure};

/// Most answer bytes read back from the relay.
const MAX_ANSWER: u64 = 1 << 20;

/// The `Sec-WebSocket-Key` of [`backend_answer`]'s request (RFC 6455's sample nonce), so seeds
/// can carry the matching `Sec-WebSocket-Accept`, `s3pPLMBiTxaQ9kYGzzhZRbK+xOo=`.
pub const BACKEND_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Serves one client connection that sends `request` and then half-closes, on `relay`'s
/// client path, as a connection from 127.0.0.1 would be served; returns what the relay wrote
/// back (at most 1 MiB).
pub async fn client_connection(relay: &RelayHandle, request: &[u8]) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer = SocketAddr::from(([127, 0, 0, 1], 40_000));
    let serve = crate::accept::serve_plain(relay.shared.acceptor.clone(), server, peer);
    let talk = async {
        // Written and read at once: the relay may answer, and stop reading, mid-request.
        let (mut reader, mut writer) = tokio::io::split(client);
        let write = async {
            let _ = writer.write_all(request).await;
            let _ = writer.shutdown().await;
        };
        let read = async {
            let mut answer = Vec::new();
            let _ = (&mut reader)
                .take(MAX_ANSWER)
                .read_to_end(&mut answer)
                .await;
            answer
        };
        tokio::join!(write, read).1
    };
    tokio::join!(serve, talk).1
}

/// Runs the relay's backend handshake (`upstream/handshake.rs`) against a backend that answers
/// `answer` and then closes its side. `Ok` with the subprotocol the backend picked when the
/// relay accepts the answer (after reading up to 16 messages that followed it); `Err` with
/// what the relay would report otherwise.
pub async fn backend_answer(answer: &[u8]) -> Result<Option<String>, String> {
    let (relay_end, mut backend_end) = tokio::io::duplex(answer.len() + 64 * 1024);
    // The backend answers once it has read the request's head, as a server would: hyper
    // refuses bytes that arrive before it has asked anything.
    let backend = async {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match backend_end.read(&mut buf).await {
                Ok(0) | Err(_) => return backend_end,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = backend_end.write_all(answer).await;
        let _ = backend_end.shutdown().await;
        backend_end
    };
    let request = Request::builder()
        .uri("/chat")
        .header(header::HOST, "backend.test")
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, BACKEND_KEY)
        .header(header::SEC_WEBSOCKET_PROTOCOL, "chat, superchat")
        .body(())
        .expect("a valid request");
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024));
    let deadline = Instant::now() + Duration::from_secs(5);
    let relay = handshake::open(relay_end, request, config, deadline);
    // The backend's end stays open until the relay is done with it, as a socket would.
    let (outcome, backend_end) = tokio::join!(relay, backend);
    drop(backend_end);
    match outcome {
        Ok(dialed) => {
            let protocol = dialed.protocol.clone();
            let mut socket = dialed.websocket();
            for _ in 0..16 {
                if !matches!(socket.next().await, Some(Ok(_))) {
                    break;
                }
            }
            Ok(protocol.map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned()))
        }
        Err(Failure::Refused(refusal)) => Err(format!(
            "refused with {} ({} body bytes)",
            refusal.status,
            refusal.body.len()
        )),
        Err(Failure::Broken(why)) => Err(why),
        Err(Failure::TimedOut) => Err("timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWITCH: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n";

    #[tokio::test]
    async fn backend_answers_get_the_relays_verdict() {
        assert_eq!(
            backend_answer(format!("{SWITCH}\r\n").as_bytes()).await,
            Ok(None)
        );
        let chat = format!("{SWITCH}Sec-WebSocket-Protocol: chat\r\n\r\n\u{81}\u{2}hi");
        assert_eq!(
            backend_answer(chat.as_bytes()).await,
            Ok(Some("chat".into()))
        );
        let refused =
            backend_answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno").await;
        assert_eq!(
            refused,
            Err("refused with 403 Forbidden (2 body bytes)".into())
        );
        let wrong = SWITCH.replace("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "AAAA");
        let broken = backend_answer(format!("{wrong}\r\n").as_bytes())
            .await
            .unwrap_err();
        assert!(broken.contains("Sec-WebSocket-Accept"), "{broken}");
        assert!(backend_answer(b"HTTP/1.1 101 Swi").await.is_err());
    }
}
