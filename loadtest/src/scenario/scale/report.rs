//! What a scale run tells: [`ScaleReport`] (its JSON) and [`render`] (its text): the verdict
//! first, then the clients, each relay and their total, the routing check and the backends.
//! The hold's own figures (handshake latency, errors by kind, timeline) are kept whole as a
//! [`TargetReport`], as every other scenario reports them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use super::ScaleOpts;
use super::routing::RoutingCheck;
use crate::procstat::{GroupSample, MachineInfo};
use crate::report::TargetReport;
use crate::report::table::{fmt_num, grid};
use crate::scenario::Measurement;
use crate::stats::{ErrorKind, LatencySummary};
use crate::units::thousands;

/// Everything a scale run found.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// `"scale"`.
    pub scenario: &'static str,
    /// `"pass"` or `"fail"`.
    pub status: &'static str,
    /// The invariants the run broke, in words.
    pub broken: Vec<String>,
    /// The options of the run.
    pub config: ScaleOpts,
    /// The machine.
    pub machine: MachineInfo,
    /// The relay that was run.
    pub relay: String,
    /// The config file every relay ran.
    pub relay_config: String,
    /// Where the config and the relays' logs were (kept with `--keep-files`).
    pub files: PathBuf,
    /// Seconds the whole run took.
    pub wall_s: f64,
    /// The clients: connected, failed, dropped, keepalive.
    pub clients: ClientFigures,
    /// Each relay process, in start order.
    pub relays: Vec<RelayFigures>,
    /// The relays together.
    pub totals: Totals,
    /// The routing as the backends saw it.
    pub routing: RoutingCheck,
    /// Each backend.
    pub backends: Vec<BackendFigures>,
    /// The hold's figures as the other scenarios report them.
    pub hold: TargetReport,
}

impl ScaleReport {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.broken.is_empty()
    }
}

/// hold's error kind of a client ping with no pong by the next one.
const PONG_TIMEOUT: &str = "pong-timeout";

/// hold's error kind of a close not answered within 2 s.
const CLOSE_TIMEOUT: &str = "close-timeout";

/// The clients of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientFigures {
    /// Clients asked for.
    pub asked: u64,
    /// Clients whose handshake succeeded.
    pub connected: u64,
    /// Clients whose connect or handshake failed.
    pub failed: u64,
    /// Clients that lost their connection while held.
    pub dropped: u64,
    /// Client pings not answered by the next one.
    pub pong_timeouts: u64,
    /// Client pings sent, and pongs received.
    pub pings: u64,
    /// Pongs received.
    pub pongs: u64,
    /// Errors of every kind (the above among them, and failed closes).
    pub errors: u64,
    /// Errors by kind, with the first of each.
    pub error_kinds: BTreeMap<String, ErrorKind>,
    /// Load-generator processes.
    pub processes: u64,
    /// Seconds the ramp took, and its rate.
    pub ramp_s: f64,
    /// Clients connected per second during the ramp.
    pub connect_rate_per_s: f64,
    /// Handshake latency (TCP connect + upgrade through a relay and a mux stream), µs.
    pub handshake_us: Option<LatencySummary>,
    /// How the clients' closing went.
    pub closing: Closing,
}

/// The end of a scale run: every client closes at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Closing {
    /// Clients that waited more than 2 s for their close reply (then stopped waiting and
    /// dropped their socket): how a storm of closes is served, not a failure of the hold.
    pub close_timeouts: u64,
    /// Seconds from the close until every relay was back near its open files before the
    /// clients came (at most a quarter second late); `None` if not within 60 s.
    pub released_after_s: Option<f64>,
    /// Client files the relays still held when the wait for them ended (0 when released).
    pub files_still_open: u64,
}

