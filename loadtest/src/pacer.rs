//! The open-loop schedule: message `k` of a run is *intended* to leave at
//! `start + k / rate`, on connection `k % connections`, whatever happened to the messages
//! before it.
//!
//! The pacer is an OS thread, not a tokio timer: tokio's timers tick in milliseconds, which
//! would add up to a millisecond of made-up latency to every message on a loopback path whose
//! real latency is tens of microseconds. The thread sleeps with the kernel's high-resolution
//! timers and hands each connection its intended send times through a channel; the connection
//! stamps the intended time into the message. A connection that can't keep up (its socket is
//! full, its task is starved) sends late, and the lateness shows in the latency: that is the
//! correction for coordinated omission.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::payload::Clock;

/// A running schedule; it ends by itself at `end_ns` (or when stopped) and closes every
/// connection's channel.
pub struct Pacer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Pacer {
    /// Starts issuing `rate` ticks per second in total, from `start_ns` to `end_ns` (clock
    /// nanoseconds), round-robin over `connections`.
    pub fn start(
        clock: Clock,
        rate: f64,
        start_ns: u64,
        end_ns: u64,
        connections: Vec<mpsc::UnboundedSender<u64>>,
    ) -> Pacer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || run(clock, rate, start_ns, end_ns, connections, &flag))
            .expect("spawn the pacer thread");
        Pacer {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops early (if still running) and returns the number of ticks issued.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The tick `k` of a schedule, in clock nanoseconds.
pub fn intended_ns(start_ns: u64, rate: f64, k: u64) -> u64 {
    start_ns + (k as f64 * 1e9 / rate) as u64
}

fn run(
    clock: Clock,
    rate: f64,
    start_ns: u64,
    end_ns: u64,
    connections: Vec<mpsc::UnboundedSender<u64>>,
    stop: &AtomicBool,
) -> u64 {
    if connections.is_empty() || rate <= 0.0 {
        return 0;
    }
    let mut k = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            return k;
        }
        let now = clock.now_ns();
        loop {
            let due = intended_ns(start_ns, rate, k);
            if due > now || due >= end_ns {
                break;
            }
            let _ = connections[(k % connections.len() as u64) as usize].send(due);
            k += 1;
        }
        let next = intended_ns(start_ns, rate, k);
        if next >= end_ns {
            return k;
        }
        // Never sleep long, so a stop is noticed within 50 ms.
        let wait = (next - clock.now_ns().min(next)).min(50_000_000);
        if wait > 0 {
            std::thread::sleep(Duration::from_nanos(wait));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_the_schedule_round_robin() {
        let clock = Clock::start();
        let (tx_a, mut rx_a) = mpsc::unbounded_channel();
        let (tx_b, mut rx_b) = mpsc::unbounded_channel();
        let start = clock.now_ns() + 1_000_000;
        let end = start + 100_000_000;
        let pacer = Pacer::start(clock, 1000.0, start, end, vec![tx_a, tx_b]);
        let issued = pacer.finish_after_end(end, &clock);
        assert_eq!(issued, 100);
        let mut a = Vec::new();
        while let Ok(t) = rx_a.try_recv() {
            a.push(t);
        }
        let mut b = 0;
        while rx_b.try_recv().is_ok() {
            b += 1;
        }
        assert_eq!((a.len(), b), (50, 50));
        assert_eq!(a[0], start);
        assert_eq!(a[1], start + 2_000_000);
    }

    impl Pacer {
        fn finish_after_end(self, end_ns: u64, clock: &Clock) -> u64 {
            while clock.now_ns() < end_ns + 20_000_000 {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.finish()
        }
    }
}
