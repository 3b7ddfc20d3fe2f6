//! Hands the heap that glibc's malloc keeps back to the system once many sessions have ended,
//! or once a burst of new sessions is over.
//!
//! glibc keeps what a thread frees in that thread's arena for later allocations and, by itself,
//! returns only the free top of each heap, which a few live allocations pin: a relay that had
//! held 10,000 clients kept 406 MiB after they left, though almost none of it was in use.
//! `malloc_trim(0)` returns every free page of every arena. It walks the whole heap, locking
//! each arena in turn, so it runs on a blocking thread, and only after many sessions ended
//! (see [`TrimPolicy`]): freed memory that new sessions are about to reuse is not worth a walk.
//! A burst of connects frees memory too: each handshake in flight holds some 40 KiB (hyper's
//! buffers on both sides, the dial) that its session gives back once upgraded, so a burst 256
//! handshakes wide leaves about 10 MiB free behind the sessions it opened.
//! docs/operations.md ("Memory") has the figures.

use std::time::Duration;

use wsrelay::RelayHandle;

/// How often the open sessions are counted: a quarter second, so a burst's memory goes back
/// soon after it ends; a count is a few loads.
const TICK: Duration = Duration::from_millis(250);

/// Fewest ended (or newly opened) sessions worth a trim, unless none is left: each leaves some
/// 30-60 KiB free, so fewer than this keep 2 MiB at most, and a trim of a heap that small
/// takes a fraction of a millisecond (0.15-0.35 ms after a burst of 50 connects, which gave
/// back 0.7-1 MiB of the 2-3 MiB the burst had grown the heap by).
const MIN_ENDED: usize = 32;

/// Decides when to trim from the number of open sessions, sampled every [`TICK`]:
/// - once the sessions that ended since the last trim are a quarter of the most that were open
///   since then (and at least [`MIN_ENDED`]), or once every session has ended;
/// - once a burst is over: the count stopped growing after it grew by a quarter of what is
///   open now (and at least [`MIN_ENDED`]) since its lowest point after the last trim.
///
/// A relay whose clients come and go at a steady rate never trims: the memory one session
/// frees, the next one takes.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    /// The most sessions open since the last trim.
    high: usize,
    /// The fewest open since the last trim.
    low: usize,
    /// The previous sample.
    last: usize,
}

impl TrimPolicy {
    /// Takes the sessions open now; true when the heap should be trimmed now.
    pub fn observe(&mut self, open: usize) -> bool {
        self.high = self.high.max(open);
        self.low = self.low.min(open);
        let ended = self.high - open;
        let after_ends = ended > 0 && (open == 0 || (ended >= MIN_ENDED && ended * 4 >= self.high));
        let opened = open - self.low;
        let burst_over = open <= self.last && opened >= MIN_ENDED && opened * 4 >= open;
        self.last = open;
        let trim = after_ends || burst_over;
        if trim {
            self.high = open;
            self.low = open;
        }
        trim
    }
}

/// Counts `relay`'s open sessions every [`TICK`] and trims the heap when [`TrimPolicy`] says
/// so; never returns (drop it to stop). Where the allocator is not glibc's there is nothing to
/// trim, and it only waits.
pub async fn watch(relay: &RelayHandle) {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return std::future::pending().await;
    }
    let mut policy = TrimPolicy::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let open = relay.open_sessions();
        if policy.observe(open) {
            // A trim of a large heap takes milliseconds: not on a worker thread.
            if let Ok(trimmed) = tokio::task::spawn_blocking(heap::trim).await {
                tracing::debug!(
                    open,
                    rss_before_kib = trimmed.rss_before_kib,
                    rss_after_kib = trimmed.rss_after_kib,
                    took_us = trimmed.took.as_micros() as u64,
                    "heap trimmed"
                );
            }
        }
    }
}

/// What one trim did.
#[derive(Debug)]
struct Trimmed {
    rss_before_kib: u64,
    rss_after_kib: u64,
    took: Duration,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod heap {
    use std::time::Instant;

    use super::Trimmed;

    /// Returns every free page of glibc's arenas to the system.
    pub fn trim() -> Trimmed {
        let rss_before_kib = rss_kib();
        let started = Instant::now();
        // SAFETY: malloc_trim takes each arena's lock itself and changes nothing but the
        // allocator's own state; any thread may call it at any time.
        unsafe { libc::malloc_trim(0) };
        let took = started.elapsed();
        Trimmed {
            rss_before_kib,
            rss_after_kib: rss_kib(),
            took,
        }
    }

    /// The process's resident set (0 if /proc can't say), for the log line.
    fn rss_kib() -> u64 {
        let resident_pages = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        // SAFETY: sysconf reads a constant of the system; it has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        resident_pages * u64::try_from(page).unwrap_or(4096) / 1024
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod heap {
    use super::Trimmed;

    /// Never called: [`super::watch`] does not trim where the allocator is not glibc's.
    pub fn trim() -> Trimmed {
        Trimmed {
            rss_before_kib: 0,
            rss_after_kib: 0,
            took: std::time::Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trims(samples: &[usize]) -> Vec<usize> {
        let mut policy = TrimPolicy::default();
        samples
            .iter()
            .copied()
            .filter(|&open| policy.observe(open))
            .collect()
    }

    #[test]
    fn steady_churn_never_trims() {
        // The ramp to 9,900 trims once it is over; the churn after it never does.
        let churn = (0..600).map(|i| 9_800 + (i * 37) % 200);
        let samples: Vec<usize> = [9_900, 9_900].into_iter().chain(churn).collect();
        assert_eq!(trims(&samples), vec![9_900]);
    }

    #[test]
    fn a_quarter_ended_trims_and_the_next_quarter_counts_from_there() {
        assert_eq!(
            trims(&[10_000, 10_000, 9_000, 7_501, 7_500, 7_000, 5_625]),
            vec![10_000, 7_500, 5_625]
        );
    }

    #[test]
    fn growth_after_a_trim_is_a_burst_of_its_own() {
        assert_eq!(
            trims(&[10_000, 10_000, 7_000, 20_000, 21_000, 17_000, 15_000]),
            vec![10_000, 7_000, 17_000]
        );
    }

    #[test]
    fn few_ended_sessions_do_not_trim_unless_none_is_left() {
        assert_eq!(trims(&[40, 20, 15, 16]), Vec::<usize>::new());
        assert_eq!(trims(&[40, 20, 0, 0, 0]), vec![0]);
        assert_eq!(trims(&[1, 0, 0, 3, 0]), vec![0, 0]);
    }

    #[test]
    fn a_burst_of_connects_trims_once_it_stops_growing() {
        assert_eq!(
            trims(&[0, 4_000, 9_000, 9_000, 9_000, 9_001, 9_000]),
            vec![9_000]
        );
    }

    #[test]
    fn a_second_burst_counts_from_the_first() {
        assert_eq!(
            trims(&[0, 8_000, 8_000, 9_000, 9_000, 12_000, 12_000]),
            vec![8_000, 12_000]
        );
    }

    #[test]
    fn a_small_burst_on_many_open_sessions_does_not_trim() {
        assert_eq!(trims(&[10_000, 10_000, 10_300, 10_300]), vec![10_000]);
    }

    #[test]
    fn an_idle_relay_never_trims() {
        assert_eq!(trims(&[0, 0, 0]), Vec::<usize>::new());
    }
}
