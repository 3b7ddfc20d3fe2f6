//! `rate`: open loop. Messages leave on a fixed schedule, `--rate` per second in total spread
//! round-robin over the connections, whether or not earlier ones were answered. Each message
//! carries the time it was *meant* to leave, and its latency is measured from then (see
//! [`crate::pacer`]): a stall of the target delays every message scheduled during it, and all
//! of them count, which a closed loop would hide (coordinated omission). The uncorrected
//! round trip and the sender's lag behind the schedule are reported beside it.
//!
//! With `--sweep`, runs one step per rate and reports the highest rate whose latency stayed
//! within `--slo` with no errors and at least 97% of the scheduled messages answered in time.

use std::time::Duration;

use serde::Serialize;

use super::messages::{self, Load};
use super::{CommonOpts, Measurement, RunTarget};
use crate::stats::LatencySummary;
use crate::units::parse_duration;

/// Options of `rate`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RateOpts {
    /// Messages per second, in total over all connections.
    #[arg(long, short = 'r', default_value_t = 1000.0)]
    pub rate: f64,
    /// Rates to try in turn instead of `--rate`: a list (`1000,2000,5000`) or a geometric
    /// range (`1000..64000x2`).
    #[arg(long, value_parser = parse_sweep)]
    pub sweep: Option<Sweep>,
    /// The latency bound of a sweep, `PERCENTILE=DURATION` with p50, p90, p99, p99.9 or max.
    #[arg(long, default_value = "p99=10ms", value_parser = parse_slo)]
    pub slo: Slo,
    /// Keep sweeping after a rate fails the bound (default: stop at the first failure).
    #[arg(long)]
    pub sweep_continue: bool,
}

/// The rates of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sweep(pub Vec<f64>);

/// A latency bound: this percentile at most this many microseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Slo {
    /// `p50`, `p90`, `p99`, `p99.9` or `max`.
    pub percentile: String,
    /// The bound in microseconds.
    pub max_us: f64,
}

/// Parses `1000,2000,5000` or `1000..64000x2`.
pub fn parse_sweep(text: &str) -> Result<Sweep, String> {
    let bad = || format!("{text:?} is not a sweep like 1000,2000,5000 or 1000..64000x2");
    let rates: Vec<f64> = if let Some((from, rest)) = text.split_once("..") {
        let (to, factor) = rest.split_once('x').ok_or_else(bad)?;
        let (from, to, factor): (f64, f64, f64) = (
            from.trim().parse().map_err(|_| bad())?,
            to.trim().parse().map_err(|_| bad())?,
            factor.trim().parse().map_err(|_| bad())?,
        );
        if from <= 0.0 || to < from || factor <= 1.0 {
            return Err(bad());
        }
        let mut rates = Vec::new();
        let mut rate = from;
        while rate <= to * 1.000_001 && rates.len() < 64 {
            rates.push(rate.round());
            rate *= factor;
        }
        rates
    } else {
        text.split(',')
            .map(|r| r.trim().parse::<f64>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?
    };
    if rates.is_empty() || rates.iter().any(|r| *r <= 0.0) {
        return Err(bad());
    }
    Ok(Sweep(rates))
}

/// Parses `p99=5ms`.
pub fn parse_slo(text: &str) -> Result<Slo, String> {
    let (percentile, bound) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not a bound like p99=5ms"))?;
    let percentile = percentile.trim().to_owned();
    if LatencySummary::default().by_name(&percentile).is_none() {
        return Err(format!(
            "unknown percentile {percentile:?}: use p50, p90, p99, p99.9 or max"
        ));
    }
    let max_us = parse_duration(bound)?.as_secs_f64() * 1e6;
    Ok(Slo { percentile, max_us })
}

/// One step of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepStep {
    /// Scheduled messages per second.
    pub rate: f64,
    /// Messages per second answered in the measured window.
    pub achieved_msgs_per_s: f64,
    /// The bounded percentile, in microseconds (corrected latency).
    pub latency_us: f64,
    /// Errors in this step.
    pub errors: u64,
    /// p99 of how late the load generator sent behind the schedule, µs: when it is near the
    /// bound, a failed step is the generator's (or the machine's) as much as the target's.
    pub send_lag_p99_us: f64,
    /// Whether the step met the bound.
    pub pass: bool,
}

/// Whether a measurement at `rate` over `duration` sustained it within `slo`. "Achieved" counts
/// the answered messages that were scheduled inside the measured window, so a rate is
/// sustained only if (nearly) every scheduled message came back in time.
pub fn sustained(m: &Measurement, rate: f64, duration: Duration, slo: &Slo) -> SweepStep {
    let summary = LatencySummary::of(&m.latency);
    let latency_us = summary.by_name(&slo.percentile).unwrap_or(f64::INFINITY);
    let achieved = m.messages as f64 / duration.as_secs_f64().max(1e-9);
    let errors = m.error_total();
    let send_lag_p99_us = m
        .extra_latency
        .get("send_lag")
        .map_or(0.0, |h| LatencySummary::of(h).p99);
    SweepStep {
        rate,
        achieved_msgs_per_s: achieved,
        latency_us,
        errors,
        send_lag_p99_us,
        pass: errors == 0 && latency_us <= slo.max_us && achieved >= 0.97 * rate - 1.0,
    }
}

/// Runs `rate` (or its sweep) against `target`. A sweep returns the measurement of the highest
/// sustained rate (or of the first step if none was sustained), with every step in its
/// `details`.
pub async fn run(common: &CommonOpts, opts: &RateOpts, target: &RunTarget) -> Measurement {
    let Some(sweep) = &opts.sweep else {
        return messages::run(common, target, Load::Open { rate: opts.rate }).await;
    };
    let mut steps = Vec::new();
    let mut best: Option<(f64, Measurement)> = None;
    let mut first: Option<Measurement> = None;
    for &rate in &sweep.0 {
        let mut step_target = target.clone();
        step_target.label = format!("{} @{rate}/s", target.label);
        let mut m = messages::run(common, &step_target, Load::Open { rate }).await;
        m.label = target.label.clone();
        let step = sustained(&m, rate, common.duration, &opts.slo);
        let pass = step.pass;
        steps.push(step);
        if pass {
            best = Some((rate, m));
        } else if first.is_none() && best.is_none() {
            first = Some(m);
        }
        if !pass && !opts.sweep_continue {
            break;
        }
    }
    let highest = best.as_ref().map(|(rate, _)| *rate);
    let mut m = match (best, first) {
        (Some((_, m)), _) | (None, Some(m)) => m,
        (None, None) => unreachable!("a sweep has at least one step"),
    };
    m.details.insert(
        "sweep".into(),
        serde_json::to_value(&steps).expect("steps serialize"),
    );
    m.details.insert(
        "slo".into(),
        format!("{}<={}us", opts.slo.percentile, opts.slo.max_us).into(),
    );
    m.details.insert(
        "highest_sustained_rate_msgs_per_s".into(),
        highest.map_or(serde_json::Value::Null, Into::into),
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sweeps_and_slos() {
        assert_eq!(parse_sweep("1000,2000").unwrap().0, vec![1000.0, 2000.0]);
        assert_eq!(
            parse_sweep("1000..8000x2").unwrap().0,
            vec![1000.0, 2000.0, 4000.0, 8000.0]
        );
        assert!(parse_sweep("1000..8000").is_err());
        assert!(parse_sweep("0,5").is_err());
        let slo = parse_slo("p99.9=5ms").unwrap();
        assert_eq!(slo.percentile, "p99.9");
        assert_eq!(slo.max_us, 5000.0);
        assert!(parse_slo("p42=1ms").is_err());
    }
}
