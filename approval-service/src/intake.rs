//! The bus consumers: hold requests in (durable, acked once decided), decisions made elsewhere
//! (a live subscription), and progress reports that keep pending deliveries from being redelivered.

use std::sync::Arc;
use std::time::Duration;

use eventbus::{Durable, Subscription};
use proto::events::Event;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::hold::Holds;

/// How many hold requests one fetch takes at most.
const BATCH: usize = 64;
/// How long one fetch waits for the first request.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// Pause after a failed fetch.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often pending deliveries report progress (JetStream redelivers after 30 s without one).
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Take hold requests from the durable consumer into `holds` until `stop`.
pub(crate) async fn consume_requests(holds: Arc<Holds>, mut durable: Durable, stop: CancellationToken) {
    loop {
        let batch = tokio::select! {
            () = stop.cancelled() => return,
            batch = durable.next_batch(BATCH, FETCH_WAIT) => batch,
        };
        match batch {
            Ok(deliveries) => {
                for d in deliveries {
                    let session = d.envelope.session;
                    match &d.envelope.event {
                        Event::HoldRequested(req) => {
                            let req = req.clone();
                            holds.admit(session, *req, Some(d)).await;
                        }
                        other => {
                            debug!(session.id = %session, kind = other.kind(), "ignoring a non-hold event");
                            if let Err(e) = d.ack().await {
                                warn!(session.id = %session, error = %e, "acking an ignored event failed");
                            }
                        }
                    }
                }
            }
            Err(eventbus::BusError::Closed) => {
                warn!("the event bus closed; no more hold requests");
                return;
            }
            Err(e) => {
                warn!(error = %e, "fetching hold requests failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RETRY_AFTER) => {}
                }
            }
        }
    }
}

/// Drop pending holds decided by anyone (another replica, a proxy's fallback, or us) until `stop`.
pub(crate) async fn watch_decisions(holds: Arc<Holds>, mut decisions: Subscription, stop: CancellationToken) {
    loop {
        let env = tokio::select! {
            () = stop.cancelled() => return,
            env = decisions.next() => env,
        };
        match env {
            Some(env) => {
                if let Event::HoldDecided(decision) = &env.event {
                    holds.observe(decision).await;
                }
            }
            None => {
                warn!("the event bus closed; no more hold decisions");
                return;
            }
        }
    }
}

/// Report progress on every pending delivery every [`PROGRESS_EVERY`] until `stop`.
pub(crate) async fn keep_alive(holds: Arc<Holds>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (id, d) in holds.deliveries() {
            if let Err(e) = d.progress().await {
                warn!(hold.id = %id, error = %e, "reporting progress on a pending hold failed");
            }
        }
    }
}
