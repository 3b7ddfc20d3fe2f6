//! A plain tokio-tungstenite echo client for Autobahn's fuzzing server: the client side of the
//! backend-leg conformance run. For every case it connects to `SERVER/runCase?case=N&agent=A`,
//! echoes each text and binary message until the server closes, then asks for the reports.
//! Pointed at the server directly it gives the reference results; pointed at a relay whose
//! backend is the server, the relay's backend leg is what is tested.
//!
//! ```text
//! cargo run -p wsrelay --example echo_client -- --server ws://127.0.0.1:9001 --agent direct
//! ```

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Echo client options.
#[derive(Debug, Parser)]
struct Args {
    /// The fuzzing server, or a relay in front of it.
    #[arg(long, default_value = "ws://127.0.0.1:9001")]
    server: String,
    /// The agent name the reports are filed under.
    #[arg(long, default_value = "wsrelay")]
    agent: String,
    /// Largest message and frame accepted, in MiB.
    #[arg(long, default_value_t = 64)]
    max_mib: usize,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), WsError> {
    let args = Args::parse();
    let config = WebSocketConfig::default()
        .max_message_size(Some(args.max_mib << 20))
        .max_frame_size(Some(args.max_mib << 20));
    let count = case_count(&args.server, config).await?;
    println!("{count} cases");
    for case in 1..=count {
        let url = format!("{}/runCase?case={case}&agent={}", args.server, args.agent);
        // A case may fail the handshake or the connection on purpose; the server judges it.
        if let Ok((mut socket, _)) =
            tokio_tungstenite::connect_async_with_config(&url, Some(config), false).await
        {
            while let Some(Ok(message)) = socket.next().await {
                let echo = match message {
                    Message::Text(_) | Message::Binary(_) => message,
                    Message::Close(_) => break,
                    _ => continue,
                };
                if socket.send(echo).await.is_err() {
                    break;
                }
            }
        }
    }
    let url = format!("{}/updateReports?agent={}", args.server, args.agent);
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await?;
    while let Some(Ok(message)) = socket.next().await {
        if message.is_close() {
            break;
        }
    }
    println!("reports updated for {}", args.agent);
    Ok(())
}

/// The number of cases the server runs (`/getCaseCount` answers it as one text message).
async fn case_count(server: &str, config: WebSocketConfig) -> Result<u32, WsError> {
    let url = format!("{server}/getCaseCount");
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(&url, Some(config), false).await?;
    while let Some(message) = socket.next().await {
        if let Message::Text(text) = message? {
            return Ok(text.as_str().trim().parse().unwrap_or(0));
        }
    }
    Ok(0)
}
