//! `fanout`: chat rooms. `--connections` clients join rooms of `--room-size` (through the
//! chat protocol of [`crate::backend`]: `join`, then `say`, answered by a `said` broadcast to
//! every member, the sender included). Says leave on an open-loop schedule of `--rate` per
//! second in total; each carries its intended send time, so the delivery latency (say ->
//! each member's `said`) is corrected for coordinated omission as in `rate`.
//!
//! Every client's URL carries `?room=NAME`, so a relay can hash a room's members onto one
//! backend (`hash_key = "query:room"`) when there are several.
//!
//! Counts: each say must reach every member of its room; a member that misses any is short by
//! that many `undelivered` errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{CommonOpts, Measurement, MemoryFigures, RunTarget, Schedule, connect_all, driver};
use crate::conn::Ws;
use crate::monitor::Rate;
use crate::pacer::Pacer;
use crate::payload::{self, Clock, Header};
use crate::stats::{Counters, ErrorLog, LatencyRecorder};

/// Options of `fanout`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct FanoutOpts {
    /// Members per room (the last room may be smaller).
    #[arg(long, short = 'k', default_value_t = 10)]
    pub room_size: usize,
    /// Says per second, in total over all clients; deliveries are this times the room size.
    #[arg(long, short = 'r', default_value_t = 200.0)]
    pub rate: f64,
}

/// What every member of a room shares.
struct Room {
    /// Members that joined.
    members: u64,
    /// Says sent into the room so far.
    sent: AtomicU64,
    /// Members still sending.
    senders_left: AtomicUsize,
    /// Woken when the last sender finishes.
    done: Notify,
}

/// The events a chat client receives.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default, borrow)]
    text: Option<&'a str>,
}

/// A room name unique to this run, so rounds against the same server never share a room.
fn room_name(run: u64, room: usize) -> String {
    format!("r{run:x}-{room}")
}

