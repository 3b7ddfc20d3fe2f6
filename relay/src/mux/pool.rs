//! The links of every mux upstream: `mux_links` slots per backend, each owned by a task that
//! dials the backend, runs the link, and re-dials with exponential backoff and jitter when it
//! ends. Sessions pick the least loaded live link of their backend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use wsrelay_protocol::{Link, LinkConfig, LinkHandle, LinkRole, max_message_len};

use super::LINK_SUBPROTOCOL;
use crate::Shared;
use crate::config::Mode;
use crate::dial::{BackendRequest, dial};
use crate::route::Upstream;
use crate::routing::Routing;

/// First re-dial delay after a link ends; it doubles per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between re-dials.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One link slot: the live link, if any.
#[derive(Default)]
struct Slot {
    link: Mutex<Option<LinkHandle>>,
}

/// The link slots of one upstream, by backend index.
struct UpstreamLinks {
    backends: Vec<Vec<Arc<Slot>>>,
}

/// Links of every mux upstream of one configuration generation.
#[derive(Default)]
pub struct MuxPool {
    upstreams: BTreeMap<String, UpstreamLinks>,
}

impl MuxPool {
    /// Slots for every upstream used by a mux route (the tasks start with [`MuxPool::start`]).
    pub fn new(routing_upstreams: &[(Arc<Upstream>, Mode)]) -> MuxPool {
        let mut upstreams = BTreeMap::new();
        for (upstream, mode) in routing_upstreams {
            if *mode != Mode::Mux || upstreams.contains_key(&upstream.name) {
                continue;
            }
            let backends = upstream
                .backends
                .iter()
                .map(|_| {
                    (0..upstream.mux_links)
                        .map(|_| Arc::new(Slot::default()))
                        .collect()
                })
                .collect();
            upstreams.insert(upstream.name.clone(), UpstreamLinks { backends });
        }
        MuxPool { upstreams }
    }

    /// The least loaded live link to backend `index` of `upstream`, if any is up.
    pub fn pick(&self, upstream: &str, index: usize) -> Option<LinkHandle> {
        self.upstreams
            .get(upstream)?
            .backends
            .get(index)?
            .iter()
            .filter_map(|slot| slot.link.lock().expect("slot lock").clone())
            .filter(|link| !link.is_closed() && !link.is_going_away())
            .min_by_key(LinkHandle::open_streams)
    }

    /// Live links and open streams to `backend` (by URL), for `/api/backends`.
    pub fn load(&self, routing: &Routing, url: &str) -> (usize, usize) {
        let mut links = 0;
        let mut streams = 0;
        for upstream in routing.routes.upstreams() {
            let Some(slots) = self.upstreams.get(&upstream.name) else {
                continue;
            };
            for (index, backend) in upstream.backends.iter().enumerate() {
                if backend.original != url {
                    continue;
                }
                for slot in &slots.backends[index] {
                    if let Some(link) = slot.link.lock().expect("slot lock").as_ref()
                        && !link.is_closed()
                    {
                        links += 1;
                        streams += link.open_streams();
                    }
                }
            }
        }
        (links, streams)
    }

    /// Starts one task per slot. They run until `routing` is retired by a reload or the relay
    /// drains; then they send GoAway and let their links end once their streams have.
    pub(crate) fn start(shared: &Arc<Shared>, routing: &Arc<Routing>) {
        for upstream in routing.routes.upstreams() {
            let Some(links) = routing.mux.upstreams.get(&upstream.name) else {
                continue;
            };
            for (index, slots) in links.backends.iter().enumerate() {
                for (number, slot) in slots.iter().enumerate() {
                    let task = run_slot(
                        shared.clone(),
                        routing.clone(),
                        upstream.clone(),
                        index,
                        number,
                        slot.clone(),
                    );
                    shared.tasks.spawn(task);
                }
            }
        }
    }
}

/// The settings of relay-side links: the relay's message limit bounds a stream's messages.
pub(super) fn link_config(routing: &Routing) -> LinkConfig {
    let max_frame = u32::try_from(routing.config.limits.max_message_size.0).unwrap_or(u32::MAX);
    let keepalive = &routing.keepalive;
    LinkConfig {
        max_frame,
        // The least the protocol allows: a stream whose client doesn't read holds at most one
        // window in the relay.
        initial_window: max_frame,
        ping_interval: keepalive.ping_interval.unwrap_or(Duration::from_secs(20)),
        pong_timeout: keepalive.pong_timeout,
        ..LinkConfig::default()
    }
}

