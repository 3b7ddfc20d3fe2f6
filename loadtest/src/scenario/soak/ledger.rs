//! The soak's bookkeeping, as pure code: what a test message carries, what each echo means for
//! one connection's sequence, and whether a finished run kept its invariants.
//!
//! A message carries its client, the client's connection generation (how many times it has
//! connected before) and a sequence number starting at 0 on every connection, padded to the
//! message size. An echo is checked against the connection's [`Ledger`]: the oldest message in
//! flight is in order; another one in flight is out of order; one already answered is a
//! duplicate (legitimate only when a backend died and the relay replayed to the next one);
//! anything else was never sent on this connection and is corrupt.

use std::collections::VecDeque;

use serde::Serialize;

/// Bytes of the header: client (u32), generation (u32), sequence (u64), little endian.
pub const HEADER_LEN: usize = 16;

/// The identity of one test message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// The client that sent it.
    pub client: u32,
    /// Which of the client's connections sent it.
    pub generation: u32,
    /// Its position on that connection, from 0.
    pub seq: u64,
}

impl Tag {
    /// The message: the header, then zeros up to `size` (at least the header).
    pub fn encode(&self, size: usize) -> Vec<u8> {
        let mut bytes = vec![0; size.max(HEADER_LEN)];
        bytes[0..4].copy_from_slice(&self.client.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.generation.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.seq.to_le_bytes());
        bytes
    }

    /// The tag of a message, if it is long enough to have one.
    pub fn decode(bytes: &[u8]) -> Option<Tag> {
        let header = bytes.get(..HEADER_LEN)?;
        Some(Tag {
            client: u32::from_le_bytes(header[0..4].try_into().ok()?),
            generation: u32::from_le_bytes(header[4..8].try_into().ok()?),
            seq: u64::from_le_bytes(header[8..16].try_into().ok()?),
        })
    }
}

/// What an echo was, for the connection that received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// The oldest message in flight came back.
    InOrder,
    /// A message in flight came back before an older one.
    OutOfOrder {
        /// The oldest message still in flight.
        expected: u64,
    },
    /// A message that had already come back came back again.
    Duplicate,
    /// A sequence number this connection never sent.
    Unsent,
}

/// One connection's messages in flight. The window is small (the client never has more than
/// `--window` outstanding), so a queue of sequence numbers is the whole state.
#[derive(Debug, Default)]
pub struct Ledger {
    next_seq: u64,
    in_flight: VecDeque<u64>,
}

impl Ledger {
    /// Takes the next sequence number and counts it as in flight.
    pub fn send(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push_back(seq);
        seq
    }

    /// Books the echo of `seq`.
    pub fn echo(&mut self, seq: u64) -> Echo {
        if self.in_flight.front() == Some(&seq) {
            self.in_flight.pop_front();
            return Echo::InOrder;
        }
        if let Some(at) = self.in_flight.iter().position(|&s| s == seq) {
            let expected = self.in_flight[0];
            self.in_flight.remove(at);
            return Echo::OutOfOrder { expected };
        }
        if seq < self.next_seq {
            Echo::Duplicate
        } else {
            Echo::Unsent
        }
    }

    /// The sequence numbers sent and not answered yet, oldest first.
    pub fn unanswered(&self) -> Vec<u64> {
        self.in_flight.iter().copied().collect()
    }

    /// Messages sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// The counts a soak's invariants are judged on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Messages sent.
    pub sent: u64,
    /// Echoes that came back in order.
    pub echoed: u64,
    /// Messages never answered before their connection ended.
    pub lost: u64,
    /// Echoes that overtook an older message.
    pub out_of_order: u64,
    /// Echoes of messages answered before.
    pub duplicates: u64,
    /// Echoes that were not ours (wrong client, generation, or never sent).
    pub corrupt: u64,
    /// Connections ended by someone other than the client.
    pub unexpected_closes: u64,
}

/// The relay's resident memory and open files at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// Entries of `/proc/PID/fd`.
    pub fds: u64,
}

