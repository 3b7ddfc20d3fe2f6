//! The scenarios: what load each one puts on a target and what it measures. Each takes the
//! [`CommonOpts`] every scenario shares, its own options, and a [`RunTarget`], and returns a
//! [`Measurement`] that `report` turns into tables, JSON and charts and `compare` merges over
//! rounds.
//!
//! | scenario | load | main figure | latency |
//! |---|---|---|---|
//! | [`echo`] | closed loop, `--window` messages in flight per connection | messages/s | round trip |
//! | [`rate`] | open loop at `--rate` messages/s in total | messages/s | round trip from the *intended* send time |
//! | [`fanout`] | open loop, chat rooms of `--room-size` | deliveries/s | say -> each member's delivery |
//! | [`hold`] | idle connections with keepalive | connections/s (ramp) | WebSocket handshake |
//! | [`churn`] | connect, one message, close, repeat | connections/s | handshake |
//! | [`soak`] | churn and backend kills through a relay process it starts, for hours | pass/fail on invariants | — |
//! | [`scale`] | idle mux clients through relay processes sharing a port (`reuse_port`) | pass/fail: no drops, one backend per key | handshake |

pub mod churn;
mod driver;
pub mod echo;
pub mod fanout;
pub mod hold;
mod messages;
pub mod rate;
pub mod scale;
pub mod soak;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::conn::{Connector, Ws};
use crate::monitor::{Monitor, Probe, Rate, Reading, Watched, WindowDelta};
use crate::payload::Clock;
use crate::procstat::GroupSample;
use crate::stats::{Counters, ErrorKind, ErrorLog, LatencyRecorder, TimelinePoint};
use crate::units::{parse_duration, parse_size, ser_duration};

/// Options every scenario shares.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct CommonOpts {
    /// Connections to open (for churn: connect/close loops running in parallel).
    #[arg(long, short = 'c', default_value_t = 50)]
    pub connections: usize,
    /// Message size in bytes (`64`, `4KiB`); at least 28 (binary) or 56 (text).
    #[arg(long, default_value = "64", value_parser = parse_size)]
    pub size: usize,
    /// Send text messages (UTF-8 checked by every proxy) instead of binary.
    #[arg(long)]
    pub text: bool,
    /// How long to measure (for hold: how long to hold the connections open).
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
    /// Load before measuring starts; not counted in latency or throughput.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub warmup: Duration,
    /// After the measured time, how long to wait for replies still in flight (those that
    /// never come are errors).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub drain_timeout: Duration,
    /// Limit for one TCP connect plus WebSocket handshake.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Handshakes in progress at once while connecting.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1, .2, ...); 0 picks one
    /// per 20,000 connections.
    #[arg(long, default_value_t = 0)]
    pub source_addrs: usize,
    /// Process whose CPU and RSS (with its children) to report, e.g. the relay's; repeatable.
    #[arg(long = "watch-pid", value_name = "PID")]
    pub watch_pids: Vec<u32>,
    /// Allow targets outside 127.0.0.0/8 and ::1 (never point a load test at a host you do
    /// not own).
    #[arg(long)]
    pub allow_remote: bool,
    /// Worker threads of the load generator's runtime (default: one per core).
    #[arg(long)]
    pub client_threads: Option<usize>,
    /// Write every figure and the run's configuration as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the headline figures and ratios as Markdown tables to this file.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Write a self-contained HTML report with SVG charts to this file.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// No progress bars (they are hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

impl CommonOpts {
    /// Small settings for tests and examples: 4 connections, 64-byte binary messages, 200 ms.
    pub fn tiny() -> CommonOpts {
        CommonOpts {
            connections: 4,
            size: 64,
            text: false,
            duration: Duration::from_millis(200),
            warmup: Duration::ZERO,
            drain_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            connect_concurrency: 64,
            source_addrs: 0,
            watch_pids: Vec::new(),
            allow_remote: false,
            client_threads: None,
            json: None,
            markdown: None,
            html: None,
            no_progress: true,
        }
    }

