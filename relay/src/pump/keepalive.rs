//! Keepalive bookkeeping for one connection: when to ping each leg, when a leg is dead, when
//! the connection has been idle too long. Pure logic over instants; the pump owns the timer.

use std::time::Duration;

use tokio::time::Instant;

/// Keepalive settings resolved from `[keepalive]`: `None` disables a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepalivePolicy {
    /// Ping a leg that has been quiet this long.
    pub ping_interval: Option<Duration>,
    /// A pinged leg that sends nothing for this long is dead.
    pub pong_timeout: Duration,
    /// Close a connection that carried no message for this long.
    pub idle_timeout: Option<Duration>,
}

/// What a leg's liveness check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegVerdict {
    /// Nothing to do until the instant given.
    Wait(Instant),
    /// Send a Ping now, then check again at the instant given.
    Ping(Instant),
    /// The peer did not answer a Ping within the pong timeout.
    Dead,
}

/// Liveness of one leg (client or backend): when we last heard from it and the ping in flight.
#[derive(Debug, Clone, Copy)]
pub struct LegLiveness {
    last_heard: Instant,
    ping_sent: Option<Instant>,
}

impl LegLiveness {
    /// A leg that was just heard from (its handshake finished at `now`).
    pub fn new(now: Instant) -> LegLiveness {
        LegLiveness {
            last_heard: now,
            ping_sent: None,
        }
    }

    /// Any frame at all from the peer proves it alive.
    #[inline]
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// Time since the ping in flight was sent, when its pong arrives at `now`.
    pub fn ping_rtt(&self, now: Instant) -> Option<Duration> {
        self.ping_sent
            .map(|sent| now.saturating_duration_since(sent))
    }

    /// Decides what to do with this leg at `now`.
    pub fn check(&mut self, now: Instant, policy: &KeepalivePolicy) -> LegVerdict {
        if let Some(sent) = self.ping_sent {
            if self.last_heard >= sent {
                self.ping_sent = None;
            } else if now >= sent + policy.pong_timeout {
                return LegVerdict::Dead;
            } else {
                return LegVerdict::Wait(sent + policy.pong_timeout);
            }
        }
        let Some(interval) = policy.ping_interval else {
            return LegVerdict::Wait(far_future(now));
        };
        let due = self.last_heard + interval;
        if now >= due {
            self.ping_sent = Some(now);
            LegVerdict::Ping(now + policy.pong_timeout)
        } else {
            LegVerdict::Wait(due)
        }
    }
}

/// An instant so far away that a timer set to it never fires in practice.
pub fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: KeepalivePolicy = KeepalivePolicy {
        ping_interval: Some(Duration::from_secs(20)),
        pong_timeout: Duration::from_secs(10),
        idle_timeout: None,
    };

    #[test]
    fn a_peer_that_answers_is_pinged_forever_and_never_dead() {
        let start = Instant::now();
        let mut leg = LegLiveness::new(start);
        let mut now = start;
        for _ in 0..100 {
            now += Duration::from_secs(20);
            assert_eq!(
                leg.check(now, &POLICY),
                LegVerdict::Ping(now + POLICY.pong_timeout)
            );
            now += Duration::from_millis(5);
            leg.heard(now);
            assert_eq!(
                leg.check(now, &POLICY),
                LegVerdict::Wait(now + Duration::from_secs(20))
            );
        }
    }

    #[test]
    fn a_silent_peer_is_dead_after_the_pong_timeout() {
        let start = Instant::now();
        let mut leg = LegLiveness::new(start);
        let ping_at = start + Duration::from_secs(20);
        assert!(matches!(leg.check(ping_at, &POLICY), LegVerdict::Ping(_)));
        assert_eq!(
            leg.check(ping_at + Duration::from_secs(9), &POLICY),
            LegVerdict::Wait(ping_at + Duration::from_secs(10))
        );
        assert_eq!(
            leg.check(ping_at + Duration::from_secs(10), &POLICY),
            LegVerdict::Dead
        );
    }

    #[test]
    fn traffic_postpones_pings() {
        let start = Instant::now();
        let mut leg = LegLiveness::new(start);
        leg.heard(start + Duration::from_secs(15));
        assert_eq!(
            leg.check(start + Duration::from_secs(20), &POLICY),
            LegVerdict::Wait(start + Duration::from_secs(35))
        );
    }

    #[test]
    fn disabled_pings_never_fire() {
        let policy = KeepalivePolicy {
            ping_interval: None,
            ..POLICY
        };
        let start = Instant::now();
        let mut leg = LegLiveness::new(start);
        assert!(matches!(
            leg.check(start + Duration::from_secs(3600), &policy),
            LegVerdict::Wait(_)
        ));
    }
}
