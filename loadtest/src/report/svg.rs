//! Just enough SVG for the report's charts: line charts (linear, log, and the "percentile"
//! axis that spreads 90%, 99%, 99.9%... evenly, as HdrHistogram plots do) and bar charts.
//! Output is a self-contained `<svg>` element, no scripts.

use std::fmt::Write as _;

/// Colors of the series, in target order.
pub const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One line of a chart.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Stroke color.
    pub color: String,
    /// (x, y) points in data units.
    pub points: Vec<(f64, f64)>,
}

/// How an axis maps data to pixels.
#[derive(Clone, Copy, PartialEq)]
pub enum Scale {
    /// Linear from 0 (or the smallest value).
    Linear,
    /// Base-10 logarithmic.
    Log,
    /// Percentile: x = -log10(1 - p/100), ticks at 0, 90, 99, 99.9 ...
    Percentile,
}

const W: f64 = 760.0;
const H: f64 = 340.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 46.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn percentile_x(p: f64) -> f64 {
    let p = p.clamp(0.0, 99.9999);
    -(1.0 - p / 100.0).log10()
}

fn transform(scale: Scale, v: f64) -> f64 {
    match scale {
        Scale::Linear => v,
        Scale::Log => v.max(1e-9).log10(),
        Scale::Percentile => percentile_x(v),
    }
}

fn ticks(scale: Scale, lo: f64, hi: f64) -> Vec<(f64, String)> {
    match scale {
        Scale::Percentile => ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
            .iter()
            .enumerate()
            .map(|(i, label)| (i as f64, label.to_string()))
            .filter(|(x, _)| *x <= hi + 1e-9)
            .collect(),
        Scale::Log => {
            let mut out = Vec::new();
            let mut e = lo.floor() as i32;
            while (e as f64) <= hi.ceil() {
                out.push((e as f64, format_value(10f64.powi(e))));
                e += 1;
            }
            out
        }
        Scale::Linear => {
            let span = (hi - lo).max(1e-9);
            let raw = span / 5.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 5.0, 10.0]
                .iter()
                .map(|m| m * mag)
                .find(|s| span / s <= 6.0)
                .unwrap_or(mag * 10.0);
            let mut out = Vec::new();
            let mut v = (lo / step).ceil() * step;
            while v <= hi + step * 1e-6 {
                out.push((v, format_value(v)));
                v += step;
            }
            out
        }
    }
}

/// Short labels: 1.5k, 20k, 3M, 0.5.
pub fn format_value(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// A line chart of `series`.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_scale: Scale,
    y_scale: Scale,
    series: &[Series],
) -> String {
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter())
        .map(|&(x, y)| (transform(x_scale, x), transform(y_scale, y)))
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        out,
        r#"<text x="{}" y="18" font-size="14" font-weight="bold">{}</text>"#,
        LEFT,
        escape(title)
    );
    if points.is_empty() {
        let _ = write!(
            out,
            r#"<text x="{LEFT}" y="{}">no data</text></svg>"#,
            H / 2.0
        );
        return out;
    }
    let (mut x_lo, mut x_hi) = min_max(points.iter().map(|p| p.0));
    let (mut y_lo, mut y_hi) = min_max(points.iter().map(|p| p.1));
    if x_scale == Scale::Percentile {
        x_lo = 0.0;
        x_hi = x_hi.ceil().max(3.0);
    }
    match y_scale {
        Scale::Log => {
            y_lo = y_lo.floor();
            y_hi = y_hi.ceil().max(y_lo + 1.0);
        }
        _ => {
            y_lo = y_lo.min(0.0);
            y_hi = if y_hi > y_lo { y_hi * 1.05 } else { y_lo + 1.0 };
        }
    }
    if x_hi <= x_lo {
        x_hi = x_lo + 1.0;
    }
    let px = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * (W - LEFT - RIGHT);
    let py = |y: f64| TOP + (1.0 - (y - y_lo) / (y_hi - y_lo)) * (H - TOP - BOTTOM);
    // Grid and ticks.
    for (v, label) in ticks(y_scale, y_lo, y_hi) {
        let y = py(v);
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
    }
    for (v, label) in ticks(x_scale, x_lo, x_hi) {
        let x = px(v);
        let _ = write!(
            out,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{TOP}\" y2=\"{}\" stroke=\"#eee\"/>\
             <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            H - BOTTOM,
            H - BOTTOM + 16.0
        );
    }
    let _ = write!(
        out,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>",
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + (W - LEFT - RIGHT) / 2.0,
        H - 8.0,
        escape(x_label)
    );
    let _ = write!(
        out,
        r#"<text transform="translate(14,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + (H - TOP - BOTTOM) / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| (transform(x_scale, x), transform(y_scale, y)))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if !path.is_empty() {
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                s.color,
                path.join(" ")
            );
        }
        let ly = TOP + 14.0 + i as f64 * 18.0;
        let lx = W - RIGHT + 12.0;
        let _ = write!(
            out,
            r#"<rect x="{lx}" y="{}" width="14" height="4" fill="{}"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 5.0,
            s.color,
            lx + 20.0,
            escape(&s.name)
        );
    }
    out.push_str("</svg>");
    out
}

/// A horizontal bar chart; bars without a value say "n/a".
pub fn bar_chart(title: &str, unit: &str, bars: &[(String, Option<f64>, String)]) -> String {
    let row = 26.0;
    let height = TOP + row * bars.len() as f64 + 20.0;
    let max = bars
        .iter()
        .filter_map(|b| b.1)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let label_w = 150.0;
    let bar_w = W - label_w - 120.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {height}" width="{W}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        out,
        r#"<text x="10" y="18" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (i, (name, value, color)) in bars.iter().enumerate() {
        let y = TOP + i as f64 * row;
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            y + 14.0,
            escape(name)
        );
        match value {
            Some(v) => {
                let w = (v.max(0.0) / max * bar_w).max(1.0);
                let _ = write!(
                    out,
                    r#"<rect x="{label_w}" y="{y}" width="{w:.1}" height="18" fill="{color}"/><text x="{:.1}" y="{}">{} {}</text>"#,
                    label_w + w + 6.0,
                    y + 14.0,
                    format_value(*v),
                    escape(unit)
                );
            }
            None => {
                let _ = write!(
                    out,
                    "<text x=\"{label_w}\" y=\"{}\" fill=\"#888\">n/a</text>",
                    y + 14.0
                );
            }
        }
    }
    out.push_str("</svg>");
    out
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg() {
        let s = Series {
            name: "a<b".into(),
            color: PALETTE[0].into(),
            points: vec![(0.0, 10.0), (99.0, 100.0), (100.0, 1000.0)],
        };
        let svg = line_chart("t", "x", "y", Scale::Percentile, Scale::Log, &[s]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("a&lt;b"));
        assert!(svg.contains("99.9%"));
        let bars = bar_chart(
            "m",
            "KiB",
            &[
                ("x".into(), Some(3.0), "#000".into()),
                ("y".into(), None, "#000".into()),
            ],
        );
        assert!(bars.contains("n/a"));
        assert_eq!(format_value(1500.0), "1.5k");
    }
}
