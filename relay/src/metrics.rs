//! Prometheus metrics (`GET /metrics` on the admin listener), with the `prometheus-client` crate.
//!
//! Nothing here is touched per message: sessions count in their own [`crate::pump::Traffic`]
//! and add the difference to the shared counters when their keepalive timer runs and when they
//! end. Label lookups (`Family::get_or_create`, a read lock) happen per connection, not per frame.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::pump::Traffic;

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;

/// Every metric the relay exports.
pub struct Metrics {
    registry: Registry,
    /// Established sessions by route and backend.
    pub connections: Family<Labels, Gauge>,
    /// Client handshakes by outcome and HTTP status.
    pub handshakes: Family<Labels, Counter>,
    /// Messages by direction (`in`: client to backend, `out`).
    pub messages: Family<Labels, Counter>,
    /// Payload bytes by direction.
    pub bytes: Family<Labels, Counter>,
    /// Closes by who closed (`client`, `backend`, `relay`) and code.
    pub closes: Family<Labels, Counter>,
    /// Sessions moved to another backend after a backend loss.
    pub reoriginations: Counter,
    /// Keepalive ping round-trip time by leg.
    pub ping_rtt: Family<Labels, Histogram>,
    /// 1 if the backend's last dial succeeded (or none was tried), else 0.
    pub backend_healthy: Family<Labels, Gauge>,
    /// Mux links open by backend.
    pub mux_links: Family<Labels, Gauge>,
    /// Mux streams open by backend.
    pub mux_streams: Family<Labels, Gauge>,
    /// Tap records a slow tap lost.
    pub tap_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wsrelay");
        let connections = Family::<Labels, Gauge>::default();
        registry.register(
            "connections_active",
            "Established sessions by route and backend",
            connections.clone(),
        );
        let handshakes = Family::<Labels, Counter>::default();
        registry.register(
            "handshakes",
            "Client handshakes by outcome and HTTP status",
            handshakes.clone(),
        );
        let messages = Family::<Labels, Counter>::default();
        registry.register(
            "messages",
            "Messages relayed by direction (in: client to backend)",
            messages.clone(),
        );
        let bytes = Family::<Labels, Counter>::default();
        registry.register("bytes", "Payload bytes relayed by direction", bytes.clone());
        let closes = Family::<Labels, Counter>::default();
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
        let backend_healthy = Family::<Labels, Gauge>::default();
        registry.register(
            "backend_healthy",
            "1 if the backend's last dial succeeded",
            backend_healthy.clone(),
        );
        let mux_links = Family::<Labels, Gauge>::default();
        registry.register("mux_links", "Mux links open by backend", mux_links.clone());
        let mux_streams = Family::<Labels, Gauge>::default();
        registry.register(
            "mux_streams",
            "Mux streams open by backend",
            mux_streams.clone(),
        );
        let tap_dropped = Counter::default();
        registry.register(
            "tap_dropped_records",
            "Tap records lost because a tap could not keep up",
            tap_dropped.clone(),
        );
        Metrics {
            registry,
            connections,
            handshakes,
            messages,
            bytes,
            closes,
            reoriginations,
            ping_rtt,
            backend_healthy,
            mux_links,
            mux_streams,
            tap_dropped,
        }
    }
}

fn rtt_histogram() -> Histogram {
    // 50 µs to about 3 s.
    Histogram::new(exponential_buckets(0.000_05, 3.0, 11))
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Counts a client handshake's outcome.
    pub fn handshake(&self, outcome: &'static str, status: u16) {
        self.handshakes
            .get_or_create(&vec![
                ("outcome", outcome.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// Counts a close.
    pub fn close(&self, by: &'static str, code: Option<u16>) {
        let code = code.map_or_else(|| "none".to_owned(), |c| c.to_string());
        self.closes
            .get_or_create(&vec![("by", by.to_owned()), ("code", code)])
            .inc();
    }

    /// Handles to the traffic counters, so sessions add to them without label lookups.
    pub fn traffic_counters(&self) -> TrafficCounters {
        let direction = |d: &str| vec![("direction", d.to_owned())];
        TrafficCounters {
            messages_in: self.messages.get_or_create_owned(&direction("in")),
            messages_out: self.messages.get_or_create_owned(&direction("out")),
            bytes_in: self.bytes.get_or_create_owned(&direction("in")),
            bytes_out: self.bytes.get_or_create_owned(&direction("out")),
        }
    }

    /// The backend's health gauge.
    pub fn set_backend_healthy(&self, backend: &str, healthy: bool) {
        self.backend_healthy
            .get_or_create(&vec![("backend", backend.to_owned())])
            .set(i64::from(healthy));
    }
}

/// The shared traffic counters (atomics) one session publishes to.
#[derive(Clone)]
pub struct TrafficCounters {
    messages_in: Counter,
    messages_out: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl TrafficCounters {
    /// Adds what crossed since `published` and remembers `now` as published.
    pub fn publish(&self, published: &mut Traffic, now: Traffic) {
        self.messages_in
            .inc_by(now.client_messages - published.client_messages);
        self.bytes_in
            .inc_by(now.client_bytes - published.client_bytes);
        self.messages_out
            .inc_by(now.backend_messages - published.backend_messages);
        self.bytes_out
            .inc_by(now.backend_bytes - published.backend_bytes);
        *published = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        metrics.handshake("upgraded", 101);
        metrics.close("client", Some(1000));
        let counters = metrics.traffic_counters();
        let mut published = Traffic::default();
        let now = Traffic {
            client_messages: 3,
            client_bytes: 30,
            backend_messages: 2,
            backend_bytes: 20,
        };
        counters.publish(&mut published, now);
        counters.publish(&mut published, now);
        let text = metrics.render();
        assert!(
            text.contains("wsrelay_handshakes_total{outcome=\"upgraded\",status=\"101\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wsrelay_messages_total{direction=\"in\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("wsrelay_bytes_total{direction=\"out\"} 20"),
            "{text}"
        );
        assert!(
            text.contains("wsrelay_closes_total{by=\"client\",code=\"1000\"} 1"),
            "{text}"
        );
    }
}
