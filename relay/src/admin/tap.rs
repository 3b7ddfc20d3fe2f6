//! The live tap over the admin listener: `GET /api/tap?conn=ID` or `?route=/path` upgrades
//! to a WebSocket that streams one JSON record per matching frame. A tap that can't keep up
//! loses records (counted, and told how many); the tapped traffic never waits.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::broadcast::error::RecvError;
use tokio_tungstenite::WebSocketStream;
use tracing::info;
use tungstenite::Message;
use tungstenite::protocol::Role;

use super::{percent_decode, text};
use crate::accept::{check_upgrade, websocket_accepted};
use crate::control::Shared;
use crate::observe::{TapFilter, TapSubscription};
use crate::route::query_value;

/// Answers a tap request: the filter and upgrade are checked, then a task streams records.
pub(super) fn open(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
    query: &str,
) -> Response<Full<Bytes>> {
    let filter = match (query_value(query, "conn"), query_value(query, "route")) {
        (Some(id), _) => match id.parse() {
            Ok(id) => TapFilter::Connection(id),
            Err(_) => return text(StatusCode::BAD_REQUEST, "conn must be a connection id\n"),
        },
        (None, Some(route)) => TapFilter::Route(percent_decode(route)),
        (None, None) => return text(StatusCode::BAD_REQUEST, "give ?conn=ID or ?route=/path\n"),
    };
    if let Err(nothing) = exists(shared, &filter) {
        return text(StatusCode::NOT_FOUND, &(nothing + "\n"));
    }
    let upgrade = match check_upgrade(&request) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return text(refusal.status, &(refusal.reason + "\n")),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let subscription = shared.observe().tap.subscribe();
    let shared = shared.clone();
    let tasks = shared.control.clone();
    tasks.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        info!(%peer, %filter, "tap opened");
        stream_tap(&shared, socket, subscription, filter).await;
        info!(%peer, "tap closed");
    });
    let mut response = websocket_accepted(&upgrade, None);
    // Tells `wsrelay tap` it reached a tap, not a backend behind the client listener.
    response
        .headers_mut()
        .insert("x-wsrelay-tap", http::HeaderValue::from_static("1"));
    response
}

/// `Err` saying what there is instead when `filter` can match nothing: a route that isn't
/// configured, a connection that isn't open.
fn exists(shared: &Shared, filter: &TapFilter) -> Result<(), String> {
    match filter {
        TapFilter::Route(path) => {
            let generation = shared.generations.current();
            let paths: Vec<&str> = generation.routes.iter().map(|r| r.path.as_ref()).collect();
            if paths.contains(&path.as_str()) {
                Ok(())
            } else {
                Err(format!(
                    "no route has the path {path:?}; the routes are: {}",
                    paths.join(", ")
                ))
            }
        }
        TapFilter::Connection(id) => {
            if shared.observe().sessions.contains(*id) {
                Ok(())
            } else {
                Err(format!(
                    "no open connection has the id {id}; GET /api/connections lists them"
                ))
            }
        }
    }
}

async fn stream_tap<S>(
    shared: &Shared,
    mut socket: WebSocketStream<S>,
    mut subscription: TapSubscription,
    filter: TapFilter,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        tokio::select! {
            record = subscription.receiver.recv() => match record {
                Ok(record) if filter.matches(&record) => {
                    let line = serde_json::to_string(&*record).expect("records serialize");
                    if socket.send(Message::text(line)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(lost)) => {
                    shared.observe().metrics.tap_dropped(lost);
                    let notice = format!("{{\"dropped\":{lost}}}");
                    if socket.send(Message::text(notice)).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            },
            incoming = socket.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            () = shared.shutdown().drain.cancelled() => {
                let _ = socket.close(None).await;
                return;
            }
        }
    }
}
