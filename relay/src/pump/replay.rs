//! The replay log: client messages sent to a backend that the backend has not yet been proven
//! to have read, so they can be sent again to a replacement backend if this one is lost.
//!
//! WebSocket has no acknowledgements, but it has an ordering guarantee the relay can use: a
//! peer answers a Ping only after reading everything sent before it. So after sending client
//! messages the relay sends a Ping whose payload is the sequence number of the last of them;
//! the matching Pong acknowledges every message up to that number. One such ping is in flight
//! at a time and rides in the same write as the messages it follows. Pings cost frames, so they
//! are batched: one is due after [`ACK_AFTER_MESSAGES`] messages or [`ACK_AFTER_BYTES`] bytes,
//! or [`ACK_DELAY`] after the first message it would cover, whichever comes first.
//!
//! Replay is at-least-once: a message the lost backend read just before dying, with its Pong
//! still on the way, is sent to the replacement too. The log is bounded; while it is overflowed
//! (until an ack covers everything sent) a backend loss closes the client with 1012 instead of
//! replaying an incomplete log.

use std::collections::VecDeque;

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tungstenite::Message;

/// Unacknowledged messages kept per session at most.
pub const MAX_UNACKED_MESSAGES: usize = 256;
/// Unacknowledged payload bytes kept per session at most.
pub const MAX_UNACKED_BYTES: usize = 256 * 1024;

/// Messages after which an ack ping is due at once.
pub const ACK_AFTER_MESSAGES: usize = 32;
/// Payload bytes after which an ack ping is due at once. What the log holds is about this
/// plus what is in flight, per busy session. 16 KiB was measured against 64 (4 KiB echo, 50
/// connections, 4 messages in flight each): 4-20 KiB less memory per connection, but the
/// backend answered every fourth message's ping with a segment of its own (1.23 -> 1.64 TCP
/// segments per echo on the machine) and the echo rate fell about 8%.
pub const ACK_AFTER_BYTES: usize = 64 * 1024;
/// Longest a message waits for an ack ping to be sent after it.
pub const ACK_DELAY: Duration = Duration::from_millis(50);

/// Ack pings carry exactly this many bytes (a big-endian sequence number); keepalive pings
/// carry a different length so the two are never confused.
const ACK_PAYLOAD_LEN: usize = 8;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct ReplayLog {
    unacked: VecDeque<(u64, Message)>,
    unacked_bytes: usize,
    /// Sequence number of the next message sent.
    next_seq: u64,
    /// The sequence number an ack ping in flight will acknowledge.
    ack_in_flight: Option<u64>,
    /// Messages were dropped from the log: a replay would be incomplete.
    overflowed: bool,
    /// The ack ping in flight went out because the messages before it waited [`ACK_DELAY`],
    /// not because enough of them gathered: the client paused.
    paused_ping: bool,
    /// When the first message not yet covered by an ack ping was sent.
    uncovered_since: Option<Instant>,
    /// Messages and bytes sent since the last ack ping.
    uncovered_messages: usize,
    uncovered_bytes: usize,
    /// Payload bytes sent to the current backend leg since it opened, overflowed ones too:
    /// the stream offset just past the newest message.
    leg_bytes: u64,
}

impl ReplayLog {
    /// Records a data message just handed to the backend leg at `now`.
    pub fn sent(&mut self, message: Message, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.uncovered_since.get_or_insert(now);
        self.uncovered_messages += 1;
        self.uncovered_bytes += message.len();
        self.leg_bytes += message.len() as u64;
        if self.overflowed {
            return;
        }
        self.unacked_bytes += message.len();
        self.unacked.push_back((seq, message));
        if self.unacked.len() > MAX_UNACKED_MESSAGES || self.unacked_bytes > MAX_UNACKED_BYTES {
            self.overflowed = true;
            self.unacked = VecDeque::new();
            self.unacked_bytes = 0;
        }
    }

    /// When the next ack ping falls due by time alone, if messages wait for one.
    pub fn ack_due(&self) -> Option<Instant> {
        if self.ack_in_flight.is_some() {
            return None;
        }
        self.uncovered_since.map(|since| since + ACK_DELAY)
    }

    /// The ack ping to send now, if one is due at `now`: messages wait for one, none is in
    /// flight, and enough of them have gathered or the first has waited [`ACK_DELAY`].
    pub fn ack_ping(&mut self, now: Instant) -> Option<Message> {
        if self.ack_in_flight.is_some() || self.uncovered_since.is_none() {
            return None;
        }
        let gathered = self.uncovered_messages >= ACK_AFTER_MESSAGES
            || self.uncovered_bytes >= ACK_AFTER_BYTES
            || self.overflowed;
        let waited = self.ack_due().is_some_and(|due| now >= due);
        if !gathered && !waited {
            return None;
        }
        let ping = self.ack_ping_now()?;
        self.paused_ping = !gathered;
        Some(ping)
    }

