//! The demo's backends: three "hosts" named alpha, bravo and charlie, each serving a chat
//! backend over mux links (many clients per link, the SDK's `MuxServer`) and a plain echo
//! backend (one WebSocket per client). Each host runs on its own thread with its own tokio
//! runtime, so killing one is what a crash looks like from the relay: its runtime is dropped
//! and every socket it held closes at once. A killed host starts again on the same ports after
//! [`RESTART_AFTER`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};
use wsrelay_client::{MuxServer, VirtualConnection};

use super::hub::{self, Command, Hub, Joining};

/// How long a killed host stays down.
pub const RESTART_AFTER: Duration = Duration::from_secs(10);

/// A request to kill a host, from a chat client.
#[derive(Debug)]
pub struct KillRequest {
    /// The host to kill.
    pub backend: String,
    /// Who asked (shown to everyone).
    pub by: String,
}

/// One demo host: its name, its two listening addresses and, while it runs, its thread.
pub struct Host {
    /// Its name, the answer to `whoami`.
    pub name: String,
    /// Where its chat (mux) backend listens.
    pub chat: SocketAddr,
    /// Where its echo backend listens.
    pub echo: SocketAddr,
    running: Mutex<Option<Running>>,
}

struct Running {
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// What a host's tasks share.
#[derive(Clone)]
struct HostContext {
    name: Arc<str>,
    hub: Arc<Hub>,
    kills: mpsc::Sender<KillRequest>,
}

impl Host {
    /// Starts host `name` on free ports of 127.0.0.1.
    pub fn start(
        name: &str,
        hub: Arc<Hub>,
        kills: mpsc::Sender<KillRequest>,
    ) -> std::io::Result<Host> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let chat = std::net::TcpListener::bind(any)?;
        let echo = std::net::TcpListener::bind(any)?;
        let host = Host {
            name: name.to_owned(),
            chat: chat.local_addr()?,
            echo: echo.local_addr()?,
            running: Mutex::new(None),
        };
        host.run(chat, echo, hub, kills)?;
        Ok(host)
    }

    /// The chat backend's URL (a mux backend).
    pub fn chat_url(&self) -> String {
        format!("ws://{}", self.chat)
    }

    /// The echo backend's URL.
    pub fn echo_url(&self) -> String {
        format!("ws://{}", self.echo)
    }

    /// Whether the host is running.
    pub fn is_running(&self) -> bool {
        self.lock().is_some()
    }

    /// Stops the host at once, as a crash would: every socket it holds closes. Returns when
    /// its thread has ended; false if it wasn't running.
    pub async fn kill(&self) -> bool {
        let Some(running) = self.lock().take() else {
            return false;
        };
        let _ = running.stop.send(());
        let _ = tokio::task::spawn_blocking(move || running.thread.join()).await;
        true
    }

