//! Moving a client whose backend was lost to the next backend in its rank, keeping the
//! client's socket: the walk of the current generation (a reload may have changed the
//! upstream) without the lost backend, then the replay of what the lost backend may have
//! missed.

use futures_util::SinkExt;
use tokio::time::Instant;
use tracing::info;
use tungstenite::protocol::CloseFrame;

use super::Session;
use super::ending::{ClosedBy, Closing, backend_unavailable};
use crate::observe::conn_span;
use crate::pump::close_leg;
use crate::upstream::{Replacing, Walked};

impl Session {
    /// Moves the session to a replacement backend, or says how it ends (1012) when there is
    /// none or the move would lose messages. `farewell` closes the old leg first when it is
    /// still alive (a drained backend).
    pub(super) async fn reoriginate(
        &mut self,
        farewell: Option<CloseFrame>,
    ) -> Result<(), Closing> {
        let lost = self.backend_url().to_owned();
        let unavailable = |how: String| backend_unavailable(ClosedBy::Relay, how);
        if farewell.is_some() {
            close_leg(&mut self.backend, farewell).await;
        }
        let Some(replay) = self.pump.take_replay(Instant::now()) else {
            // The client sent more than the replay log holds since the backend last
            // acknowledged: moving it would lose messages silently.
            return Err(unavailable(format!(
                "backend {lost} lost with more unacknowledged messages than can be replayed"
            )));
        };
        let generation = self.context.generations.current();
        let Some(upstream) = generation.routes.upstream(&self.upstream.name) else {
            return Err(unavailable(format!(
                "backend {lost} lost, and its upstream is gone"
            )));
        };
        let ranked = upstream.ranking.rank(&self.hash_key);
        let walk = generation.walk(
            &upstream,
            self.route.mode,
            &self.request,
            self.peer(),
            self.conn_id,
            None,
        );
        let replacing = Replacing {
            lost: &lost,
            protocol: self.protocol.as_deref(),
        };
        let walked = tokio::select! {
            walked = walk.run(&ranked, Some(replacing)) => walked,
            () = self.context.shutdown.drain.cancelled() => Walked::Unreachable,
        };
        let Walked::Connected { index, mut leg, .. } = walked else {
            return Err(unavailable(format!(
                "backend {lost} lost, no other backend took the client"
            )));
        };
        let replayed = replay.len();
        for message in replay {
            if leg.feed(message).await.is_err() {
                return Err(unavailable(
                    "replacement backend failed during replay".into(),
                ));
            }
        }
        if leg.flush().await.is_err() {
            return Err(unavailable(
                "replacement backend failed during replay".into(),
            ));
        }
        let to = upstream.backends[index].original.clone();
        conn_span(self.conn_id)
            .in_scope(|| info!(from = %lost, %to, replayed, "client re-originated"));
        self.pump.hooks_mut().set_backend(to);
        self.upstream = upstream;
        self.backend_index = index;
        self.backend = leg;
        self.context.observe.metrics.reoriginated();
        Ok(())
    }
}
