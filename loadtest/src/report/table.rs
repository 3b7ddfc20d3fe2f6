//! The human-readable summary printed at the end of a run. Its first line says whether the run
//! had errors; then the figures per target, the ratios, and the notes (saturation, skips).

use std::fmt::Write as _;

use super::{RunReport, TargetReport};
use crate::units::thousands;

/// Renders the summary of `report`.
pub fn render(report: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", first_line(report));
    let _ = writeln!(
        out,
        "{} {}: {}",
        report.mode,
        report.scenario,
        report.config_line()
    );
    let m = &report.machine;
    let _ = writeln!(
        out,
        "machine: {} CPUs ({}), kernel {}, {} MiB; load generator: {} threads",
        m.cpus, m.cpu_model, m.kernel, m.memory_mib, report.loadgen_threads
    );
    let _ = writeln!(out);
    let unit = report
        .targets
        .iter()
        .find(|t| t.is_ok())
        .map_or("items/s", |t| t.throughput_unit.as_str());
    let headers = [
        "target",
        unit,
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "proxy CPU-s/M",
        "proxy CPU %",
        "RSS KiB/conn",
        "errors",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for t in &report.targets {
        if !t.is_ok() {
            rows.push(vec![t.name.clone(), t.status.clone()]);
            continue;
        }
        let lat = |f: fn(&crate::stats::LatencySummary) -> f64| {
            t.latency_us.as_ref().map_or("-".into(), |l| fmt_num(f(l)))
        };
        rows.push(vec![
            t.name.clone(),
            t.throughput_msgs_per_s
                .map_or("-".into(), |v| thousands(v.round() as u64)),
            lat(|l| l.p50),
            lat(|l| l.p90),
            lat(|l| l.p99),
            lat(|l| l.p999),
            lat(|l| l.max),
            opt(t.proxy_cpu_s_per_million_msgs),
            opt(t.proxy_cpu_percent_of_one_core),
            opt(t.rss_kib_per_conn),
            thousands(t.errors),
        ]);
    }
    out.push_str(&grid(&headers, &rows));

    let ratio_rows = ratio_rows(report);
    if !ratio_rows.is_empty() {
        let _ = writeln!(
            out,
            "\nratios (throughput: above 1 is better; the rest: above 1 is worse)"
        );
        out.push_str(&grid(
            &["", "throughput", "p50", "p99", "p99.9", "CPU/M", "RSS/conn"],
            &ratio_rows,
        ));
    }
    if let Some(line) = best_peer_line(report) {
        let _ = writeln!(out, "{line}");
    }

    let _ = writeln!(out);
    for t in report.targets.iter().filter(|t| t.is_ok()) {
        let _ = writeln!(
            out,
            "{}: {} connections, {} sent, {} received; latency = {}",
            t.name,
            thousands(t.connections),
            thousands(t.sent),
            thousands(t.received),
            t.latency_kind
        );
        let mut extras: Vec<String> = t
            .extra_latency_us
            .iter()
            .map(|(name, l)| {
                format!(
                    "{name} p50/p99/max {}/{}/{} µs",
                    fmt_num(l.p50),
                    fmt_num(l.p99),
                    fmt_num(l.max)
                )
            })
            .collect();
        extras.push(format!(
            "load generator {:.0}% of a core{}; machine {:.0}% busy",
            t.loadgen_cpu_percent_of_one_core,
            t.loadgen_cpu_s_per_million_msgs
                .map(|c| format!(" ({c:.1} CPU-s/M)"))
                .unwrap_or_default(),
            t.machine_busy_percent
        ));
        if let Some(b) = t.backend_cpu_s_per_million_msgs {
            extras.push(format!("backends {b:.1} CPU-s/M"));
        }
        if let Some(mem) = &t.memory {
            extras.push(format!(
                "proxy RSS {} -> {} -> {} KiB, fds {} -> {} -> {}",
                mem.before_kib,
                mem.loaded_kib,
                mem.after_kib,
                mem.fds_before,
                mem.fds_loaded,
                mem.fds_after
            ));
        }
        if t.rounds.len() > 1 {
            let thr: Vec<String> = t
                .rounds
                .iter()
                .map(|r| thousands(r.throughput.round() as u64))
                .collect();
            extras.push(format!(
                "per round {} (median {})",
                thr.join(" / "),
                t.throughput_round_median
                    .map_or("-".into(), |m| thousands(m.round() as u64))
            ));
        }
        for line in extras {
            let _ = writeln!(out, "    {line}");
        }
        for (kind, e) in &t.error_kinds {
            let _ = writeln!(
                out,
                "    ERROR {kind} x{}: {}",
                thousands(e.count),
                e.example
            );
        }
        for (key, value) in &t.details {
            if key == "hold_window" || key == "sweep" {
                continue;
            }
            let _ = writeln!(out, "    {key}: {value}");
        }
        if let Some(serde_json::Value::Array(steps)) = t.details.get("sweep") {
            for step in steps {
                let _ = writeln!(
                    out,
                    "    sweep {} msg/s -> {} msg/s answered, latency {} µs (sender lag p99 {} µs), {} errors: {}",
                    step["rate"],
                    fmt_num(step["achieved_msgs_per_s"].as_f64().unwrap_or(0.0)),
                    fmt_num(step["latency_us"].as_f64().unwrap_or(0.0)),
                    fmt_num(step["send_lag_p99_us"].as_f64().unwrap_or(0.0)),
                    step["errors"],
                    if step["pass"].as_bool() == Some(true) {
                        "sustained"
                    } else {
                        "NOT sustained"
                    }
                );
            }
        }
    }
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

/// `ERRORS: ...` or `OK: no errors ...`: the first line of every summary.
pub fn first_line(report: &RunReport) -> String {
    if report.errors_total == 0 {
        return format!(
            "OK: no errors ({} target{} measured)",
            report.targets.iter().filter(|t| t.is_ok()).count(),
            if report.targets.len() == 1 { "" } else { "s" }
        );
    }
    let per: Vec<String> = report
        .targets
        .iter()
        .filter(|t| t.errors > 0)
        .map(|t| {
            let kinds: Vec<String> = t
                .error_kinds
                .iter()
                .map(|(k, e)| format!("{k} {}", e.count))
                .collect();
            format!("{}: {}", t.name, kinds.join(", "))
        })
        .collect();
    format!(
        "ERRORS: {} errors in this run ({}); the figures below include them",
        thousands(report.errors_total),
        per.join("; ")
    )
}

impl RunReport {
    /// One line with the settings that matter for reading the figures.
    pub fn config_line(&self) -> String {
        let c = &self.config;
        let get = |k: &str| c.get(k).map(|v| v.to_string().trim_matches('"').to_owned());
        let mut parts = Vec::new();
        for (key, label) in [
            ("connections", "connections"),
            ("size", "bytes"),
            ("window", "window"),
            ("rate", "rate/s"),
            ("room_size", "room size"),
            ("duration", "measured"),
            ("warmup", "warmup"),
            ("rounds", "rounds"),
        ] {
            if let Some(v) = get(key) {
                parts.push(format!("{label} {v}"));
            }
        }
        if c.get("text").and_then(|v| v.as_bool()) == Some(true) {
            parts.push("text".into());
        }
        parts.join(", ")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), fmt_num)
}

fn ratio(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}x"))
}