/// Runs `fanout` against `target`.
pub async fn run(common: &CommonOpts, opts: &FanoutOpts, target: &RunTarget) -> Measurement {
    let room_size = opts.room_size.max(1);
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let counters = Arc::new(Counters::default());
    let errors = ErrorLog::default();
    let handshake = LatencyRecorder::default();
    let latency = LatencyRecorder::default();
    let send_lag = LatencyRecorder::default();
    let before = target.proxy_sample();

    let slots = connect_all(
        &target.connector,
        common.connections,
        common.connect_concurrency,
        |i| Some(format!("room={}", room_name(run_id, i / room_size))),
        &errors,
        &counters,
        &handshake,
    )
    .await;

    // Join the rooms, every member confirmed before anyone speaks.
    let mut joins = JoinSet::new();
    for (index, slot) in slots.into_iter().enumerate() {
        let Some(ws) = slot else { continue };
        let room = room_name(run_id, index / room_size);
        let timeout = common.connect_timeout;
        joins.spawn(async move { (index, join(ws, &room, timeout).await) });
    }
    let mut members: BTreeMap<usize, Ws> = BTreeMap::new();
    while let Some(joined) = joins.join_next().await {
        match joined {
            Ok((index, Ok(ws))) => {
                members.insert(index, ws);
            }
            Ok((index, Err(reason))) => errors.record("join", format!("client {index}: {reason}")),
            Err(error) => errors.record("task", error),
        }
    }
    let mut sizes: BTreeMap<usize, usize> = BTreeMap::new();
    for index in members.keys() {
        *sizes.entry(index / room_size).or_default() += 1;
    }
    let rooms: BTreeMap<usize, Arc<Room>> = sizes
        .into_iter()
        .map(|(room, count)| {
            let state = Room {
                members: count as u64,
                sent: AtomicU64::new(0),
                senders_left: AtomicUsize::new(count),
                done: Notify::new(),
            };
            (room, Arc::new(state))
        })
        .collect();

    let schedule = Schedule::new(common, Duration::from_millis(20));
    let Schedule {
        clock,
        start,
        drain_until,
        ..
    } = schedule;
    let expected = common.warmup + common.duration;
    let monitor = target.monitor(expected, Rate::Received, &counters, &errors);
    let window = schedule.window_ns();
    let mut ticks = Vec::new();
    let mut tasks = JoinSet::new();
    let connected = members.len();
    for (index, ws) in members {
        let (tx, rx) = mpsc::unbounded_channel();
        ticks.push(tx);
        let member = Member {
            index,
            room: rooms[&(index / room_size)].clone(),
            clock,
            size: common.size,
            window,
            drain_until,
            counters: counters.clone(),
            errors: errors.clone(),
            latency: latency.clone(),
            send_lag: send_lag.clone(),
        };
        tasks.spawn(async move {
            tokio::time::sleep_until(start).await;
            member.chat(ws, rx).await
        });
    }
    let pacer = Pacer::start(
        clock,
        opts.rate,
        clock.ns_of(start.into_std()),
        window.1,
        ticks,
    );

    let readings = schedule.measure(target, &counters).await;

    let mut measured = 0;
    let mut received = 0;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((r, m)) => {
                received += r;
                measured += m;
            }
            Err(error) => errors.record("task", error),
        }
    }
    let scheduled = pacer.finish();
    let after = target.proxy_sample();
    let outcome = monitor.finish().await;
    let says: u64 = rooms.values().map(|r| r.sent.load(Ordering::Relaxed)).sum();

    let mut details = serde_json::Map::new();
    details.insert("room_size".into(), room_size.into());
    details.insert("rooms".into(), rooms.len().into());
    details.insert("target_rate_says_per_s".into(), opts.rate.into());
    details.insert("says_scheduled".into(), scheduled.into());
    details.insert("says_sent".into(), says.into());
    let expected: u64 = rooms
        .values()
        .map(|r| r.sent.load(Ordering::Relaxed) * r.members)
        .sum();
    details.insert("deliveries_expected".into(), expected.into());
    let mut extra_latency = BTreeMap::new();
    extra_latency.insert("handshake".to_owned(), handshake.snapshot());
    extra_latency.insert("send_lag".to_owned(), send_lag.snapshot());
    Measurement {
        label: target.label.clone(),
        url: target.connector.target(0).url.clone(),
        connections: connected as u64,
        sent: says,
        received,
        messages: measured,
        window: readings.delta(),
        latency: latency.snapshot(),
        latency_kind: "delivery: say -> each member's said, from the intended send time".into(),
        extra_latency,
        errors: errors.snapshot(),
        timeline: outcome.timeline,
        memory: MemoryFigures::from_samples(before, readings.loaded, after, connected as u64),
        cpu_per_item: true,
        details,
    }
}

