//! The links of every mux upstream: `mux_links` slots per backend, each owned by a task that
//! dials the backend, runs the link, and re-dials with exponential backoff and jitter when it
//! ends. Sessions pick the least loaded live link of their backend.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use tungstenite::protocol::WebSocketConfig;
use wsrelay_protocol::{
    Link, LinkConfig, LinkDriver, LinkError, LinkHandle, LinkRole, max_message_len,
};

use super::Upstream;
use super::book::BackendBook;
use super::dial::dial;
use super::request::BackendRequest;
use crate::shutdown::Shutdown;

/// The WebSocket subprotocol a mux link is opened with.
pub(crate) use wsrelay_protocol::LINK_SUBPROTOCOL;

/// First re-dial delay after a link ends; it doubles per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between re-dials.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One link slot: the live link, if any, and whether its first dial is over.
#[derive(Default)]
struct Slot {
    link: Mutex<Option<LinkHandle>>,
    /// Set once the slot's first dial has succeeded or failed (or its generation retired).
    settled: AtomicBool,
    /// Woken when `settled` is set.
    first_dial: Notify,
}

impl Slot {
    /// Marks the first dial over, waking whoever waits for it.
    fn settle(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.first_dial.notify_waiters();
        }
    }
}

/// The link slots of one upstream, by backend index.
struct UpstreamLinks {
    backends: Vec<Vec<Arc<Slot>>>,
}

/// Links of every mux upstream of one configuration generation.
pub(crate) struct MuxPool {
    upstreams: BTreeMap<String, UpstreamLinks>,
    /// The settings of every link of this generation.
    config: LinkConfig,
}