/// Numbers with sensible precision: 12,345 / 123.4 / 1.23.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 1000.0 {
        thousands(v.round() as u64)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Left-aligned first column, right-aligned numbers; rows shorter than the header (skipped
/// targets) print their text after the name.
pub(crate) fn grid(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows.iter().filter(|r| r.len() == headers.len()) {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths.get(i).copied().unwrap_or(0);
            if i == 0 {
                let _ = write!(out, "{cell:<pad$}");
            } else if cells.len() < headers.len() {
                let _ = write!(out, "  {cell}");
            } else {
                let _ = write!(out, "  {cell:>pad$}");
            }
        }
        out.push('\n');
    };
    line(
        &headers.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        &mut out,
    );
    for row in rows {
        line(row, &mut out);
    }
    out
}

/// Markdown tables of the headline figures and the ratios (for a README).
pub fn markdown(report: &RunReport) -> String {
    let mut out = String::new();
    let unit = report
        .targets
        .iter()
        .find(|t| t.is_ok())
        .map_or("items/s", |t| t.throughput_unit.as_str());
    let _ = writeln!(
        out,
        "| target | {unit} | median of rounds | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | proxy CPU-s / M | proxy RSS KiB / conn | errors |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for t in &report.targets {
        if !t.is_ok() {
            let _ = writeln!(out, "| {} | {} | | | | | | | | | |", t.name, t.status);
            continue;
        }
        let l = t.latency_us.unwrap_or_default();
        let count = |v: Option<f64>| v.map_or("-".into(), |v| thousands(v.round() as u64));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.name,
            count(t.throughput_msgs_per_s),
            count(t.throughput_round_median),
            fmt_num(l.p50),
            fmt_num(l.p90),
            fmt_num(l.p99),
            fmt_num(l.p999),
            fmt_num(l.max),
            opt(t.proxy_cpu_s_per_million_msgs),
            opt(t.rss_kib_per_conn),
            t.errors,
        );
    }
    let _ = writeln!(
        out,
        "\n| ratio | throughput | p50 | p99 | p99.9 | proxy CPU / M | RSS / conn |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for row in ratio_rows(report) {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    if let Some(line) = best_peer_line(report) {
        let _ = writeln!(out, "\n{line}");
    }
    out
}