    /// An ack ping covering every message sent so far, to send now whatever the batching
    /// says (a planned move waits for it); `None` while one is in flight or nothing is
    /// uncovered.
    pub fn ack_ping_now(&mut self) -> Option<Message> {
        if !self.can_ping_now() {
            return None;
        }
        let last = self.next_seq - 1;
        self.ack_in_flight = Some(last);
        self.paused_ping = false;
        self.uncovered_since = None;
        self.uncovered_messages = 0;
        self.uncovered_bytes = 0;
        Some(Message::Ping(Bytes::copy_from_slice(&last.to_be_bytes())))
    }

    /// Whether [`ReplayLog::ack_ping_now`] would give a ping.
    pub fn can_ping_now(&self) -> bool {
        self.ack_in_flight.is_none() && self.uncovered_since.is_some()
    }

    /// Handles a Pong from the backend; returns true if it was one of ours.
    pub fn pong(&mut self, payload: &[u8]) -> bool {
        let Ok(bytes) = <[u8; ACK_PAYLOAD_LEN]>::try_from(payload) else {
            return false;
        };
        let acked = u64::from_be_bytes(bytes);
        if self.ack_in_flight != Some(acked) {
            return false;
        }
        self.ack_in_flight = None;
        if self.overflowed && acked + 1 == self.next_seq {
            // Everything ever sent is acknowledged: the log is complete again.
            self.overflowed = false;
        }
        while let Some((seq, message)) = self.unacked.front() {
            if *seq > acked {
                break;
            }
            self.unacked_bytes -= message.len();
            self.unacked.pop_front();
        }
        // The client paused and everything is acknowledged: the end of a burst, so its room
        // goes back now, while other sessions can take it, rather than at the next keepalive
        // check. A session that keeps sending acks by count and refills it instead.
        if std::mem::take(&mut self.paused_ping) {
            self.release_idle_buffer();
        }
        true
    }

    /// True while something waits for an acknowledgement (messages, or an overflow to clear).
    pub fn awaits_confirmation(&self) -> bool {
        self.overflowed || !self.unacked.is_empty()
    }

    /// Payload bytes sent to the current backend leg since it opened.
    pub fn leg_bytes(&self) -> u64 {
        self.leg_bytes
    }

    /// Handles a leg that reports how many of the payload bytes sent on it its peer has
    /// consumed, counted from the leg's start (a mux stream's returned flow-control credit):
    /// every message that ends within them is acknowledged. A message the leg never took
    /// (its write failed) lies beyond them, so it stays.
    pub fn confirm_through(&mut self, acknowledged: u64) {
        if self.overflowed && acknowledged >= self.leg_bytes {
            self.overflowed = false;
        }
        // The oldest message held starts where the held bytes begin.
        let mut start = self.leg_bytes - self.unacked_bytes as u64;
        while let Some((_, message)) = self.unacked.front() {
            let end = start + message.len() as u64;
            if end > acknowledged {
                break;
            }
            start = end;
            self.unacked_bytes -= message.len();
            self.unacked.pop_front();
        }
    }

    /// Gives back the log's buffer if everything in it is acknowledged; the pump calls it at
    /// its keepalive checks. A burst grows the buffer (64 bytes a message: 4 KiB after 40
    /// messages in flight), and an idle client would keep that for as long as it stays.
    /// Giving it back whenever the log empties made a busy session grow it again after every
    /// ack (3% more instructions per 64 B echo); a pong answering a ping sent after a pause
    /// gives it back at once (see [`ReplayLog::pong`]).
    pub fn release_idle_buffer(&mut self) {
        if self.unacked.is_empty() && self.unacked.capacity() > 0 {
            self.unacked = VecDeque::new();
        }
    }

    /// Takes the messages to replay on a replacement backend, oldest first, or `None` if the
    /// log overflowed and cannot say what the lost backend missed. Resets the log for the
    /// replacement.
    pub fn take_for_replay(&mut self) -> Option<Vec<Message>> {
        let overflowed = std::mem::take(&mut self.overflowed);
        self.ack_in_flight = None;
        self.paused_ping = false;
        self.uncovered_since = None;
        self.uncovered_messages = 0;
        self.uncovered_bytes = 0;
        self.unacked_bytes = 0;
        self.leg_bytes = 0;
        let unacked = std::mem::take(&mut self.unacked);
        (!overflowed).then(|| unacked.into_iter().map(|(_, m)| m).collect())
    }