    /// Source addresses to use for `connections` connections.
    pub fn source_count(&self, connections: usize) -> usize {
        if self.source_addrs > 0 {
            self.source_addrs
        } else {
            connections.div_ceil(20_000).max(1)
        }
    }

    /// Checks values no parser can: message size against the header.
    pub fn validate(&self) -> Result<(), String> {
        let min = crate::payload::min_size(self.text);
        if self.size < min {
            return Err(format!(
                "--size {} is below the {min}-byte header of a {} test message",
                self.size,
                if self.text { "text" } else { "binary" }
            ));
        }
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        Ok(())
    }
}

/// Where a scenario sends its load and what it watches meanwhile.
#[derive(Debug, Clone)]
pub struct RunTarget {
    /// Name in reports: `direct`, `per-client`, `mux`, `nginx`, or the URL.
    pub label: String,
    /// Opens the connections.
    pub connector: Connector,
    /// Processes measured during the run.
    pub watched: Watched,
    /// Whether to draw progress bars.
    pub show_progress: bool,
}

impl RunTarget {
    /// A reader of the watched processes.
    pub(crate) fn probe(&self) -> Probe {
        Probe {
            watched: self.watched.clone(),
        }
    }

    /// The proxy's CPU, memory and open files now, if a proxy is watched.
    pub(crate) fn proxy_sample(&self) -> Option<GroupSample> {
        self.watched.proxy.sample_if_any()
    }

    /// Starts the progress bar and timeline of a run expected to last `expected`, showing
    /// `rate` from `counters`.
    pub(crate) fn monitor(
        &self,
        expected: Duration,
        rate: Rate,
        counters: &Arc<Counters>,
        errors: &ErrorLog,
    ) -> Monitor {
        Monitor::start(
            &self.label,
            expected,
            rate,
            counters.clone(),
            errors.clone(),
            self.watched.clone(),
            self.show_progress,
        )
    }
}

/// The phases of a measured run: the load starts, warms up, is measured, then the replies
/// still in flight are waited for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    /// The clock every timestamp of the run is taken on.
    pub clock: Clock,
    /// When the load starts.
    pub start: Instant,
    /// Start of the measured window (after the warmup).
    pub measure_from: Instant,
    /// End of the measured window: no new load after it.
    pub measure_until: Instant,
    /// Replies not in by then are lost.
    pub drain_until: Instant,
}

impl Schedule {
    /// Starts the clock; the load starts `delay` from now, is measured after `common.warmup`
    /// for `common.duration`, and its replies are awaited `common.drain_timeout` longer.
    pub(crate) fn new(common: &CommonOpts, delay: Duration) -> Schedule {
        let clock = Clock::start();
        let start = Instant::now() + delay;
        let measure_from = start + common.warmup;
        let measure_until = measure_from + common.duration;
        Schedule {
            clock,
            start,
            measure_from,
            measure_until,
            drain_until: measure_until + common.drain_timeout,
        }
    }

    /// The measured window on the clock, in nanoseconds.
    pub(crate) fn window_ns(&self) -> (u64, u64) {
        (
            self.clock.ns_of(self.measure_from.into_std()),
            self.clock.ns_of(self.measure_until.into_std()),
        )
    }

    /// Waits through the measured window, reading everything at its start and end and the
    /// proxy's memory "loaded" in its middle, when every connection is open and busy (at the
    /// end they close within microseconds of the last reply).
    pub(crate) async fn measure(&self, target: &RunTarget, counters: &Counters) -> Window {
        let probe = target.probe();
        tokio::time::sleep_until(self.measure_from).await;
        let start = probe.read(counters);
        let half = (self.measure_until - self.measure_from) / 2;
        tokio::time::sleep_until(self.measure_from + half).await;
        let loaded = target.proxy_sample();
        tokio::time::sleep_until(self.measure_until).await;
        Window {
            start,
            loaded,
            end: probe.read(counters),
        }
    }
}