/// `best peer: throughput haproxy, p50 nginx, ...`: whom the `/ best peer` rows divide by.
fn best_peer_line(report: &RunReport) -> Option<String> {
    let best = report.best_peer.as_ref()?;
    let parts: Vec<String> = [
        ("throughput", &best.throughput),
        ("p50", &best.p50),
        ("p99", &best.p99),
        ("p99.9", &best.p999),
        ("CPU/M", &best.proxy_cpu_s_per_million_msgs),
        ("RSS/conn", &best.rss_kib_per_conn),
    ]
    .into_iter()
    .filter_map(|(figure, name)| name.as_ref().map(|n| format!("{figure} {n}")))
    .collect();
    Some(format!("best peer: {}", parts.join(", ")))
}

/// The ratio rows of both tables: each target that ran against direct (when measured, and not
/// itself), and each that is not a peer proxy against the best peer (figure by figure; nginx
/// alone is the best peer when it is the only one); its label (`per-client / best peer`) and
/// the throughput, p50, p99, p99.9, proxy CPU per million and RSS per connection ratios.
fn ratio_rows(report: &RunReport) -> Vec<Vec<String>> {
    report
        .targets
        .iter()
        .filter(|t| t.is_ok())
        .flat_map(|t| {
            let to_best = (!super::is_peer(&t.name)).then_some(t.ratio_to_best_peer);
            [("direct", Some(t.ratio_to_direct)), ("best peer", to_best)]
                .into_iter()
                .filter_map(move |(reference, r)| {
                    let r = r.flatten().filter(|_| t.name != reference)?;
                    Some(vec![
                        format!("{} / {reference}", t.name),
                        ratio(r.throughput),
                        ratio(r.p50),
                        ratio(r.p99),
                        ratio(r.p999),
                        ratio(r.proxy_cpu_s_per_million_msgs),
                        ratio(r.rss_kib_per_conn),
                    ])
                })
        })
        .collect()
}

/// The table row of a target (used by tests and the HTML page).
pub fn headline(t: &TargetReport) -> String {
    match (&t.latency_us, t.throughput_msgs_per_s) {
        (Some(l), Some(thr)) => format!(
            "{}: {} {}, p50 {} µs, p99 {} µs",
            t.name,
            thousands(thr.round() as u64),
            t.throughput_unit,
            fmt_num(l.p50),
            fmt_num(l.p99)
        ),
        _ => format!("{}: {}", t.name, t.status),
    }
}
