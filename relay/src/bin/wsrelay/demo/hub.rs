//! The demo's chat rooms, shared by the three chat backends the way a real deployment shares
//! them through a message bus: a line said on one backend reaches the room's members on every
//! backend. The hub keeps each room's recent history, who is in it and through which backend,
//! and which backends are up; it drops a line a client sends twice (the relay replays the
//! messages a dead backend had not acknowledged, so a move may deliver one twice).
//!
//! Everything here is synchronous state behind one mutex; members get their messages as JSON
//! text on bounded queues, so a member that stops reading loses lines instead of growing the
//! hub.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;

/// Lines a room remembers for members who join later.
const HISTORY: usize = 50;
/// Client message ids a room remembers to drop replays.
const SEEN_IDS: usize = 512;
/// Messages queued for a member before it starts losing lines.
pub const OUTBOX: usize = 256;
/// Longest line, nick and room name, in characters.
const MAX_TEXT: usize = 2000;
const MAX_NICK: usize = 24;
const MAX_ROOM: usize = 32;

/// A member's place in the hub; returned by [`Hub::join`], given back to [`Hub::leave`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemberId(u64);

/// One line of a room's conversation.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// Position in the room, from 1: clients skip lines they already have.
    pub seq: u64,
    /// Who said it.
    pub nick: String,
    /// What was said.
    pub text: String,
    /// The backend that took it from its sender.
    pub via: String,
    /// Unix time in milliseconds.
    pub at: u64,
}

/// Who a joining client is, as its chat URL says.
#[derive(Debug, Clone)]
pub struct Joining {
    /// The room (`?room=`), already cleaned by [`room_name`].
    pub room: String,
    /// The nick (`?user=`), already cleaned by [`nick_name`].
    pub nick: String,
    /// The backend serving it.
    pub backend: String,
    /// The relay's id of the client's connection.
    pub conn: u64,
    /// True when the relay moved this client here from a backend that went away.
    pub resumed: bool,
}

struct Member {
    room: String,
    nick: String,
    backend: String,
    outbox: mpsc::Sender<Arc<str>>,
}

#[derive(Default)]
struct Room {
    history: VecDeque<Line>,
    seen: VecDeque<String>,
    seen_set: HashSet<String>,
    next_seq: u64,
}

impl Room {
    /// Records `id`; false when the room has seen it already.
    fn first_time(&mut self, id: &str) -> bool {
        if id.is_empty() {
            return true;
        }
        if !self.seen_set.insert(id.to_owned()) {
            return false;
        }
        self.seen.push_back(id.to_owned());
        if self.seen.len() > SEEN_IDS
            && let Some(old) = self.seen.pop_front()
        {
            self.seen_set.remove(&old);
        }
        true
    }
}

#[derive(Default)]
struct State {
    rooms: HashMap<String, Room>,
    members: HashMap<MemberId, Member>,
    backends: BTreeMap<String, bool>,
    next_member: u64,
}

/// The chat rooms of the demo, shared by its backends.
#[derive(Default)]
pub struct Hub {
    state: Mutex<State>,
    tap: OnceLock<String>,
}

impl Hub {
    /// A hub that knows `backends` (all up).
    pub fn new(backends: &[&str]) -> Hub {
        let hub = Hub::default();
        hub.lock().backends = backends.iter().map(|b| (b.to_string(), true)).collect();
        hub
    }

    /// Where a client taps its own frames: the admin listener's `/api/tap?conn=` (known
    /// once the relay is bound).
    pub fn set_tap_url(&self, base: String) {
        let _ = self.tap.set(base);
    }

    /// Adds a member and queues its welcome: the backend serving it, its connection id, the
    /// room's history, and where to tap its frames. Everyone learns the new member lists.
    pub fn join(&self, joining: Joining, outbox: mpsc::Sender<Arc<str>>) -> MemberId {
        let mut state = self.lock();
        state.next_member += 1;
        let id = MemberId(state.next_member);
        let history: Vec<Line> = state
            .rooms
            .entry(joining.room.clone())
            .or_default()
            .history
            .iter()
            .cloned()
            .collect();
        let tap = self.tap.get().map(|base| format!("{base}{}", joining.conn));
        let welcome = json!({
            "type": "welcome",
            "backend": joining.backend,
            "conn": joining.conn,
            "resumed": joining.resumed,
            "room": joining.room,
            "nick": joining.nick,
            "history": history,
            "tap": tap,
        });
        let _ = outbox.try_send(welcome.to_string().into());
        state.members.insert(
            id,
            Member {
                room: joining.room.clone(),
                nick: joining.nick,
                backend: joining.backend,
                outbox,
            },
        );
        state.announce_members(&joining.room);
        state.announce_backends();
        id
    }

