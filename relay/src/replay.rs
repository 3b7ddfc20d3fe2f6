//! The replay log: client messages sent to a backend that the backend has not yet been proven
//! to have read, so they can be sent again to a replacement backend if this one is lost.
//!
//! WebSocket has no acknowledgements, but it has an ordering guarantee the relay can use: a
//! peer answers a Ping only after reading everything sent before it. So after sending client
//! messages the relay sends a Ping whose payload is the sequence number of the last of them;
//! the matching Pong acknowledges every message up to that number. One such ping is in flight
//! at a time and rides in the same write as the messages it follows.
//!
//! Replay is at-least-once: a message the lost backend read just before dying, with its Pong
//! still on the way, is sent to the replacement too. The log is bounded; while it is overflowed
//! (until an ack covers everything sent) a backend loss closes the client with 1012 instead of
//! replaying an incomplete log.

use std::collections::VecDeque;

use bytes::Bytes;
use tungstenite::Message;

/// Unacknowledged messages kept per session at most.
pub const MAX_UNACKED_MESSAGES: usize = 256;
/// Unacknowledged payload bytes kept per session at most.
pub const MAX_UNACKED_BYTES: usize = 256 * 1024;

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
}

impl ReplayLog {
    /// Records a data message just handed to the backend leg.
    pub fn sent(&mut self, message: Message) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.overflowed {
            return;
        }
        self.unacked_bytes += message.len();
        self.unacked.push_back((seq, message));
        if self.unacked.len() > MAX_UNACKED_MESSAGES || self.unacked_bytes > MAX_UNACKED_BYTES {
            self.overflowed = true;
            self.unacked.clear();
            self.unacked_bytes = 0;
        }
    }

    /// The ack ping to send with the next flush, if one is due: there are unacknowledged
    /// messages and no ack ping is in flight.
    pub fn ack_ping(&mut self) -> Option<Message> {
        if self.ack_in_flight.is_some() || self.next_seq == 0 {
            return None;
        }
        if !self.overflowed && self.unacked.is_empty() {
            return None;
        }
        let last = self.next_seq - 1;
        self.ack_in_flight = Some(last);
        Some(Message::Ping(Bytes::copy_from_slice(&last.to_be_bytes())))
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
        true
    }

    /// Handles a leg that reports how many sent payload bytes its peer has not yet consumed
    /// (a mux stream's flow-control credit): every message older than those bytes is
    /// acknowledged.
    pub fn confirm_all_but(&mut self, unconfirmed_bytes: u64) {
        let unconfirmed = usize::try_from(unconfirmed_bytes).unwrap_or(usize::MAX);
        if self.overflowed && unconfirmed == 0 {
            self.overflowed = false;
        }
        while self.unacked_bytes > unconfirmed {
            let Some((_, message)) = self.unacked.pop_front() else {
                break;
            };
            self.unacked_bytes -= message.len();
        }
    }

    /// Takes the messages to replay on a replacement backend, oldest first, or `None` if the
    /// log overflowed and cannot say what the lost backend missed. Resets the log for the
    /// replacement.
    pub fn take_for_replay(&mut self) -> Option<Vec<Message>> {
        let overflowed = std::mem::take(&mut self.overflowed);
        self.ack_in_flight = None;
        self.unacked_bytes = 0;
        let unacked = std::mem::take(&mut self.unacked);
        (!overflowed).then(|| unacked.into_iter().map(|(_, m)| m).collect())
    }

    /// Unacknowledged messages held now.
    pub fn len(&self) -> usize {
        self.unacked.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_pong_acknowledges_everything_sent_before_its_ping() {
        let mut log = ReplayLog::default();
        log.sent(text(0));
        log.sent(text(1));
        let ping = log.ack_ping().expect("a ping is due");
        // Only one ack ping in flight.
        log.sent(text(2));
        assert!(log.ack_ping().is_none());
        assert!(log.pong(&payload(&ping)));
        assert_eq!(log.len(), 1);
        let ping = log.ack_ping().expect("message 2 needs an ack");
        assert!(!log.pong(b"wsrelay"), "keepalive pongs are not acks");
        assert!(log.pong(&payload(&ping)));
        assert!(log.is_empty());
        assert!(log.ack_ping().is_none(), "nothing left to acknowledge");
    }

    #[test]
    fn replay_returns_unacknowledged_messages_in_order() {
        let mut log = ReplayLog::default();
        for n in 0..5 {
            log.sent(text(n));
        }
        let ping = log.ack_ping().unwrap();
        log.sent(text(5));
        log.sent(text(6));
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
            log.sent(text(n));
        }
        assert!(log.is_empty(), "an overflowed log holds nothing");
        // An ack covering everything sent makes the log complete again.
        let ping = log.ack_ping().expect("overflowed logs still ask for acks");
        assert!(log.pong(&payload(&ping)));
        log.sent(text(0));
        assert_eq!(log.take_for_replay().unwrap(), vec![text(0)]);
        for n in 0..(MAX_UNACKED_MESSAGES as u32 + 1) {
            log.sent(text(n));
        }
        assert!(log.take_for_replay().is_none());
        // After the reset the log works again.
        log.sent(text(1));
        assert_eq!(log.take_for_replay().unwrap(), vec![text(1)]);
    }

    #[test]
    fn credit_confirms_the_oldest_messages() {
        let mut log = ReplayLog::default();
        for n in 10..15 {
            log.sent(text(n));
        }
        // Four of the five two-byte messages consumed: only the newest stays.
        log.confirm_all_but(2);
        assert_eq!(log.take_for_replay().unwrap(), vec![text(14)]);
    }

    #[test]
    fn big_messages_overflow_by_bytes() {
        let mut log = ReplayLog::default();
        log.sent(Message::binary(vec![0u8; MAX_UNACKED_BYTES]));
        assert_eq!(log.len(), 1);
        log.sent(Message::binary(vec![0u8; 1]));
        assert!(log.take_for_replay().is_none());
    }
}