/// What [`Schedule::measure`] read.
pub(crate) struct Window {
    /// Everything at the window's start.
    pub start: Reading,
    /// The proxy mid-window, if one is watched.
    pub loaded: Option<GroupSample>,
    /// Everything at the window's end.
    pub end: Reading,
}

impl Window {
    /// What changed over the window.
    pub(crate) fn delta(&self) -> WindowDelta {
        WindowDelta::between(&self.start, &self.end)
    }
}

/// Resident memory of the proxy around a run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MemoryFigures {
    /// Before the run's connections were opened, KiB.
    pub before_kib: u64,
    /// With every connection open, KiB.
    pub loaded_kib: u64,
    /// After they were closed (and a short settle time), KiB.
    pub after_kib: u64,
    /// Connections open at the loaded reading.
    pub connections: u64,
    /// Open file descriptors before.
    pub fds_before: u64,
    /// Open file descriptors with every connection open.
    pub fds_loaded: u64,
    /// Open file descriptors after.
    pub fds_after: u64,
}

impl MemoryFigures {
    /// The figures of the proxy's samples before a run, with `connections` open, and after
    /// it; `None` unless all three were taken (no proxy is watched).
    pub fn from_samples(
        before: Option<GroupSample>,
        loaded: Option<GroupSample>,
        after: Option<GroupSample>,
        connections: u64,
    ) -> Option<MemoryFigures> {
        let (b, l, a) = (before?, loaded?, after?);
        Some(MemoryFigures {
            before_kib: b.rss_kib,
            loaded_kib: l.rss_kib,
            after_kib: a.rss_kib,
            connections,
            fds_before: b.fds,
            fds_loaded: l.fds,
            fds_after: a.fds,
        })
    }

    /// `(loaded - before) / connections`, in KiB.
    pub fn rss_kib_per_conn(&self) -> Option<f64> {
        (self.connections > 0)
            .then(|| (self.loaded_kib as f64 - self.before_kib as f64) / self.connections as f64)
    }
}

/// What one scenario run against one target measured.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// The target's name.
    pub label: String,
    /// The URL(s) the clients used.
    pub url: String,
    /// Connections that were established.
    pub connections: u64,
    /// Messages handed to sockets over the whole run (warmup and drain included).
    pub sent: u64,
    /// Messages (deliveries, for fanout) received over the whole run.
    pub received: u64,
    /// Latency samples in the measured window: the contract's `messages`.
    pub messages: u64,
    /// The measured window: seconds, items counted, CPU of everyone.
    pub window: WindowDelta,
    /// The main latency (see [`Measurement::latency_kind`]).
    pub latency: Histogram<u64>,
    /// What the main latency is.
    pub latency_kind: String,
    /// Other latencies (`uncorrected`, `send_lag`, `handshake`, ...).
    pub extra_latency: BTreeMap<String, Histogram<u64>>,
    /// Errors by kind.
    pub errors: BTreeMap<String, ErrorKind>,
    /// Throughput and memory over time.
    pub timeline: Vec<TimelinePoint>,
    /// The proxy's memory around the run, if a proxy is watched.
    pub memory: Option<MemoryFigures>,
    /// Whether the proxy CPU per item is per message (false for hold, where items are
    /// connections and the CPU is not about them).
    pub cpu_per_item: bool,
    /// Scenario-specific figures for the JSON (sweep steps, keepalive counts, ...).
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl Measurement {
    /// Errors of all kinds.
    pub fn error_total(&self) -> u64 {
        self.errors.values().map(|e| e.count).sum()
    }

    /// Items (messages, deliveries or connections) per second over the measured window.
    pub fn throughput(&self) -> f64 {
        if self.window.seconds > 0.0 {
            self.window.received as f64 / self.window.seconds
        } else {
            0.0
        }
    }

    /// Proxy CPU seconds per million items, if a proxy is watched.
    pub fn proxy_cpu_per_million(&self) -> Option<f64> {
        let cpu = self.window.proxy_cpu_s?;
        (self.cpu_per_item && self.window.received > 0)
            .then(|| cpu * 1e6 / self.window.received as f64)
    }

    /// Merges another round of the same target into this one.
    pub fn merge(&mut self, other: &Measurement) {
        self.connections = self.connections.max(other.connections);
        self.sent += other.sent;
        self.received += other.received;
        self.messages += other.messages;
        self.window.add(&other.window);
        self.latency.add(&other.latency).expect("same bounds");
        for (name, h) in &other.extra_latency {
            match self.extra_latency.get_mut(name) {
                Some(mine) => mine.add(h).expect("same bounds"),
                None => {
                    self.extra_latency.insert(name.clone(), h.clone());
                }
            }
        }
        for (kind, e) in &other.errors {
            let mine = self.errors.entry(kind.clone()).or_default();
            if mine.count == 0 {
                mine.example = e.example.clone();
            }
            mine.count += e.count;
        }
        let offset = self.timeline.last().map_or(0.0, |p| p.t_s);
        self.timeline
            .extend(other.timeline.iter().map(|p| TimelinePoint {
                t_s: p.t_s + offset,
                ..*p
            }));
        // Memory: keep the first round's figures, taken from a fresh process.
        if self.memory.is_none() {
            self.memory = other.memory;
        }
    }
}

