//! Prometheus metrics (`GET /metrics` on the admin listener), with the `prometheus-client` crate.
//!
//! Two kinds. Events (handshakes, closes, re-originations, ping round trips, lost tap records)
//! are counted where they happen, once per connection or per ping, never per message. Everything
//! that describes state (connections, traffic, backend health, mux links and streams) is derived
//! at scrape time from the state itself ([`Figures`]), so it is current within a scrape and never
//! stored twice; the data path counts traffic in its own session entry only. The series and
//! their labels are listed in `docs/operations.md` (Metrics).

use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::pump::{Side, Traffic};

/// Label pairs of one series.
type Labels = Vec<(&'static str, String)>;

/// A handshake's labels: counted at every connect, so they are built without allocating.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    outcome: &'static str,
    status: u16,
}

/// A close's labels: counted at every session's end, so they are built without allocating.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    by: &'static str,
    code: CloseCodeLabel,
}

/// The close code the client got, or `none`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct CloseCodeLabel(Option<u16>);

impl EncodeLabelValue for CloseCodeLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(code) => EncodeLabelValue::encode(&code, encoder),
            None => EncodeLabelValue::encode(&"none", encoder),
        }
    }
}

/// Every event metric the relay exports.
pub struct Metrics {
    registry: Registry,
    handshakes: Family<HandshakeLabels, Counter>,
    closes: Family<CloseLabels, Counter>,
    reoriginations: Counter,
    ping_rtt: Family<Labels, Histogram>,
    /// The `ping_rtt` series of each leg (client, backend), looked up once: every session
    /// keeps both, and a lookup costs a label vector and a lock.
    rtt_by_leg: [OnceLock<Histogram>; 2],
    tap_dropped: Counter,
    discovery_failures: Family<Labels, Counter>,
    /// Bytes of the compressed client legs, counted by the legs themselves.
    compression: CompressionCounters,
    /// Traffic as last rendered: a session that ends during a scrape may be missed once, and a
    /// counter must never go back.
    rendered_traffic: Mutex<Traffic>,
}

/// What the `permessage-deflate` client legs count, as they go (one relaxed add per socket
/// read or write and per message: the compression itself costs far more). Clones share the
/// counts.
#[derive(Debug, Clone, Default)]
pub struct CompressionCounters {
    /// Sessions whose client leg negotiated `permessage-deflate`.
    pub sessions: Counter,
    /// Bytes read from compressed client legs' sockets (frames as sent, headers included).
    pub wire_in: Counter,
    /// Bytes written to them.
    pub wire_out: Counter,
    /// Payload bytes of the data messages read from them, after decompression.
    pub message_in: Counter,
    /// Payload bytes of the data messages written to them, before compression.
    pub message_out: Counter,
}

/// State-describing figures gathered at scrape time.
#[derive(Debug, Default)]
pub struct Figures {
    /// Established sessions by (route, backend); configured pairs with none are listed as 0.
    pub connections: Vec<(String, String, i64)>,
    /// Traffic of every session so far.
    pub traffic: Traffic,
    /// Backend health by URL.
    pub backend_healthy: Vec<(String, bool)>,
    /// Live mux links by backend URL.
    pub mux_links: Vec<(String, i64)>,
    /// Open mux streams by backend URL.
    pub mux_streams: Vec<(String, i64)>,
    /// Backends of each `discover` upstream, by upstream name.
    pub discovered: Vec<(String, i64)>,
}

