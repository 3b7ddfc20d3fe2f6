//! What the relay knows of each backend at run time: passive health (did the last dial work?)
//! and the admin's drain flag. Rankings skip draining backends; `/api/backends` shows both.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// One backend's run-time state.
#[derive(Debug, Default)]
pub struct BackendState {
    /// The upstream it belongs to.
    pub upstream: String,
    healthy: AtomicBool,
    drained: CancellationToken,
}

impl BackendState {
    /// False after a failed dial, until one succeeds.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// True once the admin drained it.
    pub fn draining(&self) -> bool {
        self.drained.is_cancelled()
    }

    /// Completes when the admin drains it.
    pub fn drained(&self) -> &CancellationToken {
        &self.drained
    }
}

/// Every configured backend by URL.
#[derive(Debug, Default)]
pub struct BackendBook {
    backends: BTreeMap<String, Arc<BackendState>>,
}

impl BackendBook {
    /// One entry per backend URL of the configuration, healthy until proven otherwise; a
    /// backend `previous` knew keeps its state (health, drain) across a reload.
    pub fn from_config(config: &Config, previous: Option<&BackendBook>) -> BackendBook {
        let mut backends = BTreeMap::new();
        for (name, upstream) in &config.upstreams {
            for backend in upstream.backends.get_ref() {
                let url = &backend.url.original;
                let state = previous
                    .and_then(|book| book.get_arc(url))
                    .filter(|state| state.upstream == *name)
                    .unwrap_or_else(|| {
                        Arc::new(BackendState {
                            upstream: name.clone(),
                            healthy: AtomicBool::new(true),
                            drained: CancellationToken::new(),
                        })
                    });
                backends.insert(url.clone(), state);
            }
        }
        BackendBook { backends }
    }

    /// The shared state of `url`, for a session to keep across reloads.
    pub fn get_arc(&self, url: &str) -> Option<Arc<BackendState>> {
        self.backends.get(url).cloned()
    }

    /// The state of `url`, if it is configured.
    pub fn get(&self, url: &str) -> Option<&BackendState> {
        self.backends.get(url).map(|state| &**state)
    }

    /// Records a dial's result; returns true if the health changed.
    pub fn record_dial(&self, url: &str, succeeded: bool) -> bool {
        self.get(url)
            .is_some_and(|state| state.healthy.swap(succeeded, Ordering::Relaxed) != succeeded)
    }

    /// True when new clients may be sent to `url`.
    pub fn accepts_new(&self, url: &str) -> bool {
        self.get(url).is_none_or(|state| !state.draining())
    }

    /// Starts draining `url`; false if no such backend is configured.
    pub fn drain(&self, url: &str) -> bool {
        match self.get(url) {
            Some(state) => {
                state.drained.cancel();
                true
            }
            None => false,
        }
    }

    /// Every backend, by URL.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &BackendState)> {
        self.backends.iter().map(|(url, state)| (url, &**state))
    }

    /// True if any backend is healthy and not draining.
    pub fn any_ready(&self) -> bool {
        self.backends
            .values()
            .any(|state| state.healthy() && !state.draining())
    }
}
