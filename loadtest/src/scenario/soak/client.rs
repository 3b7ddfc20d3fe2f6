//! One soak client's life: connect, send numbered messages and check their echoes, leave after
//! a random lifetime (the churn), come back after a pause, reconnect after anything it did not
//! ask for, and leave for good when the run ends. Each client is one task that owns its socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use super::ledger::{Counts, Echo, Ledger, Tag};
use crate::conn::{Connector, Ws};
use crate::stats::ErrorLog;

/// What every client of a run shares: the plan and where outcomes are counted.
pub(super) struct Shared {
    /// One message per connection this often (skipped while `window` are unanswered).
    pub interval: Duration,
    /// Messages in flight per connection at most.
    pub window: usize,
    /// Message size in bytes.
    pub size: usize,
    /// Mean time a client stays before leaving (exponentially distributed); zero: never.
    pub lifetime: Duration,
    /// Longest pause before a client that left comes back (uniform from a tenth of it).
    pub away: Duration,
    /// How long a leaving client waits for its messages in flight.
    pub drain_timeout: Duration,
    /// Run-wide counts.
    pub tally: Tally,
    /// Connections ended by someone else, by kind (`close-1012`, `eof`, ...).
    pub unexpected: ErrorLog,
    /// Failed connection attempts and broken sequences, by kind, with a first example.
    pub problems: ErrorLog,
}

/// Run-wide counters, bumped by every client.
#[derive(Default)]
pub(super) struct Tally {
    pub sent: AtomicU64,
    pub echoed: AtomicU64,
    pub lost: AtomicU64,
    pub out_of_order: AtomicU64,
    pub duplicates: AtomicU64,
    pub corrupt: AtomicU64,
    pub unexpected_closes: AtomicU64,
    /// Ticks skipped because the window was full.
    pub held_back: AtomicU64,
    pub connects: AtomicU64,
    pub failed_connects: AtomicU64,
    /// Clients that left by themselves (and came back, unless the run was ending).
    pub left: AtomicU64,
    /// Connections opened again after an unexpected close.
    pub reconnections: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Most connections open at once.
    pub peak_open: AtomicU64,
    /// Clients that have connected at least once.
    pub clients_seen: AtomicU64,
}

