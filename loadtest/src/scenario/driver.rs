//! One connection's message loop, shared by `echo` (closed loop) and `rate` (open loop).
//!
//! The socket is split: a sender half writes test messages when its [`Trigger`] says so, a
//! receiver half reads the echoes, checks them (ours, in order, the right size) and records
//! latency. Both run in the connection's one task. Sending never waits for a reply, so a peer
//! that echoes while we are still writing a burst can't deadlock us.
//!
//! After the sender stops, the receiver waits for every message still in flight until
//! `drain_until`; the ones that never come back are counted as `unanswered` errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::conn::Ws;
use crate::payload::{self, Clock, Header};
use crate::stats::{Counters, ErrorLog, LatencyRecorder};

/// What makes the sender send.
pub(crate) enum Trigger {
    /// Closed loop: keep `window` messages in flight until `send_until`.
    Closed {
        /// Messages in flight.
        window: usize,
        /// No new message after this.
        send_until: Instant,
    },
    /// Open loop: send one message per tick; a tick is the intended send time in clock
    /// nanoseconds. The pacer closes the channel at the end of the schedule.
    Open {
        /// Intended send times.
        ticks: mpsc::UnboundedReceiver<u64>,
    },
}

/// Everything one connection's loop needs.
pub(crate) struct DriverCtx {
    /// Connection index within the run (in every message header).
    pub index: usize,
    /// The run's clock.
    pub clock: Clock,
    /// Message size.
    pub size: usize,
    /// Text instead of binary.
    pub text: bool,
    /// Messages intended from this time (clock ns)...
    pub measure_from_ns: u64,
    /// ...until this one are measured.
    pub measure_until_ns: u64,
    /// Give up on sending and on replies at this instant.
    pub drain_until: Instant,
    /// Run-wide counters.
    pub counters: Arc<Counters>,
    /// Run-wide errors.
    pub errors: ErrorLog,
    /// Latency from the intended send time (closed loop: the actual one).
    pub latency: LatencyRecorder,
    /// Open loop only: latency from the actual send time (what a naive tool reports).
    pub uncorrected: Option<LatencyRecorder>,
    /// Open loop only: how late messages left compared with the schedule.
    pub send_lag: Option<LatencyRecorder>,
}

/// What one connection did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DriverTotals {
    pub sent: u64,
    pub received: u64,
    pub measured: u64,
}

