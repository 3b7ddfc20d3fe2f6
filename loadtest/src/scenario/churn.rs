//! `churn`: `--connections` loops run side by side, each repeating connect -> send one
//! message -> read its echo -> close (closing handshake), until `--duration` ends. Reports
//! completed cycles per second, handshake and whole-cycle latency, and the watched process's
//! memory and open files before the run and after it (plus `--settle`): memory or file
//! descriptors that grow with the number of cycles are a leak.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{CommonOpts, Measurement, MemoryFigures, RunTarget, Schedule, driver};
use crate::monitor::{Rate, WindowDelta};
use crate::payload::{self, Header};
use crate::stats::{Counters, ErrorLog, LatencyRecorder};
use crate::units::{parse_duration, ser_duration};

/// Options of `churn`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct ChurnOpts {
    /// Pause after the last cycle before the "after" memory reading.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub settle: Duration,
    /// Stop each loop after this many cycles even if time is left (0: no count limit).
    #[arg(long, default_value_t = 0)]
    pub max_cycles: u64,
}

impl Default for ChurnOpts {
    fn default() -> Self {
        ChurnOpts {
            settle: Duration::from_secs(2),
            max_cycles: 0,
        }
    }
}

/// Runs `churn` against `target`.
pub async fn run(common: &CommonOpts, opts: &ChurnOpts, target: &RunTarget) -> Measurement {
    let counters = Arc::new(Counters::default());
    let errors = ErrorLog::default();
    let handshake = LatencyRecorder::default();
    let cycle = LatencyRecorder::default();
    let probe = target.probe();
    let before = target.proxy_sample();
    let Schedule {
        clock,
        measure_from,
        measure_until,
        ..
    } = Schedule::new(common, Duration::ZERO);
    let expected = common.warmup + common.duration;
    let monitor = target.monitor(expected, Rate::Received, &counters, &errors);
    let mut loops = JoinSet::new();
    for index in 0..common.connections {
        let connector = target.connector.clone();
        let counters = counters.clone();
        let errors = errors.clone();
        let handshake = handshake.clone();
        let cycle = cycle.clone();
        let (size, text, max_cycles) = (common.size, common.text, opts.max_cycles);
        loops.spawn(async move {
            let mut cycles = 0u64;
            let mut cycle_latency = cycle.local(index);
            while Instant::now() < measure_until && (max_cycles == 0 || cycles < max_cycles) {
                let began = std::time::Instant::now();
                let measured = Instant::now() >= measure_from;
                let mut ws = match connector.connect(index, None).await {
                    Ok(ws) => ws,
                    Err(error) => {
                        Counters::bump(&counters.failed);
                        errors.record(&error.kind(), &error);
                        // Don't spin on a target that refuses everything.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if measured {
                    handshake.record(index, began.elapsed());
                }
                Counters::bump(&counters.connected);
                let header = Header {
                    conn: index as u32,
                    seq: cycles,
                    intended_ns: clock.now_ns(),
                    sent_ns: clock.now_ns(),
                };
                let message = if text {
                    Message::text(payload::encode_text(header, size))
                } else {
                    Message::binary(payload::encode_binary(header, size))
                };
                cycles += 1;
                if let Err(error) = ws.send(message).await {
                    errors.record("send", error);
                    continue;
                }
                Counters::bump(&counters.sent);
                let reply = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Binary(_) | Message::Text(_))) => return Ok(()),
                            Some(Ok(Message::Close(frame))) => {
                                return Err(("closed-by-peer", format!("{frame:?}")));
                            }
                            Some(Ok(_)) => continue,
                            Some(Err(error)) => return Err(("receive", error.to_string())),
                            None => return Err(("eof", "closed without a close frame".into())),
                        }
                    }
                })
                .await;
                match reply {
                    Ok(Ok(())) => {
                        driver::close(ws, index, &errors).await;
                        Counters::bump(&counters.received);
                        if measured {
                            cycle_latency.record(began.elapsed());
                        }
                    }
                    Ok(Err((kind, detail))) => {
                        errors.record(kind, format!("loop {index}: {detail}"));
                    }
                    Err(_) => {
                        errors.record("unanswered", format!("loop {index}: no echo within 5s"))
                    }
                }
            }
            cycles
        });
    }
    tokio::time::sleep_until(measure_from).await;
    let reading_a = probe.read(&counters);
    tokio::time::sleep_until(measure_until).await;
    let reading_b = probe.read(&counters);
    let mut attempted = 0;
    while let Some(done) = loops.join_next().await {
        match done {
            Ok(cycles) => attempted += cycles,
            Err(error) => errors.record("task", error),
        }
    }
    tokio::time::sleep(opts.settle).await;
    let after = target.proxy_sample();
    let outcome = monitor.finish().await;
    let completed = Counters::get(&counters.received);
    let mut details = serde_json::Map::new();
    details.insert("cycles_attempted".into(), attempted.into());
    details.insert("cycles_completed".into(), completed.into());
    if let (Some(b), Some(a)) = (before, after) {
        details.insert("rss_before_kib".into(), b.rss_kib.into());
        details.insert("rss_after_kib".into(), a.rss_kib.into());
        details.insert("fds_before".into(), b.fds.into());
        details.insert("fds_after".into(), a.fds.into());
        if completed > 0 {
            let growth = (a.rss_kib as f64 - b.rss_kib as f64) * 1000.0 / completed as f64;
            details.insert("rss_growth_kib_per_1000_cycles".into(), growth.into());
        }
    }
    let mut extra_latency = BTreeMap::new();
    extra_latency.insert("handshake".to_owned(), handshake.snapshot());
    extra_latency.insert("cycle".to_owned(), cycle.snapshot());
    Measurement {
        label: target.label.clone(),
        url: target.connector.target(0).url.clone(),
        connections: common.connections as u64,
        sent: Counters::get(&counters.sent),
        received: completed,
        messages: handshake.snapshot().len(),
        window: WindowDelta::between(&reading_a, &reading_b),
        latency: handshake.snapshot(),
        latency_kind: "WebSocket handshake of each cycle (TCP connect + upgrade)".into(),
        extra_latency,
        errors: errors.snapshot(),
        timeline: outcome.timeline,
        memory: match (before, after) {
            (Some(b), Some(a)) => Some(MemoryFigures {
                before_kib: b.rss_kib,
                loaded_kib: outcome.peak_proxy_rss_kib.unwrap_or(a.rss_kib),
                after_kib: a.rss_kib,
                // Connections come and go: no per-connection figure (see `details`).
                connections: 0,
                fds_before: b.fds,
                fds_loaded: b.fds,
                fds_after: a.fds,
            }),
            _ => None,
        },
        cpu_per_item: true,
        details,
    }
}
