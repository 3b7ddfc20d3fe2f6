//! Inspectors: per-frame hooks that see every message a route carries and can forward, drop,
//! rewrite or close. They are chained per route from config (`inspect = ["log", "json", "rate"]`)
//! and run inside the pump, on the connection's own task, in order.
//!
//! An inspector is made per connection by its [`InspectorFactory`], so it can keep state (a token
//! bucket, a parser) without locks. A route with no inspectors has no chain at all: the pump's
//! hot path pays one branch for the feature.
//!
//! Adding your own takes a few lines: implement [`Inspector`] (override only what you need) and
//! an [`InspectorFactory`], register it with [`crate::RelayBuilder::inspector`], and name it in a
//! route's `inspect` list. The built-ins and their arguments: `docs/configuration.md`
//! (Inspectors).

mod json;
mod log;
mod rate;
mod size;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tungstenite::Message;

use crate::config::InspectorCatalog;
pub use crate::pump::{Direction, Verdict};

pub use json::JsonOnly;
pub use log::FrameLog;
pub use rate::RateLimit;
pub use size::MaxSize;

/// What an inspector knows about the connection a frame belongs to.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The relay's id for the connection (also sent to the backend as `X-Relay-Conn-Id`).
    pub conn_id: u64,
    /// The route's path prefix.
    pub route: Arc<str>,
    /// The request path the client asked for.
    pub path: String,
    /// The client's address.
    pub client_addr: SocketAddr,
}

/// The context of one frame.
#[derive(Debug, Clone, Copy)]
pub struct FrameContext<'a> {
    /// The connection.
    pub connection: &'a ConnectionInfo,
    /// The backend currently serving it.
    pub backend: &'a str,
    /// Which way the frame travels.
    pub direction: Direction,
}

/// A per-connection frame hook. Every method has a default that does nothing, so an inspector
/// overrides only the phases it cares about.
pub trait Inspector: Send {
    /// Called for every text and binary message before it is forwarded. The inspector may
    /// rewrite `message` in place (keeping a payload's `Bytes` avoids a copy); the next
    /// inspector in the chain sees the rewritten message. Returning anything but
    /// [`Verdict::Forward`] stops the chain.
    fn on_message(&mut self, context: &FrameContext<'_>, message: &mut Message) -> Verdict {
        let _ = (context, message);
        Verdict::Forward
    }

    /// Called for every control frame (ping, pong, close) a leg receives. Control frames are
    /// handled by the relay itself (pings answered, closes carried across), so this only
    /// observes.
    fn on_control(&mut self, context: &FrameContext<'_>, message: &Message) {
        let _ = (context, message);
    }
}

/// Makes the inspector of one connection; one factory per inspector name.
pub trait InspectorFactory: Send + Sync + 'static {
    /// Creates the inspector for a new connection. `argument` is what followed `name:` in the
    /// route's `inspect` list, if anything.
    fn create(&self, connection: &ConnectionInfo, argument: Option<&str>) -> Box<dyn Inspector>;

    /// Checks an `inspect` entry's argument when the config is loaded; an error is reported
    /// with the route's line.
    fn check_argument(&self, argument: Option<&str>) -> Result<(), String> {
        match argument {
            None => Ok(()),
            Some(argument) => Err(format!("takes no argument, got {argument:?}")),
        }
    }
}

impl InspectorCatalog for InspectorRegistry {
    fn check_entry(&self, entry: &str) -> Result<(), String> {
        let (name, argument) = split_entry(entry);
        let factory = self.factories.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.factories.keys().map(String::as_str).collect();
            format!("unknown inspector {name:?} (known: {})", known.join(", "))
        })?;
        factory
            .check_argument(argument)
            .map_err(|e| format!("inspector {name:?}: {e}"))
    }
}

/// Known inspector names and their factories: the built-ins plus any registered by the
/// embedding application.
#[derive(Clone)]
pub struct InspectorRegistry {
    factories: BTreeMap<String, Arc<dyn InspectorFactory>>,
}

impl Default for InspectorRegistry {
    fn default() -> Self {
        let mut registry = InspectorRegistry {
            factories: BTreeMap::new(),
        };
        registry.register("log", log::FrameLogFactory);
        registry.register("json", json::JsonOnlyFactory);
        registry.register("rate", rate::RateLimitFactory);
        registry.register("max_size", size::MaxSizeFactory);
        registry
    }
}

impl InspectorRegistry {
    /// Adds (or replaces) the factory for `name`.
    pub fn register(&mut self, name: &str, factory: impl InspectorFactory) {
        self.factories.insert(name.to_owned(), Arc::new(factory));
    }

    /// Checks one `inspect` entry (`name` or `name:argument`).
    pub fn check(&self, entry: &str) -> Result<(), String> {
        self.check_entry(entry)
    }

