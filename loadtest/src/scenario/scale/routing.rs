//! The routing check of a scale run, from the backends' side: given what every backend recorded
//! (streams by key and by mux link) and which relay process holds each link, does every key
//! live on one backend only, whichever relay its clients went through?
//!
//! A pure function of its inputs, so a test can hand it a key on two backends and see it fail.
//! Beside the verdict it counts what makes the verdict mean something: keys whose clients came
//! through two or more relays (without those, agreeing is trivial), and streams per relay (the
//! kernel's `SO_REUSEPORT` spreading).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use serde::Serialize;

use super::recorder::Records;

/// Examples of keys found on several backends kept in the report.
const EXAMPLES: usize = 10;

/// What the backends' records say about routing.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RoutingCheck {
    /// Streams the backends saw opened, in all.
    pub streams: u64,
    /// Streams per backend, in the order of the backends.
    pub streams_per_backend: Vec<u64>,
    /// Distinct mux links (relay ends) that carried streams, per backend.
    pub links_per_backend: Vec<usize>,
    /// Streams per relay process, in the order of the relays.
    pub streams_per_relay: Vec<u64>,
    /// Streams that came on a link none of the relays holds (a link that ended and was
    /// replaced, or a process the run did not start).
    pub unattributed_streams: u64,
    /// Streams whose query had no `key=`.
    pub streams_without_key: u64,
    /// Distinct keys seen.
    pub keys: u64,
    /// Keys seen on more than one backend: the routing broke for them. Must be 0.
    pub keys_on_several_backends: u64,
    /// Up to ten of them, each with its streams per backend.
    pub split_keys: Vec<SplitKey>,
    /// Keys whose streams came through two or more relay processes: the relays agreed on
    /// these without talking to each other.
    pub keys_through_several_relays: u64,
    /// The most relays one key's streams came through.
    pub most_relays_for_one_key: usize,
}

/// A key seen on more than one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SplitKey {
    /// The key.
    pub key: String,
    /// Its streams on each backend, in the order of the backends.
    pub streams_per_backend: Vec<u64>,
}

/// Checks the records of every backend (`records[i]` is backend `i`'s), with `owners` mapping a
/// link's relay end to the relay's pid and `relays` the pids in report order.
pub fn check(
    records: &[Records],
    owners: &HashMap<SocketAddr, u32>,
    relays: &[u32],
) -> RoutingCheck {
    let relay_index: HashMap<u32, usize> =
        relays.iter().enumerate().map(|(i, &p)| (p, i)).collect();
    let mut result = RoutingCheck {
        streams_per_backend: records.iter().map(Records::streams).collect(),
        streams_per_relay: vec![0; relays.len()],
        ..RoutingCheck::default()
    };
    result.streams = result.streams_per_backend.iter().sum();
    // key -> (streams per backend, relays seen)
    let mut by_key: BTreeMap<&str, (Vec<u64>, BTreeSet<usize>)> = BTreeMap::new();
    for (backend, record) in records.iter().enumerate() {
        let mut links = BTreeSet::new();
        for (key, peers) in &record.keys {
            for (peer, &streams) in peers {
                links.insert(*peer);
                let relay = owners.get(peer).and_then(|pid| relay_index.get(pid));
                match relay {
                    Some(&r) => result.streams_per_relay[r] += streams,
                    None => result.unattributed_streams += streams,
                }
                if key.is_empty() {
                    result.streams_without_key += streams;
                    continue;
                }
                let (per_backend, through) = by_key
                    .entry(key)
                    .or_insert_with(|| (vec![0; records.len()], BTreeSet::new()));
                per_backend[backend] += streams;
                through.extend(relay);
            }
        }
        result.links_per_backend.push(links.len());
    }
    result.keys = by_key.len() as u64;
    for (key, (per_backend, through)) in &by_key {
        if per_backend.iter().filter(|&&n| n > 0).count() > 1 {
            result.keys_on_several_backends += 1;
            if result.split_keys.len() < EXAMPLES {
                result.split_keys.push(SplitKey {
                    key: (*key).to_owned(),
                    streams_per_backend: per_backend.clone(),
                });
            }
        }
        if through.len() > 1 {
            result.keys_through_several_relays += 1;
        }
        result.most_relays_for_one_key = result.most_relays_for_one_key.max(through.len());
    }
    result
}

