//! A terminal chat client for the `chat_backend` example, through a relay.
//!
//! ```text
//! cargo run -p wsrelay-client --example chat_backend -- --listen 127.0.0.1:9301
//! wsrelay --config chat.toml      # a route "/chat" in mode "mux" to ws://127.0.0.1:9301
//! cargo run -p wsrelay-client --example chat_cli -- --url ws://127.0.0.1:8080/chat --nick ann
//! ```
//!
//! `--deflate` offers `permessage-deflate` (a route with `compression = "client"` accepts it).
//!
//! Type a line to say it to your room; `/join ROOM`, `/nick NAME`, `/quit` (or end of input).
//! Others' lines print as `[room] nick: text`; the client's own status lines start with `*`.
//!
//! It keeps working across a relay restart: the client reconnects with backoff, says so, and
//! restores the session first thing on the new connection (the nick and the room are sent
//! by `on_connect`), then sends what was typed meanwhile.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use wsrelay_client::{
    Client, ClientBuilder, CloseReason, Deflate, Event, Message, QueuePolicy, Reconnect, SendError,
};

/// Lines typed while disconnected that wait for the reconnect.
pub const QUEUE: usize = 256;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "terminal chat client for the chat_backend example, through wsrelay")]
struct Args {
    /// The relay route that leads to the chat backend.
    #[arg(long, default_value = "ws://127.0.0.1:8080/chat")]
    url: String,
    /// Your nick.
    #[arg(long)]
    nick: String,
    /// The room to start in.
    #[arg(long, default_value = "lobby")]
    room: String,
    /// Offer permessage-deflate.
    #[arg(long)]
    deflate: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let session = Session::shared(&args.nick, &args.room);
    let mut builder = builder(&args.url, &session);
    if args.deflate {
        builder = builder.deflate(Deflate::default());
    }
    let mut client = builder.start()?;
    println!("* connecting to {} as {}", args.url, args.nick);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut typing = true;
    loop {
        tokio::select! {
            line = lines.next_line(), if typing => {
                let line = match line {
                    Ok(Some(line)) => line,
                    // End of input: leave like /quit.
                    Ok(None) | Err(_) => {
                        typing = false;
                        "/quit".to_owned()
                    }
                };
                match input(&line, &session) {
                    Input::Send(message) => {
                        if let Some(note) = send(&client, message) {
                            println!("{note}");
                        }
                    }
                    Input::Say(note) => println!("{note}"),
                    Input::Quit => {
                        client.close(1000, "bye").await;
                        typing = false;
                    }
                    Input::Nothing => {}
                }
            }
            event = client.next_event() => match event {
                Some(event) => {
                    if let Some(line) = render(&event, &session) {
                        println!("{line}");
                    }
                }
                None => break,
            }
        }
    }
    Ok(())
}

/// Who the user is and where: restored on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The nick.
    pub nick: String,
    /// The current room.
    pub room: String,
}

/// The session, shared between the input loop and the client's `on_connect`.
pub type SharedSession = Arc<Mutex<Session>>;

impl Session {
    /// A shared session for `nick` in `room`.
    pub fn shared(nick: &str, room: &str) -> SharedSession {
        Arc::new(Mutex::new(Session {
            nick: nick.to_owned(),
            room: room.to_owned(),
        }))
    }
}

fn current(session: &SharedSession) -> Session {
    session.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The chat client's settings: quick reconnects (250 ms to 5 s, forever), lines queued while
/// disconnected, and the session restored first on every connection.
pub fn builder(url: &str, session: &SharedSession) -> ClientBuilder {
    let session = Arc::clone(session);
    Client::builder(url)
        .reconnect(Reconnect::default().backoff(Duration::from_millis(250), Duration::from_secs(5)))
        .queue(QueuePolicy::Buffer {
            max_messages: QUEUE,
        })
        .on_connect(move |_| {
            let Session { nick, room } = current(&session);
            vec![
                command(json!({"type": "nick", "name": nick})),
                command(json!({"type": "join", "room": room})),
            ]
        })
}

fn command(value: Value) -> Message {
    Message::text(value.to_string())
}

/// What a typed line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Send this to the backend.
    Send(Message),
    /// Print this locally.
    Say(String),
    /// Leave.
    Quit,
    /// Nothing to do (an empty line).
    Nothing,
}

