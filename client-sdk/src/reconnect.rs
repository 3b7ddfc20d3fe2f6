//! The reconnect machinery [`Client`](crate::Client) and [`MuxClient`](crate::MuxClient)
//! share: the [`Reconnect`] policy (backoff, attempt limit, which server close codes end the
//! client) and the retry loop that dials until it gets a connection, gives up, or meets an
//! error that retrying cannot fix.
//!
//! Attempt numbering: after a connection is lost (or the first dial of
//! [`ClientBuilder::start`](crate::ClientBuilder::start) failed), attempt 1 waits
//! `backoff.delay(1)` and dials, attempt 2 waits `backoff.delay(2)` and dials, and so on. A
//! connection that opens resets the count.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::{Backoff, Jitter};
use crate::dial::ConnectError;

/// When and how a client reconnects.
///
/// ```
/// use std::time::Duration;
/// use wsrelay_client::Reconnect;
///
/// // Retry forever, between 200 ms and 10 s apart.
/// let policy = Reconnect::default().backoff(Duration::from_millis(200), Duration::from_secs(10));
/// // Give up after 5 attempts in a row.
/// let limited = Reconnect::default().max_attempts(Some(5));
/// // Never reconnect.
/// let off = Reconnect::never();
/// assert!(policy.reconnects_after_close(1012) && !policy.reconnects_after_close(1000));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconnect {
    /// The delay before each attempt.
    pub backoff: Backoff,
    /// Attempts in a row before giving up; `None` retries forever, `Some(0)` never
    /// reconnects.
    pub max_attempts: Option<u32>,
    /// Close codes from the server after which the client stops instead of reconnecting.
    /// The default is 1000 (normal closure), 1005 (a close frame with no code, which is how
    /// some servers say a normal goodbye) and 1008 (policy violation: reconnecting would be
    /// refused again). Every other code, such as 1001 (going away), 1011 (server error),
    /// 1012 (service restart), 1013 (try again later) or an application's 4xxx, reconnects,
    /// and so does a connection lost without a close frame.
    pub stop_codes: Vec<u16>,
    /// A seed for the jitter, to make every delay predictable (tests); `None` seeds it
    /// randomly per client.
    pub seed: Option<u64>,
}

impl Default for Reconnect {
    /// Forever, with [`Backoff::default`] (500 ms to 30 s), stopping on 1000, 1005 and 1008.
    fn default() -> Reconnect {
        Reconnect {
            backoff: Backoff::default(),
            max_attempts: None,
            stop_codes: vec![1000, 1005, 1008],
            seed: None,
        }
    }
}

impl Reconnect {
    /// A policy that never reconnects: the first lost connection ends the client.
    pub fn never() -> Reconnect {
        Reconnect::default().max_attempts(Some(0))
    }

    /// Sets the backoff bounds (see [`Backoff::new`]).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Reconnect {
        self.backoff = Backoff::new(min, max);
        self
    }

    /// Sets how many attempts in a row may fail before the client gives up (`None`: never).
    pub fn max_attempts(mut self, attempts: Option<u32>) -> Reconnect {
        self.max_attempts = attempts;
        self
    }

    /// Replaces the close codes that end the client instead of reconnecting.
    pub fn stop_codes(mut self, codes: impl IntoIterator<Item = u16>) -> Reconnect {
        self.stop_codes = codes.into_iter().collect();
        self
    }

    /// Pins the jitter's random sequence.
    pub fn seed(mut self, seed: u64) -> Reconnect {
        self.seed = Some(seed);
        self
    }

    /// True unless reconnecting is off ([`Reconnect::never`]).
    pub fn is_enabled(&self) -> bool {
        self.max_attempts != Some(0)
    }

    /// Whether a server's close with `code` is followed by a reconnect.
    pub fn reconnects_after_close(&self, code: u16) -> bool {
        self.is_enabled() && !self.stop_codes.contains(&code)
    }
}

/// The state of one client's retrying: the policy, its jitter, and the failures in a row.
#[derive(Debug)]
pub(crate) struct Retrier {
    policy: Reconnect,
    jitter: Jitter,
    /// Attempts made since the last connection opened.
    attempts: u32,
}

