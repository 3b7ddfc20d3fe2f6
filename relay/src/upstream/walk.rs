//! The one walk down a client's backend ranking, for every way a backend leg is made: a
//! per-client connect, a mux stream open, and a re-origination after a loss. It skips backends
//! that may not take new clients, tries the others best first, counts each answer toward
//! passive health the same way (an answer below 500 means the backend is up), and stops at the
//! first backend that takes the client or answers for it with an HTTP status.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};
use tokio::time::Instant;
use tracing::{info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use wsrelay_protocol::OpenError;

use super::Upstream;
use super::book::BackendBook;
use super::dial::{DialError, dial};
use super::links::MuxPool;
use super::request::BackendRequest;
use crate::observe::conn_span;
use crate::pump::{AnyLeg, BackendLeg, StreamLeg, close_leg};

/// How a backend leg is made.
#[derive(Clone, Copy)]
pub(crate) enum Via<'a> {
    /// A WebSocket of its own per client, with these socket settings.
    Socket(WebSocketConfig),
    /// A stream on one of the upstream's shared links.
    Mux(&'a MuxPool),
}

/// A backend's own HTTP answer to a client's handshake, passed on to the client as it is.
#[derive(Debug, Clone)]
pub(crate) struct BackendRefusal {
    /// The backend's status.
    pub status: StatusCode,
    /// Its end-to-end headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

impl BackendRefusal {
    /// A mux backend's `Reject`: a status and a reason, as a plain-text answer.
    fn from_reject(status: u16, reason: &str) -> BackendRefusal {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        BackendRefusal {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            headers,
            body: Bytes::from(format!("{reason}\n")),
        }
    }
}

/// A re-origination: the backend just lost is skipped, and a replacement must pick the
/// subprotocol the client already has.
#[derive(Clone, Copy)]
pub(crate) struct Replacing<'a> {
    /// The lost backend's URL.
    pub lost: &'a str,
    /// The client's subprotocol.
    pub protocol: Option<&'a HeaderValue>,
}

/// Where a walk ended.
pub(crate) enum Walked {
    /// A backend took the client.
    Connected {
        /// The backend's index in its upstream.
        index: usize,
        /// The open leg.
        leg: BackendLeg,
        /// The subprotocol the backend picked.
        protocol: Option<HeaderValue>,
    },
    /// A backend answered the handshake with an HTTP status for the client.
    Refused {
        /// Its answer.
        refusal: BackendRefusal,
    },
    /// No backend of the upstream may take new clients (unhealthy or draining).
    NoCandidate,
    /// Some may, but none could be reached.
    Unreachable,
    /// The client's handshake time ran out before a backend answered.
    TimedOut,
}

/// One client's walk: its upstream, how legs are made, and its request.
pub(crate) struct Walk<'a> {
    /// The client's upstream.
    pub upstream: &'a Upstream,
    /// Which backends may take new clients; answers are recorded here.
    pub book: &'a BackendBook,
    /// How the leg is made.
    pub via: Via<'a>,
    /// What the backend is asked.
    pub request: &'a BackendRequest,
    /// The client's address.
    pub peer: SocketAddr,
    /// The relay's id for the client's connection, for the walk's log lines.
    pub conn_id: u64,
    /// When the client's handshake must be answered (`handshake_timeout`); each attempt gets
    /// at most the time left. `None` for a re-origination: the client already has its socket.
    pub deadline: Option<Instant>,
}

/// What trying one backend gave.
enum Attempt {
    Connected(BackendLeg, Option<HeaderValue>),
    Refused(BackendRefusal),
    Failed(String),
    /// A mux backend with no live link: its link task dials and counts its health.
    NoLink,
}

impl Attempt {
    /// Whether the answer shows the backend up, for passive health; `None` if there was none.
    fn reached(&self) -> Option<bool> {
        match self {
            Attempt::Connected(..) => Some(true),
            Attempt::Refused(refusal) => Some(refusal.status.as_u16() < 500),
            Attempt::Failed(_) => Some(false),
            Attempt::NoLink => None,
        }
    }
}