fn rtt_histogram() -> Histogram {
    // 50 µs to about 3 s.
    Histogram::new(exponential_buckets(0.000_05, 3.0, 11))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wsrelay");
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "handshakes",
            "Client handshakes by outcome and HTTP status",
            handshakes.clone(),
        );
        let closes = Family::<CloseLabels, Counter>::default();
        registry.register(
            "closes",
            "Session closes by who closed and close code",
            closes.clone(),
        );
        let reoriginations = Counter::default();
        registry.register(
            "reoriginations",
            "Sessions moved to another backend after a backend loss",
            reoriginations.clone(),
        );
        let ping_rtt =
            Family::<Labels, Histogram>::new_with_constructor(rtt_histogram as fn() -> Histogram);
        registry.register(
            "ping_rtt_seconds",
            "Keepalive ping round-trip time by leg",
            ping_rtt.clone(),
        );
        let tap_dropped = Counter::default();
        registry.register(
            "tap_dropped_records",
            "Tap records lost because a tap could not keep up",
            tap_dropped.clone(),
        );
        let discovery_failures = Family::<Labels, Counter>::default();
        registry.register(
            "discovery_failures",
            "Failed DNS lookups of discover upstreams (the last backend set stays)",
            discovery_failures.clone(),
        );
        let sessions = Counter::default();
        registry.register(
            "compression_sessions",
            "Client sessions that negotiated permessage-deflate",
            sessions.clone(),
        );
        let wire = Family::<Labels, Counter>::default();
        registry.register(
            "compression_wire_bytes",
            "Bytes on the sockets of compressed client legs by direction, frame headers included",
            wire.clone(),
        );
        let message = Family::<Labels, Counter>::default();
        registry.register(
            "compression_message_bytes",
            "Payload bytes of data messages on compressed client legs by direction, uncompressed",
            message.clone(),
        );
        // A family's counter clones share its count: the legs add to them without a lookup.
        let series = |family: &Family<Labels, Counter>, direction: &str| {
            family
                .get_or_create(&vec![("direction", direction.to_owned())])
                .clone()
        };
        let compression = CompressionCounters {
            sessions,
            wire_in: series(&wire, "in"),
            wire_out: series(&wire, "out"),
            message_in: series(&message, "in"),
            message_out: series(&message, "out"),
        };
        Metrics {
            registry,
            compression,
            discovery_failures,
            handshakes,
            closes,
            reoriginations,
            ping_rtt,
            rtt_by_leg: Default::default(),
            tap_dropped,
            rendered_traffic: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Counts a client handshake's outcome.
    pub fn handshake(&self, outcome: &'static str, status: u16) {
        self.handshakes
            .get_or_create(&HandshakeLabels { outcome, status })
            .inc();
    }

    /// Counts a session's close: who closed it (`client`, `backend`, `relay`) and the code
    /// the client got.
    pub fn close(&self, by: &'static str, code: Option<u16>) {
        let code = CloseCodeLabel(code);
        self.closes.get_or_create(&CloseLabels { by, code }).inc();
    }

    /// The counters the compressed client legs add to.
    pub fn compression(&self) -> &CompressionCounters {
        &self.compression
    }

    /// Counts a session moved to another backend.
    pub fn reoriginated(&self) {
        self.reoriginations.inc();
    }

    /// Counts a failed lookup of a `discover` upstream.
    pub fn discovery_failed(&self, upstream: &str) {
        self.discovery_failures
            .get_or_create(&vec![("upstream", upstream.to_owned())])
            .inc();
    }

    /// Counts tap records a slow tap lost.
    pub fn tap_dropped(&self, lost: u64) {
        self.tap_dropped.inc_by(lost);
    }

    /// The histogram of keepalive round trips on `side`'s legs, for a session to keep.
    pub fn ping_rtt(&self, side: Side) -> Histogram {
        let leg = match side {
            Side::Client => 0,
            Side::Backend => 1,
        };
        self.rtt_by_leg[leg]
            .get_or_init(|| {
                self.ping_rtt
                    .get_or_create_owned(&vec![("leg", side.as_str().to_owned())])
            })
            .clone()
    }

    /// The Prometheus text exposition of every metric: events as counted, state from `figures`.
    pub fn render(&self, figures: &Figures) -> String {
        let traffic = {
            let mut rendered = self.rendered_traffic.lock().expect("traffic lock");
            rendered.raise_to(&figures.traffic);
            *rendered
        };
        let state = state_registry(figures, &traffic);
        let mut out = String::new();
        encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &state))
            .and_then(|()| encode_eof(&mut out))
            .expect("writing to a String cannot fail");
        out
    }
}

