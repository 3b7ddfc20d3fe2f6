//! The HTML report: one self-contained file (inline CSS and SVG, no scripts, nothing fetched)
//! with the summary table, latency percentile curves per target, throughput over time, memory
//! per connection, proxy CPU per million messages, the errors, and the run's configuration.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use super::svg::{self, PALETTE, Scale, Series};
use super::{RunReport, table};

/// Renders `report` as an HTML page.
pub fn render(report: &RunReport) -> String {
    let mut out = String::new();
    let title = format!("wsrelay-loadtest {} {}", report.mode, report.scenario);
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>\
         body{{font-family:sans-serif;margin:2em;max-width:1000px}}\
         table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
         td:first-child,th:first-child{{text-align:left}}.err{{color:#b00;font-weight:bold}}.ok{{color:#070;font-weight:bold}}\
         pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}}</style></head><body><h1>{title}</h1>"
    );
    let first = table::first_line(report);
    let class = if report.errors_total == 0 {
        "ok"
    } else {
        "err"
    };
    let _ = write!(
        out,
        "<p class=\"{class}\">{}</p><p>{}</p>",
        escape(&first),
        escape(&report.config_line())
    );
    let m = &report.machine;
    let _ = write!(
        out,
        "<p>Machine: {} CPUs ({}), kernel {}, {} MiB memory; load generator {} threads; run took {:.0} s.</p>",
        m.cpus,
        escape(&m.cpu_model),
        escape(&m.kernel),
        m.memory_mib,
        report.loadgen_threads,
        report.wall_s
    );
    out.push_str("<h2>Summary</h2><pre>");
    out.push_str(&escape(&table::render(report)));
    out.push_str("</pre>");

    let colored: Vec<(&super::TargetReport, String)> = report
        .targets
        .iter()
        .filter(|t| t.is_ok())
        .enumerate()
        .map(|(i, t)| (t, PALETTE[i % PALETTE.len()].to_owned()))
        .collect();

    out.push_str("<h2>Latency by percentile</h2>");
    let curves: Vec<Series> = colored
        .iter()
        .map(|(t, color)| Series {
            name: t.name.clone(),
            color: color.clone(),
            points: t
                .latency_curve_us
                .iter()
                .map(|p| (p.percentile, p.latency_us))
                .collect(),
        })
        .collect();
    let kind = colored
        .first()
        .map(|(t, _)| t.latency_kind.clone())
        .unwrap_or_default();
    out.push_str(&svg::line_chart(
        &format!("Latency: {kind}"),
        "percentile",
        "latency (µs, log scale)",
        Scale::Percentile,
        Scale::Log,
        &curves,
    ));

    out.push_str("<h2>Throughput over time</h2>");
    let unit = colored
        .first()
        .map(|(t, _)| t.throughput_unit.clone())
        .unwrap_or_default();
    let lines: Vec<Series> = colored
        .iter()
        .map(|(t, color)| Series {
            name: t.name.clone(),
            color: color.clone(),
            points: t.timeline.iter().map(|p| (p.t_s, p.per_s)).collect(),
        })
        .collect();
    out.push_str(&svg::line_chart(
        "Throughput (rounds of a target follow each other)",
        "seconds of the target's runs",
        &unit,
        Scale::Linear,
        Scale::Linear,
        &lines,
    ));

    out.push_str("<h2>Memory and CPU of the proxy</h2>");
    let bars = |f: fn(&super::TargetReport) -> Option<f64>| -> Vec<(String, Option<f64>, String)> {
        colored
            .iter()
            .map(|(t, color)| (t.name.clone(), f(t), color.clone()))
            .collect()
    };
    out.push_str(&svg::bar_chart(
        "Proxy memory per connection (RSS with connections open - before) / connections",
        "KiB",
        &bars(|t| t.rss_kib_per_conn),
    ));
    out.push_str(&svg::bar_chart(
        "Proxy CPU seconds per million messages (utime + stime from /proc)",
        "CPU-s",
        &bars(|t| t.proxy_cpu_s_per_million_msgs),
    ));
    let rss_series: Vec<Series> = colored
        .iter()
        .filter(|(t, _)| t.timeline.iter().any(|p| p.rss_kib.is_some()))
        .map(|(t, color)| Series {
            name: t.name.clone(),
            color: color.clone(),
            points: t
                .timeline
                .iter()
                .filter_map(|p| p.rss_kib.map(|r| (p.t_s, r as f64 / 1024.0)))
                .collect(),
        })
        .collect();
    if !rss_series.is_empty() {
        out.push_str(&svg::line_chart(
            "Proxy resident memory over time",
            "seconds of the target's runs",
            "RSS (MiB)",
            Scale::Linear,
            Scale::Linear,
            &rss_series,
        ));
    }

    if report.errors_total > 0 {
        out.push_str("<h2 class=\"err\">Errors</h2><table><tr><th>target</th><th>kind</th><th>count</th><th>first</th></tr>");
        for t in &report.targets {
            for (kind, e) in &t.error_kinds {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>",
                    escape(&t.name),
                    escape(kind),
                    e.count,
                    escape(&e.example)
                );
            }
        }
        out.push_str("</table>");
    }
    out.push_str("<h2>Configuration</h2><pre>");
    out.push_str(&escape(
        &serde_json::to_string_pretty(&report.config).unwrap_or_default(),
    ));
    out.push_str("</pre></body></html>\n");
    out
}

/// Writes the HTML report to `path`.
pub fn write(report: &RunReport, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, render(report)).with_context(|| format!("write {}", path.display()))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
