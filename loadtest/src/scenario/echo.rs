//! `echo`: closed loop. Each of `--connections` connections keeps `--window` messages of
//! `--size` bytes in flight: a new message leaves as soon as an echo comes back. Measures
//! throughput (echoes per second) and round-trip latency.
//!
//! A closed loop slows down when the target does, so its latency hides the stalls it caused
//! (coordinated omission): use it for throughput, and [`rate`](super::rate) for latency under
//! a given load.

use serde::Serialize;

use super::messages::{self, Load};
use super::{CommonOpts, Measurement, RunTarget};

/// Options of `echo`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct EchoOpts {
    /// Messages in flight per connection.
    #[arg(long, short = 'w', default_value_t = 1)]
    pub window: usize,
}

/// Runs `echo` against `target`.
pub async fn run(common: &CommonOpts, opts: &EchoOpts, target: &RunTarget) -> Measurement {
    messages::run(
        common,
        target,
        Load::Closed {
            window: opts.window.max(1),
        },
    )
    .await
}
