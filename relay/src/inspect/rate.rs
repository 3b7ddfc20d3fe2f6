//! `rate:N`: at most N messages per second from the client (a token bucket holding one second's
//! worth); above it the client is closed with 1008. `rate` alone takes
//! `[limits] max_messages_per_second`, which also applies it to every route when set.

use std::time::Instant;

use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

use super::{ConnectionInfo, Direction, FrameContext, Inspector, InspectorFactory, Verdict};

/// A per-client token bucket over client messages.
pub struct RateLimit {
    per_second: f64,
    tokens: f64,
    refilled: Instant,
}

impl RateLimit {
    /// A full bucket allowing `per_second` messages a second.
    pub fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            refilled: Instant::now(),
        }
    }

    /// Takes a token at `now`; false when the bucket is empty.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Inspector for RateLimit {
    fn on_message(&mut self, context: &FrameContext<'_>, _: &mut Message) -> Verdict {
        if context.direction == Direction::BackendToClient || self.take(Instant::now()) {
            Verdict::Forward
        } else {
            Verdict::Close(
                CloseCode::Policy,
                format!("more than {} messages per second", self.per_second),
            )
        }
    }
}

/// Makes [`RateLimit`]s; `default_rate` serves `rate` without an argument.
pub(crate) struct RateLimitFactory;

impl InspectorFactory for RateLimitFactory {
    fn create(&self, _: &ConnectionInfo, argument: Option<&str>) -> Box<dyn Inspector> {
        let per_second = argument.and_then(|a| a.parse().ok()).unwrap_or(u32::MAX);
        Box::new(RateLimit::new(per_second))
    }

    fn check_argument(&self, argument: Option<&str>) -> Result<(), String> {
        match argument.map(str::parse::<u32>) {
            Some(Ok(n)) if n > 0 => Ok(()),
            _ => Err("expected rate:N with N messages per second above 0".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_rate_and_refills() {
        let start = Instant::now();
        let mut bucket = RateLimit::new(10);
        for _ in 0..10 {
            assert!(bucket.take(start));
        }
        assert!(!bucket.take(start));
        assert!(bucket.take(start + Duration::from_millis(100)));
        assert!(!bucket.take(start + Duration::from_millis(100)));
        // Idle time refills only up to one second's worth.
        let later = start + Duration::from_secs(60);
        for _ in 0..10 {
            assert!(bucket.take(later));
        }
        assert!(!bucket.take(later));
    }
}