impl Retrier {
    pub fn new(policy: Reconnect) -> Retrier {
        let jitter = policy.seed.map_or_else(Jitter::new, Jitter::seeded);
        Retrier {
            policy,
            jitter,
            attempts: 0,
        }
    }

    pub fn policy(&self) -> &Reconnect {
        &self.policy
    }

    /// The next attempt's number and delay, or `None` when the policy allows no more.
    fn next_attempt(&mut self) -> Option<(u32, Duration)> {
        if self
            .policy
            .max_attempts
            .is_some_and(|max| self.attempts >= max)
        {
            return None;
        }
        self.attempts += 1;
        let delay = self.policy.backoff.delay(self.attempts, &mut self.jitter);
        Some((self.attempts, delay))
    }

    /// A connection opened: the next loss starts again from attempt 1.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// One retry, as the loop reports it before waiting.
#[derive(Debug, Clone)]
pub(crate) struct Retry {
    /// The attempt about to be made (from 1).
    pub attempt: u32,
    /// How long the loop waits before it.
    pub delay: Duration,
    /// Why the previous attempt failed (`None` before the first attempt after a lost
    /// connection).
    pub error: Option<Arc<ConnectError>>,
}

/// Why the retry loop stopped without a connection.
#[derive(Debug, Clone)]
pub(crate) enum GiveUp {
    /// The last attempt failed in a way retrying cannot fix.
    Permanent(Arc<ConnectError>),
    /// The policy's attempts ran out (0 when reconnecting is off).
    Exhausted {
        attempts: u32,
        last_error: Option<Arc<ConnectError>>,
    },
}

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GiveUp::Permanent(error) => write!(f, "{error} (not retried)"),
            GiveUp::Exhausted {
                attempts: 0,
                last_error: _,
            } => f.write_str("reconnecting is off"),
            GiveUp::Exhausted {
                attempts,
                last_error: Some(error),
            } => write!(f, "gave up after {attempts} attempts: {error}"),
            GiveUp::Exhausted {
                attempts,
                last_error: None,
            } => write!(f, "gave up after {attempts} attempts"),
        }
    }
}

