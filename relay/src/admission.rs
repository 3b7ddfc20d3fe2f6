//! Who may open a connection or start a handshake: the relay's protection limits. A client
//! connection is admitted with a [`ConnectionSlot`] (its share of `max_connections` and of
//! `max_connections_per_ip`), held until the connection, or the session it became, ends; new
//! WebSocket handshakes are paced by `max_handshakes_per_second`.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::inspect::RateLimit;

/// What a client connection holds while it lives.
pub(crate) struct ConnectionSlot {
    _connection: OwnedSemaphorePermit,
    _ip: IpShare,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotAdmitted {
    /// `max_connections` are open.
    OverCapacity,
    /// Its IP address holds `max_connections_per_ip` already.
    OverIpLimit,
}

/// The limits on connections, shared by the listener's tasks.
pub(crate) struct Admission {
    /// One permit per connection, handshaking or established (`max_connections`, fixed at
    /// start).
    connections: Arc<Semaphore>,
    /// Open connections by client IP.
    per_ip: Arc<DashMap<IpAddr, usize>>,
    /// The handshake pace and the rate it was made for (a reload may change the rate).
    handshakes: Mutex<Option<(u32, RateLimit)>>,
}

impl Admission {
    /// Limits for at most `max_connections` connections.
    pub fn new(max_connections: usize) -> Admission {
        Admission {
            connections: Arc::new(Semaphore::new(max_connections)),
            per_ip: Arc::default(),
            handshakes: Mutex::new(None),
        }
    }

    /// Admits a connection from `ip`, which may hold `per_ip_limit` connections (0: any
    /// number).
    pub fn admit(&self, ip: IpAddr, per_ip_limit: usize) -> Result<ConnectionSlot, NotAdmitted> {
        let connection = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| NotAdmitted::OverCapacity)?;
        let mut held = self.per_ip.entry(ip).or_insert(0);
        if !ip_admits(*held, per_ip_limit) {
            return Err(NotAdmitted::OverIpLimit);
        }
        *held += 1;
        drop(held);
        Ok(ConnectionSlot {
            _connection: connection,
            _ip: IpShare {
                counts: self.per_ip.clone(),
                ip,
            },
        })
    }

    /// Takes one handshake from the pace of `per_second` (0: unpaced); false when the relay
    /// already started that many in the last second.
    pub fn handshake_allowed(&self, per_second: u32, now: Instant) -> bool {
        if per_second == 0 {
            return true;
        }
        let mut pace = self.handshakes.lock().expect("handshake pace lock");
        match &mut *pace {
            Some((rate, bucket)) if *rate == per_second => bucket.take(now),
            other => {
                let mut bucket = RateLimit::new(per_second);
                let allowed = bucket.take(now);
                *other = Some((per_second, bucket));
                allowed
            }
        }
    }
}

/// Whether an IP holding `held` connections may open one more under `limit` (0: no limit).
fn ip_admits(held: usize, limit: usize) -> bool {
    limit == 0 || held < limit
}

/// A connection's share of its IP's count, given back when it ends.
struct IpShare {
    counts: Arc<DashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl Drop for IpShare {
    fn drop(&mut self) {
        self.counts.remove_if_mut(&self.ip, |_, held| {
            *held -= 1;
            *held == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_holds_at_most_its_limit_and_gets_it_back() {
        let admission = Admission::new(10);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let first = admission.admit(ip, 2).unwrap();
        let second = admission.admit(ip, 2).unwrap();
        assert_eq!(admission.admit(ip, 2).err(), Some(NotAdmitted::OverIpLimit));
        assert!(
            admission.admit(other, 2).is_ok(),
            "other addresses are not affected"
        );
        drop(first);
        let third = admission.admit(ip, 2).unwrap();
        drop((second, third));
        assert!(
            admission.per_ip.get(&ip).is_none(),
            "no entry is left behind"
        );
        assert!(ip_admits(1000, 0), "0 is no limit");
    }

    #[test]
    fn capacity_comes_first() {
        let admission = Admission::new(1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let _held = admission.admit(ip, 0).unwrap();
        assert_eq!(
            admission.admit(ip, 0).err(),
            Some(NotAdmitted::OverCapacity)
        );
    }

    #[test]
    fn handshakes_are_paced_and_a_new_rate_applies() {
        let admission = Admission::new(10);
        let now = Instant::now();
        assert!((0..3).all(|_| admission.handshake_allowed(3, now)));
        assert!(!admission.handshake_allowed(3, now));
        assert!(admission.handshake_allowed(0, now), "0 is unpaced");
        assert!(
            admission.handshake_allowed(5, now),
            "a reload's new rate starts full"
        );
    }
}
