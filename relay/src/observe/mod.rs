//! Everything that watches sessions without being part of them: the registry of open sessions
//! (admin API, derived metrics), Prometheus metrics, and live taps. A session reaches them only
//! through its [`SessionObserver`], which is the pump's hooks: observing wraps the data path,
//! it never reaches into it, and a slow observer loses records rather than slowing traffic.

mod metrics;
mod registry;
mod tap;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use tungstenite::Message;

pub(crate) use metrics::{CompressionCounters, Figures, Metrics};
pub(crate) use registry::{Registered, SessionEntry, SessionRegistry, StopListener, StopRequest};
pub(crate) use tap::{TapFilter, TapHub, TapSubscription};

use crate::inspect::InspectorChain;
use crate::pump::{Direction, PumpHooks, Side, Traffic, Verdict};

/// The span a connection's log lines are written in: `conn{id=N}`. Made and entered for each
/// line (`conn_span(id).in_scope(|| info!(..))`, so every formatter sees it as the current
/// span) rather than kept for the session's life: a live span holds about 0.4 KiB in the log
/// registry for every idle client, and entering it costs each wakeup two atomic updates, while
/// a session writes one line at the default level.
pub(crate) fn conn_span(conn_id: u64) -> tracing::Span {
    tracing::info_span!("conn", id = conn_id)
}

/// The observers every session reports to, shared by the whole relay.
#[derive(Default)]
pub(crate) struct Observatory {
    /// Event metrics.
    pub metrics: Metrics,
    /// Open sessions.
    pub sessions: Arc<SessionRegistry>,
    /// Where taps listen.
    pub tap: Arc<TapHub>,
}

/// One session as its observers see it: its registry entry (kept while the observer lives),
/// its inspectors, taps and keepalive histograms. It is the session pump's [`PumpHooks`].
pub(crate) struct SessionObserver {
    entry: Arc<SessionEntry>,
    _registered: Registered,
    /// The backend serving the session, as taps and inspectors name it.
    backend: Arc<str>,
    /// Boxed: most routes have none, and every session would hold a chain's room.
    inspectors: Option<Box<InspectorChain>>,
    tap: Arc<TapHub>,
    /// The route is `sensitive`: taps get no payload preview.
    redact: bool,
    client_rtt: Histogram,
    backend_rtt: Histogram,
}

impl SessionObserver {
    /// Registers `entry` (until the observer drops) and watches its session.
    pub fn new(
        observatory: &Observatory,
        entry: SessionEntry,
        inspectors: Option<InspectorChain>,
        redact: bool,
    ) -> SessionObserver {
        let entry = Arc::new(entry);
        SessionObserver {
            _registered: observatory.sessions.register(entry.clone()),
            backend: entry.backend(),
            entry,
            inspectors: inspectors.map(Box::new),
            tap: observatory.tap.clone(),
            redact,
            client_rtt: observatory.metrics.ping_rtt(Side::Client),
            backend_rtt: observatory.metrics.ping_rtt(Side::Backend),
        }
    }

    /// The session's registry entry (e.g. to wait for an admin's close request).
    pub fn entry(&self) -> Arc<SessionEntry> {
        self.entry.clone()
    }

    /// The session's registry entry, to read.
    pub fn session(&self) -> &SessionEntry {
        &self.entry
    }

    /// The session moved to `backend`.
    pub fn set_backend(&mut self, backend: Arc<str>) {
        self.entry.set_backend(backend.clone());
        self.backend = backend;
    }

    #[inline]
    fn publish(&self, direction: Direction, message: &Message) {
        if self.tap.active() {
            let entry = &self.entry;
            self.tap.publish(
                entry.id,
                &entry.route,
                &self.backend,
                direction,
                message,
                self.redact,
            );
        }
    }
}

impl PumpHooks for SessionObserver {
    #[inline]
    fn on_message(&mut self, direction: Direction, message: &mut Message) -> Verdict {
        let verdict = match &mut self.inspectors {
            Some(chain) => chain.on_message(&self.backend, direction, message),
            None => Verdict::Forward,
        };
        // Taps show what crossed: a message as the inspectors passed it on, none they held back.
        if verdict == Verdict::Forward {
            self.publish(direction, message);
        }
        verdict
    }

    fn on_control(&mut self, direction: Direction, message: &Message) {
        // Pings and pongs end at the relay (it answers pings and sends its own); only a
        // Close crosses to the other leg.
        if matches!(message, Message::Close(_)) {
            self.publish(direction, message);
        }
        if let Some(chain) = &mut self.inspectors {
            chain.on_control(&self.backend, direction, message);
        }
    }

    fn on_ping_rtt(&mut self, side: Side, rtt: Duration) {
        match side {
            Side::Client => &self.client_rtt,
            Side::Backend => &self.backend_rtt,
        }
        .observe(rtt.as_secs_f64());
    }

    #[inline]
    fn on_traffic(&mut self, traffic: &Traffic) {
        self.entry.store_traffic(traffic);
    }
}
