//! Where a run's figures accumulate: latency histograms (hdrhistogram, microseconds), error
//! counts by kind, and message counters sampled over time.
//!
//! Connection tasks never share a histogram directly: each keeps a small [`LocalLatency`] buffer
//! and empties it into one of a few mutex-guarded shards, so recording costs no contention and
//! a run with 10,000 connections holds a few histograms, not 10,000.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded: one hour, in microseconds (larger values are clamped to it).
const HIGHEST_US: u64 = 3_600_000_000;
/// Shards of a [`LatencyRecorder`].
const SHARDS: usize = 16;
/// Samples a [`LocalLatency`] buffers before it takes a shard's lock.
const LOCAL_BATCH: usize = 128;

/// A new empty latency histogram: 1 µs to one hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("valid histogram bounds")
}

/// Latencies of one kind, shared by every task of a run.
#[derive(Clone)]
pub struct LatencyRecorder {
    shards: Arc<Vec<Mutex<Histogram<u64>>>>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        LatencyRecorder {
            shards: Arc::new((0..SHARDS).map(|_| Mutex::new(new_histogram())).collect()),
        }
    }
}

impl LatencyRecorder {
    /// A buffer for one task; `key` (a connection index) picks its shard.
    pub fn local(&self, key: usize) -> LocalLatency {
        LocalLatency {
            recorder: self.clone(),
            shard: key % SHARDS,
            buffer: Vec::with_capacity(LOCAL_BATCH),
        }
    }

    /// Records one value directly (for rare events such as handshakes).
    pub fn record(&self, key: usize, latency: Duration) {
        let mut shard = self.shards[key % SHARDS].lock().expect("histogram lock");
        shard.saturating_record(as_us(latency));
    }

    /// Everything recorded so far, merged.
    pub fn snapshot(&self) -> Histogram<u64> {
        let mut merged = new_histogram();
        for shard in self.shards.iter() {
            merged
                .add(&*shard.lock().expect("histogram lock"))
                .expect("same bounds");
        }
        merged
    }
}

/// A task's latency buffer; flushes into its shard every 128 samples and on drop.
pub struct LocalLatency {
    recorder: LatencyRecorder,
    shard: usize,
    buffer: Vec<u64>,
}

impl LocalLatency {
    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        self.buffer.push(as_us(latency));
        if self.buffer.len() >= LOCAL_BATCH {
            self.flush();
        }
    }

    /// Moves the buffered samples into the shared histogram.
    pub fn flush(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let mut shard = self.recorder.shards[self.shard]
            .lock()
            .expect("histogram lock");
        for value in self.buffer.drain(..) {
            shard.saturating_record(value);
        }
    }
}

impl Drop for LocalLatency {
    fn drop(&mut self) {
        self.flush();
    }
}

fn as_us(latency: Duration) -> u64 {
    (latency.as_micros() as u64).clamp(1, HIGHEST_US)
}

/// Percentiles of a latency histogram, in microseconds (the JSON `latency_us` object).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value recorded.
    pub max: f64,
    /// Smallest value recorded.
    pub min: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Values recorded.
    pub count: u64,
}

impl LatencySummary {
    /// Summarizes a histogram; all zero if it is empty.
    pub fn of(histogram: &Histogram<u64>) -> LatencySummary {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        let at = |q: f64| histogram.value_at_quantile(q) as f64;
        LatencySummary {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: histogram.max() as f64,
            min: histogram.min() as f64,
            mean: (histogram.mean() * 10.0).round() / 10.0,
            count: histogram.len(),
        }
    }

    /// The value at a percentile named like `p99` or `p99.9`, if it is one of ours.
    pub fn by_name(&self, name: &str) -> Option<f64> {
        match name {
            "p50" => Some(self.p50),
            "p90" => Some(self.p90),
            "p99" => Some(self.p99),
            "p99.9" | "p999" => Some(self.p999),
            "max" => Some(self.max),
            _ => None,
        }
    }
}

/// Percentiles at which latency curves are drawn and stored.
pub const CURVE_PERCENTILES: [f64; 16] = [
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999,
    99.9999, 100.0,
];

/// One point of a latency percentile curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Percentile, 0..=100.
    pub percentile: f64,
    /// Latency at it, in microseconds.
    pub latency_us: f64,
}

