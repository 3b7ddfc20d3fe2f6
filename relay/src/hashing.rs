//! Rendezvous (highest-random-weight) hashing of clients onto backends.
//!
//! The score of a (key, backend) pair is `xxh3_64(key bytes ++ 0xFF ++ backend URL bytes)`,
//! seed 0: a fixed, published function, so two relays with the same backend list rank every
//! key identically with no coordination, across processes, builds and machines. With equal
//! weights the backends are ordered by that score (ties by URL); with unequal weights by the
//! logarithmic method of "Weighted Distributed Hash Tables" (`ln(score / 2^64) / weight`), as
//! implemented by the `rendezvous_hash` crate. Removing a backend moves only the keys it held.

use std::hash::{Hash, Hasher};

use rendezvous_hash::{Capacity, KeyValueNode, NodeHasher, RendezvousNodes, WeightedNode};
use xxhash_rust::xxh3::Xxh3;

/// A backend's identity for hashing: its URL exactly as configured.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct BackendId(String);

impl Hash for BackendId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

/// The bytes that identify a client (see `hash_key`), hashed as themselves plus a 0xFF
/// separator so `("ab", "c")` and `("a", "bc")` differ.
#[derive(Debug, Clone, Copy)]
struct ClientKey<'a>(&'a [u8]);

impl Hash for ClientKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0);
        state.write_u8(0xFF);
    }
}

/// The fixed hash function behind every ranking (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
struct StableNodeHasher;

impl NodeHasher<BackendId> for StableNodeHasher {
    fn hash<T: Hash>(&self, node: &BackendId, item: &T) -> u64 {
        let mut hasher = Xxh3::new();
        item.hash(&mut hasher);
        node.hash(&mut hasher);
        hasher.finish()
    }
}

/// The ranking of one upstream's backends; `rank` yields backend indexes, best first.
pub struct Ranking {
    nodes: RankingNodes,
}

enum RankingNodes {
    /// All weights equal: order by the integer score, exact on every platform.
    Uniform(RendezvousNodes<KeyValueNode<BackendId, usize>, StableNodeHasher>),
    /// Unequal weights: the logarithmic method.
    Weighted(RendezvousNodes<WeightedNode<KeyValueNode<BackendId, usize>>, StableNodeHasher>),
}

impl Ranking {
    /// Builds a ranking over `(url, weight)` pairs; indexes in results refer to this order.
    ///
    /// Weights must be positive and finite (the config guarantees it); others count as 1.0.
    pub fn new<'a>(backends: impl IntoIterator<Item = (&'a str, f64)>) -> Ranking {
        let backends: Vec<(&str, f64)> = backends.into_iter().collect();
        let uniform = backends.windows(2).all(|pair| pair[0].1 == pair[1].1);
        let node = |index: usize, url: &str| KeyValueNode::new(BackendId(url.to_owned()), index);
        let nodes = if uniform {
            let mut nodes = RendezvousNodes::new(StableNodeHasher);
            for (index, (url, _)) in backends.iter().enumerate() {
                nodes.insert(node(index, url));
            }
            RankingNodes::Uniform(nodes)
        } else {
            let mut nodes = RendezvousNodes::new(StableNodeHasher);
            for (index, (url, weight)) in backends.iter().enumerate() {
                let capacity =
                    Capacity::new(*weight).unwrap_or_else(|| Capacity::new(1.0).unwrap());
                nodes.insert(WeightedNode::new(node(index, url), capacity));
            }
            RankingNodes::Weighted(nodes)
        };
        Ranking { nodes }
    }

    /// Backend indexes for `key`, best first.
    pub fn rank(&self, key: &[u8]) -> Vec<usize> {
        let key = ClientKey(key);
        match &self.nodes {
            RankingNodes::Uniform(nodes) => nodes.calc_candidates(&key).map(|n| n.value).collect(),
            RankingNodes::Weighted(nodes) => {
                nodes.calc_candidates(&key).map(|n| n.node.value).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(count: usize) -> Vec<String> {
        (1..=count)
            .map(|i| format!("ws://10.0.0.{i}:9000"))
            .collect()
    }

    fn top(ranking: &Ranking, key: &str) -> usize {
        ranking.rank(key.as_bytes())[0]
    }

    /// Pins the function itself: if this changes, relays of different versions disagree.
    #[test]
    fn ranking_is_pinned() {
        let mut hasher = Xxh3::new();
        ClientKey(b"alice").hash(&mut hasher);
        BackendId("ws://10.0.0.1:9000".into()).hash(&mut hasher);
        assert_eq!(
            hasher.finish(),
            xxhash_rust::xxh3::xxh3_64(b"alice\xffws://10.0.0.1:9000")
        );

        let urls = urls(4);
        let ranking = Ranking::new(urls.iter().map(|u| (u.as_str(), 1.0)));
        let pinned: Vec<(&str, Vec<usize>)> =
            ["alice", "bob", "carol", "dave", "10.1.2.3", "/chat/room-7"]
                .iter()
                .map(|key| (*key, ranking.rank(key.as_bytes())))
                .collect();
        assert_eq!(
            pinned,
            vec![
                ("alice", vec![3, 2, 0, 1]),
                ("bob", vec![0, 3, 1, 2]),
                ("carol", vec![1, 2, 3, 0]),
                ("dave", vec![1, 0, 3, 2]),
                ("10.1.2.3", vec![3, 1, 0, 2]),
                ("/chat/room-7", vec![0, 1, 3, 2]),
            ]
        );
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let all = urls(5);
        let before = Ranking::new(all.iter().map(|u| (u.as_str(), 1.0)));
        let removed = 2;
        let remaining: Vec<&String> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != removed)
            .map(|(_, u)| u)
            .collect();
        let after = Ranking::new(remaining.iter().map(|u| (u.as_str(), 1.0)));
        let mut moved = 0;
        for n in 0..10_000 {
            let key = format!("client-{n}");
            let old = &all[top(&before, &key)];
            let new = remaining[top(&after, &key)];
            if old != new {
                assert_eq!(old, &all[removed], "{key} moved off a backend that stayed");
                moved += 1;
            }
        }
        // The removed backend held about a fifth of the keys; all of them moved.
        assert!((1_600..2_400).contains(&moved), "moved {moved}");
    }

    #[test]
    fn weights_split_keys_in_proportion() {
        let all = urls(3);
        let weights = [1.0, 2.0, 5.0];
        let ranking = Ranking::new(all.iter().map(String::as_str).zip(weights));
        let mut counts = [0usize; 3];
        let total = 10_000;
        for n in 0..total {
            counts[top(&ranking, &format!("client-{n}"))] += 1;
        }
        let weight_sum: f64 = weights.iter().sum();
        for (index, weight) in weights.iter().enumerate() {
            let expected = weight / weight_sum * 100.0;
            let actual = counts[index] as f64 / total as f64 * 100.0;
            assert!(
                (expected - actual).abs() < 2.0,
                "backend {index}: {actual:.1}% vs {expected:.1}%"
            );
        }
    }

    #[test]
    fn equal_weights_spread_evenly() {
        let all = urls(4);
        let ranking = Ranking::new(all.iter().map(|u| (u.as_str(), 1.0)));
        let mut counts = [0usize; 4];
        for n in 0..10_000 {
            counts[top(&ranking, &format!("10.0.{}.{}", n / 256, n % 256))] += 1;
        }
        for count in counts {
            assert!((2_300..2_700).contains(&count), "{counts:?}");
        }
    }
}