/// Interprets a typed line, updating the session for `/nick` and `/join`.
pub fn input(line: &str, session: &SharedSession) -> Input {
    let line = line.trim();
    if line.is_empty() {
        return Input::Nothing;
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Input::Send(command(json!({"type": "say", "text": line})));
    };
    let (name, argument) = rest.split_once(' ').unwrap_or((rest, ""));
    let argument = argument.trim();
    let mut session = session.lock().unwrap_or_else(|e| e.into_inner());
    match (name, argument) {
        ("quit", _) => Input::Quit,
        ("nick", nick) if !nick.is_empty() => {
            session.nick = nick.to_owned();
            Input::Send(command(json!({"type": "nick", "name": nick})))
        }
        ("join", room) if !room.is_empty() => {
            session.room = room.to_owned();
            Input::Send(command(json!({"type": "join", "room": room})))
        }
        _ => Input::Say(
            "* commands: /join ROOM, /nick NAME, /quit; anything else is said to the room".into(),
        ),
    }
}

/// Queues `message`; returns a note for the user when it was not sent at once.
pub fn send(client: &Client, message: Message) -> Option<String> {
    let connected = client.is_connected();
    match client.try_send(message) {
        Ok(()) if connected => None,
        Ok(()) => Some("* not connected: queued, will be sent on reconnect".into()),
        Err(SendError::Full { capacity, .. }) => Some(format!(
            "* not sent: {capacity} lines already wait for the reconnect"
        )),
        Err(error) => Some(format!("* not sent: {error}")),
    }
}

/// The line to print for an event, if any.
pub fn render(event: &Event, session: &SharedSession) -> Option<String> {
    match event {
        Event::Message(Message::Text(text)) => Some(render_chat(text)),
        Event::Message(Message::Binary(data)) => Some(format!("* ({} binary bytes)", data.len())),
        Event::Connected(connected) => {
            let Session { nick, room } = current(session);
            let how = if connected.is_compressed() {
                " (compressed)"
            } else {
                ""
            };
            Some(if connected.is_reconnect() {
                format!("* reconnected{how}; you are {nick} in [{room}]")
            } else {
                format!("* connected{how}; you are {nick} in [{room}]")
            })
        }
        Event::Disconnected {
            code: Some(code),
            reason,
        } => Some(format!("* disconnected by the server ({code} {reason})")),
        Event::Disconnected { code: None, reason } => Some(format!("* connection lost: {reason}")),
        Event::Reconnecting {
            attempt,
            delay,
            error,
        } => Some(match error {
            Some(error) => format!(
                "* reconnecting in {:.1}s (attempt {attempt}; last: {error})",
                delay.as_secs_f64()
            ),
            None => format!(
                "* reconnecting in {:.1}s (attempt {attempt})",
                delay.as_secs_f64()
            ),
        }),
        Event::Closed(CloseReason::Local { .. }) => Some("* bye".into()),
        Event::Closed(why) => Some(format!("* closed: {why}")),
    }
}

/// `[room] nick: text` for a chat event; errors and anything else as they come.
pub fn render_chat(text: &str) -> String {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return text.to_owned();
    };
    let field = |name: &str| value[name].as_str().unwrap_or_default().to_owned();
    match value["type"].as_str() {
        Some("said") => format!("[{}] {}: {}", field("room"), field("nick"), field("text")),
        Some("error") => format!("! {}", field("message")),
        _ => text.to_owned(),
    }
}
