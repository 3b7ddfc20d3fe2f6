//! The backends the harness brings along: an echo server and a chat-room server, both plain
//! tokio-tungstenite, and a mux echo server (the client SDK's `MuxServer`) for relay routes in
//! mode "mux". `compare` runs them as child processes (`wsrelay-loadtest serve echo|chat`)
//! so their CPU is not the load generator's; tests run them in-process.
//!
//! The chat protocol (JSON text messages): every connection starts in room `"lobby"`;
//! `{"type":"join","room":R}` moves it to room R and is answered `{"type":"joined","room":R}`;
//! `{"type":"say","text":T}` is broadcast to every member of the sender's room, the sender
//! included, as `{"type":"said","room":R,"from":ID,"text":T}`. Anything else is answered with
//! `{"type":"error","reason":...}`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use wsrelay_client::{MuxServer, VirtualConnection};

/// Which server to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Echoes every text and binary message.
    Echo,
    /// Chat rooms: join, say, said (see the module docs).
    Chat,
    /// Echoes every message of every stream of the mux links a relay opens to it.
    MuxEcho,
}

impl BackendKind {
    /// Its name on the command line (`serve NAME`).
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Echo => "echo",
            BackendKind::Chat => "chat",
            BackendKind::MuxEcho => "mux-echo",
        }
    }
}

