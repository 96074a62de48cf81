//! Holds: a statement waits here until its decision event arrives.
//!
//! One live subscription per proxy node receives every `hold_decided` event and hands each to
//! the session waiting for that hold id. A waiter registers before its HoldRequested event is
//! published, so a decision can never arrive unseen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use eventbus::{BusError, EventBus};
use proto::events::{Event, HoldDecision, HoldId};
use tokio::sync::oneshot;

#[derive(Clone, Default)]
pub struct Holds {
    waiters: Arc<Mutex<HashMap<HoldId, oneshot::Sender<HoldDecision>>>>,
}

impl Holds {
    /// Subscribe to decisions and dispatch them in the background.
    pub async fn start(bus: &EventBus) -> Result<Self, BusError> {
        let holds = Self::default();
        let mut sub = bus.subscribe(proto::subjects::HOLD_DECIDED).await?;
        let h = holds.clone();
        tokio::spawn(async move {
            while let Some(env) = sub.next().await {
                if let Event::HoldDecided(d) = env.event {
                    h.deliver(d);
                }
            }
            tracing::warn!("hold decision subscription ended; waiting holds will expire");
        });
        Ok(holds)
    }

    fn deliver(&self, d: HoldDecision) {
        let tx = self.lock().remove(&d.hold_id);
        if let Some(tx) = tx {
            let _ = tx.send(d);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<HoldId, oneshot::Sender<HoldDecision>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for `id`'s decision. Register before publishing the hold.
    pub fn register(&self, id: HoldId) -> oneshot::Receiver<HoldDecision> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        rx
    }

    /// Stop waiting for `id`.
    pub fn forget(&self, id: HoldId) {
        self.lock().remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::events::{Envelope, HoldOutcome};
    use uuid::Uuid;

    #[tokio::test]
    async fn decisions_reach_only_their_waiter() {
        let bus = EventBus::memory();
        let holds = Holds::start(&bus).await.expect("start");
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let rx_a = holds.register(a);
        let mut rx_b = holds.register(b);
        let d =
            HoldDecision { hold_id: a, outcome: HoldOutcome::Approved, decided_by: "x".into(), reason: None };
        bus.publish(&Envelope::new(Uuid::now_v7(), Event::HoldDecided(d.clone()))).await.expect("publish");
        assert_eq!(rx_a.await.expect("decided"), d);
        assert!(rx_b.try_recv().is_err(), "b is still waiting");
    }
}
