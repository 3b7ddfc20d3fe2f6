//! A mux-mode echo backend: echoes every message of every client stream, and answers the text
//! `whoami` with its `--name`.
//!
//! ```text
//! cargo run --release -p wsrelay-client --example mux_echo_backend -- --listen 127.0.0.1:9001 --name b1
//! ```
//!
//! Point a relay route in mode "mux" at `ws://127.0.0.1:9001`. A client that offers
//! subprotocols (`Sec-WebSocket-Protocol`) gets the first one it offered.

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tungstenite::Message;
use wsrelay_client::{MuxServer, MuxStream, VirtualConnection};

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "mux-mode echo backend for wsrelay")]
struct Args {
    /// Address to listen on for mux links from relays.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: String,
    /// The name `whoami` answers with.
    #[arg(long, default_value = "mux-echo")]
    name: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let server = MuxServer::bind(args.listen.as_str()).await?;
    println!(
        "mux echo backend {:?} listening on ws://{}",
        args.name,
        server.local_addr()
    );
    serve(server, args.name).await;
    Ok(())
}

/// Accepts every virtual connection of `server` and echoes it in its own task.
pub async fn serve(server: MuxServer, name: String) {
    while let Some(conn) = server.accept().await {
        let stream = accept(conn);
        tokio::spawn(echo(stream, name.clone()));
    }
}

/// Accepts `conn`, selecting the first subprotocol the client offered.
fn accept(conn: VirtualConnection) -> MuxStream {
    let protocol = conn
        .header("sec-websocket-protocol")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.split(',').next())
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty());
    conn.accept(protocol)
}

/// Echoes until the client closes; `whoami` gets `name`.
async fn echo(mut stream: MuxStream, name: String) {
    while let Some(msg) = stream.next().await {
        let reply = match msg {
            Ok(Message::Text(t)) if t.as_str() == "whoami" => Message::text(name.clone()),
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => msg,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        if stream.send(reply).await.is_err() {
            break;
        }
    }
}
