//! What a run tells people: the JSON document ([`RunReport`], whose `scenario`, `config` and
//! `targets[]` keys are the contract), the human table ([`table`]) and the HTML page with SVG
//! charts ([`html`]).
//!
//! Each [`TargetReport`] has the contract's keys (`name`, `messages`, `errors`,
//! `throughput_msgs_per_s`, `latency_us{p50,p90,p99,p999,max}`,
//! `proxy_cpu_s_per_million_msgs`, `rss_kib_per_conn`, `ratio_to_direct`, `ratio_to_nginx`) and
//! more (`ratio_to_best_peer`, and the report's `best_peer`). A skipped target (mux on a relay
//! without mux) keeps its place with `status` saying why and `null` figures. Ratios are
//! `target / direct`, `target / nginx` and `target / best peer` for every figure, so a
//! throughput ratio above 1 is better and a latency, CPU or memory ratio above 1 is worse. The
//! best peer is chosen figure by figure among the proxies a user would otherwise run (nginx,
//! HAProxy, Caddy): the highest throughput, the lowest latency, CPU and memory.

pub mod html;
mod svg;
pub mod table;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::monitor::WindowDelta;
use crate::procstat::MachineInfo;
use crate::scenario::{Measurement, MemoryFigures};
use crate::stats::{CurvePoint, ErrorKind, LatencySummary, TimelinePoint, percentile_curve};

/// The whole JSON document of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `echo`, `rate`, `fanout`, `hold` or `churn`.
    pub scenario: String,
    /// Every option of the run, as given or defaulted.
    pub config: serde_json::Value,
    /// Errors over all targets; a run with any says so first.
    pub errors_total: u64,
    /// `compare` or `single`.
    pub mode: String,
    /// The machine.
    pub machine: MachineInfo,
    /// Load-generator runtime threads.
    pub loadgen_threads: usize,
    /// Unix time the run started.
    pub started_unix_s: u64,
    /// Seconds the whole run took.
    pub wall_s: f64,
    /// Things the reader should know (saturation, skipped targets, deviations).
    pub notes: Vec<String>,
    /// Which peer proxy was best at each figure (null without a measured peer).
    pub best_peer: Option<BestPeer>,
    /// One entry per target, in the order they were configured.
    pub targets: Vec<TargetReport>,
}

/// One target's figures.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// `direct`, `per-client`, `mux`, `nginx`, or the URL of a single-target run.
    pub name: String,
    /// What the clients connected to.
    pub url: String,
    /// `ok`, `skipped: REASON` or `failed: REASON`.
    pub status: String,
    /// Latency samples in the measured windows (messages, deliveries, or handshakes).
    pub messages: u64,
    /// Errors of all kinds.
    pub errors: u64,
    /// Errors by kind, with the first message of each.
    pub error_kinds: BTreeMap<String, ErrorKind>,
    /// Connections established.
    pub connections: u64,
    /// Messages sent over the whole run.
    pub sent: u64,
    /// Messages (deliveries) received over the whole run.
    pub received: u64,
    /// Items per second over the measured windows.
    pub throughput_msgs_per_s: Option<f64>,
    /// What the throughput counts: `messages/s`, `deliveries/s` or `connections/s`.
    pub throughput_unit: String,
    /// Main latency percentiles, µs.
    pub latency_us: Option<LatencySummary>,
    /// What the main latency measures.
    pub latency_kind: String,
    /// Main latency percentile curve (for charts).
    pub latency_curve_us: Vec<CurvePoint>,
    /// Other latencies (handshake, uncorrected, send_lag, cycle).
    pub extra_latency_us: BTreeMap<String, LatencySummary>,
    /// Proxy CPU seconds (utime + stime, all its processes) per million items.
    pub proxy_cpu_s_per_million_msgs: Option<f64>,
    /// Backend CPU seconds per million items.
    pub backend_cpu_s_per_million_msgs: Option<f64>,
    /// Load-generator CPU seconds per million items.
    pub loadgen_cpu_s_per_million_msgs: Option<f64>,
    /// Load-generator CPU over the measured window, in percent of one core.
    pub loadgen_cpu_percent_of_one_core: f64,
    /// Proxy CPU over the measured window, in percent of one core.
    pub proxy_cpu_percent_of_one_core: Option<f64>,
    /// Machine CPU busy over the measured window, percent of all cores.
    pub machine_busy_percent: f64,
    /// Proxy memory per connection, KiB: (RSS loaded - RSS before) / connections.
    pub rss_kib_per_conn: Option<f64>,
    /// The memory readings behind `rss_kib_per_conn`.
    pub memory: Option<MemoryFigures>,
    /// Sums over the measured windows.
    pub window: WindowDelta,
    /// Throughput and p99 of each round (compare), to show the spread.
    pub rounds: Vec<RoundFigures>,
    /// Median of the rounds' throughputs: less sensitive than the merged figure to one round
    /// that a noisy neighbour slowed down.
    pub throughput_round_median: Option<f64>,
    /// Throughput over time (rounds concatenated).
    pub timeline: Vec<TimelinePoint>,
    /// Every figure divided by direct's (null when there is no direct target).
    pub ratio_to_direct: Option<Ratios>,
    /// Every figure divided by nginx's (null without nginx).
    pub ratio_to_nginx: Option<Ratios>,
    /// Every figure divided by the best peer proxy's figure (see [`BestPeer`]; null without a
    /// measured peer).
    pub ratio_to_best_peer: Option<Ratios>,
    /// Scenario-specific figures.
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// One round's headline figures.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RoundFigures {
    /// Items per second.
    pub throughput: f64,
    /// p99 latency, µs.
    pub p99_us: f64,
    /// Errors.
    pub errors: u64,
}