impl MuxPool {
    /// Slots for every upstream in `mux_upstreams` (the tasks start with [`MuxPool::start`]),
    /// whose links will use `config`.
    pub fn new(mux_upstreams: &[Arc<Upstream>], config: LinkConfig) -> MuxPool {
        let mut upstreams = BTreeMap::new();
        for upstream in mux_upstreams {
            if upstreams.contains_key(&upstream.name) {
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
        MuxPool { upstreams, config }
    }

    /// The settings of this generation's links (also those of mux clients' links).
    pub fn link_config(&self) -> &LinkConfig {
        &self.config
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

    /// [`MuxPool::pick`], waiting up to `timeout` while a slot of that backend still makes its
    /// first dial. Every generation dials its links afresh, so right after a reload or a
    /// discovery change the new links are not up yet: a client arriving or moved then waits for
    /// them instead of being told no backend took it. A slot whose first dial failed is not
    /// waited for (its backend is down; the walk goes on to the next).
    pub async fn pick_or_wait(
        &self,
        upstream: &str,
        index: usize,
        timeout: Duration,
    ) -> Option<LinkHandle> {
        let deadline = Instant::now() + timeout;
        let slots = self.upstreams.get(upstream)?.backends.get(index)?;
        loop {
            if let Some(link) = self.pick(upstream, index) {
                return Some(link);
            }
            let dialing = slots
                .iter()
                .find(|slot| !slot.settled.load(Ordering::Acquire))?;
            let settled = dialing.first_dial.notified();
            tokio::pin!(settled);
            // Registered before the second look, so a settle in between is not missed.
            settled.as_mut().enable();
            if dialing.settled.load(Ordering::Acquire) {
                continue;
            }
            tokio::time::timeout_at(deadline, settled).await.ok()?;
        }
    }

    /// Live links to `url` (any upstream), for `/api/backends` and metrics.
    pub fn live_links(&self, upstreams: &[Arc<Upstream>], url: &str) -> usize {
        let mut links = 0;
        for upstream in upstreams {
            let Some(slots) = self.upstreams.get(&upstream.name) else {
                continue;
            };
            for (index, backend) in upstream.backends.iter().enumerate() {
                if *backend.original == *url {
                    links += slots.backends[index]
                        .iter()
                        .filter(|slot| {
                            let link = slot.link.lock().expect("slot lock");
                            link.as_ref().is_some_and(|link| !link.is_closed())
                        })
                        .count();
                }
            }
        }
        links
    }

    /// Starts one task per slot, owned by `tasks`. They dial with `socket` settings and run
    /// until `retired` (a reload replaced their generation, or the relay drains); then they
    /// send GoAway and let their links end once their streams have, or `shutdown.abort`.
    pub fn start(
        &self,
        upstreams: &[Arc<Upstream>],
        book: &Arc<BackendBook>,
        socket: WebSocketConfig,
        tasks: &TaskTracker,
        retired: &CancellationToken,
        shutdown: &Arc<Shutdown>,
    ) {
        for upstream in upstreams {
            let Some(links) = self.upstreams.get(&upstream.name) else {
                continue;
            };
            for (index, slots) in links.backends.iter().enumerate() {
                for (number, slot) in slots.iter().enumerate() {
                    let task = LinkSlotTask {
                        upstream: upstream.clone(),
                        index,
                        number,
                        slot: slot.clone(),
                        book: book.clone(),
                        config: self.config.clone(),
                        socket,
                        retired: retired.clone(),
                        shutdown: shutdown.clone(),
                    };
                    tasks.spawn(task.run());
                }
            }
        }
    }
}

/// The settings of relay-side links: the relay's message limit bounds a stream's messages.
pub(crate) fn link_config(
    max_message_size: u64,
    ping_interval: Option<Duration>,
    pong_timeout: Duration,
) -> LinkConfig {
    let max_frame = u32::try_from(max_message_size).unwrap_or(u32::MAX);
    LinkConfig {
        max_frame,
        // The least the protocol allows: a stream whose client doesn't read holds at most one
        // window in the relay.
        initial_window: max_frame,
        ping_interval: ping_interval.unwrap_or(Duration::from_secs(20)),
        pong_timeout,
        ..LinkConfig::default()
    }
}

/// `socket` with its message limits raised to what a link's frames may need.
pub(crate) fn link_socket_config(
    mut socket: WebSocketConfig,
    config: &LinkConfig,
) -> WebSocketConfig {
    let largest = max_message_len(config.max_frame);
    socket.max_message_size = Some(largest);
    socket.max_frame_size = Some(largest);
    socket
}

/// The task that keeps one link slot filled: dial, run the link, re-dial with backoff.
struct LinkSlotTask {
    upstream: Arc<Upstream>,
    index: usize,
    number: usize,
    slot: Arc<Slot>,
    book: Arc<BackendBook>,
    config: LinkConfig,
    socket: WebSocketConfig,
    retired: CancellationToken,
    shutdown: Arc<Shutdown>,
}

impl LinkSlotTask {
    async fn run(self) {
        let backend = &self.upstream.backends[self.index];
        let url = backend.original.as_ref();
        let number = self.number;
        let socket = link_socket_config(self.socket, &self.config);
        let request = BackendRequest::mux_link();
        let timeout = self.upstream.connect_timeout;
        let mut backoff = MIN_BACKOFF;
        // A dead backend is reported once, not at every re-dial.
        let mut failures_in_a_row = 0u32;
        while !self.retired.is_cancelled() {
            let attempt = async {
                let dialed = dial(
                    backend,
                    self.upstream.tls.as_deref(),
                    &request,
                    socket,
                    timeout,
                )
                .await;
                let dialed = dialed.map_err(|e| e.to_string())?;
                let establish =
                    Link::establish(dialed.websocket(), LinkRole::Initiator, self.config.clone());
                tokio::time::timeout(timeout, establish)
                    .await
                    .map_err(|_| "no Hello within connect_timeout".to_owned())?
                    .map_err(|e| e.to_string())
            };
            let started = Instant::now();
            let thresholds = self.upstream.health_thresholds();
            match attempt.await {
                Ok((link, driver)) => {
                    failures_in_a_row = 0;
                    self.book.record(url, true, thresholds);
                    info!(backend = %url, link = number, "mux link up");
                    *self.slot.link.lock().expect("slot lock") = Some(link.clone());
                    self.slot.settle();
                    let ended = self.serve(&link, driver).await;
                    *self.slot.link.lock().expect("slot lock") = None;
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
                    self.slot.settle();
                    self.book.record(url, false, thresholds);
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
                () = self.retired.cancelled() => break,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        // Retired before a first dial ended: nobody should wait for it.
        self.slot.settle();
    }

    /// Runs a live link until it ends (`Some`), or until the grace period of a retirement is
    /// over (`None`).
    async fn serve(&self, link: &LinkHandle, mut driver: LinkDriver) -> Option<LinkError> {
        tokio::select! {
            ended = &mut driver => return Some(ended),
            () = self.retired.cancelled() => {}
        }
        link.go_away(if self.shutdown.drain.is_cancelled() {
            "relay shutting down"
        } else {
            "configuration reloaded"
        });
        tokio::select! {
            ended = &mut driver => Some(ended),
            () = self.shutdown.abort.cancelled() => None,
        }
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
