//! [`TestDns`]: a real DNS server (hickory-server) on 127.0.0.1, UDP and TCP on one port, with
//! an in-memory zone whose A and AAAA records a test changes between a relay's refreshes; and
//! [`backends_on_one_port`], backends on several loopback addresses sharing one port, as the
//! pods behind a headless Kubernetes Service do.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, MessageType, Metadata};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use tokio::net::{TcpListener, UdpSocket};

use crate::backend::{BackendBehavior, TestBackend};

/// Attempts at finding a port free on every address asked for.
const PORT_ATTEMPTS: usize = 20;

/// A DNS server authoritative for one zone, on `127.0.0.1:PORT` (UDP and TCP). Records answer
/// with TTL 0. Dropping it stops the server.
pub struct TestDns {
    addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler>,
    serial: AtomicU32,
    silent: Arc<AtomicBool>,
    server: Server<Quietable>,
}

/// The catalog, or nothing at all while `silent`: queries then go unanswered, as when a DNS
/// server is down behind a network that drops packets.
struct Quietable {
    catalog: Catalog,
    silent: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl RequestHandler for Quietable {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        if self.silent.load(Ordering::SeqCst) {
            let metadata = Metadata::new(
                request.metadata.id,
                MessageType::Response,
                request.metadata.op_code,
            );
            return ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            });
        }
        self.catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

impl TestDns {
    /// Starts a server authoritative for `zone` (e.g. `"test."`) with no records but its SOA.
    pub async fn start(zone: &str) -> TestDns {
        let origin = Name::from_str(zone).expect("a zone name");
        let mut handler =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            Name::from_str("ns")
                .unwrap()
                .append_domain(&origin)
                .unwrap(),
            Name::from_str("admin")
                .unwrap()
                .append_domain(&origin)
                .unwrap(),
            1,
            60,
            60,
            60,
            0,
        );
        handler.upsert_mut(Record::from_rdata(origin.clone(), 0, RData::SOA(soa)), 1);
        let zone = Arc::new(handler);
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::new(&origin),
            vec![zone.clone() as Arc<dyn ZoneHandler>],
        );
        let silent = Arc::new(AtomicBool::new(false));
        let mut server = Server::new(Quietable {
            catalog,
            silent: silent.clone(),
        });
        let (udp, tcp) = udp_and_tcp_on_one_port().await;
        let addr = udp.local_addr().unwrap();
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        TestDns {
            addr,
            zone,
            serial: AtomicU32::new(1),
            silent,
            server,
        }
    }

    /// Where it answers, UDP and TCP: the relay's `[server] resolver`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes `addresses` the A and AAAA records of `name` (e.g. `"chat.test."`) in one step
    /// (a query never sees half of the change); none removes the name (NXDOMAIN).
    pub async fn set(&self, name: &str, addresses: &[IpAddr]) {
        let name = Name::from_str(name).expect("a DNS name");
        let serial = self.serial.fetch_add(1, Ordering::SeqCst) + 1;
        let mut sets = [
            RecordSet::new(name.clone(), RecordType::A, serial),
            RecordSet::new(name.clone(), RecordType::AAAA, serial),
        ];
        for address in addresses {
            let (set, data) = match address {
                IpAddr::V4(v4) => (&mut sets[0], RData::A(A(*v4))),
                IpAddr::V6(v6) => (&mut sets[1], RData::AAAA(AAAA(*v6))),
            };
            set.insert(Record::from_rdata(name.clone(), 0, data), serial);
        }
        let mut records = self.zone.records_mut().await;
        for set in sets {
            let key = RrKey::new(LowerName::new(&name), set.record_type());
            if set.is_empty() {
                records.remove(&key);
            } else {
                records.insert(key, Arc::new(set));
            }
        }
    }

    /// While `silent`, queries get no answer at all (a lookup times out).
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.server.shutdown_token().cancel();
    }
}

/// A UDP socket and a TCP listener on the same free port of 127.0.0.1.
async fn udp_and_tcp_on_one_port() -> (UdpSocket, TcpListener) {
    for _ in 0..PORT_ATTEMPTS {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp);
        }
    }
    panic!("no port of 127.0.0.1 was free for both UDP and TCP in {PORT_ATTEMPTS} attempts");
}

/// A listener on each of `addresses`, all on one port: the first binds port 0 of its address,
/// the others that port of theirs; a port taken on one of them starts over.
pub fn listeners_on_one_port(addresses: &[IpAddr]) -> Vec<std::net::TcpListener> {
    'attempt: for _ in 0..PORT_ATTEMPTS {
        let first = addresses.first().expect("at least one address");
        let first = std::net::TcpListener::bind(SocketAddr::new(*first, 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for address in &addresses[1..] {
            match std::net::TcpListener::bind(SocketAddr::new(*address, port)) {
                Ok(listener) => listeners.push(listener),
                Err(_) => continue 'attempt,
            }
        }
        return listeners;
    }
    panic!("no port was free on all of {addresses:?} in {PORT_ATTEMPTS} attempts");
}

/// Echoing backends named by `named` (name, address), all on one port (see
/// [`listeners_on_one_port`]), by name.
pub fn backends_on_one_port(named: &[(&str, IpAddr)]) -> BTreeMap<String, TestBackend> {
    let addresses: Vec<IpAddr> = named.iter().map(|(_, address)| *address).collect();
    named
        .iter()
        .zip(listeners_on_one_port(&addresses))
        .map(|((name, _), listener)| {
            listener.set_nonblocking(true).unwrap();
            let listener = TcpListener::from_std(listener).unwrap();
            let backend = TestBackend::on_listener(
                name,
                BackendBehavior::default(),
                listener,
                Arc::default(),
            );
            (name.to_string(), backend)
        })
        .collect()
}

/// Whether this machine can listen on IPv6 loopback (`[::1]`).
pub async fn has_ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").await.is_ok()
}
