//! The in-process implementation, for `airlock up`: no server, no persistence.
//!
//! - Each durable name owns one unbounded queue, shared by every consumer created with that name
//!   (they split the work). A publish appends to every durable queue whose filter matches, and
//!   sends to every live subscription whose filter matches.
//! - A durable only sees events published after it was first created (there is no stream to
//!   replay from). `airlock up` therefore creates every consumer before the proxy accepts
//!   connections.
//! - Acks are no-ops: a delivery is handed out exactly once. Nothing survives the process.
//! - Stream sequence numbers count from 1 per bus.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proto::events::Envelope;
use proto::subjects;
use tokio::sync::mpsc;

use crate::{Acker, BusError, Delivery};

type Queued = (u64, Envelope);

struct DurableQueue {
    filter: String,
    tx: mpsc::UnboundedSender<Queued>,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Queued>>>,
}

#[derive(Default)]
struct State {
    seq: u64,
    durables: HashMap<String, DurableQueue>,
    subscriptions: Vec<(String, mpsc::UnboundedSender<Envelope>)>,
}

/// The in-process bus. Clones share the same queues.
#[derive(Clone, Default)]
pub struct MemoryBus {
    state: Arc<Mutex<State>>,
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a way that
        // matters (each step is a push or a send), so keep going with the inner value.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hand every envelope, in order, to the matching durables and subscriptions.
    pub fn publish_all(&self, envs: &[Envelope]) -> Result<(), BusError> {
        let mut state = self.state();
        for env in envs {
            state.seq += 1;
            let seq = state.seq;
            let subject = env.subject();
            for queue in state.durables.values() {
                if subjects::matches(&queue.filter, &subject) {
                    // The queue's receiver lives in the map as long as the bus: send cannot fail.
                    let _ = queue.tx.send((seq, env.clone()));
                }
            }
            state.subscriptions.retain(|(filter, tx)| {
                if subjects::matches(filter, &subject) {
                    tx.send(env.clone()).is_ok()
                } else {
                    !tx.is_closed()
                }
            });
        }
        Ok(())
    }

    /// A consumer of the durable queue `name`, created with `filter` on first use (a later call
    /// with the same name shares the queue and keeps the first filter).
    pub fn durable(&self, name: &str, filter: &str) -> MemoryDurable {
        let mut state = self.state();
        let queue = state.durables.entry(name.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            DurableQueue { filter: filter.to_string(), tx, rx: Arc::new(tokio::sync::Mutex::new(rx)) }
        });
        MemoryDurable { rx: queue.rx.clone() }
    }

    /// Events matching `filter` from now on.
    pub fn subscribe(&self, filter: &str) -> MemorySubscription {
        let (tx, rx) = mpsc::unbounded_channel();
        self.state().subscriptions.push((filter.to_string(), tx));
        MemorySubscription { rx }
    }
}

/// A consumer of an in-process durable queue.
pub struct MemoryDurable {
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Queued>>>,
}

impl MemoryDurable {
    /// Up to `max` deliveries, waiting at most `wait` for the first.
    pub async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let max = max.max(1);
        let deadline = tokio::time::Instant::now() + wait;
        // Consumers sharing the name take turns; the wait for the lock counts against `wait`.
        let Ok(mut rx) = tokio::time::timeout_at(deadline, self.rx.lock()).await else {
            return Ok(Vec::new());
        };
        let first = match rx.try_recv() {
            Ok(q) => q,
            Err(mpsc::error::TryRecvError::Disconnected) => return Err(BusError::Closed),
            Err(mpsc::error::TryRecvError::Empty) => match tokio::time::timeout_at(deadline, rx.recv()).await
            {
                Ok(Some(q)) => q,
                Ok(None) => return Err(BusError::Closed),
                Err(_) => return Ok(Vec::new()),
            },
        };
        let mut out = vec![delivery(first)];
        while out.len() < max {
            match rx.try_recv() {
                Ok(q) => out.push(delivery(q)),
                Err(_) => break,
            }
        }
        Ok(out)
    }
}

fn delivery((stream_seq, envelope): Queued) -> Delivery {
    Delivery { envelope, stream_seq, delivered: 1, acker: Acker::Memory }
}

/// A live in-process subscription.
pub struct MemorySubscription {
    rx: mpsc::UnboundedReceiver<Envelope>,
}

impl MemorySubscription {
    /// The next event, or `None` once the bus is gone.
    pub async fn next(&mut self) -> Option<Envelope> {
        self.rx.recv().await
    }
}
