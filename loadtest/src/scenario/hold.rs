//! `hold`: open `--connections` idle connections, hold them for `--duration` with keepalive on,
//! close them. Reports the connect rate of the ramp, handshake latency, failures by kind,
//! connections dropped while held, client pings without a pong, and the watched process's
//! memory and file descriptors per connection.
//!
//! Phases: memory reading "before" -> ramp (at most `--connect-rate` per second, at most
//! `--connect-concurrency` handshakes at once) -> `--settle` -> reading "loaded" -> hold ->
//! close every connection (closing handshake) -> `--settle` -> reading "after".
//! `rss_kib_per_conn = (loaded - before) / connections held`.
//!
//! Big runs: one process may hold `--per-process` connections (the open-file limit is 20,000
//! here); beyond that the harness starts copies of itself as worker processes
//! (`wsrelay-loadtest hold-worker`, see [`crate::worker`]) that each hold a share and report
//! over a pipe. Connections are spread over loopback source addresses (one per 20,000 by
//! default), each good for ~28,000 ports per destination.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{Attempts, CommonOpts, Measurement, MemoryFigures, RunTarget, driver};
use crate::conn::{Connector, Ws};
use crate::monitor::{Rate, WindowDelta};
use crate::stats::{self, Counters, ErrorKind, ErrorLog, LatencyRecorder};
use crate::units::{parse_duration, ser_duration};
use crate::worker::{WorkerFleet, WorkerLauncher};

/// Options of `hold`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct HoldOpts {
    /// Client-side keepalive: each connection pings this often ("0s": never). A ping with no
    /// pong by the next one is a `pong-timeout` error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub ping_interval: Duration,
    /// New connections per second during the ramp, in total (0: as fast as
    /// `--connect-concurrency` allows).
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Connections one process holds; more start worker processes.
    #[arg(long, default_value_t = 15_000)]
    pub per_process: usize,
    /// Pause after the ramp and after closing, before reading memory.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub settle: Duration,
    /// Each connection's URL carries `key=INDEX mod N` (for a route with `hash_key =
    /// "query:key"`: N keys, each shared by connections that may land on different relays); 0:
    /// no key.
    #[arg(long, default_value_t = 0)]
    pub key_space: usize,
}

impl Default for HoldOpts {
    fn default() -> Self {
        HoldOpts {
            ping_interval: Duration::from_secs(10),
            connect_rate: 0.0,
            per_process: 15_000,
            settle: Duration::from_secs(1),
            key_space: 0,
        }
    }
}

/// What one process's share of a hold did; workers send it to the parent as JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HoldSummary {
    /// Connections established.
    pub connected: u64,
    /// Connection attempts that failed.
    pub failed: u64,
    /// Seconds the ramp took.
    pub ramp_s: f64,
    /// Connections that ended while they should have been held.
    pub dropped: u64,
    /// Client pings sent.
    pub pings: u64,
    /// Pongs received.
    pub pongs: u64,
    /// Errors by kind.
    pub errors: BTreeMap<String, ErrorKind>,
    /// Handshake latency histogram as (µs, count) pairs.
    pub handshake: Vec<(u64, u64)>,
}

impl HoldSummary {
    /// Adds another share.
    pub fn merge(&mut self, other: &HoldSummary) {
        self.connected += other.connected;
        self.failed += other.failed;
        self.ramp_s = self.ramp_s.max(other.ramp_s);
        self.dropped += other.dropped;
        self.pings += other.pings;
        self.pongs += other.pongs;
        for (kind, e) in &other.errors {
            let mine = self.errors.entry(kind.clone()).or_default();
            if mine.count == 0 {
                mine.example = e.example.clone();
            }
            mine.count += e.count;
        }
        self.handshake.extend_from_slice(&other.handshake);
    }
}

/// Which connections a process holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Share {
    /// How many.
    pub connections: usize,
    /// Global index of the first (picks source addresses and targets).
    pub first_index: usize,
    /// New connections per second for this share (0: unlimited).
    pub connect_rate: f64,
    /// Keys the connections' URLs carry (see [`key_query`]); 0: none.
    #[serde(default)]
    pub key_space: usize,
}

/// The query parameter that carries a connection's key.
pub const KEY_PARAM: &str = "key";

/// The query of connection `index` when `key_space` keys are spread over the connections:
/// `key=INDEX mod KEY_SPACE`, so consecutive connections have different keys and every key
/// has connections all over the run (and its worker processes and source addresses).
pub fn key_query(index: usize, key_space: usize) -> Option<String> {
    (key_space > 0).then(|| format!("{KEY_PARAM}={}", index % key_space))
}

/// Counters of held connections.
#[derive(Default)]
struct Keepalive {
    pings: AtomicU64,
    pongs: AtomicU64,
    dropped: AtomicU64,
}

