//! The registry of established sessions: `GET /api/connections`, the session count, and the
//! figures metrics derive at scrape time (connections per route and backend, traffic).
//!
//! Each session owns a [`SessionEntry`]; its pump stores its traffic counters there (relaxed
//! stores into memory only that session writes), so reading the registry never slows a session
//! and a scrape sees traffic as of the session's last round of pumping. A session that ends adds
//! its traffic to the registry's totals of closed sessions, once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::SystemTime;

use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use serde::Serialize;

use crate::config::Mode;
use crate::pump::Traffic;

/// The four traffic counters, stored as relaxed atomics.
#[derive(Debug, Default)]
struct TrafficCells {
    client_messages: AtomicU64,
    client_bytes: AtomicU64,
    backend_messages: AtomicU64,
    backend_bytes: AtomicU64,
}

impl TrafficCells {
    fn load(&self) -> Traffic {
        Traffic {
            client_messages: self.client_messages.load(Ordering::Relaxed),
            client_bytes: self.client_bytes.load(Ordering::Relaxed),
            backend_messages: self.backend_messages.load(Ordering::Relaxed),
            backend_bytes: self.backend_bytes.load(Ordering::Relaxed),
        }
    }

    fn store(&self, traffic: &Traffic) {
        self.client_messages
            .store(traffic.client_messages, Ordering::Relaxed);
        self.client_bytes
            .store(traffic.client_bytes, Ordering::Relaxed);
        self.backend_messages
            .store(traffic.backend_messages, Ordering::Relaxed);
        self.backend_bytes
            .store(traffic.backend_bytes, Ordering::Relaxed);
    }

    fn add(&self, traffic: &Traffic) {
        self.client_messages
            .fetch_add(traffic.client_messages, Ordering::Relaxed);
        self.client_bytes
            .fetch_add(traffic.client_bytes, Ordering::Relaxed);
        self.backend_messages
            .fetch_add(traffic.backend_messages, Ordering::Relaxed);
        self.backend_bytes
            .fetch_add(traffic.backend_bytes, Ordering::Relaxed);
    }
}

/// What the relay asks of a session from outside it. Each is a bit in the session's entry,
/// raised by whoever walks the registry (the drain, the admin, a reload) and read by the
/// session's pump: one word and one waker per session, rather than a waiter in a queue for
/// each thing that could stop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// The relay drains: close with 1001 at the session's turn.
    Drain = 1,
    /// The session's backend was drained or removed: move after the grace period.
    BackendDrained = 2,
    /// The admin closed the connection (`DELETE /api/connections/ID`).
    Close = 4,
    /// The grace period is over: the session is dropped where it stands. Its pump only needs
    /// waking; what ends the session is the relay's flag ([`crate::shutdown::Shutdown`]).
    Abort = 8,
}

/// The stop requests raised so far, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StopRequests(u8);

impl StopRequests {
    /// True if `request` is among them.
    pub fn has(self, request: StopRequest) -> bool {
        self.0 & request as u8 != 0
    }
}

/// A session pump's side of its stop requests: the waker it gave and the requests it saw.
#[derive(Debug, Default)]
pub struct StopListener {
    registered: Option<Waker>,
    seen: u8,
}

/// What the admin API shows of one session.
#[derive(Debug)]
pub struct SessionEntry {
    /// Connection id.
    pub id: u64,
    /// Client address.
    pub client_addr: SocketAddr,
    /// The HTTP version that carries the client: `1.1` or `2`.
    pub http: &'static str,
    /// Route path prefix.
    pub route: Arc<str>,
    /// Request path.
    pub path: Box<str>,
    /// How its route carries it.
    mode: Mode,
    /// When the session was established.
    pub since: SystemTime,
    backend: Mutex<Arc<str>>,
    traffic: TrafficCells,
    /// The close the admin asked for (`DELETE /api/connections/ID`), once it did; boxed, as
    /// few sessions are ever asked.
    close_request: Mutex<Option<Box<(u16, String)>>>,
    /// [`StopRequest`] bits raised so far.
    stops: AtomicU8,
    /// The session's pump, to wake when one is raised.
    stop_waker: AtomicWaker,
}

