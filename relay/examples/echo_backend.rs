//! A plain tokio-tungstenite echo server: the backend for conformance runs (Autobahn) and
//! quick experiments. Echoes every text and binary message; nothing else.
//!
//! ```text
//! cargo run --release -p wsrelay --example echo_backend -- --listen 127.0.0.1:9001
//! ```

use std::net::SocketAddr;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Echo server options.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Largest message and frame accepted, in MiB.
    #[arg(long, default_value_t = 64)]
    max_mib: usize,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    println!("echo backend on ws://{}", listener.local_addr()?);
    let config = WebSocketConfig::default()
        .max_message_size(Some(args.max_mib << 20))
        .max_frame_size(Some(args.max_mib << 20));
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(echo(tcp, config));
    }
}

async fn echo(tcp: TcpStream, config: WebSocketConfig) {
    let _ = tcp.set_nodelay(true);
    let Ok(mut socket) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await
    else {
        return;
    };
    while let Some(Ok(message)) = socket.next().await {
        if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
            break;
        }
    }
}