/// Dials until a connection opens: waits the backoff delay before each attempt, reports
/// each retry through `report` (awaited, so a caller may deliver it through a bounded
/// channel), and stops on a permanent error or when the attempts run out.
///
/// `last_error` is why the previous dial failed, if the caller made one (the first dial of a
/// background start is made at once, without a delay).
pub(crate) async fn redial<T, D, DF, R, RF>(
    retrier: &mut Retrier,
    mut last_error: Option<Arc<ConnectError>>,
    mut dial: D,
    mut report: R,
) -> Result<T, GiveUp>
where
    D: FnMut() -> DF,
    DF: Future<Output = Result<T, ConnectError>>,
    R: FnMut(Retry) -> RF,
    RF: Future<Output = ()>,
{
    loop {
        if let Some(error) = last_error.as_ref().filter(|e| e.is_permanent()) {
            return Err(GiveUp::Permanent(Arc::clone(error)));
        }
        let Some((attempt, mut delay)) = retrier.next_attempt() else {
            return Err(GiveUp::Exhausted {
                attempts: retrier.attempts,
                last_error,
            });
        };
        // A server that said when to come back (503 + Retry-After) is believed, up to `max`.
        if let Some(after) = last_error.as_ref().and_then(|e| e.retry_after()) {
            delay = delay.max(after.min(retrier.policy.backoff.max));
        }
        report(Retry {
            attempt,
            delay,
            error: last_error.clone(),
        })
        .await;
        tokio::time::sleep(delay).await;
        match dial().await {
            Ok(connection) => {
                retrier.reset();
                return Ok(connection);
            }
            Err(error) => last_error = Some(Arc::new(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(n: u32) -> ConnectError {
        ConnectError::Tcp {
            url: "ws://127.0.0.1:1/".into(),
            addr: "127.0.0.1:1".into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, format!("#{n}")),
        }
    }

    #[test]
    fn close_codes_decide_whether_to_reconnect() {
        let policy = Reconnect::default();
        for code in [1001, 1006, 1011, 1012, 1013, 4000] {
            assert!(policy.reconnects_after_close(code), "{code}");
        }
        for code in [1000, 1005, 1008] {
            assert!(!policy.reconnects_after_close(code), "{code}");
        }
        assert!(!Reconnect::never().reconnects_after_close(1012));
        let custom = Reconnect::default().stop_codes([4001]);
        assert!(custom.reconnects_after_close(1000) && !custom.reconnects_after_close(4001));
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_waits_the_seeded_delays_and_gives_up_after_max_attempts() {
        let policy = Reconnect::default()
            .backoff(Duration::from_millis(100), Duration::from_secs(2))
            .max_attempts(Some(6))
            .seed(3);
        let mut expected = Jitter::seeded(3);
        let expected: Vec<Duration> = (1..=6)
            .map(|n| policy.backoff.delay(n, &mut expected))
            .collect();
        let mut retrier = Retrier::new(policy);
        let mut reports = Vec::new();
        let mut dials = 0;
        let start = tokio::time::Instant::now();
        let result: Result<(), GiveUp> = redial(
            &mut retrier,
            None,
            || {
                dials += 1;
                std::future::ready(Err(refused(dials)))
            },
            |retry| {
                reports.push((retry.attempt, retry.delay, tokio::time::Instant::now()));
                std::future::ready(())
            },
        )
        .await;
        assert_eq!(dials, 6);
        let attempts: Vec<u32> = reports.iter().map(|r| r.0).collect();
        assert_eq!(attempts, [1, 2, 3, 4, 5, 6]);
        let delays: Vec<Duration> = reports.iter().map(|r| r.1).collect();
        assert_eq!(delays, expected);
        // Each attempt was reported after the previous one's full delay had passed (tokio's
        // timers round up to the next millisecond).
        let tick = Duration::from_millis(1);
        for pair in reports.windows(2) {
            let gap = pair[1].2 - pair[0].2;
            assert!(
                pair[0].1 <= gap && gap <= pair[0].1 + tick,
                "{gap:?} {:?}",
                pair[0].1
            );
        }
        let total: Duration = expected.iter().sum();
        assert!(total <= start.elapsed() && start.elapsed() <= total + 6 * tick);
        match result {
            Err(GiveUp::Exhausted {
                attempts: 6,
                last_error: Some(error),
            }) => assert!(error.to_string().ends_with("#6"), "{error}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_stops_at_once_and_success_resets_the_count() {
        let mut retrier = Retrier::new(Reconnect::default().seed(1));
        let refusal = ConnectError::Http {
            url: "ws://x/".into(),
            status: 403,
            retry_after: None,
            body: String::new(),
        };
        let mut dials = 0;
        let result: Result<(), GiveUp> = redial(
            &mut retrier,
            Some(Arc::new(refusal)),
            || {
                dials += 1;
                std::future::ready(Ok(()))
            },
            |_| std::future::ready(()),
        )
        .await;
        assert!(matches!(result, Err(GiveUp::Permanent(_))));
        assert_eq!(dials, 0);

        let mut failures = 2;
        let result = redial(
            &mut retrier,
            None,
            || {
                failures -= 1;
                std::future::ready(if failures < 0 { Ok(7) } else { Err(refused(0)) })
            },
            |_| std::future::ready(()),
        )
        .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(retrier.attempts, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_raises_the_delay_up_to_max() {
        let policy =
            Reconnect::default().backoff(Duration::from_millis(10), Duration::from_secs(3));
        let mut retrier = Retrier::new(policy);
        let busy = |after| ConnectError::Http {
            url: "ws://x/".into(),
            status: 503,
            retry_after: Some(Duration::from_secs(after)),
            body: String::new(),
        };
        let mut delays = Vec::new();
        let mut dials = 0;
        let _: Result<(), GiveUp> = redial(
            &mut retrier,
            Some(Arc::new(busy(2))),
            || {
                dials += 1;
                std::future::ready(if dials == 1 { Err(busy(60)) } else { Ok(()) })
            },
            |retry| {
                delays.push(retry.delay);
                std::future::ready(())
            },
        )
        .await;
        assert_eq!(delays, [Duration::from_secs(2), Duration::from_secs(3)]);
    }
}