impl SessionEntry {
    /// A new entry for a session on `backend`.
    pub fn new(
        id: u64,
        client_addr: SocketAddr,
        http: &'static str,
        route: Arc<str>,
        path: String,
        mode: Mode,
        backend: Arc<str>,
    ) -> SessionEntry {
        SessionEntry {
            id,
            client_addr,
            http,
            route,
            path: path.into_boxed_str(),
            mode,
            since: SystemTime::now(),
            backend: Mutex::new(backend),
            traffic: TrafficCells::default(),
            close_request: Mutex::new(None),
            stops: AtomicU8::new(0),
            stop_waker: AtomicWaker::new(),
        }
    }

    /// `per-client` or `mux`.
    pub fn mode(&self) -> &'static str {
        match self.mode {
            Mode::PerClient => "per-client",
            Mode::Mux => "mux",
        }
    }

    /// The backend serving the session now.
    pub fn backend(&self) -> Arc<str> {
        self.backend.lock().expect("backend lock").clone()
    }

    /// Records a move to another backend; a drain of the one it left no longer applies. Under
    /// the backend's lock, as [`SessionEntry::backend_drained`] reads it: a drain of the old
    /// backend is raised before the move (and cleared here) or sees the new one.
    pub fn set_backend(&self, backend: Arc<str>) {
        let mut current = self.backend.lock().expect("backend lock");
        *current = backend;
        self.stops
            .fetch_and(!(StopRequest::BackendDrained as u8), Ordering::AcqRel);
    }

    /// Raises `request` and wakes the session's pump.
    pub fn raise(&self, request: StopRequest) {
        self.stops.fetch_or(request as u8, Ordering::AcqRel);
        self.stop_waker.wake();
    }

    /// Raises [`StopRequest::BackendDrained`] if the session is on `url`.
    pub fn backend_drained(&self, url: &str) {
        let backend = self.backend.lock().expect("backend lock");
        if **backend == *url {
            self.raise(StopRequest::BackendDrained);
        }
    }

    /// The requests raised so far; `cx`'s task is woken at the next raise. `listener` keeps
    /// what the last poll saw, so a poll with the same waker and nothing new costs a load and
    /// two comparisons.
    pub fn poll_stops(&self, cx: &mut Context<'_>, listener: &mut StopListener) -> StopRequests {
        let raised = self.stops.load(Ordering::Acquire);
        let same_waker = listener
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        if raised == listener.seen && same_waker {
            return StopRequests(raised);
        }
        // A raise since the last poll took the waker out to wake it: give it again, or the
        // next raise (a drain after a drained backend) would wake nobody.
        self.stop_waker.register(cx.waker());
        listener.registered = Some(cx.waker().clone());
        // Raised between the first load and the registration: its wake found no waker.
        listener.seen = self.stops.load(Ordering::Acquire);
        StopRequests(listener.seen)
    }

    /// Asks the session to close with `code` and `reason`.
    pub fn request_close(&self, code: u16, reason: String) {
        *self.close_request.lock().expect("close request lock") = Some(Box::new((code, reason)));
        self.raise(StopRequest::Close);
    }

    /// The close the admin asked for, once it did.
    pub fn close_request(&self) -> Option<(u16, String)> {
        self.close_request
            .lock()
            .expect("close request lock")
            .as_deref()
            .cloned()
    }

    /// Stores the session's traffic so far.
    #[inline]
    pub fn store_traffic(&self, traffic: &Traffic) {
        self.traffic.store(traffic);
    }

    /// A JSON-ready snapshot.
    pub fn snapshot(&self) -> SessionSnapshot {
        let traffic = self.traffic.load();
        SessionSnapshot {
            id: self.id,
            client_addr: self.client_addr.to_string(),
            http: self.http,
            route: self.route.to_string(),
            path: self.path.to_string(),
            backend: self.backend().to_string(),
            mode: self.mode(),
            since_unix_ms: self
                .since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            messages_in: traffic.client_messages,
            bytes_in: traffic.client_bytes,
            messages_out: traffic.backend_messages,
            bytes_out: traffic.backend_bytes,
        }
    }
}