/// The latency percentile curve of a histogram at [`CURVE_PERCENTILES`].
pub fn percentile_curve(histogram: &Histogram<u64>) -> Vec<CurvePoint> {
    if histogram.is_empty() {
        return Vec::new();
    }
    CURVE_PERCENTILES
        .iter()
        .map(|&percentile| CurvePoint {
            percentile,
            latency_us: histogram.value_at_percentile(percentile) as f64,
        })
        .collect()
}

/// A histogram as `(value_us, count)` pairs, so another process can merge it exactly.
pub fn histogram_to_pairs(histogram: &Histogram<u64>) -> Vec<(u64, u64)> {
    histogram
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds `(value_us, count)` pairs from [`histogram_to_pairs`] into a histogram.
pub fn add_pairs(histogram: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        let _ = histogram.record_n(value.clamp(1, HIGHEST_US), count);
    }
}

/// Errors of a run, counted by kind, with the first message of each kind kept as an example.
#[derive(Clone, Default)]
pub struct ErrorLog {
    inner: Arc<Mutex<BTreeMap<String, ErrorKind>>>,
}

/// One kind of error in an [`ErrorLog`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorKind {
    /// How many times it happened.
    pub count: u64,
    /// The first occurrence's message.
    pub example: String,
}

impl ErrorLog {
    /// Counts one error of `kind` (a short stable name such as `connect` or `unanswered`).
    pub fn record(&self, kind: &str, detail: impl std::fmt::Display) {
        self.record_n(kind, 1, detail);
    }

    /// Counts `n` errors of `kind` at once.
    pub fn record_n(&self, kind: &str, n: u64, detail: impl std::fmt::Display) {
        if n == 0 {
            return;
        }
        let mut map = self.inner.lock().expect("error log lock");
        let entry = map.entry(kind.to_owned()).or_default();
        if entry.count == 0 {
            entry.example = detail.to_string();
        }
        entry.count += n;
    }

    /// Adds the counts of another run's errors.
    pub fn merge(&self, other: &BTreeMap<String, ErrorKind>) {
        for (kind, e) in other {
            self.record_n(kind, e.count, &e.example);
        }
    }

    /// Total errors of all kinds.
    pub fn total(&self) -> u64 {
        self.inner
            .lock()
            .expect("error log lock")
            .values()
            .map(|e| e.count)
            .sum()
    }

    /// Every kind with its count and example.
    pub fn snapshot(&self) -> BTreeMap<String, ErrorKind> {
        self.inner.lock().expect("error log lock").clone()
    }
}

/// Message counters every task of a run bumps; a sampler turns them into a throughput curve.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages handed to sockets.
    pub sent: AtomicU64,
    /// Messages (or deliveries) received back and matched.
    pub received: AtomicU64,
    /// Connections established.
    pub connected: AtomicU64,
    /// Connections that failed or dropped.
    pub failed: AtomicU64,
}

impl Counters {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One point of a throughput-over-time curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Seconds since the run started.
    pub t_s: f64,
    /// Messages (or connections, for hold and churn) per second over the preceding interval.
    pub per_s: f64,
    /// Resident memory of the watched processes at that time, in KiB, if any are watched.
    pub rss_kib: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_recorder_merges_everything() {
        let recorder = LatencyRecorder::default();
        for key in 0..40 {
            let mut local = recorder.local(key);
            for us in 1..=100 {
                local.record(Duration::from_micros(us));
            }
        }
        recorder.record(3, Duration::from_secs(7200));
        let merged = recorder.snapshot();
        assert_eq!(merged.len(), 4001);
        let summary = LatencySummary::of(&merged);
        assert_eq!(summary.p50, 51.0); // 2,001st of 4,001 values
        assert!((summary.max - HIGHEST_US as f64).abs() / (HIGHEST_US as f64) < 0.001);
    }

    #[test]
    fn pairs_round_trip() {
        let mut h = new_histogram();
        for v in [1u64, 5, 5, 900, 123_456] {
            h.record(v).unwrap();
        }
        let mut back = new_histogram();
        add_pairs(&mut back, &histogram_to_pairs(&h));
        assert_eq!(back.len(), h.len());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(back.max(), h.max());
    }

    #[test]
    fn error_log_counts_and_keeps_first_example() {
        let log = ErrorLog::default();
        log.record("connect", "refused");
        log.record("connect", "timed out");
        log.record_n("unanswered", 3, "3 messages");
        assert_eq!(log.total(), 5);
        let snap = log.snapshot();
        assert_eq!(snap["connect"].example, "refused");
        assert_eq!(snap["unanswered"].count, 3);
    }
}