impl ClientFigures {
    /// The clients of a hold's measurement of `asked` clients.
    pub fn of(m: &Measurement, asked: usize) -> ClientFigures {
        let detail = |key: &str| m.details.get(key).and_then(|v| v.as_f64()).unwrap_or(0.0);
        let dropped = detail("dropped_while_held") as u64;
        ClientFigures {
            asked: asked as u64,
            connected: m.connections,
            // hold counts a connection dropped while held as failed too.
            failed: (detail("failed_connects") as u64).saturating_sub(dropped),
            dropped,
            pong_timeouts: m.errors.get(PONG_TIMEOUT).map_or(0, |e| e.count),
            pings: m.sent,
            pongs: m.received,
            errors: m.error_total(),
            error_kinds: m.errors.clone(),
            processes: detail("processes") as u64,
            ramp_s: detail("ramp_s"),
            connect_rate_per_s: detail("connect_rate_per_s"),
            handshake_us: (!m.latency.is_empty()).then(|| LatencySummary::of(&m.latency)),
            closing: Closing {
                close_timeouts: m.errors.get(CLOSE_TIMEOUT).map_or(0, |e| e.count),
                ..Closing::default()
            },
        }
    }

    /// The client invariants broken: everyone connected, none dropped, every ping answered,
    /// every client's socket let go by the relays after the close, and no other error (close
    /// replies later than 2 s in the closing storm are reported, not counted against it).
    pub fn broken(&self) -> Vec<String> {
        let mut broken = Vec::new();
        if self.connected != self.asked {
            broken.push(format!(
                "{} of {} clients connected ({} failed)",
                self.connected, self.asked, self.failed
            ));
        }
        if self.dropped > 0 {
            broken.push(format!("{} clients were dropped while held", self.dropped));
        }
        if self.pong_timeouts > 0 {
            broken.push(format!(
                "{} client pings were not answered in time",
                self.pong_timeouts
            ));
        }
        if self.closing.released_after_s.is_none() {
            broken.push(format!(
                "the relays still held {} client files {:?} after the clients closed",
                self.closing.files_still_open,
                super::RELEASE_WITHIN
            ));
        }
        let others: u64 = self
            .error_kinds
            .iter()
            .filter(|(kind, _)| !matches!(kind.as_str(), PONG_TIMEOUT | CLOSE_TIMEOUT))
            .map(|(_, e)| e.count)
            .sum();
        if others > self.failed + self.dropped {
            broken.push(format!(
                "{} other client errors ({})",
                others - self.failed - self.dropped,
                self.error_kinds
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        broken
    }
}

/// One relay process.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RelayFigures {
    /// Its pid.
    pub pid: u32,
    /// Clients it carried (streams the backends saw come through its links).
    pub clients: u64,
    /// Resident memory before the clients came, KiB.
    pub rss_before_kib: u64,
    /// Resident memory with every client held, KiB.
    pub rss_held_kib: u64,
    /// Resident memory after the clients left, KiB.
    pub rss_after_kib: u64,
    /// (held - before) / clients, KiB.
    pub rss_kib_per_client: Option<f64>,
    /// Open files with every client held.
    pub files_held: u64,
    /// CPU seconds it used over the hold window.
    pub cpu_s_holding: f64,
    /// Its CPU over the hold window, in percent of one core.
    pub cpu_percent_holding: f64,
}

/// Each relay's figures from its readings before the clients, when every client was held
/// (`holding`), at the end of the hold window (`held`, `seconds` later) and after; its clients
/// from the routing check.
pub fn relay_figures(
    pids: &[u32],
    before: &[GroupSample],
    holding: &[GroupSample],
    held: &[GroupSample],
    after: &[GroupSample],
    seconds: f64,
    routing: &RoutingCheck,
) -> Vec<RelayFigures> {
    pids.iter()
        .enumerate()
        .map(|(i, &pid)| {
            let at = |samples: &[GroupSample]| samples.get(i).copied().unwrap_or_default();
            let (b, h, e) = (at(before), at(holding), at(held));
            let clients = routing.streams_per_relay.get(i).copied().unwrap_or(0);
            let cpu = (e.cpu_s - h.cpu_s).max(0.0);
            RelayFigures {
                pid,
                clients,
                rss_before_kib: b.rss_kib,
                rss_held_kib: h.rss_kib,
                rss_after_kib: at(after).rss_kib,
                rss_kib_per_client: per_client(b.rss_kib, h.rss_kib, clients),
                files_held: h.fds,
                cpu_s_holding: cpu,
                cpu_percent_holding: percent(cpu, seconds),
            }
        })
        .collect()
}

fn per_client(before_kib: u64, held_kib: u64, clients: u64) -> Option<f64> {
    (clients > 0).then(|| (held_kib as f64 - before_kib as f64) / clients as f64)
}

fn percent(cpu_s: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        100.0 * cpu_s / seconds
    } else {
        0.0
    }
}

/// The relays together.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Clients held to the end (connected - dropped).
    pub clients: u64,
    /// Resident memory of every relay before the clients came, KiB.
    pub rss_before_kib: u64,
    /// ... with every client held, KiB.
    pub rss_held_kib: u64,
    /// ... after the clients left, KiB.
    pub rss_after_kib: u64,
    /// The relays' memory per client: (held - before) / clients, KiB.
    pub rss_kib_per_client: Option<f64>,
    /// The relays' CPU while holding (keepalive only), in percent of one core.
    pub relays_cpu_percent_of_one_core: f64,
    /// The same in percent of the machine (all cores).
    pub relays_cpu_percent_of_machine: f64,
    /// The machine's busy share over the hold window (relays, load generator, backends), %.
    pub machine_busy_percent: f64,
}