impl Tally {
    /// The counts the invariants are judged on.
    pub fn counts(&self) -> Counts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            sent: get(&self.sent),
            echoed: get(&self.echoed),
            lost: get(&self.lost),
            out_of_order: get(&self.out_of_order),
            duplicates: get(&self.duplicates),
            corrupt: get(&self.corrupt),
            unexpected_closes: get(&self.unexpected_closes),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// How a connection ended.
enum End {
    /// The client left on its own (churn); it comes back.
    Left,
    /// The run is over.
    Stopped,
    /// Someone else ended it; the client reconnects.
    Unexpected,
}

/// A route of the relay: its name in reports and how to connect to it.
#[derive(Clone)]
pub(super) struct Route {
    /// `per-client` or `mux`.
    pub name: &'static str,
    /// Opens connections to it.
    pub connector: Arc<Connector>,
}

/// Runs client `id` on `route` from `start` until `stop` turns true, then leaves cleanly.
pub(super) async fn run(
    id: u32,
    route: Route,
    shared: Arc<Shared>,
    start: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = fastrand::Rng::with_seed(u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let query = format!("client={id}");
    let mut generation = 0u32;
    let mut seen = false;
    if pause_until(start, &mut stop).await {
        return;
    }
    loop {
        let ws = match route.connector.connect(id as usize, Some(&query)).await {
            Ok(ws) => ws,
            Err(error) => {
                bump(&shared.tally.failed_connects);
                shared
                    .problems
                    .record(&format!("connect {}", error.kind()), &error);
                let retry = Duration::from_millis(rng.u64(200..1000));
                if pause_until(Instant::now() + retry, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        bump(&shared.tally.connects);
        if !seen {
            seen = true;
            bump(&shared.tally.clients_seen);
        }
        let open = shared.tally.open.fetch_add(1, Ordering::Relaxed) + 1;
        shared.tally.peak_open.fetch_max(open, Ordering::Relaxed);
        let lifetime = exponential(&mut rng, shared.lifetime);
        let end = Connection::new(ws, id, route.name, generation, &shared)
            .run(lifetime, &mut rng, &mut stop)
            .await;
        shared.tally.open.fetch_sub(1, Ordering::Relaxed);
        generation = generation.wrapping_add(1);
        let pause = match end {
            End::Stopped => return,
            End::Left => {
                bump(&shared.tally.left);
                let away = shared.away.as_millis() as u64;
                Duration::from_millis(rng.u64(away / 10..=away.max(1)))
            }
            End::Unexpected => {
                bump(&shared.tally.reconnections);
                Duration::from_millis(rng.u64(50..500))
            }
        };
        if pause_until(Instant::now() + pause, &mut stop).await {
            return;
        }
    }
}

/// Sleeps until `at`; true if the run ended first.
async fn pause_until(at: Instant, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep_until(at) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// An exponentially distributed duration of mean `mean` (memoryless leaving); `None` for a
/// zero mean (never leave).
fn exponential(rng: &mut fastrand::Rng, mean: Duration) -> Option<Duration> {
    if mean.is_zero() {
        return None;
    }
    // 1 - f64() is in (0, 1], so the logarithm is finite.
    Some(mean.mul_f64(-(1.0 - rng.f64()).ln()))
}

/// One connection of a client and its ledger.
struct Connection<'a> {
    ws: Ws,
    id: u32,
    route: &'static str,
    generation: u32,
    ledger: Ledger,
    shared: &'a Shared,
}

impl<'a> Connection<'a> {
    fn new(ws: Ws, id: u32, route: &'static str, generation: u32, shared: &'a Shared) -> Self {
        Connection {
            ws,
            id,
            route,
            generation,
            ledger: Ledger::default(),
            shared,
        }
    }

    /// Sends and checks until the client leaves (after `lifetime`), the run stops, or the
    /// connection is ended by someone else.
    async fn run(
        mut self,
        lifetime: Option<Duration>,
        rng: &mut fastrand::Rng,
        stop: &mut watch::Receiver<bool>,
    ) -> End {
        // Clients tick out of phase, so the load is even rather than in bursts.
        let first = Instant::now() + self.shared.interval.mul_f64(rng.f64());
        let mut tick = tokio::time::interval_at(first, self.shared.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let leave = lifetime.map(|l| Instant::now() + l);
        let end = loop {
            tokio::select! {
                message = self.ws.next() => {
                    if let Err(kind) = self.receive(message) {
                        return self.ended_by_peer(kind);
                    }
                }
                _ = tick.tick() => {
                    if let Err(kind) = self.send_next().await {
                        return self.ended_by_peer(kind);
                    }
                }
                _ = sleep_until_or_never(leave) => break End::Left,
                _ = stop.changed() => break End::Stopped,
            }
        };
        self.leave(end).await
    }

    /// Sends the next message, unless the window is full.
    async fn send_next(&mut self) -> Result<(), String> {
        if self.ledger.in_flight() >= self.shared.window {
            bump(&self.shared.tally.held_back);
            return Ok(());
        }
        let tag = Tag {
            client: self.id,
            generation: self.generation,
            seq: self.ledger.send(),
        };
        bump(&self.shared.tally.sent);
        self.ws
            .send(Message::binary(tag.encode(self.shared.size)))
            .await
            .map_err(|error| format!("send: {error}"))
    }

    /// Books what the connection delivered; `Err(kind)` when it ended.
    fn receive(
        &mut self,
        message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), String> {
        let bytes = match message {
            Some(Ok(Message::Binary(bytes))) => bytes,
            Some(Ok(Message::Close(frame))) => {
                return Err(match frame {
                    Some(frame) => format!("close-{}", u16::from(frame.code)),
                    None => "close-no-status".to_owned(),
                });
            }
            Some(Ok(Message::Text(text))) => {
                bump(&self.shared.tally.corrupt);
                self.shared.problems.record(
                    "corrupt",
                    format!("{}: a text message {:?}", self.who(), &text[..]),
                );
                return Ok(());
            }
            Some(Ok(_)) => return Ok(()),
            Some(Err(error)) => return Err(format!("receive: {error}")),
            None => return Err("eof".to_owned()),
        };
        let tally = &self.shared.tally;
        let tag =
            Tag::decode(&bytes).filter(|t| t.client == self.id && t.generation == self.generation);
        let Some(tag) = tag else {
            bump(&tally.corrupt);
            self.shared.problems.record(
                "corrupt",
                format!("{}: an echo tagged {:?}", self.who(), Tag::decode(&bytes)),
            );
            return Ok(());
        };
        match self.ledger.echo(tag.seq) {
            Echo::InOrder => bump(&tally.echoed),
            Echo::Duplicate => bump(&tally.duplicates),
            Echo::OutOfOrder { expected } => {
                bump(&tally.out_of_order);
                self.shared.problems.record(
                    "out-of-order",
                    format!(
                        "{}: seq {} came back before {expected}",
                        self.who(),
                        tag.seq
                    ),
                );
            }
            Echo::Unsent => {
                bump(&tally.corrupt);
                self.shared.problems.record(
                    "corrupt",
                    format!("{}: seq {} was never sent", self.who(), tag.seq),
                );
            }
        }
        Ok(())
    }

    /// Counts a connection someone else ended; its messages in flight are lost.
    fn ended_by_peer(self, kind: String) -> End {
        bump(&self.shared.tally.unexpected_closes);
        self.shared.unexpected.record(
            kind.split(':').next().unwrap_or("closed"),
            format!(
                "{}: {kind}, {} messages in flight",
                self.who(),
                self.ledger.in_flight()
            ),
        );
        self.count_lost();
        End::Unexpected
    }

    /// The connection in messages: `client 7 (mux) connection 3`.
    fn who(&self) -> String {
        format!(
            "client {} ({}) connection {}",
            self.id, self.route, self.generation
        )
    }

    fn count_lost(&self) {
        let lost = self.ledger.in_flight() as u64;
        if lost > 0 {
            self.shared.tally.lost.fetch_add(lost, Ordering::Relaxed);
            self.shared.problems.record_n(
                "lost",
                lost,
                format!(
                    "{}: {lost} messages never came back (seq {:?})",
                    self.who(),
                    self.ledger.unanswered()
                ),
            );
        }
    }

    /// Waits (up to the drain timeout) for the messages in flight, then closes with 1000.
    async fn leave(mut self, end: End) -> End {
        let deadline = Instant::now() + self.shared.drain_timeout;
        while self.ledger.in_flight() > 0 {
            let Ok(message) = tokio::time::timeout_at(deadline, self.ws.next()).await else {
                break;
            };
            if let Err(kind) = self.receive(message) {
                return match self.ended_by_peer(kind) {
                    // The run is over either way: the client doesn't come back.
                    _ if matches!(end, End::Stopped) => End::Stopped,
                    unexpected => unexpected,
                };
            }
        }
        self.count_lost();
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            self.ws.close(None).await.ok()?;
            while let Some(Ok(_)) = self.ws.next().await {}
            Some(())
        })
        .await;
        if !matches!(closed, Ok(Some(()))) {
            self.shared.problems.record(
                "close-not-answered",
                format!("{}: the relay did not answer its Close", self.who()),
            );
        }
        end
    }
}

async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_average_their_mean_and_zero_means_forever() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mean = Duration::from_secs(10);
        let total: f64 = (0..20_000)
            .map(|_| exponential(&mut rng, mean).unwrap().as_secs_f64())
            .sum();
        let average = total / 20_000.0;
        assert!((9.0..11.0).contains(&average), "{average}");
        assert_eq!(exponential(&mut rng, Duration::ZERO), None);
    }
}
