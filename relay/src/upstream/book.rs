//! What the relay knows of each backend at run time: its health (from the answers of client
//! dials and of active probes) and the admin's drain flag. Rankings skip draining backends, and
//! unhealthy ones when active checks are on; `/api/backends` and metrics show both.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tracing::{info, warn};

use super::BackendSets;
use crate::config::Config;

/// One backend's run-time state.
#[derive(Debug, Default)]
pub struct BackendState {
    /// The upstream it belongs to.
    pub upstream: String,
    healthy: AtomicBool,
    /// With active health checks, an unhealthy backend leaves the ranking (they bring it back);
    /// without them, health is only reported.
    gates_ranking: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
    drained: AtomicBool,
}

impl BackendState {
    /// False after a failed dial, until one succeeds.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records a dial or probe result; returns the new health if it changed. With
    /// `thresholds` (`unhealthy_after`, `healthy_after`) health flips after that many results
    /// in a row; without, it follows the last result.
    fn record(&self, succeeded: bool, thresholds: Option<(u32, u32)>) -> Option<bool> {
        let (unhealthy_after, healthy_after) = thresholds.unwrap_or((1, 1));
        let flip_to = if succeeded {
            self.failures.store(0, Ordering::Relaxed);
            let run = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            (run >= healthy_after).then_some(true)
        } else {
            self.successes.store(0, Ordering::Relaxed);
            let run = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            (run >= unhealthy_after).then_some(false)
        }?;
        (self.healthy.swap(flip_to, Ordering::Relaxed) != flip_to).then_some(flip_to)
    }

    /// True once the admin drained it, or a reload removed it. Its sessions are told through
    /// the session registry.
    pub fn draining(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }
}

/// Every configured backend by URL.
#[derive(Debug, Default)]
pub struct BackendBook {
    backends: BTreeMap<Arc<str>, Arc<BackendState>>,
}

impl BackendBook {
    /// One entry per backend URL of the configuration, healthy until proven otherwise; a
    /// backend `previous` knew keeps its state (health, drain) across a reload.
    pub fn from_config(
        config: &Config,
        sets: &BackendSets,
        previous: Option<&BackendBook>,
    ) -> BackendBook {
        let mut backends = BTreeMap::new();
        for (name, upstream) in &config.upstreams {
            for backend in sets.get(name).map_or(&[][..], Vec::as_slice) {
                let url = &backend.url.original;
                let state = previous
                    .and_then(|book| book.get_arc(url))
                    .filter(|state| state.upstream == *name)
                    .unwrap_or_else(|| {
                        Arc::new(BackendState {
                            upstream: name.clone(),
                            healthy: AtomicBool::new(true),
                            ..BackendState::default()
                        })
                    });
                state
                    .gates_ranking
                    .store(upstream.health_check.is_some(), Ordering::Relaxed);
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

    /// True when new clients may be sent to `url`: it is not draining, and not unhealthy by
    /// active health checks.
    pub fn accepts_new(&self, url: &str) -> bool {
        self.get(url).is_none_or(|state| {
            !state.draining() && (state.healthy() || !state.gates_ranking.load(Ordering::Relaxed))
        })
    }

    /// Records an answer (or its absence) from `url`, with the upstream's `thresholds`, and
    /// says so when the backend's health flips.
    pub fn record(&self, url: &str, succeeded: bool, thresholds: Option<(u32, u32)>) {
        let Some(state) = self.get(url) else {
            return;
        };
        match state.record(succeeded, thresholds) {
            Some(true) => info!(backend = url, "backend healthy again"),
            Some(false) if state.gates_ranking.load(Ordering::Relaxed) => {
                warn!(
                    backend = url,
                    "backend unhealthy; out of the ranking until it recovers"
                );
            }
            Some(false) => warn!(backend = url, "backend unhealthy (its last answer failed)"),
            None => {}
        }
    }

    /// Starts draining `url`; false if no such backend is configured.
    pub fn drain(&self, url: &str) -> bool {
        match self.get(url) {
            Some(state) => {
                state.drained.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Every backend, by URL.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &BackendState)> {
        self.backends.iter().map(|(url, state)| (&**url, &**state))
    }

    /// True if any backend is healthy and not draining.
    pub fn any_ready(&self) -> bool {
        self.backends
            .values()
            .any(|state| state.healthy() && !state.draining())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_flips_after_runs_of_results() {
        let state = BackendState {
            healthy: AtomicBool::new(true),
            ..BackendState::default()
        };
        let thresholds = Some((2, 3));
        assert_eq!(state.record(false, thresholds), None);
        assert_eq!(state.record(false, thresholds), Some(false));
        assert_eq!(state.record(false, thresholds), None);
        assert_eq!(state.record(true, thresholds), None);
        assert_eq!(state.record(true, thresholds), None);
        assert_eq!(
            state.record(false, thresholds),
            None,
            "a failure restarts the run"
        );
        for _ in 0..2 {
            assert_eq!(state.record(true, thresholds), None);
        }
        assert_eq!(state.record(true, thresholds), Some(true));
        // Without thresholds, the last result decides.
        assert_eq!(state.record(false, None), Some(false));
        assert_eq!(state.record(true, None), Some(true));
    }
}