    /// Starts a killed host again on its old ports.
    pub fn restart(&self, hub: Arc<Hub>, kills: mpsc::Sender<KillRequest>) -> std::io::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let chat = std::net::TcpListener::bind(self.chat)?;
        let echo = std::net::TcpListener::bind(self.echo)?;
        self.run(chat, echo, hub, kills)
    }

    fn run(
        &self,
        chat: std::net::TcpListener,
        echo: std::net::TcpListener,
        hub: Arc<Hub>,
        kills: mpsc::Sender<KillRequest>,
    ) -> std::io::Result<()> {
        chat.set_nonblocking(true)?;
        echo.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let context = HostContext {
            name: self.name.as_str().into(),
            hub,
            kills,
        };
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("demo-{}", self.name))
            .spawn(move || {
                runtime.block_on(async move {
                    let serving = async {
                        let chat = TcpListener::from_std(chat)?;
                        let echo = TcpListener::from_std(echo)?;
                        let chat = MuxServer::from_listener(chat)
                            .map_err(|e| std::io::Error::other(e.to_string()))?;
                        tokio::join!(
                            serve_chat(chat, context.clone()),
                            serve_echo(echo, context.name.clone())
                        );
                        Ok::<(), std::io::Error>(())
                    };
                    tokio::select! {
                        result = serving => if let Err(error) = result {
                            warn!(backend = %context.name, %error, "demo backend failed");
                        },
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every task it runs, and with them every socket.
                drop(runtime);
            })?;
        *self.lock() = Some(Running { stop, thread });
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn serve_chat(server: MuxServer, context: HostContext) {
    let mut clients = JoinSet::new();
    loop {
        tokio::select! {
            conn = server.accept() => match conn {
                Some(conn) => { clients.spawn(chat_client(conn, context.clone())); }
                None => break,
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
}

/// One chat client, carried as a stream on a mux link: joins its room in the hub, forwards
/// what it says, and writes it what the hub has for it.
async fn chat_client(conn: VirtualConnection, context: HostContext) {
    let query = conn.query().to_owned();
    let joining = Joining {
        room: hub::room_name(hub::query_value(&query, "room")),
        nick: hub::nick_name(hub::query_value(&query, "user")),
        backend: context.name.to_string(),
        conn: conn
            .header("x-relay-conn-id")
            .and_then(|id| std::str::from_utf8(id).ok()?.parse().ok())
            .unwrap_or_default(),
        resumed: conn.resumed(),
    };
    let nick = joining.nick.clone();
    let mut stream = conn.accept(None);
    let (outbox, mut inbox) = mpsc::channel(hub::OUTBOX);
    let membership = Membership {
        hub: context.hub.clone(),
        id: context.hub.join(joining, outbox),
    };
    loop {
        tokio::select! {
            message = stream.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                match hub::command(text.as_str()) {
                    Command::Say { id, text } => {
                        context.hub.say(membership.id, &id, &text);
                    }
                    Command::WhoAmI => {
                        let answer = serde_json::json!({
                            "type": "system",
                            "text": format!("you are served by {}", context.name),
                        });
                        if stream.send(Message::text(answer.to_string())).await.is_err() {
                            break;
                        }
                    }
                    Command::Kill(Some(backend)) => {
                        let _ = context.kills.try_send(KillRequest { backend, by: nick.clone() });
                    }
                    Command::Kill(None) => {
                        let answer = serde_json::json!({
                            "type": "system",
                            "text": format!("say which backend: /kill {} (you are on {})", context.name, context.name),
                        });
                        if stream.send(Message::text(answer.to_string())).await.is_err() {
                            break;
                        }
                    }
                }
            }
            Some(outgoing) = inbox.recv() => {
                if stream.send(Message::text(outgoing.to_string())).await.is_err() {
                    break;
                }
            }
        }
    }
    debug!(backend = %context.name, %nick, "demo chat client left");
    drop(membership);
}

/// Leaves the hub when the client's task ends, however it ends: also when a kill drops the
/// task in the middle of an await.
struct Membership {
    hub: Arc<Hub>,
    id: hub::MemberId,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(self.id);
    }
}

async fn serve_echo(listener: TcpListener, name: Arc<str>) {
    let mut connections = JoinSet::new();
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

/// Echoes every message and answers `whoami` with the host's name.
async fn echo_one(tcp: TcpStream, name: Arc<str>) {
    let _ = tcp.set_nodelay(true);
    let Ok(mut socket) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    while let Some(Ok(message)) = socket.next().await {
        let reply = match message {
            Message::Text(text) if text.as_str().trim() == "whoami" => Message::text(&*name),
            Message::Text(_) | Message::Binary(_) => message,
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
    debug!(backend = %name, "demo echo connection ended");
}

/// Carries out kill requests: marks the host down, kills it, and starts it again after
/// [`RESTART_AFTER`]. Runs until `requests` closes.
pub async fn kill_and_restart(
    hosts: Arc<Vec<Host>>,
    hub: Arc<Hub>,
    kills: mpsc::Sender<KillRequest>,
    mut requests: mpsc::Receiver<KillRequest>,
) {
    let mut restarts = JoinSet::new();
    loop {
        let request = tokio::select! {
            request = requests.recv() => match request {
                Some(request) => request,
                None => break,
            },
            Some(_) = restarts.join_next(), if !restarts.is_empty() => continue,
        };
        let Some(index) = hosts.iter().position(|h| h.name == request.backend) else {
            let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
            hub.notice(&format!(
                "there is no backend {:?}; the demo has {}",
                request.backend,
                names.join(", ")
            ));
            continue;
        };
        let host = &hosts[index];
        if !host.kill().await {
            continue;
        }
        let seconds = RESTART_AFTER.as_secs();
        info!(backend = %host.name, by = %request.by, "demo backend killed; restarting in {seconds} s");
        hub.set_backend_up(&host.name, false);
        hub.notice(&format!(
            "{} killed {}: its clients move to other backends and keep their sockets; it restarts in {seconds} s",
            request.by, host.name
        ));
        let (hosts, hub, kills) = (hosts.clone(), hub.clone(), kills.clone());
        restarts.spawn(async move {
            tokio::time::sleep(RESTART_AFTER).await;
            let host = &hosts[index];
            match host.restart(hub.clone(), kills) {
                Ok(()) => {
                    info!(backend = %host.name, "demo backend restarted");
                    hub.set_backend_up(&host.name, true);
                    hub.notice(&format!(
                        "{} is back: new clients hashed to it land there again",
                        host.name
                    ));
                }
                Err(error) => warn!(backend = %host.name, %error, "demo backend could not restart"),
            }
        });
    }
}