/// A share of connections being held by this process.
pub struct HeldSet {
    counters: Arc<Counters>,
    errors: ErrorLog,
    handshake: LatencyRecorder,
    keepalive: Arc<Keepalive>,
    close: watch::Sender<bool>,
    tasks: JoinSet<()>,
    ramp_s: f64,
}

impl HeldSet {
    /// Opens the share's connections; each is held (answering pings, sending its own) from the
    /// moment it is open. Returns when every attempt has finished.
    pub async fn ramp(
        connector: &Connector,
        share: Share,
        concurrency: usize,
        ping_interval: Duration,
        counters: Arc<Counters>,
    ) -> HeldSet {
        let errors = ErrorLog::default();
        let handshake = LatencyRecorder::default();
        let keepalive = Arc::new(Keepalive::default());
        let (close, closing) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let started = Instant::now();
        let pace = |n: usize| async move {
            if share.connect_rate > 0.0 {
                let at = started + Duration::from_secs_f64(n as f64 / share.connect_rate);
                tokio::time::sleep_until(at).await;
            }
        };
        let attempts = Attempts {
            connector,
            concurrency,
            errors: &errors,
            counters: &counters,
            handshake: &handshake,
        };
        let indices = share.first_index..share.first_index + share.connections;
        attempts
            .run(
                indices,
                |index| key_query(index, share.key_space),
                pace,
                |index, ws| {
                    tasks.spawn(hold_one(
                        ws,
                        index,
                        ping_interval,
                        closing.clone(),
                        keepalive.clone(),
                        errors.clone(),
                        counters.clone(),
                    ));
                },
            )
            .await;
        HeldSet {
            counters,
            errors,
            handshake,
            keepalive,
            close,
            tasks,
            ramp_s: started.elapsed().as_secs_f64(),
        }
    }

    /// A summary of the share so far (before closing: for the "ramped" report).
    pub fn summary(&self) -> HoldSummary {
        HoldSummary {
            connected: Counters::get(&self.counters.connected),
            failed: Counters::get(&self.counters.failed),
            ramp_s: self.ramp_s,
            dropped: self.keepalive.dropped.load(Ordering::Relaxed),
            pings: self.keepalive.pings.load(Ordering::Relaxed),
            pongs: self.keepalive.pongs.load(Ordering::Relaxed),
            errors: self.errors.snapshot(),
            handshake: stats::histogram_to_pairs(&self.handshake.snapshot()),
        }
    }

    /// Closes every connection (closing handshake) and returns the share's summary.
    pub async fn close(mut self) -> HoldSummary {
        let _ = self.close.send(true);
        while self.tasks.join_next().await.is_some() {}
        self.summary()
    }
}

/// Holds one connection until `closing`: reads (so the peer's pings are answered), pings on
/// its own every `ping_interval`, then closes.
async fn hold_one(
    ws: Ws,
    index: usize,
    ping_interval: Duration,
    mut closing: watch::Receiver<bool>,
    keepalive: Arc<Keepalive>,
    errors: ErrorLog,
    counters: Arc<Counters>,
) {
    let mut ws = ws;
    let pinging = !ping_interval.is_zero();
    // Spread the first pings over one interval so they don't all go at once.
    let offset = if pinging {
        ping_interval.mul_f64((index % 997) as f64 / 997.0)
    } else {
        Duration::ZERO
    };
    let mut next_ping = Instant::now() + ping_interval + offset;
    let mut awaiting_pong = false;
    let mut dropped = None;
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Pong(_))) => {
                    awaiting_pong = false;
                    keepalive.pongs.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(Message::Close(frame))) => {
                    dropped = Some(("closed-by-peer", format!("connection {index}: {frame:?}")));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    dropped = Some(("receive", format!("connection {index}: {error}")));
                    break;
                }
                None => {
                    dropped = Some(("eof", format!("connection {index}: closed without a close frame")));
                    break;
                }
            },
            _ = tokio::time::sleep_until(next_ping), if pinging => {
                if awaiting_pong {
                    errors.record("pong-timeout", format!(
                        "connection {index}: no pong within {ping_interval:?}"));
                }
                if let Err(error) = ws.send(Message::Ping(Default::default())).await {
                    dropped = Some(("send", format!("connection {index}: {error}")));
                    break;
                }
                awaiting_pong = true;
                keepalive.pings.fetch_add(1, Ordering::Relaxed);
                next_ping += ping_interval;
            },
            _ = closing.changed() => break,
        }
    }
    match dropped {
        Some((kind, detail)) => {
            keepalive.dropped.fetch_add(1, Ordering::Relaxed);
            Counters::bump(&counters.failed);
            errors.record(kind, detail);
        }
        None => driver::close(ws, index, &errors).await,
    }
}