/// The relay's usage before the clients came, at its highest, and after they left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UsageFigures {
    /// Before the first client connected (backend links and listeners only).
    pub baseline: Usage,
    /// The highest RSS and the most files seen while clients were connected.
    pub peak: Usage,
    /// After every client had left.
    pub after: Usage,
}

/// How close to the baseline the relay must come back.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Tolerance {
    /// Open files above the baseline still accepted after the clients left.
    pub fds: u64,
    /// Share of the RSS growth (peak - baseline) the allocator may keep.
    pub rss_share: f64,
    /// KiB above the baseline always accepted (allocator caches, thread stacks).
    pub rss_kib: u64,
}

impl Tolerance {
    /// The highest RSS after the clients left that still counts as back near `usage.baseline`.
    pub fn rss_limit(&self, usage: &UsageFigures) -> u64 {
        let growth = usage.peak.rss_kib.saturating_sub(usage.baseline.rss_kib);
        usage.baseline.rss_kib + self.rss_kib + (growth as f64 * self.rss_share) as u64
    }

    /// Whether the relay is back near its baseline.
    pub fn returned(&self, usage: &UsageFigures) -> bool {
        usage.after.fds <= usage.baseline.fds + self.fds
            && usage.after.rss_kib <= self.rss_limit(usage)
    }
}

