//! Group commit of session events. Every session of a node hands its events to one journal
//! task. While a batch is on its way to the bus, the events of other sessions queue up; the
//! next batch takes all of them at once. So under load a node publishes one bus message per
//! round trip instead of one per event, and each session still waits for its own events to be
//! acknowledged before it goes on (the caller of [`Journal::record`] gets `Ok` only then).
//!
//! Order: a session awaits each `record` before its next one, and batches are published in
//! order on one connection, so a session's events reach the stream in the order it recorded
//! them.

use eventbus::EventBus;
use proto::events::Envelope;
use tokio::sync::{mpsc, oneshot};

/// Most `record` calls taken into one batch (the bus splits a batch by size on its own).
const MAX_ENTRIES: usize = 512;

type Done = oneshot::Sender<Result<(), String>>;

/// A node's journal: a handle to its group-commit task.
#[derive(Clone)]
pub(crate) struct Journal {
    tx: mpsc::UnboundedSender<(Vec<Envelope>, Done)>,
}

impl Journal {
    /// Start the task (on the current runtime); it ends when every handle is dropped.
    pub(crate) fn start(bus: EventBus) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<Envelope>, Done)>();
        tokio::spawn(async move {
            let mut entries = Vec::with_capacity(MAX_ENTRIES);
            let mut envs = Vec::new();
            while rx.recv_many(&mut entries, MAX_ENTRIES).await > 0 {
                // Let the sessions that are ready to run reach their next record first: one
                // more turn of the scheduler, no timer, often a much bigger batch.
                tokio::task::yield_now().await;
                while entries.len() < MAX_ENTRIES {
                    match rx.try_recv() {
                        Ok(e) => entries.push(e),
                        Err(_) => break,
                    }
                }
                envs.clear();
                let mut waiters = Vec::with_capacity(entries.len());
                for (mut e, done) in entries.drain(..) {
                    envs.append(&mut e);
                    waiters.push(done);
                }
                let result = bus.publish_batch(&envs).await.map_err(|e| e.to_string());
                for done in waiters {
                    // A session that stopped waiting has ended; nothing to tell it.
                    let _ = done.send(result.clone());
                }
            }
        });
        Self { tx }
    }

    /// Publish `envs` with whatever other sessions are publishing; `Ok` once acknowledged.
    pub(crate) async fn record(&self, envs: Vec<Envelope>) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.tx.send((envs, done)).map_err(|_| "the event journal has stopped".to_string())?;
        wait.await.map_err(|_| "the event journal has stopped".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proto::events::Event;
    use uuid::Uuid;

    use super::*;

    #[tokio::test]
    async fn concurrent_sessions_are_published_together_and_each_in_order() {
        let nats = testkit::Nats::start().expect("nats");
        testkit::init_crypto();
        let cfg = eventbus::NatsConfig { url: nats.url.clone(), ..Default::default() };
        let bus = EventBus::connect_nats(&cfg).await.expect("connect");
        let mut durable = bus.durable("journal", proto::subjects::ALL_SESSION_EVENTS).await.expect("durable");
        let journal = Journal::start(bus);
        let sessions: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
        let tasks: Vec<_> = sessions
            .iter()
            .map(|&s| {
                let j = journal.clone();
                tokio::spawn(async move {
                    for seq in 1..=50 {
                        let ev =
                            Event::RequestReceived { seq, statement: "select 1".into(), parameters: vec![] };
                        j.record(vec![Envelope::new(s, ev)]).await.expect("recorded");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("session task");
        }
        let mut seen: std::collections::HashMap<Uuid, Vec<u64>> = Default::default();
        let mut messages = std::collections::HashSet::new();
        loop {
            let batch = durable.next_batch(1000, Duration::from_millis(100)).await.expect("fetch");
            if batch.is_empty() {
                break;
            }
            for d in batch {
                messages.insert(d.stream_seq);
                d.ack().await.expect("ack");
                if let Event::RequestReceived { seq, .. } = d.envelope.event {
                    seen.entry(d.envelope.session).or_default().push(seq);
                }
            }
        }
        assert_eq!(seen.len(), 20);
        // 1000 events from 20 concurrent sessions: group commit puts many in each message.
        assert!(messages.len() < 500, "{} bus messages for 1000 events", messages.len());
        for s in &sessions {
            assert_eq!(seen[s], (1..=50).collect::<Vec<_>>(), "session {s} out of order or incomplete");
        }
    }
}