impl RoundFigures {
    /// The headline figures of one measurement.
    pub fn of(m: &Measurement) -> RoundFigures {
        RoundFigures {
            throughput: m.throughput(),
            p99_us: LatencySummary::of(&m.latency).p99,
            errors: m.error_total(),
        }
    }
}

/// `target / reference` for each figure (null where either is missing or zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Ratios {
    /// Throughput ratio (above 1: more than the reference).
    pub throughput: Option<f64>,
    /// p50 ratio (above 1: slower).
    pub p50: Option<f64>,
    /// p90 ratio.
    pub p90: Option<f64>,
    /// p99 ratio.
    pub p99: Option<f64>,
    /// p99.9 ratio.
    pub p999: Option<f64>,
    /// max ratio.
    pub max: Option<f64>,
    /// Proxy CPU per million ratio (direct has no proxy: null).
    pub proxy_cpu_s_per_million_msgs: Option<f64>,
    /// Memory per connection ratio.
    pub rss_kib_per_conn: Option<f64>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.abs() > f64::EPSILON && a.is_finite() && b.is_finite() => {
            Some((a / b * 1000.0).round() / 1000.0)
        }
        _ => None,
    }
}

impl TargetReport {
    /// The report of a measured target (merged over rounds), with per-round figures.
    pub fn measured(m: &Measurement, rounds: Vec<RoundFigures>, unit: &str) -> TargetReport {
        let summary = LatencySummary::of(&m.latency);
        let per_million = |cpu: Option<f64>| {
            (m.cpu_per_item && m.window.received > 0)
                .then(|| cpu.map(|c| c * 1e6 / m.window.received as f64))
                .flatten()
        };
        let errors = m.error_total();
        TargetReport {
            name: m.label.clone(),
            url: m.url.clone(),
            status: "ok".into(),
            messages: m.messages,
            errors,
            error_kinds: m.errors.clone(),
            connections: m.connections,
            sent: m.sent,
            received: m.received,
            throughput_msgs_per_s: Some(round2(m.throughput())),
            throughput_unit: unit.to_owned(),
            latency_us: (!m.latency.is_empty()).then_some(summary),
            latency_kind: m.latency_kind.clone(),
            latency_curve_us: percentile_curve(&m.latency),
            extra_latency_us: m
                .extra_latency
                .iter()
                .filter(|(_, h)| !h.is_empty())
                .map(|(k, h)| (k.clone(), LatencySummary::of(h)))
                .collect(),
            proxy_cpu_s_per_million_msgs: m.proxy_cpu_per_million().map(round3),
            backend_cpu_s_per_million_msgs: per_million(m.window.backend_cpu_s).map(round3),
            loadgen_cpu_s_per_million_msgs: per_million(Some(m.window.loadgen_cpu_s)).map(round3),
            loadgen_cpu_percent_of_one_core: round2(
                100.0 * m.window.loadgen_cpu_s / m.window.seconds.max(1e-9),
            ),
            proxy_cpu_percent_of_one_core: m
                .window
                .proxy_cpu_s
                .map(|c| round2(100.0 * c / m.window.seconds.max(1e-9))),
            machine_busy_percent: round2(100.0 * m.window.machine_busy),
            rss_kib_per_conn: m.memory.and_then(|mem| mem.rss_kib_per_conn()).map(round2),
            memory: m.memory,
            window: m.window,
            throughput_round_median: median(rounds.iter().map(|r| r.throughput).collect()),
            rounds,
            timeline: m.timeline.clone(),
            ratio_to_direct: None,
            ratio_to_nginx: None,
            ratio_to_best_peer: None,
            details: m.details.clone(),
        }
    }