/// Sends the join and waits for `joined`.
async fn join(mut ws: Ws, room: &str, timeout: Duration) -> Result<Ws, String> {
    let request = format!(r#"{{"type":"join","room":"{room}"}}"#);
    ws.send(Message::text(request))
        .await
        .map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(timeout, async {
        while let Some(message) = ws.next().await {
            match message.map_err(|e| e.to_string())? {
                Message::Text(text) => {
                    let event: Event<'_> = serde_json::from_str(&text)
                        .map_err(|e| format!("bad event {text:?}: {e}"))?;
                    return match event.kind {
                        "joined" => Ok(()),
                        other => Err(format!("expected joined, got {other}: {text}")),
                    };
                }
                Message::Close(frame) => return Err(format!("closed: {frame:?}")),
                _ => continue,
            }
        }
        Err("connection ended".to_owned())
    })
    .await
    .map_err(|_| format!("no joined reply within {timeout:?}"))?;
    reply.map(|()| ws)
}

/// One chat client of a run.
struct Member {
    index: usize,
    room: Arc<Room>,
    clock: Clock,
    size: usize,
    window: (u64, u64),
    drain_until: Instant,
    counters: Arc<Counters>,
    errors: ErrorLog,
    latency: LatencyRecorder,
    send_lag: LatencyRecorder,
}

impl Member {
    /// Says on every tick, counts every `said`; returns (deliveries, measured deliveries).
    async fn chat(self, ws: Ws, mut ticks: mpsc::UnboundedReceiver<u64>) -> (u64, u64) {
        let (mut sink, mut stream) = ws.split();
        let in_window = |ns: u64| ns >= self.window.0 && ns < self.window.1;
        let send = async {
            let mut seq = 0u64;
            let mut lag = self.send_lag.local(self.index);
            let mut ok = true;
            loop {
                let tick = tokio::select! {
                    tick = ticks.recv() => tick,
                    _ = tokio::time::sleep_until(self.drain_until) => None,
                };
                let Some(intended_ns) = tick else { break };
                let sent_ns = self.clock.now_ns();
                if in_window(intended_ns) {
                    lag.record(Duration::from_nanos(sent_ns.saturating_sub(intended_ns)));
                }
                let text = payload::encode_text(
                    Header {
                        conn: self.index as u32,
                        seq,
                        intended_ns,
                        sent_ns,
                    },
                    self.size,
                );
                seq += 1;
                let say = format!(r#"{{"type":"say","text":"{text}"}}"#);
                if let Err(error) = sink.feed(Message::text(say)).await {
                    self.errors.record("send", error);
                    ok = false;
                    break;
                }
                self.room.sent.fetch_add(1, Ordering::AcqRel);
                Counters::bump(&self.counters.sent);
                if ticks.is_empty() {
                    match tokio::time::timeout_at(self.drain_until, sink.flush()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            self.errors.record("send", error);
                            ok = false;
                            break;
                        }
                        Err(_) => {
                            self.errors
                                .record("send-timeout", "a say was not written in time");
                            ok = false;
                            break;
                        }
                    }
                }
            }
            let mut unsent = 0u64;
            while ticks.try_recv().is_ok() {
                unsent += 1;
            }
            self.errors.record_n(
                "unsent",
                unsent,
                format!("client {}: {unsent} scheduled says never sent", self.index),
            );
            if self.room.senders_left.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.room.done.notify_waiters();
            }
            ok
        };
        let receive = async {
            let mut latency = self.latency.local(self.index);
            let (mut received, mut measured) = (0u64, 0u64);
            let mut broken = false;
            loop {
                let done = self.room.done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                let finished = self.room.senders_left.load(Ordering::Acquire) == 0;
                if finished && received >= self.room.sent.load(Ordering::Acquire) {
                    break;
                }
                let next = tokio::select! {
                    next = stream.next() => next,
                    _ = &mut done, if !finished => continue,
                    _ = tokio::time::sleep_until(self.drain_until) => break,
                };
                let text = match next {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        self.errors.record(
                            "closed-by-peer",
                            format!("client {}: {frame:?}", self.index),
                        );
                        broken = true;
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => {
                        self.errors
                            .record("receive", format!("client {}: {error}", self.index));
                        broken = true;
                        break;
                    }
                    None => {
                        self.errors.record(
                            "eof",
                            format!("client {}: closed without a close frame", self.index),
                        );
                        broken = true;
                        break;
                    }
                };
                let header = match serde_json::from_str::<Event<'_>>(&text) {
                    Ok(Event {
                        kind: "said",
                        text: Some(said),
                    }) => payload::decode_text(said).map_err(|e| e.to_string()),
                    Ok(event) => Err(format!("unexpected {} event: {text}", event.kind)),
                    Err(error) => Err(format!("bad event: {error}")),
                };
                match header {
                    Ok(header) => {
                        received += 1;
                        Counters::bump(&self.counters.received);
                        if in_window(header.intended_ns) {
                            let now = self.clock.now_ns();
                            latency.record(Duration::from_nanos(
                                now.saturating_sub(header.intended_ns),
                            ));
                            measured += 1;
                        }
                    }
                    Err(reason) => self
                        .errors
                        .record("chat-error", format!("client {}: {reason}", self.index)),
                }
            }
            (received, measured, broken)
        };
        let (send_ok, (received, measured, broken)) = tokio::join!(send, receive);
        let expected = self.room.sent.load(Ordering::Acquire);
        if received < expected {
            self.errors.record_n(
                "undelivered",
                expected - received,
                format!(
                    "client {}: got {received} of the {expected} says of its room",
                    self.index
                ),
            );
        }
        if send_ok && !broken {
            let ws = sink.reunite(stream).expect("halves of one socket");
            driver::close(ws, self.index, &self.errors).await;
        }
        (received, measured)
    }
}
