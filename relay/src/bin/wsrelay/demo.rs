//! `wsrelay demo`: three in-process backends and a relay in front of them, one command.
//!
//! Each demo backend echoes every message and answers the text `whoami` with its own name, so
//! a user can see rendezvous hashing pick a backend and stick to it.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

/// A running demo backend.
pub struct DemoBackend {
    /// Its name, the answer to `whoami`.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl DemoBackend {
    /// Starts an echo backend named `name` on `addr` (port 0 picks a free port).
    pub async fn start(name: &str, addr: SocketAddr) -> std::io::Result<DemoBackend> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let name = name.to_owned();
        let task = tokio::spawn(serve_echo(listener, name.clone()));
        Ok(DemoBackend { name, addr, task })
    }

    /// The backend's `ws://` URL.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_echo(listener: TcpListener, name: String) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                connections.spawn(echo_one(tcp, name.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn echo_one(tcp: tokio::net::TcpStream, name: String) {
    let _ = tcp.set_nodelay(true);
    let Ok(mut socket) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    while let Some(Ok(message)) = socket.next().await {
        let reply = match message {
            Message::Text(text) if text.as_str().trim() == "whoami" => Message::text(name.clone()),
            Message::Text(_) | Message::Binary(_) => message,
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
    debug!(backend = %name, "demo connection ended");
}
