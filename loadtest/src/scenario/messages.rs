//! The life of an `echo` or `rate` run: connect everyone, start the clock, run every
//! connection's [`driver`](super::driver) loop, read the watched processes at the start and end
//! of the measured window, then close and collect.
//!
//! ```text
//! connect ──► warmup ──► measured window ──► drain (replies in flight) ──► close
//!             │           ▲ reading A        ▲ reading B (memory "loaded")
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::driver::{self, DriverCtx, Trigger};
use super::{CommonOpts, Measurement, MemoryFigures, RunTarget, Schedule, connect_all};
use crate::monitor::Rate;
use crate::pacer::Pacer;
use crate::stats::{Counters, ErrorLog, LatencyRecorder};

/// How messages are sent.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Load {
    /// Closed loop with this many messages in flight per connection.
    Closed { window: usize },
    /// Open loop at this many messages per second in total.
    Open { rate: f64 },
}

/// Time from "everyone is connected" to the first message, so every task is ready.
const START_DELAY: Duration = Duration::from_millis(20);

/// Runs `load` against `target` with the common options.
pub(crate) async fn run(common: &CommonOpts, target: &RunTarget, load: Load) -> Measurement {
    let counters = Arc::new(Counters::default());
    let errors = ErrorLog::default();
    let handshake = LatencyRecorder::default();
    let latency = LatencyRecorder::default();
    let open = matches!(load, Load::Open { .. });
    let uncorrected = open.then(LatencyRecorder::default);
    let send_lag = open.then(LatencyRecorder::default);
    let before = target.proxy_sample();

    let slots = connect_all(
        &target.connector,
        common.connections,
        common.connect_concurrency,
        |_| None,
        &errors,
        &counters,
        &handshake,
    )
    .await;
    let connected = slots.iter().filter(|s| s.is_some()).count();

    let schedule = Schedule::new(common, START_DELAY);
    let Schedule {
        clock,
        start,
        measure_until,
        ..
    } = schedule;
    let (measure_from_ns, measure_until_ns) = schedule.window_ns();
    let expected = common.warmup + common.duration;
    let monitor = target.monitor(expected, Rate::Received, &counters, &errors);

    let mut tick_senders = Vec::new();
    let mut tasks = JoinSet::new();
    for (index, slot) in slots.into_iter().enumerate() {
        let Some(ws) = slot else { continue };
        let trigger = match load {
            Load::Closed { window } => Trigger::Closed {
                window: window.max(1),
                send_until: measure_until,
            },
            Load::Open { .. } => {
                let (tx, rx) = mpsc::unbounded_channel();
                tick_senders.push(tx);
                Trigger::Open { ticks: rx }
            }
        };
        let ctx = DriverCtx {
            index,
            clock,
            size: common.size,
            text: common.text,
            measure_from_ns,
            measure_until_ns,
            drain_until: schedule.drain_until,
            counters: counters.clone(),
            errors: errors.clone(),
            latency: latency.clone(),
            uncorrected: uncorrected.clone(),
            send_lag: send_lag.clone(),
        };
        tasks.spawn(async move {
            tokio::time::sleep_until(start).await;
            driver::drive(ws, trigger, ctx).await
        });
    }
    let pacer = match load {
        Load::Open { rate } => Some(Pacer::start(
            clock,
            rate,
            clock.ns_of(start.into_std()),
            measure_until_ns,
            tick_senders,
        )),
        Load::Closed { .. } => None,
    };

    let window = schedule.measure(target, &counters).await;

    let mut sent = 0;
    let mut received = 0;
    let mut measured = 0;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(totals) => {
                sent += totals.sent;
                received += totals.received;
                measured += totals.measured;
            }
            Err(error) => errors.record("task", error),
        }
    }
    let ticks = pacer.map(Pacer::finish);
    let after = target.proxy_sample();
    let outcome = monitor.finish().await;

    let memory = MemoryFigures::from_samples(before, window.loaded, after, connected as u64);
    let mut extra_latency = BTreeMap::new();
    extra_latency.insert("handshake".to_owned(), handshake.snapshot());
    if let Some(u) = &uncorrected {
        extra_latency.insert("uncorrected".to_owned(), u.snapshot());
    }
    if let Some(l) = &send_lag {
        extra_latency.insert("send_lag".to_owned(), l.snapshot());
    }
    let mut details = serde_json::Map::new();
    match load {
        Load::Closed { window } => {
            details.insert("window".into(), window.into());
        }
        Load::Open { rate } => {
            details.insert("target_rate_msgs_per_s".into(), rate.into());
            details.insert("scheduled".into(), ticks.unwrap_or(0).into());
        }
    }
    Measurement {
        label: target.label.clone(),
        url: target.connector.target(0).url.clone(),
        connections: connected as u64,
        sent,
        received,
        messages: measured,
        window: window.delta(),
        latency: latency.snapshot(),
        latency_kind: if open {
            "round trip from the intended send time (corrected for coordinated omission)".into()
        } else {
            "round trip (closed loop)".into()
        },
        extra_latency,
        errors: errors.snapshot(),
        timeline: outcome.timeline,
        memory,
        cpu_per_item: true,
        details,
    }
}