impl Walk<'_> {
    /// Tries `ranked` (backend indexes, best first) until one backend takes the client or
    /// answers for it. While `replacing`, the lost backend is skipped, and refusals and
    /// replacements with another subprotocol only move the walk on.
    pub async fn run(&self, ranked: &[usize], replacing: Option<Replacing<'_>>) -> Walked {
        let mut candidates = 0;
        for &index in ranked {
            let url = self.upstream.backends[index].original.as_ref();
            if replacing.is_some_and(|r| r.lost == url) || !self.book.accepts_new(url) {
                continue;
            }
            candidates += 1;
            let Some(timeout) = self.attempt_timeout(Instant::now()) else {
                return Walked::TimedOut;
            };
            let attempt = self.attempt(index, timeout, replacing.is_some()).await;
            if let Attempt::Failed(_) = &attempt
                && self.attempt_timeout(Instant::now()).is_none()
            {
                // Cut short by the client's deadline: that says nothing about the backend.
                conn_span(self.conn_id).in_scope(|| {
                    warn!(
                        backend = url,
                        "no answer before the client's handshake_timeout"
                    )
                });
                return Walked::TimedOut;
            }
            if let Some(reached) = attempt.reached() {
                self.book
                    .record(url, reached, self.upstream.health_thresholds());
            }
            match attempt {
                Attempt::Connected(mut leg, protocol) => {
                    if let Some(replacing) = replacing
                        && protocol.as_ref() != replacing.protocol
                    {
                        conn_span(self.conn_id).in_scope(|| {
                            warn!(
                                backend = url,
                                "replacement backend picked another subprotocol; skipping it"
                            )
                        });
                        let mismatch = CloseFrame {
                            code: CloseCode::Protocol,
                            reason: "subprotocol mismatch".into(),
                        };
                        close_leg(&mut leg, Some(mismatch)).await;
                        continue;
                    }
                    return Walked::Connected {
                        index,
                        leg,
                        protocol,
                    };
                }
                Attempt::Refused(refusal) if replacing.is_none() => {
                    conn_span(self.conn_id).in_scope(|| info!(peer = %self.peer, backend = url, status = %refusal.status, "backend refused the client"));
                    return Walked::Refused { refusal };
                }
                Attempt::Refused(refusal) => {
                    conn_span(self.conn_id).in_scope(|| warn!(backend = url, status = %refusal.status, "replacement backend refused the client"));
                }
                Attempt::Failed(reason) => conn_span(self.conn_id)
                    .in_scope(|| warn!(backend = url, %reason, "backend unreachable")),
                Attempt::NoLink => {}
            }
        }
        if candidates == 0 {
            Walked::NoCandidate
        } else {
            Walked::Unreachable
        }
    }

    /// Time one attempt may take from `now`: `connect_timeout`, or less when the client's
    /// deadline is nearer; `None` once the deadline has passed.
    fn attempt_timeout(&self, now: Instant) -> Option<Duration> {
        attempt_timeout(self.upstream.connect_timeout, self.deadline, now)
    }

    async fn attempt(&self, index: usize, timeout: Duration, resumed: bool) -> Attempt {
        let backend = &self.upstream.backends[index];
        match self.via {
            Via::Socket(config) => match dial(
                backend,
                self.upstream.tls.as_deref(),
                self.request,
                config,
                timeout,
            )
            .await
            {
                Ok(mut dialed) => {
                    let protocol = dialed.protocol.take();
                    Attempt::Connected(AnyLeg::Socket(dialed.websocket()), protocol)
                }
                Err(DialError::Refused {
                    status,
                    headers,
                    body,
                    ..
                }) => Attempt::Refused(BackendRefusal {
                    status,
                    headers,
                    body,
                }),
                Err(unreachable) => Attempt::Failed(unreachable.to_string()),
            },
            Via::Mux(pool) => {
                let started = Instant::now();
                let Some(link) = pool.pick_or_wait(&self.upstream.name, index, timeout).await
                else {
                    return Attempt::NoLink;
                };
                let timeout = timeout.saturating_sub(started.elapsed());
                let open = self.request.to_open(&backend.authority, self.peer, resumed);
                match tokio::time::timeout(timeout, link.open(open)).await {
                    Ok(Ok(stream)) => {
                        let protocol = stream
                            .protocol()
                            .and_then(|p| HeaderValue::from_str(p).ok());
                        Attempt::Connected(AnyLeg::Stream(StreamLeg::new(stream)), protocol)
                    }
                    Ok(Err(OpenError::Rejected { status, reason })) => {
                        Attempt::Refused(BackendRefusal::from_reject(status, &reason))
                    }
                    Ok(Err(error)) => Attempt::Failed(format!("mux open: {error}")),
                    Err(_) => Attempt::Failed(format!("mux open: no answer within {timeout:?}")),
                }
            }
        }
    }
}

/// `connect_timeout`, cut to what is left before `deadline`; `None` when nothing is.
fn attempt_timeout(
    connect_timeout: Duration,
    deadline: Option<Instant>,
    now: Instant,
) -> Option<Duration> {
    match deadline {
        None => Some(connect_timeout),
        Some(deadline) if deadline > now => Some(connect_timeout.min(deadline - now)),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_never_outlast_the_clients_deadline() {
        let now = Instant::now();
        let five = Duration::from_secs(5);
        assert_eq!(attempt_timeout(five, None, now), Some(five));
        let soon = now + Duration::from_secs(2);
        assert_eq!(
            attempt_timeout(five, Some(soon), now),
            Some(Duration::from_secs(2))
        );
        let later = now + Duration::from_secs(60);
        assert_eq!(attempt_timeout(five, Some(later), now), Some(five));
        assert_eq!(attempt_timeout(five, Some(now), now), None);
    }
}