    /// Removes a member; its room and everyone's backend list learn it.
    pub fn leave(&self, id: MemberId) {
        let mut state = self.lock();
        if let Some(member) = state.members.remove(&id) {
            state.announce_members(&member.room);
            state.announce_backends();
        }
    }

    /// `id` says `text` in its room, as its message `message_id` (empty: no replay check);
    /// the line goes to every member of the room. Returns the line, or `None` for a replay
    /// or an empty text.
    pub fn say(&self, id: MemberId, message_id: &str, text: &str) -> Option<Line> {
        let text: String = text.trim().chars().take(MAX_TEXT).collect();
        if text.is_empty() {
            return None;
        }
        let mut state = self.lock();
        let member = state.members.get(&id)?;
        let (room_name, nick, via) = (
            member.room.clone(),
            member.nick.clone(),
            member.backend.clone(),
        );
        let room = state.rooms.entry(room_name.clone()).or_default();
        let replay_key = format!("{nick}\u{0}{message_id}");
        if !message_id.is_empty() && !room.first_time(&replay_key) {
            return None;
        }
        room.next_seq += 1;
        let line = Line {
            seq: room.next_seq,
            nick,
            text,
            via,
            at: unix_millis(),
        };
        room.history.push_back(line.clone());
        if room.history.len() > HISTORY {
            room.history.pop_front();
        }
        let mut message = json!(line);
        message["type"] = json!("line");
        state.send_room(&room_name, &message.to_string());
        Some(line)
    }

    /// Tells every member something that happened (a backend killed or back).
    pub fn notice(&self, text: &str) {
        let message = json!({"type": "system", "text": text}).to_string();
        let state = self.lock();
        for member in state.members.values() {
            let _ = member.outbox.try_send(message.as_str().into());
        }
    }

    /// Marks `backend` up or down; everyone's backend list shows it.
    pub fn set_backend_up(&self, backend: &str, up: bool) {
        let mut state = self.lock();
        state.backends.insert(backend.to_owned(), up);
        state.announce_backends();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn send_room(&self, room: &str, message: &str) {
        let message: Arc<str> = message.into();
        for member in self.members.values().filter(|m| m.room == room) {
            let _ = member.outbox.try_send(message.clone());
        }
    }

    fn announce_members(&self, room: &str) {
        let mut members: Vec<_> = self
            .members
            .values()
            .filter(|m| m.room == room)
            .map(|m| json!({"nick": m.nick, "backend": m.backend}))
            .collect();
        members.sort_by_key(|m| m["nick"].as_str().unwrap_or_default().to_owned());
        let message = json!({"type": "members", "room": room, "members": members});
        self.send_room(room, &message.to_string());
    }

    fn announce_backends(&self) {
        let backends: Vec<_> = self
            .backends
            .iter()
            .map(|(name, up)| {
                let clients = self.members.values().filter(|m| &m.backend == name).count();
                json!({"name": name, "up": up, "clients": clients})
            })
            .collect();
        let message: Arc<str> = json!({"type": "backends", "backends": backends})
            .to_string()
            .into();
        for member in self.members.values() {
            let _ = member.outbox.try_send(message.clone());
        }
    }
}

/// What a chat client asked for, from its text message: JSON from the page
/// (`{"type":"say","id":..,"text":..}`, `{"type":"kill","backend":..}`) or plain text from a
/// terminal (`/kill alpha`, `whoami`, anything else is said).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Say a line in the room; `id` identifies it for the replay check.
    Say {
        /// The client's id of this message (may be empty).
        id: String,
        /// The line.
        text: String,
    },
    /// Kill the backend named; `None`: no name was given. Never "the one serving me": the
    /// relay replays a message the dying backend had not acknowledged to the next one, which
    /// would then kill itself too.
    Kill(Option<String>),
    /// Which backend serves me?
    WhoAmI,
}

