//! Watching a run while it happens: a [`Probe`] reads the processes under test, the load
//! generator itself and the machine at a moment; a [`Monitor`] samples counters and memory every
//! quarter second into a throughput-over-time curve and keeps the progress bar moving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::watch;

use crate::procstat::{self, GroupSample, ProcessGroup};
use crate::stats::{Counters, ErrorLog, TimelinePoint};
use crate::units::thousands;

/// The processes a run measures besides itself.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    /// The proxy under test (relay, nginx master and workers); empty for direct runs.
    pub proxy: ProcessGroup,
    /// The backends behind it, if the harness knows them.
    pub backend: ProcessGroup,
}

/// Everything measured at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// When.
    pub at: Instant,
    /// The proxy's processes, if any are watched.
    pub proxy: Option<GroupSample>,
    /// The backends' processes, if any are watched.
    pub backend: Option<GroupSample>,
    /// CPU time of this process so far, in seconds.
    pub loadgen_cpu_s: f64,
    /// Machine CPU counters (busy, total) in ticks.
    pub machine: Option<(u64, u64)>,
    /// Messages received so far.
    pub received: u64,
}

/// Takes [`Reading`]s.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    /// What to read besides this process.
    pub watched: Watched,
}

impl Probe {
    /// Reads everything now.
    pub fn read(&self, counters: &Counters) -> Reading {
        Reading {
            at: Instant::now(),
            proxy: self.watched.proxy.sample_if_any(),
            backend: self.watched.backend.sample_if_any(),
            loadgen_cpu_s: procstat::self_cpu_time().as_secs_f64(),
            machine: procstat::machine_cpu_ticks(),
            received: Counters::get(&counters.received),
        }
    }
}

/// What happened between two readings.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WindowDelta {
    /// Wall-clock seconds between them.
    pub seconds: f64,
    /// Proxy CPU seconds used (all its processes).
    pub proxy_cpu_s: Option<f64>,
    /// Backend CPU seconds used.
    pub backend_cpu_s: Option<f64>,
    /// Load-generator CPU seconds used (this process, all threads).
    pub loadgen_cpu_s: f64,
    /// Fraction of all the machine's cores busy (0..=1).
    pub machine_busy: f64,
    /// Messages received.
    pub received: u64,
}

impl WindowDelta {
    /// The difference `after - before`.
    pub fn between(before: &Reading, after: &Reading) -> WindowDelta {
        let cpu = |a: Option<GroupSample>, b: Option<GroupSample>| match (a, b) {
            (Some(a), Some(b)) => Some((b.cpu_s - a.cpu_s).max(0.0)),
            _ => None,
        };
        WindowDelta {
            seconds: after.at.duration_since(before.at).as_secs_f64(),
            proxy_cpu_s: cpu(before.proxy, after.proxy),
            backend_cpu_s: cpu(before.backend, after.backend),
            loadgen_cpu_s: (after.loadgen_cpu_s - before.loadgen_cpu_s).max(0.0),
            machine_busy: match (before.machine, after.machine) {
                (Some(a), Some(b)) => procstat::machine_busy_fraction(a, b),
                _ => 0.0,
            },
            received: after.received.saturating_sub(before.received),
        }
    }

    /// Adds another window (for runs merged over rounds).
    pub fn add(&mut self, other: &WindowDelta) {
        let sum = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        let weight = self.seconds + other.seconds;
        if weight > 0.0 {
            self.machine_busy =
                (self.machine_busy * self.seconds + other.machine_busy * other.seconds) / weight;
        }
        self.seconds += other.seconds;
        self.proxy_cpu_s = sum(self.proxy_cpu_s, other.proxy_cpu_s);
        self.backend_cpu_s = sum(self.backend_cpu_s, other.backend_cpu_s);
        self.loadgen_cpu_s += other.loadgen_cpu_s;
        self.received += other.received;
    }
}

/// Which counter the throughput curve follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Messages received (echo, rate, fanout).
    Received,
    /// Connections established (hold, churn).
    Connected,
}

/// Samples a run every quarter second: the throughput curve, the watched processes' memory,
/// and the progress bar. Stop it with [`Monitor::finish`].
pub struct Monitor {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<MonitorOutcome>,
    bar: ProgressBar,
}

/// What a [`Monitor`] saw.
#[derive(Debug, Clone, Default)]
pub struct MonitorOutcome {
    /// Throughput (and memory) over time.
    pub timeline: Vec<TimelinePoint>,
    /// Largest proxy RSS seen, in KiB.
    pub peak_proxy_rss_kib: Option<u64>,
}

/// Sampling interval of a [`Monitor`].
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

impl Monitor {
    /// Starts sampling; `expected` sizes the progress bar, `label` prefixes it.
    pub fn start(
        label: &str,
        expected: Duration,
        rate: Rate,
        counters: Arc<Counters>,
        errors: ErrorLog,
        watched: Watched,
        show_progress: bool,
    ) -> Monitor {
        let bar = progress_bar(label, expected, show_progress);
        let (stop, mut stopped) = watch::channel(false);
        let task_bar = bar.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut outcome = MonitorOutcome::default();
            let mut last_count = 0u64;
            let mut last_at = start;
            let unit = match rate {
                Rate::Received => "msg/s",
                Rate::Connected => "conn/s",
            };
            let mut ticker = tokio::time::interval(SAMPLE_EVERY);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                let finished = tokio::select! {
                    _ = ticker.tick() => false,
                    _ = stopped.changed() => true,
                };
                let now = Instant::now();
                let count = match rate {
                    Rate::Received => Counters::get(&counters.received),
                    Rate::Connected => Counters::get(&counters.connected),
                };
                let dt = now.duration_since(last_at).as_secs_f64();
                let rss = watched.proxy.rss_kib();
                if let Some(r) = rss {
                    outcome.peak_proxy_rss_kib =
                        Some(outcome.peak_proxy_rss_kib.unwrap_or(0).max(r));
                }
                if dt > 0.05 {
                    let per_s = (count - last_count) as f64 / dt;
                    outcome.timeline.push(TimelinePoint {
                        t_s: now.duration_since(start).as_secs_f64(),
                        per_s,
                        rss_kib: rss,
                    });
                    let errors = errors.total();
                    task_bar.set_position(now.duration_since(start).as_millis() as u64);
                    task_bar.set_message(format!(
                        "{} {unit}, {} total, {} errors{}",
                        thousands(per_s as u64),
                        thousands(count),
                        thousands(errors),
                        rss.map(|r| format!(", proxy RSS {} MiB", r / 1024))
                            .unwrap_or_default()
                    ));
                    last_count = count;
                    last_at = now;
                }
                if finished {
                    return outcome;
                }
            }
        });
        Monitor { stop, task, bar }
    }

    /// Stops sampling and clears the progress bar.
    pub async fn finish(self) -> MonitorOutcome {
        let _ = self.stop.send(true);
        let outcome = self.task.await.unwrap_or_default();
        self.bar.finish_and_clear();
        outcome
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal or progress is off).
pub fn progress_bar(label: &str, expected: Duration, show: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(expected.as_millis().max(1) as u64),
        if show {
            ProgressDrawTarget::stderr_with_hz(4)
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("{prefix:>18} [{elapsed_precise}] {wide_bar} {msg}")
            .expect("valid template"),
    );
    bar.set_prefix(label.to_owned());
    bar
}
