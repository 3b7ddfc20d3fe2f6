//! Who may open a connection or start a handshake: the relay's protection limits. A client
//! connection is admitted with a [`ConnectionSlot`] (its share of `max_connections` and of
//! `max_connections_per_ip`), held until the connection, or the session it became, ends; new
//! WebSocket handshakes are paced by `max_handshakes_per_second`.
//!
//! An HTTP/2 connection carries many WebSockets: its slot goes to the first, and each other
//! one is admitted on its own ([`ConnectionAdmission::claim`]), so the limits count WebSockets
//! whichever HTTP version carries them.

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

/// A client connection's admission, shared by its requests: refused at accept, or its slot
/// until a WebSocket takes it.
pub(crate) struct ConnectionAdmission(Mutex<Result<Option<ConnectionSlot>, NotAdmitted>>);

impl ConnectionAdmission {
    /// The verdict at accept.
    pub fn new(admitted: Result<ConnectionSlot, NotAdmitted>) -> ConnectionAdmission {
        ConnectionAdmission(Mutex::new(admitted.map(Some)))
    }

    /// What one request of the connection may hold. A request that is no WebSocket holds
    /// nothing, but over HTTP/1.1 a connection refused at accept has every request refused (it
    /// is closed after the answer). A WebSocket takes the connection's slot while it has one;
    /// otherwise (the slot went to an earlier WebSocket of an HTTP/2 connection, or such a
    /// connection was refused at accept) it is admitted on its own from `ip`, which may hold
    /// `per_ip_limit` connections.
    pub fn claim(
        &self,
        http2: bool,
        websocket: bool,
        admission: &Admission,
        ip: IpAddr,
        per_ip_limit: usize,
    ) -> Result<Option<ConnectionSlot>, NotAdmitted> {
        {
            let mut held = self.0.lock().expect("admission lock");
            match &mut *held {
                Err(refused) if !http2 => return Err(*refused),
                _ if !websocket => return Ok(None),
                Ok(slot @ Some(_)) => return Ok(slot.take()),
                _ => {}
            }
        }
        admission.admit(ip, per_ip_limit).map(Some)
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
    fn an_http2_connection_gives_its_slot_to_one_websocket_and_admits_the_others() {
        let admission = Admission::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let connection = ConnectionAdmission::new(admission.admit(ip, 0));
        assert!(matches!(
            connection.claim(true, false, &admission, ip, 0),
            Ok(None)
        ));
        let first = connection.claim(true, true, &admission, ip, 0).unwrap();
        assert!(first.is_some(), "the connection's own slot");
        let second = connection.claim(true, true, &admission, ip, 0).unwrap();
        assert!(second.is_some(), "a slot of its own");
        assert_eq!(
            connection.claim(true, true, &admission, ip, 0).err(),
            Some(NotAdmitted::OverCapacity)
        );
        drop(first);
        assert!(connection.claim(true, true, &admission, ip, 0).is_ok());
    }

    #[test]
    fn an_http1_connection_refused_at_accept_stays_refused() {
        let admission = Admission::new(1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let _held = admission.admit(ip, 0).unwrap();
        let connection = ConnectionAdmission::new(admission.admit(ip, 0));
        drop(_held);
        assert_eq!(
            connection.claim(false, false, &admission, ip, 0).err(),
            Some(NotAdmitted::OverCapacity),
            "every request of it"
        );
        assert_eq!(
            connection.claim(false, true, &admission, ip, 0).err(),
            Some(NotAdmitted::OverCapacity)
        );
        assert!(
            connection.claim(true, true, &admission, ip, 0).is_ok(),
            "over HTTP/2 the next stream tries again"
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
