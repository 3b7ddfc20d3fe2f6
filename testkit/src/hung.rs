//! [`HungBackend`]: a backend whose process is stuck: the kernel accepts its TCP connections,
//! the application never answers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// A listener on 127.0.0.1 that accepts every connection and never writes a byte: no `101`, no
/// refusal, no close. It reads what it is sent, so a test can tell the relay's health probes
/// from client dials by their request heads, and holds each socket until the peer gives up.
pub struct HungBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl HungBackend {
    /// Starts one on a free port.
    pub async fn start() -> HungBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(hold_all(listener, heads.clone()));
        HungBackend { addr, heads, task }
    }

    /// `ws://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The request heads (up to the blank line, or what came before the peer gave up) of the
    /// connections accepted so far, in order.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for HungBackend {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every held connection.
        self.task.abort();
    }
}

async fn hold_all(listener: TcpListener, heads: Arc<Mutex<Vec<String>>>) {
    let mut held = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let index = {
                    let mut heads = heads.lock().unwrap();
                    heads.push(String::new());
                    heads.len() - 1
                };
                held.spawn(hold(tcp, heads.clone(), index));
            }
            Some(_) = held.join_next(), if !held.is_empty() => {}
        }
    }
}

/// Reads until the peer closes, recording the request head, and never answers.
async fn hold(mut tcp: TcpStream, heads: Arc<Mutex<Vec<String>>>, index: usize) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tcp.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if !head.ends_with(b"\r\n\r\n") {
                    head.extend_from_slice(&buffer[..n]);
                    heads.lock().unwrap()[index] = String::from_utf8_lossy(&head).into_owned();
                }
            }
        }
    }
}