impl Totals {
    /// The relays' figures summed, with the clients held to the end and the machine's busy
    /// share over the hold window.
    pub fn of(
        relays: &[RelayFigures],
        clients: &ClientFigures,
        machine_busy: f64,
        machine: &MachineInfo,
    ) -> Totals {
        let sum = |f: fn(&RelayFigures) -> u64| relays.iter().map(f).sum::<u64>();
        let held = clients.connected.saturating_sub(clients.dropped);
        let cpu: f64 = relays.iter().map(|r| r.cpu_percent_holding).sum();
        let (before, with) = (sum(|r| r.rss_before_kib), sum(|r| r.rss_held_kib));
        Totals {
            clients: held,
            rss_before_kib: before,
            rss_held_kib: with,
            rss_after_kib: sum(|r| r.rss_after_kib),
            rss_kib_per_client: per_client(before, with, held),
            relays_cpu_percent_of_one_core: cpu,
            relays_cpu_percent_of_machine: cpu / machine.cpus.max(1) as f64,
            machine_busy_percent: 100.0 * machine_busy,
        }
    }
}

/// One backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BackendFigures {
    /// Its URL.
    pub url: String,
    /// Its pid.
    pub pid: u32,
    /// Streams it saw opened.
    pub streams: u64,
    /// Mux links (relay ends) that carried them.
    pub links: usize,
}

/// Each backend's figures from the routing check.
pub fn backend_figures(
    urls: &[String],
    pids: &[u32],
    routing: &RoutingCheck,
) -> Vec<BackendFigures> {
    urls.iter()
        .zip(pids)
        .enumerate()
        .map(|(i, (url, &pid))| BackendFigures {
            url: url.clone(),
            pid,
            streams: routing.streams_per_backend.get(i).copied().unwrap_or(0),
            links: routing.links_per_backend.get(i).copied().unwrap_or(0),
        })
        .collect()
}

