//! A multi-room chat backend in mux mode.
//!
//! ```text
//! cargo run --release -p wsrelay-client --example chat_backend -- --listen 127.0.0.1:9001
//! ```
//!
//! Clients send JSON text messages:
//! `{"type":"nick","name":"ann"}`, `{"type":"join","room":"rust"}`, `{"type":"say","text":"hi"}`.
//! Every `say` is broadcast to the members of the sender's room, the sender included, as
//! `{"type":"said","room":"rust","nick":"ann","text":"hi"}`. A stream starts in room `lobby`
//! with nick `anon-<id>`. Input that is not one of these gets `{"type":"error","message":..}`.
//!
//! Shape: one task per stream; rooms in one shared map of member id -> bounded outgoing queue.
//! A broadcast never waits: it `try_send`s into each member's queue, and a member whose queue
//! is full (it reads slower than its room talks) is removed from the room, which ends its queue;
//! its task then closes the stream with 1008. A slow user never stalls the room.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::Utf8Bytes;
use tungstenite::protocol::frame::coding::CloseCode;
use wsrelay_client::{MuxServer, MuxStream};

/// Messages queued for one user before it counts as too slow.
pub const USER_QUEUE: usize = 1024;

/// Longest nick or room name, in characters.
const MAX_NAME: usize = 64;

/// Longest `say` text, in bytes.
const MAX_TEXT: usize = 16 << 10;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "multi-room chat backend for wsrelay (mux mode)")]
struct Args {
    /// Address to listen on for mux links from relays.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let server = MuxServer::bind(args.listen.as_str()).await?;
    println!("chat backend listening on ws://{}", server.local_addr());
    serve(server).await;
    Ok(())
}

/// A message from a client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Command {
    Nick { name: String },
    Join { room: String },
    Say { text: String },
}

/// A message to a client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Event<'a> {
    Said {
        room: &'a str,
        nick: &'a str,
        text: &'a str,
    },
    Error {
        message: &'a str,
    },
}

impl Event<'_> {
    fn encode(&self) -> Utf8Bytes {
        // Serializing these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default().into()
    }
}

/// Room name -> members (user id -> that user's outgoing queue).
#[derive(Default)]
struct Rooms {
    rooms: Mutex<HashMap<String, HashMap<u64, mpsc::Sender<Utf8Bytes>>>>,
}

impl Rooms {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u64, mpsc::Sender<Utf8Bytes>>>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves user `id` from room `from` to room `to`. False if the user was no longer in
    /// `from` (it was dropped for being too slow).
    fn join(&self, id: u64, from: &str, to: &str) -> bool {
        let mut rooms = self.lock();
        let Some(queue) = rooms.get_mut(from).and_then(|members| members.remove(&id)) else {
            return false;
        };
        if rooms.get(from).is_some_and(HashMap::is_empty) {
            rooms.remove(from);
        }
        rooms.entry(to.to_owned()).or_default().insert(id, queue);
        true
    }

    fn leave(&self, id: u64, room: &str) {
        let mut rooms = self.lock();
        if let Some(members) = rooms.get_mut(room) {
            members.remove(&id);
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// Queues `event` for every member of `room`. Members whose queue is full are removed
    /// (their queue ends, and their task closes them with 1008).
    fn broadcast(&self, room: &str, event: Utf8Bytes) {
        let mut rooms = self.lock();
        let Some(members) = rooms.get_mut(room) else {
            return;
        };
        members.retain(|_, queue| match queue.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => false,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }
}

/// Serves chat on every virtual connection of `server`.
pub async fn serve(server: MuxServer) {
    let rooms = Arc::new(Rooms::default());
    while let Some(conn) = server.accept().await {
        let id = conn.id();
        let stream = conn.accept(None);
        tokio::spawn(user(id, stream, Arc::clone(&rooms)));
    }
}

/// One user's task: reads commands, writes what its room says.
async fn user(id: u64, mut stream: MuxStream, rooms: Arc<Rooms>) {
    let (queue, mut outgoing) = mpsc::channel(USER_QUEUE);
    let mut nick = format!("anon-{id}");
    let mut room = "lobby".to_owned();
    rooms
        .lock()
        .entry(room.clone())
        .or_default()
        .insert(id, queue);

    loop {
        tokio::select! {
            incoming = stream.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Binary(_))) => {
                        let error = Event::Error { message: "send JSON text messages" }.encode();
                        if stream.send(Message::Text(error)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                match handle(&text, &mut nick, &mut room, id, &rooms) {
                    Ok(true) => {}
                    Ok(false) => {
                        close_slow(&mut stream).await;
                        break;
                    }
                    Err(message) => {
                        let error = Event::Error { message: &message }.encode();
                        if stream.send(Message::Text(error)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            event = outgoing.recv() => {
                let Some(event) = event else {
                    close_slow(&mut stream).await;
                    break;
                };
                // Send what is queued in one go, then flush once.
                let mut batch = vec![event];
                while batch.len() < 64 {
                    match outgoing.try_recv() {
                        Ok(event) => batch.push(event),
                        Err(_) => break,
                    }
                }
                let mut failed = false;
                for event in batch {
                    if stream.feed(Message::Text(event)).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed || stream.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    rooms.leave(id, &room);
}

/// Applies one command. `Ok(false)`: the user was dropped for being too slow.
fn handle(
    text: &str,
    nick: &mut String,
    room: &mut String,
    id: u64,
    rooms: &Rooms,
) -> Result<bool, String> {
    let command: Command = serde_json::from_str(text).map_err(|e| format!("bad command: {e}"))?;
    match command {
        Command::Nick { name } => {
            *nick = checked_name("name", name)?;
        }
        Command::Join { room: to } => {
            let to = checked_name("room", to)?;
            if to != *room {
                if !rooms.join(id, room, &to) {
                    return Ok(false);
                }
                *room = to;
            }
        }
        Command::Say { text } => {
            if text.len() > MAX_TEXT {
                return Err(format!("text is over {MAX_TEXT} bytes"));
            }
            let event = Event::Said {
                room,
                nick,
                text: &text,
            };
            rooms.broadcast(room, event.encode());
        }
    }
    Ok(true)
}

fn checked_name(what: &str, name: String) -> Result<String, String> {
    let name = name.trim().to_owned();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(format!("{what} must be 1 to {MAX_NAME} characters"));
    }
    Ok(name)
}

/// Closes a user that could not keep up with its room.
async fn close_slow(stream: &mut MuxStream) {
    let _ = stream
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: "too slow: messages were dropped".into(),
        })))
        .await;
}