/// The handshake request of a link: the backend's base path, the mux subprotocol.
fn link_request() -> BackendRequest {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static("wsrelay-mux-link"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(LINK_SUBPROTOCOL),
    );
    BackendRequest {
        path_and_query: "/".into(),
        client_host: None,
        headers,
        preserve_host: false,
    }
}

async fn run_slot(
    shared: Arc<Shared>,
    routing: Arc<Routing>,
    upstream: Arc<Upstream>,
    index: usize,
    number: usize,
    slot: Arc<Slot>,
) {
    let backend = &upstream.backends[index];
    let url = backend.original.as_str();
    let config = link_config(&routing);
    let mut socket_config = routing.backend_ws;
    let largest = max_message_len(config.max_frame);
    socket_config.max_message_size = Some(largest);
    socket_config.max_frame_size = Some(largest);
    let request = link_request();
    let gauge = shared
        .metrics
        .mux_links
        .get_or_create_owned(&vec![("backend", url.to_owned())]);
    let mut backoff = MIN_BACKOFF;
    // A dead backend is reported once, not at every re-dial.
    let mut failures_in_a_row = 0u32;
    let stopping = || routing.retired.is_cancelled() || shared.shutdown.drain.is_cancelled();
    while !stopping() {
        let attempt = async {
            let dialed = dial(backend, &request, socket_config, upstream.connect_timeout).await;
            let dialed = dialed.map_err(|e| e.to_string())?;
            let establish = Link::establish(dialed.socket, LinkRole::Initiator, config.clone());
            tokio::time::timeout(upstream.connect_timeout, establish)
                .await
                .map_err(|_| "no Hello within connect_timeout".to_owned())?
                .map_err(|e| e.to_string())
        };
        let started = Instant::now();
        match attempt.await {
            Ok((link, driver)) => {
                failures_in_a_row = 0;
                record(&shared, &routing, &upstream, url, true);
                info!(backend = %url, link = number, "mux link up");
                *slot.link.lock().expect("slot lock") = Some(link.clone());
                gauge.inc();
                tokio::pin!(driver);
                let ended = tokio::select! {
                    ended = &mut driver => Some(ended),
                    () = routing.retired.cancelled() => {
                        link.go_away("configuration reloaded");
                        tokio::select! {
                            ended = &mut driver => Some(ended),
                            () = shared.shutdown.abort.cancelled() => None,
                        }
                    }
                    () = shared.shutdown.drain.cancelled() => {
                        link.go_away("relay shutting down");
                        tokio::select! {
                            ended = &mut driver => Some(ended),
                            () = shared.shutdown.abort.cancelled() => None,
                        }
                    }
                };
                gauge.dec();
                *slot.link.lock().expect("slot lock") = None;
                let Some(ended) = ended else {
                    return;
                };
                if ended.is_graceful() {
                    debug!(backend = %url, link = number, reason = %ended, "mux link closed");
                } else {
                    warn!(backend = %url, link = number, reason = %ended, "mux link lost");
                }
                // A link that lived a while earns a quick re-dial.
                if started.elapsed() > MAX_BACKOFF {
                    backoff = MIN_BACKOFF;
                }
            }
            Err(error) => {
                record(&shared, &routing, &upstream, url, false);
                failures_in_a_row += 1;
                if failures_in_a_row == 1 {
                    warn!(backend = %url, link = number, %error, "mux link dial failed; re-dialing with backoff");
                } else {
                    debug!(backend = %url, link = number, %error, retry_in = ?backoff, "mux link dial failed");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(jittered(backoff, number)) => {}
            () = routing.retired.cancelled() => break,
            () = shared.shutdown.drain.cancelled() => break,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn record(shared: &Shared, routing: &Routing, upstream: &Upstream, url: &str, ok: bool) {
    if let Some(state) = routing.backends.get(url)
        && let Some(healthy) = state.record(ok, upstream.health_thresholds())
    {
        shared.metrics.set_backend_healthy(url, healthy);
    }
}

/// `delay` scaled by a factor in [0.5, 1.5), different per slot and per call, so links that
/// failed together don't re-dial together.
fn jittered(delay: Duration, slot: usize) -> Duration {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ (slot as u32).wrapping_mul(0x9E37_79B9);
    let unit = (xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes()) % 1_000) as f64 / 1_000.0;
    delay.mul_f64(0.5 + unit)
}