/// Every invariant the run broke, in words; empty when it passed. `backend_kills` is how many
/// backends were killed (duplicates are legitimate only after one).
pub fn broken_invariants(
    counts: &Counts,
    backend_kills: u64,
    usage: &UsageFigures,
    tolerance: &Tolerance,
) -> Vec<String> {
    let mut broken = Vec::new();
    if counts.echoed == 0 {
        broken.push("no message came back at all".to_owned());
    }
    if counts.lost > 0 {
        broken.push(format!("{} messages lost", counts.lost));
    }
    if counts.out_of_order > 0 {
        broken.push(format!("{} echoes out of order", counts.out_of_order));
    }
    if counts.corrupt > 0 {
        broken.push(format!("{} echoes that were never sent", counts.corrupt));
    }
    if counts.duplicates > 0 && backend_kills == 0 {
        broken.push(format!(
            "{} duplicate echoes although no backend died",
            counts.duplicates
        ));
    }
    if counts.unexpected_closes > 0 {
        broken.push(format!(
            "{} connections closed by the relay (on_backend_loss = \"reconnect\" keeps them)",
            counts.unexpected_closes
        ));
    }
    if usage.after.fds > usage.baseline.fds + tolerance.fds {
        broken.push(format!(
            "relay open files did not come back: {} before the clients, {} after (more than {} above)",
            usage.baseline.fds, usage.after.fds, tolerance.fds
        ));
    }
    let rss_limit = tolerance.rss_limit(usage);
    if usage.after.rss_kib > rss_limit {
        broken.push(format!(
            "relay RSS did not come back: {} KiB before the clients, {} KiB at peak, {} KiB after \
             (limit {rss_limit} KiB)",
            usage.baseline.rss_kib, usage.peak.rss_kib, usage.after.rss_kib
        ));
    }
    broken
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOLERANCE: Tolerance = Tolerance {
        fds: 16,
        rss_share: 0.25,
        rss_kib: 1024,
    };

    fn usage(baseline: (u64, u64), peak: (u64, u64), after: (u64, u64)) -> UsageFigures {
        let u = |(rss_kib, fds)| Usage { rss_kib, fds };
        UsageFigures {
            baseline: u(baseline),
            peak: u(peak),
            after: u(after),
        }
    }

    fn clean() -> Counts {
        Counts {
            sent: 10,
            echoed: 10,
            ..Counts::default()
        }
    }

    #[test]
    fn tags_round_trip_and_short_messages_have_none() {
        let tag = Tag {
            client: 7,
            generation: 3,
            seq: u64::MAX - 1,
        };
        let bytes = tag.encode(64);
        assert_eq!(bytes.len(), 64);
        assert_eq!(Tag::decode(&bytes), Some(tag));
        assert_eq!(tag.encode(4).len(), HEADER_LEN);
        assert_eq!(Tag::decode(&bytes[..HEADER_LEN - 1]), None);
    }

    #[test]
    fn echoes_in_order_drain_the_window() {
        let mut ledger = Ledger::default();
        let (a, b) = (ledger.send(), ledger.send());
        assert_eq!(ledger.in_flight(), 2);
        assert_eq!(ledger.echo(a), Echo::InOrder);
        assert_eq!(ledger.echo(b), Echo::InOrder);
        assert_eq!(ledger.in_flight(), 0);
    }

    #[test]
    fn an_overtaking_echo_is_out_of_order_and_a_repeat_is_a_duplicate() {
        let mut ledger = Ledger::default();
        let (a, b, c) = (ledger.send(), ledger.send(), ledger.send());
        assert_eq!(ledger.echo(b), Echo::OutOfOrder { expected: a });
        assert_eq!(ledger.echo(a), Echo::InOrder);
        assert_eq!(ledger.echo(a), Echo::Duplicate);
        assert_eq!(ledger.echo(b), Echo::Duplicate);
        assert_eq!(ledger.echo(c + 1), Echo::Unsent);
        assert_eq!(ledger.in_flight(), 1);
        assert_eq!(ledger.unanswered(), vec![c]);
    }

    #[test]
    fn a_clean_run_that_came_back_passes() {
        let u = usage((10_000, 20), (90_000, 10_020), (20_000, 30));
        assert!(TOLERANCE.returned(&u));
        assert!(broken_invariants(&clean(), 0, &u, &TOLERANCE).is_empty());
    }

    #[test]
    fn every_message_invariant_is_reported() {
        let u = usage((10_000, 20), (10_000, 20), (10_000, 20));
        for (counts, words) in [
            (Counts { lost: 2, ..clean() }, "2 messages lost"),
            (
                Counts {
                    out_of_order: 1,
                    ..clean()
                },
                "out of order",
            ),
            (
                Counts {
                    corrupt: 1,
                    ..clean()
                },
                "never sent",
            ),
            (
                Counts {
                    unexpected_closes: 3,
                    ..clean()
                },
                "3 connections closed by the relay",
            ),
            (Counts::default(), "no message came back"),
        ] {
            let broken = broken_invariants(&counts, 5, &u, &TOLERANCE);
            assert!(
                broken.iter().any(|b| b.contains(words)),
                "{counts:?}: {broken:?}"
            );
        }
    }

    #[test]
    fn duplicates_need_a_dead_backend() {
        let u = usage((10_000, 20), (10_000, 20), (10_000, 20));
        let counts = Counts {
            duplicates: 4,
            ..clean()
        };
        assert!(broken_invariants(&counts, 1, &u, &TOLERANCE).is_empty());
        let broken = broken_invariants(&counts, 0, &u, &TOLERANCE);
        assert_eq!(broken.len(), 1);
        assert!(broken[0].contains("no backend died"));
    }

    #[test]
    fn a_relay_that_keeps_files_or_memory_fails() {
        let leaked_fds = usage((10_000, 20), (90_000, 10_020), (20_000, 37));
        let broken = broken_invariants(&clean(), 0, &leaked_fds, &TOLERANCE);
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(broken[0].contains("open files"));
        assert!(!TOLERANCE.returned(&leaked_fds));

        // Growth 80,000 KiB: a quarter of it plus 1,024 KiB may stay.
        let limit = 10_000 + 1_024 + 20_000;
        let kept = usage((10_000, 20), (90_000, 10_020), (limit + 1, 20));
        assert_eq!(TOLERANCE.rss_limit(&kept), limit);
        let broken = broken_invariants(&clean(), 0, &kept, &TOLERANCE);
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(broken[0].contains("RSS"));
    }
}