/// A registry of this scrape's state figures.
fn state_registry(figures: &Figures, traffic: &Traffic) -> Registry {
    let mut registry = Registry::with_prefix("wsrelay");
    let gauges = |pairs: &mut dyn Iterator<Item = (Labels, i64)>| {
        let family = Family::<Labels, Gauge>::default();
        for (labels, value) in pairs {
            family.get_or_create(&labels).set(value);
        }
        family
    };
    let connections = gauges(&mut figures.connections.iter().map(|(route, backend, n)| {
        (
            vec![("route", route.clone()), ("backend", backend.clone())],
            *n,
        )
    }));
    registry.register(
        "connections_active",
        "Established sessions by route and backend",
        connections,
    );
    let by_direction = |inbound: u64, outbound: u64| {
        let family = Family::<Labels, Counter>::default();
        family
            .get_or_create(&vec![("direction", "in".to_owned())])
            .inc_by(inbound);
        family
            .get_or_create(&vec![("direction", "out".to_owned())])
            .inc_by(outbound);
        family
    };
    registry.register(
        "messages",
        "Messages relayed by direction (in: client to backend)",
        by_direction(traffic.client_messages, traffic.backend_messages),
    );
    registry.register(
        "bytes",
        "Payload bytes relayed by direction",
        by_direction(traffic.client_bytes, traffic.backend_bytes),
    );
    let per_backend = |values: &[(String, i64)]| {
        gauges(
            &mut values
                .iter()
                .map(|(url, n)| (vec![("backend", url.clone())], *n)),
        )
    };
    let healthy: Vec<(String, i64)> = figures
        .backend_healthy
        .iter()
        .map(|(url, up)| (url.clone(), i64::from(*up)))
        .collect();
    registry.register(
        "backend_healthy",
        "1 if the backend may take clients by its health, else 0",
        per_backend(&healthy),
    );
    registry.register(
        "mux_links",
        "Mux links open by backend",
        per_backend(&figures.mux_links),
    );
    registry.register(
        "mux_streams",
        "Mux streams open by backend",
        per_backend(&figures.mux_streams),
    );
    let discovered = gauges(
        &mut figures
            .discovered
            .iter()
            .map(|(upstream, n)| (vec![("upstream", upstream.clone())], *n)),
    );
    registry.register(
        "discovered_backends",
        "Backends a discover upstream resolved to at its last successful lookup",
        discovered,
    );
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_events_and_state() {
        let metrics = Metrics::default();
        metrics.handshake("upgraded", 101);
        metrics.close("client", Some(1000));
        metrics.close("relay", None);
        metrics.close("relay", None);
        metrics.discovery_failed("chat");
        metrics.discovery_failed("chat");
        let mut figures = Figures {
            connections: vec![("/chat".into(), "ws://b:1".into(), 2)],
            traffic: Traffic {
                client_messages: 3,
                client_bytes: 30,
                backend_messages: 2,
                backend_bytes: 20,
            },
            discovered: vec![("chat".into(), 3)],
            ..Figures::default()
        };
        let text = metrics.render(&figures);
        for expected in [
            "wsrelay_handshakes_total{outcome=\"upgraded\",status=\"101\"} 1",
            "wsrelay_messages_total{direction=\"in\"} 3",
            "wsrelay_bytes_total{direction=\"out\"} 20",
            "wsrelay_closes_total{by=\"client\",code=\"1000\"} 1",
            "wsrelay_closes_total{by=\"relay\",code=\"none\"} 2",
            "wsrelay_connections_active{route=\"/chat\",backend=\"ws://b:1\"} 2",
            "wsrelay_discovery_failures_total{upstream=\"chat\"} 2",
            "wsrelay_discovered_backends{upstream=\"chat\"} 3",
        ] {
            assert!(text.contains(expected), "{expected} missing in\n{text}");
        }
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        // A session missed by one scrape (it ended mid-walk) never makes a counter go back.
        figures.traffic.client_messages = 1;
        let text = metrics.render(&figures);
        assert!(
            text.contains("wsrelay_messages_total{direction=\"in\"} 3"),
            "{text}"
        );
    }
}