    /// Unacknowledged messages held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.unacked.len()
    }

    /// True when nothing is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }

    /// Messages the log could hold without growing.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.unacked.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ms` milliseconds after a fixed start.
    fn at(ms: u64) -> Instant {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *START.get_or_init(Instant::now) + Duration::from_millis(ms)
    }

    fn text(n: u32) -> Message {
        Message::text(n.to_string())
    }

    fn payload(ping: &Message) -> Vec<u8> {
        match ping {
            Message::Ping(p) => p.to_vec(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_planned_move_asks_at_once_and_again_for_what_came_after_the_ping_in_flight() {
        let mut log = ReplayLog::default();
        assert!(
            !log.can_ping_now() && log.ack_ping_now().is_none(),
            "nothing to ask for"
        );
        log.sent(text(0), at(0));
        let first = log.ack_ping_now().expect("no batching wait");
        log.sent(text(1), at(1));
        assert!(log.ack_ping_now().is_none(), "one ping in flight at a time");
        assert!(log.pong(&payload(&first)));
        assert!(log.awaits_confirmation(), "message 1 is not covered yet");
        assert!(log.can_ping_now());
        let second = log.ack_ping_now().unwrap();
        assert!(log.pong(&payload(&second)));
        assert!(!log.awaits_confirmation() && log.is_empty());
    }

    #[test]
    fn a_pong_acknowledges_everything_sent_before_its_ping() {
        let mut log = ReplayLog::default();
        log.sent(text(0), at(0));
        log.sent(text(1), at(0));
        let ping = log.ack_ping(at(50)).expect("a ping is due");
        // Only one ack ping in flight.
        log.sent(text(2), at(0));
        assert!(log.ack_ping(at(50)).is_none());
        assert!(log.pong(&payload(&ping)));
        assert_eq!(log.len(), 1);
        let ping = log.ack_ping(at(50)).expect("message 2 needs an ack");
        assert!(!log.pong(b"wsrelay"), "keepalive pongs are not acks");
        assert!(log.pong(&payload(&ping)));
        assert!(log.is_empty());
        assert!(
            log.ack_ping(at(50)).is_none(),
            "nothing left to acknowledge"
        );
    }

    #[test]
    fn an_acknowledged_burst_gives_its_buffer_back_when_asked() {
        let mut log = ReplayLog::default();
        for n in 0..40 {
            log.sent(text(n), at(0));
        }
        let ping = log.ack_ping_now().unwrap();
        log.sent(text(40), at(1));
        assert!(log.pong(&payload(&ping)));
        log.release_idle_buffer();
        assert_eq!(log.len(), 1);
        assert!(log.capacity() >= 40, "kept while a message waits");
        let ping = log.ack_ping_now().unwrap();
        assert!(log.pong(&payload(&ping)));
        assert!(
            log.capacity() >= 40,
            "kept until asked: a busy session refills it"
        );
        log.release_idle_buffer();
        assert_eq!(log.capacity(), 0, "an idle client holds no log buffer");
        // The same when a mux stream's returned credit confirms them.
        for n in 0..40 {
            log.sent(text(n), at(2));
        }
        log.confirm_through(log.leg_bytes());
        log.release_idle_buffer();
        assert_eq!(log.capacity(), 0);
        // Acks and credit offsets go on from where they were.
        log.sent(text(0), at(3));
        let ping = log.ack_ping_now().unwrap();
        assert_eq!(payload(&ping), 81u64.to_be_bytes());
    }

    #[test]
    fn a_burst_acknowledged_after_a_pause_gives_its_buffer_back_at_once() {
        let mut log = ReplayLog::default();
        for n in 0..32 {
            log.sent(text(n), at(0));
        }
        let ping = log.ack_ping(at(0)).expect("32 messages gathered");
        for n in 32..40 {
            log.sent(text(n), at(1));
        }
        // Acked by count: a busy session keeps its room.
        assert!(log.pong(&payload(&ping)));
        assert_eq!(log.len(), 8);
        assert!(log.capacity() >= 32);
        assert!(log.ack_ping(at(2)).is_none(), "8 messages wait for company");
        // The rest waited for the ack delay: the client paused.
        let ping = log.ack_ping(at(60)).expect("the ack delay passed");
        assert!(log.pong(&payload(&ping)));
        assert_eq!(log.capacity(), 0);
    }

    #[test]
    fn ack_pings_are_batched_by_count_bytes_and_time() {
        let mut log = ReplayLog::default();
        log.sent(text(0), at(0));
        assert!(
            log.ack_ping(at(10)).is_none(),
            "one message waits for company"
        );
        assert_eq!(log.ack_due(), Some(at(50)));
        assert!(
            log.ack_ping(at(50)).is_some(),
            "but not longer than ACK_DELAY"
        );
        let ping = log.ack_ping(at(50));
        assert!(ping.is_none(), "one in flight at a time");
        assert!(log.pong(&0u64.to_be_bytes()));
        for n in 1..ACK_AFTER_MESSAGES as u32 {
            log.sent(text(n), at(60));
            assert!(log.ack_ping(at(60)).is_none());
        }
        log.sent(text(99), at(60));
        assert!(
            log.ack_ping(at(60)).is_some(),
            "a full batch is acknowledged at once"
        );
        let mut big = ReplayLog::default();
        big.sent(Message::binary(vec![0u8; ACK_AFTER_BYTES]), at(0));
        assert!(big.ack_ping(at(0)).is_some(), "so is a full batch of bytes");
    }

    #[test]
    fn replay_returns_unacknowledged_messages_in_order() {
        let mut log = ReplayLog::default();
        for n in 0..5 {
            log.sent(text(n), at(0));
        }
        let ping = log.ack_ping(at(50)).unwrap();
        log.sent(text(5), at(0));
        log.sent(text(6), at(0));
        // The backend died before answering: everything since the start is replayed.
        let replay = log.take_for_replay().unwrap();
        assert_eq!(replay, (0..7).map(text).collect::<Vec<_>>());
        // A stale pong from the old backend is not an ack for the new one.
        assert!(!log.pong(&payload(&ping)));
    }

    #[test]
    fn an_overflowing_log_refuses_to_replay() {
        let mut log = ReplayLog::default();
        for n in 0..(MAX_UNACKED_MESSAGES as u32 + 1) {
            log.sent(text(n), at(0));
        }
        assert!(log.is_empty(), "an overflowed log holds nothing");
        // An ack covering everything sent makes the log complete again.
        let ping = log
            .ack_ping(at(50))
            .expect("overflowed logs still ask for acks");
        assert!(log.pong(&payload(&ping)));
        log.sent(text(0), at(0));
        assert_eq!(log.take_for_replay().unwrap(), vec![text(0)]);
        for n in 0..(MAX_UNACKED_MESSAGES as u32 + 1) {
            log.sent(text(n), at(0));
        }
        assert!(log.take_for_replay().is_none());
        // After the reset the log works again.
        log.sent(text(1), at(0));
        assert_eq!(log.take_for_replay().unwrap(), vec![text(1)]);
    }

    #[test]
    fn credit_confirms_the_oldest_messages() {
        let mut log = ReplayLog::default();
        for n in 10..15 {
            log.sent(text(n), at(0));
        }
        // Four of the five two-byte messages consumed (and half of the fifth): only the
        // newest stays.
        log.confirm_through(9);
        assert_eq!(log.take_for_replay().unwrap(), vec![text(14)]);
    }

    #[test]
    fn credit_counts_from_the_start_of_the_current_leg() {
        let mut log = ReplayLog::default();
        for n in 10..13 {
            log.sent(text(n), at(0));
        }
        log.confirm_through(2);
        // The leg is lost; the two unconfirmed messages go to the next one, which counts
        // from zero again.
        let replay = log.take_for_replay().unwrap();
        assert_eq!(replay, vec![text(11), text(12)]);
        for message in replay {
            log.sent(message, at(1));
        }
        log.sent(text(13), at(1));
        assert_eq!(log.leg_bytes(), 6);
        log.confirm_through(4);
        assert_eq!(log.take_for_replay().unwrap(), vec![text(13)]);
    }

    #[test]
    fn a_message_the_leg_never_took_is_not_confirmed_by_credit() {
        let mut log = ReplayLog::default();
        log.sent(text(10), at(0));
        log.sent(text(11), at(0));
        // The peer returned all the credit the leg took: the first message only (the
        // second one's write failed).
        log.confirm_through(2);
        assert_eq!(log.take_for_replay().unwrap(), vec![text(11)]);
    }

    #[test]
    fn big_messages_overflow_by_bytes() {
        let mut log = ReplayLog::default();
        log.sent(Message::binary(vec![0u8; MAX_UNACKED_BYTES]), at(0));
        assert_eq!(log.len(), 1);
        log.sent(Message::binary(vec![0u8; 1]), at(0));
        assert!(log.take_for_replay().is_none());
    }
}