/// A backend running in the current tokio runtime; stops when dropped.
pub struct BackendServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl BackendServer {
    /// Binds `listen` and serves `kind` in the background.
    pub async fn start(kind: BackendKind, listen: SocketAddr) -> std::io::Result<BackendServer> {
        let listener = bind_deep(listen)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(accept_loop(kind, listener, stopped));
        Ok(BackendServer { addr, stop })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDR/`.
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Serves `kind` on `listen` until the process ends, printing `listening on ws://ADDR/` first
/// (what a parent process waits for).
pub async fn serve_forever(kind: BackendKind, listen: SocketAddr) -> std::io::Result<()> {
    let listener = bind_deep(listen)?;
    println!("listening on ws://{}/", listener.local_addr()?);
    let (_stop, stopped) = watch::channel(false);
    accept_loop(kind, listener, stopped).await;
    Ok(())
}

/// A backend's accept queue. A proxy under test dials its backend as fast as its clients
/// arrive; with `TcpListener::bind`'s 128 the queue overflowed during `hold` ramps (256
/// handshakes at once), and the dials it dropped were retried a second later, in the proxy's
/// p99 rather than its own. The kernel caps it at `net.core.somaxconn`.
const ACCEPT_BACKLOG: u32 = 4096;

/// Binds `listen` as `TcpListener::bind` does, with an [`ACCEPT_BACKLOG`] queue.
fn bind_deep(listen: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    socket.listen(ACCEPT_BACKLOG)
}

fn server_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

async fn accept_loop(kind: BackendKind, listener: TcpListener, mut stopped: watch::Receiver<bool>) {
    if kind == BackendKind::MuxEcho {
        return mux_echo(listener, stopped, |_| {}).await;
    }
    let rooms = Arc::new(Rooms::default());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => return,
        };
        let Ok((tcp, _)) = accepted else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let stopped = stopped.clone();
        let rooms = rooms.clone();
        tokio::spawn(async move {
            let served = async {
                match kind {
                    BackendKind::Echo => echo(tcp).await,
                    BackendKind::Chat => chat(tcp, rooms).await,
                    BackendKind::MuxEcho => unreachable!("served by mux_echo"),
                }
            };
            let mut stopped = stopped;
            tokio::select! {
                _ = served => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

async fn echo(tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(server_ws_config())).await
    else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    // Echo in order, flushing whenever the socket has nothing more buffered to read.
    while let Some(Ok(message)) = stream.next().await {
        if !(message.is_text() || message.is_binary()) {
            continue;
        }
        if sink.feed(message).await.is_err() {
            return;
        }
        // Drain whatever is already readable before paying for a flush.
        loop {
            match futures_util::FutureExt::now_or_never(stream.next()) {
                Some(Some(Ok(next))) => {
                    if (next.is_text() || next.is_binary()) && sink.feed(next).await.is_err() {
                        return;
                    }
                }
                Some(_) => {
                    let _ = sink.flush().await;
                    return;
                }
                None => break,
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

/// Serves mux links on `listener` until `stopped` changes: every stream of every link is shown
/// to `opened` (its path, query, link peer: what the scale run's backends record), then
/// accepted and echoed in its own task, which ends with its stream (and so with its link).
pub async fn mux_echo(
    listener: TcpListener,
    mut stopped: watch::Receiver<bool>,
    mut opened: impl FnMut(&VirtualConnection),
) {
    let Ok(server) = MuxServer::from_listener(listener) else {
        return;
    };
    loop {
        let conn = tokio::select! {
            conn = server.accept() => conn,
            _ = stopped.changed() => return,
        };
        let Some(conn) = conn else { return };
        opened(&conn);
        let mut stream = conn.accept(None);
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if (message.is_text() || message.is_binary()) && stream.send(message).await.is_err()
                {
                    return;
                }
            }
        });
    }
}

/// Members of every room: connection id -> its outgoing queue.
#[derive(Default)]
struct Rooms {
    rooms: Mutex<HashMap<String, HashMap<u64, mpsc::Sender<Message>>>>,
    next_id: AtomicU64,
}

impl Rooms {
    fn join(&self, room: &str, id: u64, queue: &mpsc::Sender<Message>, from: Option<&str>) {
        let mut rooms = self.rooms.lock().expect("rooms lock");
        if let Some(old) = from {
            self.leave_locked(&mut rooms, old, id);
        }
        rooms
            .entry(room.to_owned())
            .or_default()
            .insert(id, queue.clone());
    }

    fn leave(&self, room: &str, id: u64) {
        let mut rooms = self.rooms.lock().expect("rooms lock");
        self.leave_locked(&mut rooms, room, id);
    }

    fn leave_locked(
        &self,
        rooms: &mut HashMap<String, HashMap<u64, mpsc::Sender<Message>>>,
        room: &str,
        id: u64,
    ) {
        if let Some(members) = rooms.get_mut(room) {
            members.remove(&id);
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    fn members(&self, room: &str) -> Vec<mpsc::Sender<Message>> {
        let rooms = self.rooms.lock().expect("rooms lock");
        rooms
            .get(room)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// A chat request from a client.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ChatIn {
    Join { room: String },
    Say { text: String },
}

/// A chat event to a client.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ChatOut<'a> {
    Joined {
        room: &'a str,
    },
    Said {
        room: &'a str,
        from: u64,
        text: &'a str,
    },
    Error {
        reason: String,
    },
}

fn encode(out: &ChatOut<'_>) -> Message {
    Message::text(serde_json::to_string(out).expect("chat events serialize"))
}

/// Messages queued to one chat client before a broadcast waits for it.
const CHAT_QUEUE: usize = 1024;

async fn chat(tcp: TcpStream, rooms: Arc<Rooms>) {
    let _ = tcp.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(server_ws_config())).await
    else {
        return;
    };
    let id = rooms.next_id.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = ws.split();
    let (queue, mut outgoing) = mpsc::channel::<Message>(CHAT_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(message) = outgoing.recv().await {
            if sink.feed(message).await.is_err() {
                return;
            }
            while let Ok(more) = outgoing.try_recv() {
                if sink.feed(more).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let mut room = String::from("lobby");
    rooms.join(&room, id, &queue, None);
    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        match serde_json::from_str::<ChatIn>(&text) {
            Ok(ChatIn::Join { room: new_room }) => {
                rooms.join(&new_room, id, &queue, Some(&room));
                room = new_room;
                if queue
                    .send(encode(&ChatOut::Joined { room: &room }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Ok(ChatIn::Say { text }) => {
                let said = encode(&ChatOut::Said {
                    room: &room,
                    from: id,
                    text: &text,
                });
                for member in rooms.members(&room) {
                    let _ = member.send(said.clone()).await;
                }
            }
            Err(error) => {
                let reply = encode(&ChatOut::Error {
                    reason: error.to_string(),
                });
                if queue.send(reply).await.is_err() {
                    break;
                }
            }
        }
    }
    rooms.leave(&room, id);
    drop(queue);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn client(url: &str) -> crate::conn::Ws {
        let target = crate::conn::TargetUrl::resolve(url, false).await.unwrap();
        crate::conn::Connector::new(vec![target], Vec::new(), std::time::Duration::from_secs(5))
            .connect(0, None)
            .await
            .unwrap()
    }

    async fn next_text(ws: &mut crate::conn::Ws) -> String {
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => return t.to_string(),
                _ => continue,
            }
        }
    }

    #[tokio::test]
    async fn echo_echoes() {
        let server = BackendServer::start(BackendKind::Echo, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mut ws = client(&server.url()).await;
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(next_text(&mut ws).await, "hi");
    }

    #[tokio::test]
    async fn chat_broadcasts_within_a_room_only() {
        let server = BackendServer::start(BackendKind::Chat, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mut a = client(&server.url()).await;
        let mut b = client(&server.url()).await;
        let mut c = client(&server.url()).await;
        for ws in [&mut a, &mut b] {
            ws.send(Message::text(r#"{"type":"join","room":"r1"}"#))
                .await
                .unwrap();
            assert_eq!(next_text(ws).await, r#"{"type":"joined","room":"r1"}"#);
        }
        a.send(Message::text(r#"{"type":"say","text":"hello"}"#))
            .await
            .unwrap();
        for ws in [&mut a, &mut b] {
            let said: serde_json::Value = serde_json::from_str(&next_text(ws).await).unwrap();
            assert_eq!(said["type"], "said");
            assert_eq!(said["room"], "r1");
            assert_eq!(said["text"], "hello");
        }
        // c is still in the lobby and heard nothing; its own say comes back to it alone.
        c.send(Message::text(r#"{"type":"say","text":"lobby"}"#))
            .await
            .unwrap();
        let said: serde_json::Value = serde_json::from_str(&next_text(&mut c).await).unwrap();
        assert_eq!(said["text"], "lobby");
    }
}