    /// A target that was not run, and why.
    pub fn not_run(name: &str, status: String) -> TargetReport {
        TargetReport {
            name: name.to_owned(),
            url: String::new(),
            status,
            messages: 0,
            errors: 0,
            error_kinds: BTreeMap::new(),
            connections: 0,
            sent: 0,
            received: 0,
            throughput_msgs_per_s: None,
            throughput_unit: String::new(),
            latency_us: None,
            latency_kind: String::new(),
            latency_curve_us: Vec::new(),
            extra_latency_us: BTreeMap::new(),
            proxy_cpu_s_per_million_msgs: None,
            backend_cpu_s_per_million_msgs: None,
            loadgen_cpu_s_per_million_msgs: None,
            loadgen_cpu_percent_of_one_core: 0.0,
            proxy_cpu_percent_of_one_core: None,
            machine_busy_percent: 0.0,
            rss_kib_per_conn: None,
            memory: None,
            window: WindowDelta::default(),
            rounds: Vec::new(),
            throughput_round_median: None,
            timeline: Vec::new(),
            ratio_to_direct: None,
            ratio_to_nginx: None,
            ratio_to_best_peer: None,
            details: serde_json::Map::new(),
        }
    }

    /// True if the target was measured.
    pub fn is_ok(&self) -> bool {
        self.status == "ok"
    }

    fn ratios_to(&self, reference: &TargetReport) -> Ratios {
        let lat = |t: &TargetReport, f: fn(&LatencySummary) -> f64| t.latency_us.as_ref().map(f);
        Ratios {
            throughput: ratio(self.throughput_msgs_per_s, reference.throughput_msgs_per_s),
            p50: ratio(lat(self, |l| l.p50), lat(reference, |l| l.p50)),
            p90: ratio(lat(self, |l| l.p90), lat(reference, |l| l.p90)),
            p99: ratio(lat(self, |l| l.p99), lat(reference, |l| l.p99)),
            p999: ratio(lat(self, |l| l.p999), lat(reference, |l| l.p999)),
            max: ratio(lat(self, |l| l.max), lat(reference, |l| l.max)),
            proxy_cpu_s_per_million_msgs: ratio(
                self.proxy_cpu_s_per_million_msgs,
                reference.proxy_cpu_s_per_million_msgs,
            ),
            rss_kib_per_conn: ratio(self.rss_kib_per_conn, reference.rss_kib_per_conn),
        }
    }
}

/// The peer proxy with the best value of each figure, by name: a target compared with it is
/// compared with the best that any of them did, figure by figure.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BestPeer {
    /// Highest throughput.
    pub throughput: Option<String>,
    /// Lowest p50.
    pub p50: Option<String>,
    /// Lowest p90.
    pub p90: Option<String>,
    /// Lowest p99.
    pub p99: Option<String>,
    /// Lowest p99.9.
    pub p999: Option<String>,
    /// Lowest max.
    pub max: Option<String>,
    /// Lowest proxy CPU per million.
    pub proxy_cpu_s_per_million_msgs: Option<String>,
    /// Lowest memory per connection.
    pub rss_kib_per_conn: Option<String>,
}

