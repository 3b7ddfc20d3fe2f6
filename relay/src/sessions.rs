//! The registry of established sessions, for `GET /api/connections` and backend drains.
//!
//! Each session owns an [`SessionEntry`]; its pump stores its traffic counters there (relaxed
//! stores into memory only that session writes), so reading the registry never slows a session.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;
use serde::Serialize;

use crate::pump::Traffic;

/// What the admin API shows of one session.
#[derive(Debug)]
pub struct SessionEntry {
    /// Connection id.
    pub id: u64,
    /// Client address.
    pub client_addr: SocketAddr,
    /// Route path prefix.
    pub route: Arc<str>,
    /// Request path.
    pub path: String,
    /// `per-client` or `mux`.
    pub mode: &'static str,
    /// When the session was established.
    pub since: SystemTime,
    backend: Mutex<Arc<str>>,
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
}

impl SessionEntry {
    /// A new entry for a session on `backend`.
    pub fn new(
        id: u64,
        client_addr: SocketAddr,
        route: Arc<str>,
        path: String,
        mode: &'static str,
        backend: Arc<str>,
    ) -> SessionEntry {
        SessionEntry {
            id,
            client_addr,
            route,
            path,
            mode,
            since: SystemTime::now(),
            backend: Mutex::new(backend),
            messages_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }

    /// The backend serving the session now.
    pub fn backend(&self) -> Arc<str> {
        self.backend.lock().expect("backend lock").clone()
    }

    /// Records a move to another backend.
    pub fn set_backend(&self, backend: Arc<str>) {
        *self.backend.lock().expect("backend lock") = backend;
    }

    /// Stores the session's traffic so far.
    #[inline]
    pub fn store_traffic(&self, traffic: &Traffic) {
        self.messages_in
            .store(traffic.client_messages, Ordering::Relaxed);
        self.bytes_in.store(traffic.client_bytes, Ordering::Relaxed);
        self.messages_out
            .store(traffic.backend_messages, Ordering::Relaxed);
        self.bytes_out
            .store(traffic.backend_bytes, Ordering::Relaxed);
    }

    /// A JSON-ready snapshot.
    pub fn snapshot(&self) -> SessionSnapshot {
        SessionSnapshot {
            id: self.id,
            client_addr: self.client_addr.to_string(),
            route: self.route.to_string(),
            path: self.path.clone(),
            backend: self.backend().to_string(),
            mode: self.mode,
            since_unix_ms: self
                .since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            messages_in: self.messages_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
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

    /// Sessions currently on `backend`.
    pub fn count_on(&self, backend: &str) -> usize {
        self.sessions
            .iter()
            .filter(|entry| &*entry.backend() == backend)
            .count()
    }

    /// Sessions now.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// Keeps a session in the registry while alive.
pub struct Registered {
    registry: Arc<SessionRegistry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.sessions.remove(&self.id);
    }
}