/// Opens `count` connections through `connector`, at most `concurrency` handshakes at a
/// time; failures are counted in `errors` and leave `None` in their slot.
pub async fn connect_all(
    connector: &Connector,
    count: usize,
    concurrency: usize,
    query: impl Fn(usize) -> Option<String>,
    errors: &ErrorLog,
    counters: &Arc<Counters>,
    handshake: &LatencyRecorder,
) -> Vec<Option<Ws>> {
    let mut slots: Vec<Option<Ws>> = (0..count).map(|_| None).collect();
    let attempts = Attempts {
        connector,
        concurrency,
        errors,
        counters,
        handshake,
    };
    attempts
        .run(
            0..count,
            query,
            |_| async {},
            |index, ws| slots[index] = Some(ws),
        )
        .await;
    slots
}

/// Connection attempts: how to make them and where their outcomes are counted.
pub(crate) struct Attempts<'a> {
    /// Opens the connections.
    pub connector: &'a Connector,
    /// Handshakes in progress at once.
    pub concurrency: usize,
    /// Where failures are recorded.
    pub errors: &'a ErrorLog,
    /// `connected` and `failed` are bumped here.
    pub counters: &'a Arc<Counters>,
    /// The handshake time of each connection that opened.
    pub handshake: &'a LatencyRecorder,
}

impl Attempts<'_> {
    /// Connects every index of `indices` (with `query(index)`), each attempt first awaiting
    /// `pace(n)` for its position `n` in `indices`; each connection that opens goes to
    /// `opened`, as it opens.
    pub(crate) async fn run<P: Future<Output = ()>>(
        &self,
        indices: Range<usize>,
        query: impl Fn(usize) -> Option<String>,
        pace: impl Fn(usize) -> P,
        mut opened: impl FnMut(usize, Ws),
    ) {
        let first = indices.start;
        let attempts = futures_util::stream::iter(indices)
            .map(|index| {
                let q = query(index);
                let paced = pace(index - first);
                async move {
                    paced.await;
                    let started = std::time::Instant::now();
                    let result = self.connector.connect(index, q.as_deref()).await;
                    (index, started.elapsed(), result)
                }
            })
            .buffer_unordered(self.concurrency.max(1));
        tokio::pin!(attempts);
        while let Some((index, took, result)) = attempts.next().await {
            match result {
                Ok(ws) => {
                    self.handshake.record(index, took);
                    Counters::bump(&self.counters.connected);
                    opened(index, ws);
                }
                Err(error) => {
                    Counters::bump(&self.counters.failed);
                    self.errors.record(&error.kind(), &error);
                }
            }
        }
    }
}