/// Sentinel for "the sender has not finished yet".
const UNKNOWN: u64 = u64::MAX;
/// Time allowed for the closing handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the loop over `ws` until the trigger ends and replies are drained, then closes.
pub(crate) async fn drive(ws: Ws, trigger: Trigger, ctx: DriverCtx) -> DriverTotals {
    let (mut sink, mut stream) = ws.split();
    let window = match &trigger {
        Trigger::Closed { window, .. } => Some(Arc::new(Semaphore::new(*window))),
        Trigger::Open { .. } => None,
    };
    let sent_final = AtomicU64::new(UNKNOWN);
    let sender_done = Notify::new();

    let send = async {
        let mut seq = 0u64;
        let mut lag = ctx.send_lag.as_ref().map(|r| r.local(ctx.index));
        let mut send_one = |intended_ns: u64| {
            let sent_ns = ctx.clock.now_ns();
            if let Some(lag) = lag.as_mut()
                && intended_ns >= ctx.measure_from_ns
                && intended_ns < ctx.measure_until_ns
            {
                lag.record(Duration::from_nanos(sent_ns.saturating_sub(intended_ns)));
            }
            let header = Header {
                conn: ctx.index as u32,
                seq,
                intended_ns,
                sent_ns,
            };
            seq += 1;
            if ctx.text {
                Message::text(payload::encode_text(header, ctx.size))
            } else {
                Message::binary(payload::encode_binary(header, ctx.size))
            }
        };
        let mut failed = false;
        match trigger {
            Trigger::Closed { send_until, .. } => {
                let window = window.as_ref().expect("closed loop has a window");
                loop {
                    let permit = tokio::select! {
                        permit = window.acquire() => permit,
                        _ = tokio::time::sleep_until(send_until) => break,
                    };
                    let Ok(permit) = permit else { break };
                    permit.forget();
                    if Instant::now() >= send_until {
                        break;
                    }
                    let message = send_one(ctx.clock.now_ns());
                    if let Err(error) = sink.feed(message).await {
                        ctx.errors.record("send", error);
                        failed = true;
                        break;
                    }
                    Counters::bump(&ctx.counters.sent);
                    if window.available_permits() == 0
                        && !flush(&mut sink, ctx.drain_until, &ctx.errors).await
                    {
                        failed = true;
                        break;
                    }
                }
            }
            Trigger::Open { mut ticks } => {
                loop {
                    let tick = tokio::select! {
                        tick = ticks.recv() => tick,
                        _ = tokio::time::sleep_until(ctx.drain_until) => None,
                    };
                    let Some(intended_ns) = tick else { break };
                    let message = send_one(intended_ns);
                    if let Err(error) = sink.feed(message).await {
                        ctx.errors.record("send", error);
                        failed = true;
                        break;
                    }
                    Counters::bump(&ctx.counters.sent);
                    if ticks.is_empty() && !flush(&mut sink, ctx.drain_until, &ctx.errors).await {
                        failed = true;
                        break;
                    }
                }
                let mut unsent = 0u64;
                while ticks.try_recv().is_ok() {
                    unsent += 1;
                }
                ctx.errors.record_n(
                    "unsent",
                    unsent,
                    format!(
                        "connection {}: {unsent} scheduled messages were never sent (the \
                         socket did not take them before the drain timeout)",
                        ctx.index
                    ),
                );
            }
        }
        if !failed && !flush(&mut sink, ctx.drain_until, &ctx.errors).await {
            failed = true;
        }
        sent_final.store(seq, Ordering::Release);
        sender_done.notify_one();
        (seq, failed)
    };

    let receive = async {
        let mut totals = DriverTotals::default();
        let mut latency = ctx.latency.local(ctx.index);
        let mut uncorrected = ctx.uncorrected.as_ref().map(|r| r.local(ctx.index));
        let mut expected_seq = 0u64;
        let mut broken = false;
        loop {
            let sent = sent_final.load(Ordering::Acquire);
            if sent != UNKNOWN && totals.received >= sent {
                break;
            }
            let next = tokio::select! {
                next = stream.next() => next,
                _ = sender_done.notified(), if sent == UNKNOWN => continue,
                _ = tokio::time::sleep_until(ctx.drain_until) => break,
            };
            let header = match next {
                Some(Ok(Message::Binary(data))) if !ctx.text => {
                    check_size(&ctx, data.len());
                    payload::decode_binary(&data)
                }
                Some(Ok(Message::Text(text))) if ctx.text => {
                    check_size(&ctx, text.len());
                    payload::decode_text(&text)
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    ctx.errors.record(
                        "closed-by-peer",
                        format!("connection {}: peer closed: {frame:?}", ctx.index),
                    );
                    broken = true;
                    break;
                }
                Some(Ok(other)) => {
                    ctx.errors.record(
                        "wrong-type",
                        format!(
                            "connection {}: got a {} message back",
                            ctx.index,
                            if other.is_text() { "text" } else { "binary" }
                        ),
                    );
                    continue;
                }
                Some(Err(error)) => {
                    ctx.errors
                        .record("receive", format!("connection {}: {error}", ctx.index));
                    broken = true;
                    break;
                }
                None => {
                    ctx.errors.record(
                        "eof",
                        format!("connection {}: closed without a close frame", ctx.index),
                    );
                    broken = true;
                    break;
                }
            };
            let header = match header {
                Ok(h) => h,
                Err(error) => {
                    ctx.errors
                        .record("malformed", format!("connection {}: {error}", ctx.index));
                    continue;
                }
            };
            if header.conn as usize != ctx.index {
                ctx.errors.record(
                    "foreign-message",
                    format!(
                        "connection {} received connection {}'s message",
                        ctx.index, header.conn
                    ),
                );
                continue;
            }
            if header.seq != expected_seq {
                ctx.errors.record(
                    "out-of-order",
                    format!(
                        "connection {}: expected message {} and got {}",
                        ctx.index, expected_seq, header.seq
                    ),
                );
            }
            expected_seq = header.seq + 1;
            let now_ns = ctx.clock.now_ns();
            if header.intended_ns >= ctx.measure_from_ns
                && header.intended_ns < ctx.measure_until_ns
            {
                latency.record(Duration::from_nanos(
                    now_ns.saturating_sub(header.intended_ns),
                ));
                if let Some(u) = uncorrected.as_mut() {
                    u.record(Duration::from_nanos(now_ns.saturating_sub(header.sent_ns)));
                }
                totals.measured += 1;
            }
            totals.received += 1;
            Counters::bump(&ctx.counters.received);
            if let Some(window) = &window {
                window.add_permits(1);
            }
        }
        (totals, broken)
    };

    let ((sent, send_failed), (mut totals, broken)) = tokio::join!(send, receive);
    totals.sent = sent;
    if totals.received < sent {
        let missing = sent - totals.received;
        ctx.errors.record_n(
            "unanswered",
            missing,
            format!(
                "connection {}: {missing} of {sent} messages got no reply{}",
                ctx.index,
                if broken {
                    " (the connection broke)"
                } else {
                    " within the drain timeout"
                }
            ),
        );
    }
    if !broken && !send_failed {
        let ws = sink.reunite(stream).expect("halves of one socket");
        close(ws, ctx.index, &ctx.errors).await;
    }
    totals
}

fn check_size(ctx: &DriverCtx, len: usize) {
    if len != ctx.size {
        ctx.errors.record(
            "size-mismatch",
            format!(
                "connection {}: sent {} bytes, got {len} back",
                ctx.index, ctx.size
            ),
        );
    }
}

/// Flushes, counting a failure or a timeout as a `send` error; true if it went out.
async fn flush(
    sink: &mut futures_util::stream::SplitSink<Ws, Message>,
    until: Instant,
    errors: &ErrorLog,
) -> bool {
    match tokio::time::timeout_at(until, sink.flush()).await {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            errors.record("send", error);
            false
        }
        Err(_) => {
            errors.record(
                "send-timeout",
                "the socket did not take a write before the drain timeout",
            );
            false
        }
    }
}

/// The closing handshake: send Close, read until the peer's Close or EOF; a peer that does not
/// answer within [`CLOSE_TIMEOUT`] is a `close-timeout` error.
pub(crate) async fn close(mut ws: Ws, index: usize, errors: &ErrorLog) {
    let finished = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if ws.close(None).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    if finished.is_err() {
        errors.record(
            "close-timeout",
            format!("connection {index}: no close reply within {CLOSE_TIMEOUT:?}"),
        );
    }
}