/// Reads one text message from a chat client.
pub fn command(text: &str) -> Command {
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text)
        && value.is_object()
    {
        let field = |name: &str| value[name].as_str().unwrap_or_default().to_owned();
        return match value["type"].as_str() {
            Some("kill") => Command::Kill(Some(field("backend")).filter(|b| !b.is_empty())),
            Some("whoami") => Command::WhoAmI,
            _ => Command::Say {
                id: field("id"),
                text: field("text"),
            },
        };
    }
    let trimmed = text.trim();
    if let Some(rest) = trimmed.strip_prefix("/kill") {
        let name = rest.trim();
        return Command::Kill((!name.is_empty()).then(|| name.to_owned()));
    }
    if trimmed == "whoami" || trimmed == "/whoami" {
        return Command::WhoAmI;
    }
    Command::Say {
        id: String::new(),
        text: text.to_owned(),
    }
}

/// The room a `?room=` value names: lowercase letters, digits, `-` and `_`, at most 32;
/// `lobby` when nothing is left.
pub fn room_name(raw: Option<&str>) -> String {
    let room: String = percent_decoded(raw.unwrap_or_default())
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(MAX_ROOM)
        .collect();
    if room.is_empty() {
        "lobby".to_owned()
    } else {
        room
    }
}

/// The nick a `?user=` value names: printable, trimmed, at most 24 characters; `guest` when
/// nothing is left.
pub fn nick_name(raw: Option<&str>) -> String {
    let decoded = percent_decoded(raw.unwrap_or_default()).replace('+', " ");
    let nick: String = decoded
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_NICK)
        .collect();
    if nick.is_empty() {
        "guest".to_owned()
    } else {
        nick
    }
}