/// Picks, among `peers`, the one whose `figure` is best (`higher`: the largest, else the
/// smallest), and returns its name and value.
fn best_of(
    peers: &[&TargetReport],
    figure: impl Fn(&TargetReport) -> Option<f64>,
    higher: bool,
) -> (Option<String>, Option<f64>) {
    let best = peers
        .iter()
        .filter_map(|t| figure(t).filter(|v| v.is_finite()).map(|v| (t, v)))
        .reduce(|a, b| {
            let b_wins = if higher { b.1 > a.1 } else { b.1 < a.1 };
            if b_wins { b } else { a }
        });
    match best {
        Some((t, v)) => (Some(t.name.clone()), Some(v)),
        None => (None, None),
    }
}

/// The best peer's figures as one synthetic target (so [`TargetReport::ratios_to`] applies),
/// and who each figure came from; `None` without a measured peer.
fn best_peer(targets: &[TargetReport]) -> Option<(TargetReport, BestPeer)> {
    let peers: Vec<&TargetReport> = targets
        .iter()
        .filter(|t| t.is_ok() && is_peer(&t.name))
        .collect();
    if peers.is_empty() {
        return None;
    }
    let mut reference = TargetReport::not_run("best peer", "ok".into());
    let mut who = BestPeer::default();
    let (name, value) = best_of(&peers, |t| t.throughput_msgs_per_s, true);
    (who.throughput, reference.throughput_msgs_per_s) = (name, value);
    let mut latency = LatencySummary::default();
    let lat = |f: fn(&LatencySummary) -> f64| {
        best_of(&peers, move |t| t.latency_us.as_ref().map(f), false)
    };
    (who.p50, latency.p50) = split(lat(|l| l.p50));
    (who.p90, latency.p90) = split(lat(|l| l.p90));
    (who.p99, latency.p99) = split(lat(|l| l.p99));
    (who.p999, latency.p999) = split(lat(|l| l.p999));
    (who.max, latency.max) = split(lat(|l| l.max));
    reference.latency_us = peers
        .iter()
        .any(|t| t.latency_us.is_some())
        .then_some(latency);
    let (name, value) = best_of(&peers, |t| t.proxy_cpu_s_per_million_msgs, false);
    (
        who.proxy_cpu_s_per_million_msgs,
        reference.proxy_cpu_s_per_million_msgs,
    ) = (name, value);
    let (name, value) = best_of(&peers, |t| t.rss_kib_per_conn, false);
    (who.rss_kib_per_conn, reference.rss_kib_per_conn) = (name, value);
    Some((reference, who))
}

/// A missing latency figure is 0 in the synthetic reference, which [`ratio`] turns into no
/// ratio rather than a wrong one.
fn split((name, value): (Option<String>, Option<f64>)) -> (Option<String>, f64) {
    (name, value.unwrap_or(0.0))
}

/// True for the peer proxies' target names (`nginx`, `haproxy`, `caddy`).
pub fn is_peer(name: &str) -> bool {
    crate::targets::Peer::ALL.iter().any(|p| p.name() == name)
}

/// Fills `ratio_to_direct`, `ratio_to_nginx` and `ratio_to_best_peer` of every measured target
/// from the measured `direct`, `nginx` and peer entries, if present; returns who the best peer
/// was at each figure.
pub fn fill_ratios(targets: &mut [TargetReport]) -> Option<BestPeer> {
    let find = |name: &str| {
        targets
            .iter()
            .find(|t| t.name == name && t.is_ok())
            .cloned()
    };
    let direct = find("direct");
    let nginx = find("nginx");
    let best = best_peer(targets);
    for target in targets.iter_mut().filter(|t| t.is_ok()) {
        target.ratio_to_direct = direct.as_ref().map(|d| target.ratios_to(d));
        target.ratio_to_nginx = nginx.as_ref().map(|n| target.ratios_to(n));
        target.ratio_to_best_peer = best.as_ref().map(|(b, _)| target.ratios_to(b));
    }
    best.map(|(_, who)| who)
}