/// One row of `GET /api/connections`.
#[derive(Debug, Clone, Serialize)]
pub struct SessionSnapshot {
    /// Connection id.
    pub id: u64,
    /// Client address.
    pub client_addr: String,
    /// The HTTP version that carries the client: `"1.1"` or `"2"`.
    pub http: &'static str,
    /// Route path prefix.
    pub route: String,
    /// Request path.
    pub path: String,
    /// Backend URL.
    pub backend: String,
    /// `per-client` or `mux`.
    pub mode: &'static str,
    /// Established at, Unix milliseconds.
    pub since_unix_ms: u64,
    /// Messages from the client.
    pub messages_in: u64,
    /// Bytes from the client.
    pub bytes_in: u64,
    /// Messages to the client.
    pub messages_out: u64,
    /// Bytes to the client.
    pub bytes_out: u64,
}

/// All established sessions.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: DashMap<u64, Arc<SessionEntry>>,
    /// What sessions that ended carried.
    closed: TrafficCells,
}

impl SessionRegistry {
    /// Adds a session; it is removed when the returned guard drops.
    pub fn register(self: &Arc<Self>, entry: Arc<SessionEntry>) -> Registered {
        self.sessions.insert(entry.id, entry.clone());
        Registered {
            registry: self.clone(),
            id: entry.id,
        }
    }

    /// Snapshots of every session, by id.
    pub fn snapshot(&self) -> Vec<SessionSnapshot> {
        let mut rows: Vec<SessionSnapshot> = self.sessions.iter().map(|e| e.snapshot()).collect();
        rows.sort_by_key(|row| row.id);
        rows
    }

    /// Asks open session `id` to close with `code` and `reason`; false if there is none.
    pub fn close(&self, id: u64, code: u16, reason: String) -> bool {
        match self.sessions.get(&id) {
            Some(entry) => {
                entry.request_close(code, reason);
                true
            }
            None => false,
        }
    }

    /// Asks every open session to drain. A session registered after this walk checks the
    /// relay's drain itself once registered.
    pub fn drain_all(&self) {
        for entry in self.sessions.iter() {
            entry.raise(StopRequest::Drain);
        }
    }

    /// Wakes every open session at the end of the grace period, for it to see the abort.
    pub fn abort_all(&self) {
        for entry in self.sessions.iter() {
            entry.raise(StopRequest::Abort);
        }
    }

    /// Tells the sessions on `url` that it was drained or removed. A session that moves to
    /// it later looks at the backend's state itself.
    pub fn backend_drained(&self, url: &str) {
        for entry in self.sessions.iter() {
            entry.backend_drained(url);
        }
    }

    /// True while session `id` is open.
    pub fn contains(&self, id: u64) -> bool {
        self.sessions.contains_key(&id)
    }

    /// Open sessions by (route, backend) and by (mode, backend), and the traffic of every
    /// session so far, open or ended. The ended ones are read first: a session ending during
    /// the walk is at worst missed for this scrape, never counted twice.
    pub fn census(&self) -> Census {
        let mut census = Census {
            traffic: self.closed.load(),
            ..Census::default()
        };
        for entry in self.sessions.iter() {
            let backend = entry.backend();
            *census
                .by_route
                .entry((entry.route.clone(), backend.clone()))
                .or_default() += 1;
            if entry.mode == Mode::Mux {
                *census.mux_streams.entry(backend).or_default() += 1;
            }
            census.traffic.add(&entry.traffic.load());
        }
        census
    }

    /// Sessions now.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }
}

/// What [`SessionRegistry::census`] counts.
#[derive(Debug, Default)]
pub struct Census {
    /// Open sessions by (route, backend).
    pub by_route: BTreeMap<(Arc<str>, Arc<str>), i64>,
    /// Open mux-mode sessions (streams) by backend.
    pub mux_streams: BTreeMap<Arc<str>, i64>,
    /// Traffic of all sessions, open and ended.
    pub traffic: Traffic,
}

/// Keeps a session in the registry while alive.
pub struct Registered {
    registry: Arc<SessionRegistry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some((_, entry)) = self.registry.sessions.remove(&self.id) {
            self.registry.closed.add(&entry.traffic.load());
        }
    }
}