/// The report as text: the verdict first, then the figures.
pub fn render(report: &ScaleReport) -> String {
    let mut out = String::new();
    let o = &report.config;
    let c = &report.clients;
    let verdict = if report.passed() { "PASS" } else { "FAIL" };
    let _ = writeln!(
        out,
        "scale: {verdict}: {} clients through {} relay processes sharing one port \
         (reuse_port), {} backends, held {:.0} s (whole run {:.0} s)",
        thousands(c.asked),
        report.relays.len(),
        report.backends.len(),
        o.duration.as_secs_f64(),
        report.wall_s
    );
    for broken in &report.broken {
        let _ = writeln!(out, "  broken: {broken}");
    }
    let m = &report.machine;
    let _ = writeln!(
        out,
        "machine: {} CPUs ({}), kernel {}, {} MiB, {} files per process; relay: {}, {} worker \
         thread(s) each",
        m.cpus,
        m.cpu_model,
        m.kernel,
        m.memory_mib,
        m.fd_limit,
        report.relay,
        match o.relay_workers {
            0 => "default".to_owned(),
            n => n.to_string(),
        }
    );
    let handshake = c.handshake_us.as_ref().map_or(String::new(), |l| {
        format!(
            ", handshake p50/p99/max {}/{}/{} ms",
            fmt_num(l.p50 / 1000.0),
            fmt_num(l.p99 / 1000.0),
            fmt_num(l.max / 1000.0)
        )
    });
    let _ = writeln!(
        out,
        "clients: connected {} of {}, failed {}, dropped while held {}, pong timeouts {}; \
         pings {}, pongs {} (every {:?}); {} load-generator processes, {} source addresses; \
         ramp {:.1} s ({}/s){handshake}",
        thousands(c.connected),
        thousands(c.asked),
        thousands(c.failed),
        thousands(c.dropped),
        thousands(c.pong_timeouts),
        thousands(c.pings),
        thousands(c.pongs),
        o.ping_interval,
        c.processes,
        o.source_count(),
        c.ramp_s,
        thousands(c.connect_rate_per_s.round() as u64)
    );
    for (kind, e) in c
        .error_kinds
        .iter()
        .filter(|(kind, _)| *kind != CLOSE_TIMEOUT)
    {
        let _ = writeln!(out, "  ERROR {kind} x{}: {}", thousands(e.count), e.example);
    }
    let k = &c.closing;
    let released = match k.released_after_s {
        Some(s) => format!("the relays had let go of every client's socket {s:.1} s after"),
        None => format!(
            "the relays still held {} client files 60 s after",
            thousands(k.files_still_open)
        ),
    };
    let _ = writeln!(
        out,
        "closing: every client closed at once; {} of them waited more than 2 s for their close \
         reply; {released}",
        thousands(k.close_timeouts)
    );
    let _ = writeln!(out);
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    let opt = |v: Option<f64>| v.map_or("-".into(), fmt_num);
    let mut rows: Vec<Vec<String>> = report
        .relays
        .iter()
        .enumerate()
        .map(|(i, r)| {
            vec![
                format!("relay {}", i + 1),
                r.pid.to_string(),
                thousands(r.clients),
                thousands(r.files_held),
                mib(r.rss_before_kib),
                mib(r.rss_held_kib),
                mib(r.rss_after_kib),
                opt(r.rss_kib_per_client),
                format!("{:.2}", r.cpu_percent_holding),
            ]
        })
        .collect();
    let t = &report.totals;
    rows.push(vec![
        "all relays".into(),
        String::new(),
        thousands(report.routing.streams_per_relay.iter().sum()),
        thousands(report.relays.iter().map(|r| r.files_held).sum()),
        mib(t.rss_before_kib),
        mib(t.rss_held_kib),
        mib(t.rss_after_kib),
        opt(t.rss_kib_per_client),
        format!("{:.2}", t.relays_cpu_percent_of_one_core),
    ]);
    out.push_str(&grid(
        &[
            "",
            "pid",
            "clients",
            "files",
            "RSS before MiB",
            "RSS held MiB",
            "RSS after MiB",
            "KiB/client",
            "CPU % holding",
        ],
        &rows,
    ));
    let _ = writeln!(
        out,
        "relays' memory per client {} KiB; relays' CPU while holding {:.2}% of one core ({:.2}% \
         of the machine; the machine was {:.0}% busy, load generator and backends included)",
        opt(t.rss_kib_per_client),
        t.relays_cpu_percent_of_one_core,
        t.relays_cpu_percent_of_machine,
        t.machine_busy_percent
    );
    let r = &report.routing;
    let _ = writeln!(
        out,
        "\nrouting (from the backends' side): {} streams, {} keys; on more than one backend: {}; \
         through 2 or more relays: {} (most relays for one key: {}); without a key: {}; on \
         links no relay holds: {}",
        thousands(r.streams),
        thousands(r.keys),
        thousands(r.keys_on_several_backends),
        thousands(r.keys_through_several_relays),
        r.most_relays_for_one_key,
        thousands(r.streams_without_key),
        thousands(r.unattributed_streams)
    );
    for b in &report.backends {
        let _ = writeln!(
            out,
            "  backend {} (pid {}): {} streams over {} links",
            b.url,
            b.pid,
            thousands(b.streams),
            b.links
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cpu_s: f64, rss_kib: u64, fds: u64) -> GroupSample {
        GroupSample {
            cpu_s,
            rss_kib,
            fds,
            processes: 1,
        }
    }

    #[test]
    fn relay_figures_take_memory_per_client_and_cpu_over_the_window() {
        let routing = RoutingCheck {
            streams_per_relay: vec![1000, 0],
            ..RoutingCheck::default()
        };
        let figures = relay_figures(
            &[7, 8],
            &[sample(1.0, 10_000, 20), sample(1.0, 10_000, 20)],
            &[sample(2.0, 16_000, 1020), sample(2.0, 10_000, 20)],
            &[sample(2.5, 16_100, 1020), sample(2.0, 10_000, 20)],
            &[sample(3.0, 12_000, 20), sample(2.0, 10_000, 20)],
            10.0,
            &routing,
        );
        assert_eq!(figures[0].clients, 1000);
        assert_eq!(figures[0].rss_kib_per_client, Some(6.0));
        assert_eq!(figures[0].cpu_percent_holding, 5.0);
        assert_eq!(figures[0].files_held, 1020);
        assert_eq!(figures[0].rss_after_kib, 12_000);
        assert_eq!(figures[1].rss_kib_per_client, None);
        assert_eq!(figures[1].cpu_percent_holding, 0.0);
    }

    #[test]
    fn client_invariants() {
        let mut fine = ClientFigures {
            asked: 10,
            connected: 10,
            closing: Closing {
                close_timeouts: 4,
                released_after_s: Some(1.5),
                files_still_open: 0,
            },
            ..ClientFigures::default()
        };
        // Close replies later than 2 s in the closing storm are no failure.
        fine.error_kinds.insert(
            CLOSE_TIMEOUT.into(),
            ErrorKind {
                count: 4,
                example: "late".into(),
            },
        );
        assert!(fine.broken().is_empty(), "{:?}", fine.broken());
        let mut bad = fine.clone();
        bad.connected = 9;
        bad.failed = 1;
        bad.dropped = 2;
        bad.pong_timeouts = 3;
        bad.error_kinds.insert(
            "connect".into(),
            ErrorKind {
                count: 1,
                example: "x".into(),
            },
        );
        bad.error_kinds.insert(
            "eof".into(),
            ErrorKind {
                count: 2,
                example: "y".into(),
            },
        );
        bad.error_kinds.insert(
            "close".into(),
            ErrorKind {
                count: 4,
                example: "z".into(),
            },
        );
        bad.closing.released_after_s = None;
        bad.closing.files_still_open = 7;
        let broken = bad.broken().join("\n");
        for words in [
            "9 of 10 clients connected (1 failed)",
            "2 clients were dropped",
            "3 client pings",
            "the relays still held 7 client files",
            "4 other client errors",
        ] {
            assert!(broken.contains(words), "{words} missing from\n{broken}");
        }
    }
}