impl RoutingCheck {
    /// The routing invariants this check breaks, in words: each key on one backend, every
    /// client (`connected`) seen by a backend exactly once with its key and its relay, every
    /// relay carrying clients, and, when keys had the chance (`relays` > 1 and
    /// `clients_per_key` > 1), some keys seen through several relays.
    pub fn broken(&self, connected: u64, relays: usize, clients_per_key: u64) -> Vec<String> {
        let mut broken = Vec::new();
        if self.keys_on_several_backends > 0 {
            let examples: Vec<String> = self
                .split_keys
                .iter()
                .map(|k| format!("key {} {:?}", k.key, k.streams_per_backend))
                .collect();
            broken.push(format!(
                "{} keys reached more than one backend (streams per backend: {})",
                self.keys_on_several_backends,
                examples.join(", ")
            ));
        }
        if self.streams != connected {
            broken.push(format!(
                "the backends saw {} streams opened for {connected} connected clients",
                self.streams
            ));
        }
        if self.streams_without_key > 0 {
            broken.push(format!(
                "{} streams reached a backend without their key",
                self.streams_without_key
            ));
        }
        if self.unattributed_streams > 0 {
            broken.push(format!(
                "{} streams came on links that none of the relays holds",
                self.unattributed_streams
            ));
        }
        let idle = self.streams_per_relay.iter().filter(|&&n| n == 0).count();
        if connected > 0 && idle > 0 {
            broken.push(format!(
                "{idle} of {relays} relays carried no client (SO_REUSEPORT spread nothing to them)"
            ));
        }
        if relays > 1
            && clients_per_key > 1
            && connected > 0
            && self.keys_through_several_relays == 0
        {
            broken.push(
                "no key came through more than one relay: the routing check compared nothing"
                    .into(),
            );
        }
        broken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Two relays (pids 10 and 20), each with one link to each of two backends: relay 10's
    /// links come from ports 1001 (backend 0) and 1002 (backend 1), relay 20's from 2001 and
    /// 2002.
    fn owners() -> HashMap<SocketAddr, u32> {
        HashMap::from([
            (addr(1001), 10),
            (addr(1002), 10),
            (addr(2001), 20),
            (addr(2002), 20),
        ])
    }

    fn records(streams: &[(&str, u16)]) -> Records {
        let mut r = Records::default();
        for &(key, port) in streams {
            r.record(key, addr(port));
        }
        r
    }

    #[test]
    fn agreeing_relays_pass() {
        // Key a lives on backend 0, key b on backend 1; both came through both relays.
        let backends = [
            records(&[("a", 1001), ("a", 2001)]),
            records(&[("b", 1002), ("b", 2002), ("b", 2002)]),
        ];
        let check = check(&backends, &owners(), &[10, 20]);
        assert_eq!(check.streams, 5);
        assert_eq!(check.streams_per_backend, [2, 3]);
        assert_eq!(check.links_per_backend, [2, 2]);
        assert_eq!(check.streams_per_relay, [2, 3]);
        assert_eq!(check.keys, 2);
        assert_eq!(check.keys_on_several_backends, 0);
        assert_eq!(check.keys_through_several_relays, 2);
        assert_eq!(check.most_relays_for_one_key, 2);
        assert!(
            check.broken(5, 2, 2).is_empty(),
            "{:?}",
            check.broken(5, 2, 2)
        );
    }

    #[test]
    fn a_key_on_two_backends_fails() {
        // Relay 20 sent key a to backend 1 while relay 10 sent it to backend 0.
        let backends = [
            records(&[("a", 1001)]),
            records(&[("a", 2002), ("b", 2002)]),
        ];
        let check = check(&backends, &owners(), &[10, 20]);
        assert_eq!(check.keys_on_several_backends, 1);
        assert_eq!(
            check.split_keys,
            [SplitKey {
                key: "a".into(),
                streams_per_backend: vec![1, 1]
            }]
        );
        let broken = check.broken(3, 2, 2);
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(broken[0].contains("1 keys reached more than one backend"));
        assert!(broken[0].contains("key a [1, 1]"));
    }

    #[test]
    fn missing_keys_strangers_and_idle_relays_fail() {
        let backends = [records(&[("", 1001), ("a", 3001)]), Records::default()];
        let check = check(&backends, &owners(), &[10, 20]);
        assert_eq!(check.streams_without_key, 1);
        assert_eq!(check.unattributed_streams, 1);
        assert_eq!(check.streams_per_relay, [1, 0]);
        let broken = check.broken(3, 2, 2).join("\n");
        for words in [
            "2 streams opened for 3 connected",
            "1 streams reached a backend without their key",
            "1 streams came on links that none",
            "1 of 2 relays carried no client",
            "no key came through more than one relay",
        ] {
            assert!(broken.contains(words), "{words} missing from\n{broken}");
        }
        // With one relay, or one client per key, nothing could have been compared.
        assert!(
            !check
                .broken(2, 1, 2)
                .join("\n")
                .contains("compared nothing")
        );
        assert!(
            !check
                .broken(2, 2, 1)
                .join("\n")
                .contains("compared nothing")
        );
    }
}
