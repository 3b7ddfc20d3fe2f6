//! Exponential backoff with full jitter: how long to wait before reconnect attempt `n`.
//!
//! Pure arithmetic plus a seedable random source, no clock and no I/O, so it is tested here
//! with plain unit tests. [`Reconnect`](crate::Reconnect) carries a [`Backoff`]; the retry loop
//! in [`reconnect`](crate::reconnect) asks it for each delay.
//!
//! The rule (the "full jitter" of the AWS architecture blog, with `min` as a floor, as the
//! Centrifugo clients do it): attempt `n` (counting from 1) waits
//!
//! ```text
//! ceiling(n) = min(max, min * 2^(n-1))
//! delay(n)   = min(max, min + uniform(0 ..= ceiling(n)))
//! ```
//!
//! so every delay lies in `[min, min(max, min + ceiling(n))]`: never below `min` (no hot
//! loop against a server that is down), never above `max`, and spread evenly enough that a
//! fleet of clients dropped at the same moment does not come back at the same moment.

use std::time::Duration;

/// Exponential backoff bounds: the first retry waits between `min` and `2 * min`, the window
/// doubles with every failed attempt, and no wait exceeds `max`.
///
/// ```
/// use std::time::Duration;
/// use wsrelay_client::{Backoff, Jitter};
///
/// let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
/// let mut jitter = Jitter::seeded(1);
/// let first = backoff.delay(1, &mut jitter);
/// assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
/// assert_eq!(backoff.bounds(20), (Duration::from_millis(500), Duration::from_secs(30)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backoff {
    /// The shortest wait, and the base the window grows from. At least 1 ms.
    pub min: Duration,
    /// The longest wait. At least `min`.
    pub max: Duration,
}

/// The shortest `min` [`Backoff::new`] accepts: a zero floor would let a client retry in a
/// tight loop.
pub const MIN_BACKOFF: Duration = Duration::from_millis(1);

impl Default for Backoff {
    /// 500 ms to 30 s.
    fn default() -> Backoff {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Backoff {
    /// Backoff between `min` and `max`. `min` is raised to [`MIN_BACKOFF`] and `max` to `min`
    /// if they are lower.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(MIN_BACKOFF);
        Backoff {
            min,
            max: max.max(min),
        }
    }

    /// The jitter window of attempt `attempt` (from 1): `min(max, min * 2^(attempt-1))`.
    /// Attempt 0 is treated as 1.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let (min, max) = self.normalized();
        // 2^31 * 1 ms is already weeks; stop doubling there.
        let doublings = attempt.saturating_sub(1).min(31);
        min.saturating_mul(1u32 << doublings).min(max)
    }

    /// The smallest and largest delay attempt `attempt` (from 1) can get.
    pub fn bounds(&self, attempt: u32) -> (Duration, Duration) {
        let (min, max) = self.normalized();
        (min, min.saturating_add(self.ceiling(attempt)).min(max))
    }

    /// The delay before attempt `attempt` (from 1), drawing its jitter from `jitter`.
    pub fn delay(&self, attempt: u32, jitter: &mut Jitter) -> Duration {
        let (min, max) = self.normalized();
        min.saturating_add(jitter.up_to(self.ceiling(attempt)))
            .min(max)
    }

    /// `min` and `max` with the invariants of [`Backoff::new`] restored, for values built
    /// with a struct literal.
    fn normalized(&self) -> (Duration, Duration) {
        let min = self.min.max(MIN_BACKOFF);
        (min, self.max.max(min))
    }
}

/// The random source of the jitter: a small fast PRNG, randomly seeded per client unless a
/// seed is given (tests pin it with [`Jitter::seeded`] to know every delay in advance).
#[derive(Debug, Clone)]
pub struct Jitter {
    rng: fastrand::Rng,
}

impl Default for Jitter {
    fn default() -> Jitter {
        Jitter::new()
    }
}

impl Jitter {
    /// A randomly seeded source.
    pub fn new() -> Jitter {
        Jitter {
            rng: fastrand::Rng::new(),
        }
    }

    /// A source that yields the same sequence for the same `seed`.
    pub fn seeded(seed: u64) -> Jitter {
        Jitter {
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// A duration drawn uniformly from `0 ..= limit`, at nanosecond resolution.
    pub fn up_to(&mut self, limit: Duration) -> Duration {
        let nanos = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.u64(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_window_doubles_from_min_up_to_max() {
        let backoff = Backoff::new(100 * MS, 1000 * MS);
        let ceilings: Vec<_> = (1..=6).map(|n| backoff.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(backoff.ceiling(0), 100 * MS);
        assert_eq!(backoff.ceiling(u32::MAX), 1000 * MS);
        assert_eq!(backoff.bounds(1), (100 * MS, 200 * MS));
        assert_eq!(backoff.bounds(3), (100 * MS, 500 * MS));
        assert_eq!(backoff.bounds(4), (100 * MS, 900 * MS));
        assert_eq!(backoff.bounds(5), (100 * MS, 1000 * MS));
    }

    #[test]
    fn every_delay_lies_within_its_bounds() {
        let backoff = Backoff::new(50 * MS, 5000 * MS);
        for seed in 0..200 {
            let mut jitter = Jitter::seeded(seed);
            for attempt in 1..=40 {
                let delay = backoff.delay(attempt, &mut jitter);
                let (low, high) = backoff.bounds(attempt);
                assert!(
                    low <= delay && delay <= high,
                    "attempt {attempt}: {delay:?} outside {low:?}..={high:?}"
                );
            }
        }
    }

    #[test]
    fn the_jitter_spreads_delays_over_the_whole_window() {
        // Full jitter: over many draws the delays of one attempt cover the window evenly,
        // so clients that lost their server together do not come back together.
        let backoff = Backoff::new(100 * MS, 60_000 * MS);
        let mut jitter = Jitter::seeded(42);
        let draws: Vec<Duration> = (0..10_000).map(|_| backoff.delay(5, &mut jitter)).collect();
        let (low, high) = backoff.bounds(5);
        let mean = draws.iter().sum::<Duration>() / draws.len() as u32;
        let middle = (low + high) / 2;
        let tolerance = (high - low) / 20;
        assert!(
            mean.abs_diff(middle) < tolerance,
            "mean {mean:?}, middle {middle:?}"
        );
        let mut tenths = [0usize; 10];
        for d in &draws {
            let position = (*d - low).as_secs_f64() / (high - low).as_secs_f64();
            tenths[((position * 10.0) as usize).min(9)] += 1;
        }
        assert!(tenths.iter().all(|&n| n > 800), "{tenths:?}");
    }

    #[test]
    fn a_seed_pins_the_sequence() {
        let backoff = Backoff::default();
        let run = |seed| {
            let mut jitter = Jitter::seeded(seed);
            (1..=10)
                .map(|n| backoff.delay(n, &mut jitter))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn bad_bounds_are_repaired() {
        let backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(backoff, Backoff { min: MS, max: MS });
        let inverted = Backoff::new(2000 * MS, 10 * MS);
        assert_eq!(inverted.bounds(3), (2000 * MS, 2000 * MS));
        // A struct literal that breaks the rules still never yields a zero delay.
        let literal = Backoff {
            min: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(literal.delay(1, &mut Jitter::seeded(1)), MS);
    }
}