    /// Resolves a route's `inspect` list into a chain template; entries were checked already.
    pub fn chain_template(&self, entries: &[String]) -> Option<ChainTemplate> {
        let links: Vec<(Arc<dyn InspectorFactory>, Option<String>)> = entries
            .iter()
            .filter_map(|entry| {
                let (name, argument) = split_entry(entry);
                Some((
                    self.factories.get(name)?.clone(),
                    argument.map(str::to_owned),
                ))
            })
            .collect();
        (!links.is_empty()).then(|| ChainTemplate { links })
    }
}

fn split_entry(entry: &str) -> (&str, Option<&str>) {
    match entry.split_once(':') {
        Some((name, argument)) => (name.trim(), Some(argument.trim())),
        None => (entry.trim(), None),
    }
}

/// A route's inspector list, ready to make per-connection chains.
#[derive(Clone)]
pub struct ChainTemplate {
    links: Vec<(Arc<dyn InspectorFactory>, Option<String>)>,
}

impl ChainTemplate {
    /// Makes the chain of a new connection.
    pub fn instantiate(&self, connection: ConnectionInfo) -> InspectorChain {
        let inspectors = self
            .links
            .iter()
            .map(|(factory, argument)| factory.create(&connection, argument.as_deref()))
            .collect();
        InspectorChain {
            connection,
            inspectors,
        }
    }
}

/// One connection's inspectors, in route order.
pub struct InspectorChain {
    connection: ConnectionInfo,
    inspectors: Vec<Box<dyn Inspector>>,
}

impl InspectorChain {
    /// Runs a data message through the chain.
    pub fn on_message(
        &mut self,
        backend: &str,
        direction: Direction,
        message: &mut Message,
    ) -> Verdict {
        let context = FrameContext {
            connection: &self.connection,
            backend,
            direction,
        };
        for inspector in &mut self.inspectors {
            match inspector.on_message(&context, message) {
                Verdict::Forward => {}
                other => return other,
            }
        }
        Verdict::Forward
    }

    /// Shows a control frame to every inspector.
    pub fn on_control(&mut self, backend: &str, direction: Direction, message: &Message) {
        let context = FrameContext {
            connection: &self.connection,
            backend,
            direction,
        };
        for inspector in &mut self.inspectors {
            inspector.on_control(&context, message);
        }
    }
}

/// The opcode name of a message, as logs and taps show it.
pub fn opcode_name(message: &Message) -> &'static str {
    match message {
        Message::Text(_) => "text",
        Message::Binary(_) => "binary",
        Message::Ping(_) => "ping",
        Message::Pong(_) => "pong",
        Message::Close(_) => "close",
        Message::Frame(_) => "frame",
    }
}

/// Up to `limit` leading payload bytes, printable: text as is (cut at a character boundary),
/// binary as hex.
pub fn preview(message: &Message, limit: usize) -> String {
    match message {
        Message::Text(text) => {
            let text = text.as_str();
            let mut end = text.len().min(limit);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text[..end].to_owned()
        }
        Message::Close(Some(frame)) => format!("{} {}", u16::from(frame.code), frame.reason),
        other => {
            let data = other.clone().into_data();
            data.iter()
                .take(limit / 2)
                .map(|b| format!("{b:02x}"))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::coding::CloseCode;

    fn connection() -> ConnectionInfo {
        ConnectionInfo {
            conn_id: 7,
            route: "/chat".into(),
            path: "/chat/x".into(),
            client_addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    struct Shout;
    impl Inspector for Shout {
        fn on_message(&mut self, _: &FrameContext<'_>, message: &mut Message) -> Verdict {
            if let Message::Text(text) = message {
                *message = Message::text(text.as_str().to_uppercase());
            }
            Verdict::Forward
        }
    }
    struct ShoutFactory;
    impl InspectorFactory for ShoutFactory {
        fn create(&self, _: &ConnectionInfo, _: Option<&str>) -> Box<dyn Inspector> {
            Box::new(Shout)
        }
    }

    #[test]
    fn a_chain_runs_in_order_and_stops_at_the_first_verdict() {
        let mut registry = InspectorRegistry::default();
        registry.register("shout", ShoutFactory);
        assert!(registry.check("shout").is_ok());
        assert!(
            registry
                .check("nope")
                .unwrap_err()
                .contains("unknown inspector")
        );
        assert!(registry.check("shout:x").is_err());
        let template = registry
            .chain_template(&["shout".into(), "json".into()])
            .unwrap();
        let mut chain = template.instantiate(connection());
        let mut message = Message::text("{\"a\":\"b\"}");
        assert_eq!(
            chain.on_message("b", Direction::ClientToBackend, &mut message),
            Verdict::Forward
        );
        assert_eq!(message, Message::text("{\"A\":\"B\"}"));
        let mut broken = Message::text("not json");
        assert!(matches!(
            chain.on_message("b", Direction::ClientToBackend, &mut broken),
            Verdict::Close(CloseCode::Invalid, _)
        ));
        assert!(registry.chain_template(&[]).is_none());
    }

    #[test]
    fn previews() {
        assert_eq!(preview(&Message::text("héllo"), 2), "h");
        assert_eq!(preview(&Message::binary(vec![0xde, 0xad, 0xbe]), 4), "dead");
    }
}
