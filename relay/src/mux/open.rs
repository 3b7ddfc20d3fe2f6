//! Turning a client into a stream: walk its backend ranking, open a stream on the least loaded
//! live link of each backend in turn, and take the first `Accept` (or pass on a `Reject`).

use std::net::SocketAddr;

use http::header;
use tracing::warn;
use wsrelay_protocol::{OpenError, OpenRequest};

use crate::dial::BackendRequest;
use crate::leg::StreamLeg;
use crate::route::Upstream;
use crate::routing::Routing;

/// How opening a stream for a client went.
pub enum Opened {
    /// A backend accepted: the stream and the backend's index in its upstream.
    Stream(StreamLeg, usize),
    /// A backend answered with an HTTP status for the client.
    Rejected {
        /// The backend's index in its upstream.
        index: usize,
        /// The status.
        status: u16,
        /// Why, as the backend said it.
        reason: String,
    },
    /// No backend of the upstream may take new clients (unhealthy or draining).
    NoCandidate,
    /// Candidates exist, but none has a live link or accepted in time.
    Unreachable,
}

/// Opens a stream for a client ranked `ranked`, skipping `skip` (a backend just lost).
pub async fn open_stream(
    routing: &Routing,
    upstream: &Upstream,
    ranked: &[usize],
    request: &BackendRequest,
    peer: SocketAddr,
    resumed: bool,
    skip: Option<&str>,
) -> Opened {
    let mut candidates = 0;
    for &index in ranked {
        let backend = &upstream.backends[index];
        if Some(backend.original.as_str()) == skip
            || !routing.backends.accepts_new(&backend.original)
        {
            continue;
        }
        candidates += 1;
        let Some(link) = routing.mux.pick(&upstream.name, index) else {
            continue;
        };
        let window = u64::from(link.params().send_initial_window);
        let open = open_request(request, &backend.authority, peer, resumed);
        match tokio::time::timeout(upstream.connect_timeout, link.open(open)).await {
            Ok(Ok(stream)) => return Opened::Stream(StreamLeg::new(stream, window), index),
            Ok(Err(OpenError::Rejected { status, reason })) => {
                return Opened::Rejected {
                    index,
                    status,
                    reason,
                };
            }
            Ok(Err(error)) => warn!(backend = %backend, %error, "mux open failed; trying the next"),
            Err(_) => warn!(backend = %backend, "mux open timed out; trying the next"),
        }
    }
    if candidates == 0 {
        Opened::NoCandidate
    } else {
        Opened::Unreachable
    }
}

/// The `Open` of DESIGN 5: path, query, the forwarded headers of DESIGN 4.3, client address.
fn open_request(
    request: &BackendRequest,
    authority: &str,
    peer: SocketAddr,
    resumed: bool,
) -> OpenRequest {
    let mut open = OpenRequest::new(&request.path_and_query);
    let host = match (&request.client_host, request.preserve_host) {
        (Some(host), true) => host.as_bytes().to_vec(),
        _ => authority.as_bytes().to_vec(),
    };
    open.headers.push((header::HOST.as_str().to_owned(), host));
    for (name, value) in &request.headers {
        open.headers
            .push((name.as_str().to_owned(), value.as_bytes().to_vec()));
    }
    open.client_addr = peer.to_string();
    open.resumed = resumed;
    open
}