/// Moments of a hold at which its caller may read what it watches beside the proxy group
/// (the scale run reads each relay process on its own). Each method does nothing by default.
pub trait HoldObserver {
    /// Every connection has been open `--settle`: the "loaded" memory reading, and the start
    /// of the hold window.
    fn holding(&mut self) {}
    /// The end of the hold window; the connections are still open, and all close right after.
    fn held(&mut self) {}
}

/// The observer that reads nothing.
impl HoldObserver for () {}

/// Runs `hold` against `target`; beyond `--per-process` connections it needs `launcher` to
/// start worker processes.
pub async fn run(
    common: &CommonOpts,
    opts: &HoldOpts,
    target: &RunTarget,
    launcher: Option<&WorkerLauncher>,
) -> anyhow::Result<Measurement> {
    run_observed(common, opts, target, launcher, &mut ()).await
}

/// [`run`], telling `observer` when the hold window starts and ends.
pub async fn run_observed(
    common: &CommonOpts,
    opts: &HoldOpts,
    target: &RunTarget,
    launcher: Option<&WorkerLauncher>,
    observer: &mut impl HoldObserver,
) -> anyhow::Result<Measurement> {
    let counters = Arc::new(Counters::default());
    let probe = target.probe();
    let before = target.proxy_sample();
    let workers = common.connections.div_ceil(opts.per_process.max(1));
    let expected = opts.settle * 2 + common.duration + Duration::from_secs(5);
    let monitor = target.monitor(expected, Rate::Connected, &counters, &ErrorLog::default());

    let reading_0 = probe.read(&counters);
    enum Fleet {
        Local(HeldSet),
        Workers(WorkerFleet),
    }
    let fleet = if workers > 1 {
        let launcher = launcher.ok_or_else(|| {
            anyhow::anyhow!(
                "{} connections need {workers} processes (--per-process {}), and this run \
                 can't start worker processes",
                common.connections,
                opts.per_process
            )
        })?;
        Fleet::Workers(
            WorkerFleet::ramp(launcher, common, opts, target, workers, counters.clone()).await?,
        )
    } else {
        let share = Share {
            connections: common.connections,
            first_index: 0,
            connect_rate: opts.connect_rate,
            key_space: opts.key_space,
        };
        Fleet::Local(
            HeldSet::ramp(
                &target.connector,
                share,
                common.connect_concurrency,
                opts.ping_interval,
                counters.clone(),
            )
            .await,
        )
    };
    let reading_ramped = probe.read(&counters);
    tokio::time::sleep(opts.settle).await;
    let loaded = target.proxy_sample();
    let hold_start = probe.read(&counters);
    observer.holding();
    tokio::time::sleep(common.duration).await;
    let hold_end = probe.read(&counters);
    observer.held();
    let summary = match fleet {
        Fleet::Local(set) => set.close().await,
        Fleet::Workers(fleet) => fleet.close().await?,
    };
    tokio::time::sleep(opts.settle).await;
    let after = target.proxy_sample();
    let outcome = monitor.finish().await;

    let mut window = WindowDelta::between(&reading_0, &reading_ramped);
    window.received = summary.connected;
    let held = summary.connected.saturating_sub(summary.dropped);
    let hold_window = WindowDelta::between(&hold_start, &hold_end);
    let mut handshake = stats::new_histogram();
    stats::add_pairs(&mut handshake, &summary.handshake);
    let mut details = serde_json::Map::new();
    details.insert("connect_rate_per_s".into(), window_rate(&summary).into());
    details.insert("ramp_s".into(), summary.ramp_s.into());
    details.insert("processes".into(), workers.max(1).into());
    details.insert("failed_connects".into(), summary.failed.into());
    details.insert("dropped_while_held".into(), summary.dropped.into());
    details.insert("pings_sent".into(), summary.pings.into());
    details.insert("pongs_received".into(), summary.pongs.into());
    details.insert(
        "hold_window".into(),
        serde_json::to_value(hold_window).expect("serializes"),
    );
    if let Some(cpu) = hold_window.proxy_cpu_s {
        details.insert(
            "proxy_cpu_percent_while_holding".into(),
            (100.0 * cpu / hold_window.seconds.max(1e-9)).into(),
        );
    }
    Ok(Measurement {
        label: target.label.clone(),
        url: target.connector.target(0).url.clone(),
        connections: summary.connected,
        sent: summary.pings,
        received: summary.pongs,
        messages: summary.connected,
        window,
        latency: handshake.clone(),
        latency_kind: "WebSocket handshake (TCP connect + upgrade)".into(),
        extra_latency: BTreeMap::from([("handshake".to_owned(), handshake)]),
        errors: summary.errors.clone(),
        timeline: outcome.timeline,
        memory: MemoryFigures::from_samples(before, loaded, after, held),
        cpu_per_item: false,
        details,
    })
}

fn window_rate(summary: &HoldSummary) -> f64 {
    if summary.ramp_s > 0.0 {
        summary.connected as f64 / summary.ramp_s
    } else {
        0.0
    }
}