/// Writes the report as pretty JSON.
pub fn write_json(report: &RunReport, path: &Path) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// Notes about saturation the reader must see beside the figures.
pub fn saturation_notes(report: &RunReport) -> Vec<String> {
    let mut notes = Vec::new();
    for t in report.targets.iter().filter(|t| t.is_ok()) {
        let threads = report.loadgen_threads.max(1) as f64;
        if t.loadgen_cpu_percent_of_one_core >= 90.0 * threads {
            notes.push(format!(
                "{}: the load generator used {:.0}% of one core with {} threads: it was \
                 saturated, so the target may be faster than measured",
                t.name, t.loadgen_cpu_percent_of_one_core, report.loadgen_threads
            ));
        }
        if t.machine_busy_percent >= 95.0 {
            notes.push(format!(
                "{}: the machine's CPUs were {:.0}% busy: load generator, proxy and backends \
                 competed for {} cores, so throughput is the whole system's",
                t.name, t.machine_busy_percent, report.machine.cpus
            ));
        }
    }
    notes
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    let m = if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    };
    Some(round2(m))
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, thr: f64, p99: f64) -> TargetReport {
        let mut t = TargetReport::not_run(name, "ok".into());
        t.throughput_msgs_per_s = Some(thr);
        t.latency_us = Some(LatencySummary {
            p99,
            ..LatencySummary::default()
        });
        t
    }

    #[test]
    fn ratios_divide_by_the_reference() {
        let mut targets = vec![
            target("direct", 1000.0, 100.0),
            target("per-client", 500.0, 300.0),
            target("nginx", 800.0, 150.0),
            TargetReport::not_run("mux", "skipped: no".into()),
        ];
        let best = fill_ratios(&mut targets).unwrap();
        assert_eq!(best.throughput.as_deref(), Some("nginx"));
        let pc = &targets[1];
        assert_eq!(pc.ratio_to_direct.unwrap().throughput, Some(0.5));
        assert_eq!(pc.ratio_to_direct.unwrap().p99, Some(3.0));
        assert_eq!(pc.ratio_to_nginx.unwrap().throughput, Some(0.625));
        assert_eq!(pc.ratio_to_nginx.unwrap().p99, Some(2.0));
        assert_eq!(targets[0].ratio_to_direct.unwrap().throughput, Some(1.0));
        assert!(targets[3].ratio_to_direct.is_none());
        // p50 is zero in the reference: no ratio rather than infinity.
        assert_eq!(pc.ratio_to_direct.unwrap().p50, None);
        // With nginx the only peer, the best peer is nginx.
        assert_eq!(pc.ratio_to_best_peer, pc.ratio_to_nginx);
    }

    #[test]
    fn the_best_peer_is_chosen_figure_by_figure() {
        let mut haproxy = target("haproxy", 900.0, 200.0);
        haproxy.rss_kib_per_conn = Some(5.0);
        haproxy.proxy_cpu_s_per_million_msgs = Some(12.0);
        let mut caddy = target("caddy", 700.0, 120.0);
        caddy.rss_kib_per_conn = Some(60.0);
        caddy.proxy_cpu_s_per_million_msgs = Some(10.0);
        let mut targets = vec![
            target("per-client", 450.0, 240.0),
            target("nginx", 800.0, 150.0),
            haproxy,
            caddy,
            TargetReport::not_run("mux", "skipped: no".into()),
        ];
        targets[0].rss_kib_per_conn = Some(20.0);
        targets[0].proxy_cpu_s_per_million_msgs = Some(25.0);
        let best = fill_ratios(&mut targets).unwrap();
        assert_eq!(best.throughput.as_deref(), Some("haproxy"));
        assert_eq!(best.p99.as_deref(), Some("caddy"));
        assert_eq!(best.rss_kib_per_conn.as_deref(), Some("haproxy"));
        assert_eq!(best.proxy_cpu_s_per_million_msgs.as_deref(), Some("caddy"));
        let r = targets[0].ratio_to_best_peer.unwrap();
        assert_eq!(r.throughput, Some(0.5));
        assert_eq!(r.p99, Some(2.0));
        assert_eq!(r.rss_kib_per_conn, Some(4.0));
        assert_eq!(r.proxy_cpu_s_per_million_msgs, Some(2.5));
        assert!(targets[4].ratio_to_best_peer.is_none());
    }

    #[test]
    fn without_a_peer_there_is_no_best_peer() {
        let mut targets = vec![target("direct", 1000.0, 100.0), target("mux", 800.0, 150.0)];
        assert!(fill_ratios(&mut targets).is_none());
        assert!(targets[1].ratio_to_best_peer.is_none());
    }
}