/// The value of `name` in a query string.
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn percent_decoded(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| std::str::from_utf8(bytes.get(index + 1..index + 3)?).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                index += 3;
            }
            None => {
                out.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joining(room: &str, nick: &str, backend: &str) -> Joining {
        Joining {
            room: room.into(),
            nick: nick.into(),
            backend: backend.into(),
            conn: 7,
            resumed: false,
        }
    }

    fn drain(rx: &mut mpsc::Receiver<Arc<str>>) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Ok(message) = rx.try_recv() {
            out.push(serde_json::from_str(&message).unwrap());
        }
        out
    }

    fn of_type<'a>(messages: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
        messages.iter().filter(|m| m["type"] == kind).collect()
    }

    #[test]
    fn a_line_reaches_the_room_on_every_backend_and_no_other_room() {
        let hub = Hub::new(&["alpha", "bravo"]);
        let (ann_tx, mut ann) = mpsc::channel(OUTBOX);
        let (bob_tx, mut bob) = mpsc::channel(OUTBOX);
        let (eve_tx, mut eve) = mpsc::channel(OUTBOX);
        let ann_id = hub.join(joining("lobby", "ann", "alpha"), ann_tx);
        hub.join(joining("lobby", "bob", "bravo"), bob_tx);
        hub.join(joining("rust", "eve", "alpha"), eve_tx);
        drain(&mut ann);
        drain(&mut bob);
        drain(&mut eve);

        let line = hub.say(ann_id, "m1", "  hello  ").unwrap();
        assert_eq!(
            (line.seq, line.text.as_str(), line.via.as_str()),
            (1, "hello", "alpha")
        );
        let to_bob = drain(&mut bob);
        let lines = of_type(&to_bob, "line");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["nick"], "ann");
        assert_eq!(
            of_type(&drain(&mut ann), "line").len(),
            1,
            "the sender sees its line"
        );
        assert!(
            of_type(&drain(&mut eve), "line").is_empty(),
            "other rooms don't"
        );
    }

    #[test]
    fn a_replayed_message_is_said_once_and_empty_ids_are_never_deduplicated() {
        let hub = Hub::new(&["alpha"]);
        let (tx, _rx) = mpsc::channel(OUTBOX);
        let ann = hub.join(joining("lobby", "ann", "alpha"), tx);
        assert!(hub.say(ann, "tab1-1", "hi").is_some());
        assert!(
            hub.say(ann, "tab1-1", "hi").is_none(),
            "the replay is dropped"
        );
        assert!(hub.say(ann, "", "same").is_some());
        assert!(hub.say(ann, "", "same").is_some());
        assert!(hub.say(ann, "tab1-2", "   ").is_none(), "nothing to say");
    }

    #[test]
    fn late_joiners_get_the_history_and_the_member_and_backend_lists() {
        let hub = Hub::new(&["alpha", "bravo"]);
        hub.set_tap_url("ws://127.0.0.1:9/api/tap?conn=".into());
        let (tx, _keep) = mpsc::channel(OUTBOX);
        let ann = hub.join(joining("lobby", "ann", "alpha"), tx);
        for n in 0..(HISTORY + 5) {
            hub.say(ann, &format!("m{n}"), &format!("line {n}"));
        }
        let (tx, mut bob) = mpsc::channel(OUTBOX);
        hub.join(joining("lobby", "bob", "bravo"), tx);
        let messages = drain(&mut bob);
        let welcome = of_type(&messages, "welcome")[0];
        assert_eq!(welcome["backend"], "bravo");
        assert_eq!(welcome["tap"], "ws://127.0.0.1:9/api/tap?conn=7");
        let history = welcome["history"].as_array().unwrap();
        assert_eq!(history.len(), HISTORY);
        assert_eq!(
            history.last().unwrap()["text"],
            format!("line {}", HISTORY + 4)
        );
        let members = of_type(&messages, "members")[0]["members"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(members.len(), 2);
        let backends = of_type(&messages, "backends")[0]["backends"].clone();
        assert_eq!(backends[0]["name"], "alpha");
        assert_eq!(backends[0]["clients"], 1);
        assert_eq!(backends[1]["clients"], 1);
    }

    #[test]
    fn leaving_and_backend_changes_are_announced() {
        let hub = Hub::new(&["alpha", "bravo"]);
        let (tx, mut ann) = mpsc::channel(OUTBOX);
        hub.join(joining("lobby", "ann", "alpha"), tx);
        let (tx, _bob) = mpsc::channel(OUTBOX);
        let bob = hub.join(joining("lobby", "bob", "bravo"), tx);
        drain(&mut ann);
        hub.leave(bob);
        let messages = drain(&mut ann);
        assert_eq!(
            of_type(&messages, "members")[0]["members"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        hub.set_backend_up("bravo", false);
        let messages = drain(&mut ann);
        assert_eq!(
            of_type(&messages, "backends")[0]["backends"][1]["up"],
            false
        );
    }

    #[test]
    fn a_member_that_stops_reading_loses_lines_and_blocks_nobody() {
        let hub = Hub::new(&["alpha"]);
        let (tx, _stalled) = mpsc::channel(2);
        hub.join(joining("lobby", "slow", "alpha"), tx);
        let (tx, mut ann) = mpsc::channel(OUTBOX);
        let ann_id = hub.join(joining("lobby", "ann", "alpha"), tx);
        drain(&mut ann);
        for n in 0..100 {
            hub.say(ann_id, &n.to_string(), "x");
        }
        assert_eq!(of_type(&drain(&mut ann), "line").len(), 100);
    }

    #[test]
    fn commands_from_the_page_and_from_a_terminal() {
        assert_eq!(
            command(r#"{"type":"say","id":"t-1","text":"hi"}"#),
            Command::Say {
                id: "t-1".into(),
                text: "hi".into()
            }
        );
        assert_eq!(
            command(r#"{"type":"kill","backend":"bravo"}"#),
            Command::Kill(Some("bravo".into()))
        );
        assert_eq!(command(r#"{"type":"kill"}"#), Command::Kill(None));
        assert_eq!(command("/kill alpha"), Command::Kill(Some("alpha".into())));
        assert_eq!(command("/kill"), Command::Kill(None));
        assert_eq!(command("whoami"), Command::WhoAmI);
        assert_eq!(
            command("hello"),
            Command::Say {
                id: String::new(),
                text: "hello".into()
            }
        );
        assert_eq!(
            command("42"),
            Command::Say {
                id: String::new(),
                text: "42".into()
            }
        );
    }

    #[test]
    fn names_from_the_url_are_cleaned() {
        assert_eq!(room_name(None), "lobby");
        assert_eq!(room_name(Some("Rust%20Talk!")), "rusttalk");
        assert_eq!(room_name(Some("%%%")), "lobby");
        assert_eq!(nick_name(Some("ann+lee")), "ann lee");
        assert_eq!(nick_name(Some("%F0%9F%A6%80crab")), "🦀crab");
        assert_eq!(nick_name(Some("%0A%0D")), "guest");
        assert_eq!(nick_name(Some(&"x".repeat(100))).len(), MAX_NICK);
        assert_eq!(query_value("room=a&user=b", "user"), Some("b"));
        assert_eq!(query_value("room=a", "user"), None);
    }
}
