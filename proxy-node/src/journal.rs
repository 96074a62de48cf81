//! Group commit of session events. Every session of a node hands its events to one journal
//! task. While a batch is on its way to the bus, the events of other sessions queue up; the
//! next batch takes all of them at once. So under load a node publishes one bus message per
//! round trip instead of one per event.
//!
//! A batch that sessions wait for also waits up to [`MAX_TURNS`] turns of the scheduler (no
//! timer: each turn polls the sockets) while other sessions have a statement at their target
//! whose events will come with its answer ([`Journal::pending`]): under load those answers are
//! often already in, and one bus message then carries them all. A statement that stays at its
//! target (a long query) costs each batch only those turns.
//!
//! Two ways in:
//! - [`Journal::record`]: the caller gets `Ok` only once its events are acknowledged (sessions
//!   of connections that require recording);
//! - [`Journal::submit`]: the events are queued and the caller goes on (best-effort
//!   recording). At most [`MAX_UNPUBLISHED`] such events wait at once; past that `submit`
//!   waits too, so a slow or absent bus slows those sessions down rather than growing memory.
//!   What the bus refuses is logged, with how many events were lost.
//!
//! Order: a session awaits each `record`/`submit` before its next one, and batches are
//! published in order on one connection, so a session's events reach the stream in the order
//! it handed them over.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use eventbus::EventBus;
use proto::events::Envelope;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::warn;

/// Most `record` calls taken into one batch (the bus splits a batch by size on its own).
const MAX_ENTRIES: usize = 512;

/// How long a batch of best-effort events only may wait for more. Each bus message costs the
/// JetStream server a fixed share of CPU (about 100 µs here, mostly handoffs between its
/// threads), so best-effort events, which nobody waits for, travel in few large messages.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// Most scheduler turns a batch that sessions wait for is held back for sessions whose
/// statements are at their targets (see [`Journal::pending`]).
const MAX_TURNS: usize = 16;

/// Most events of best-effort sessions queued and not yet published.
pub(crate) const MAX_UNPUBLISHED: usize = 65_536;

const STOPPED: &str = "the event journal has stopped";

struct Entry {
    envs: Vec<Envelope>,
    /// Who waits for the acknowledgement (`None`: a best-effort submission).
    done: Option<oneshot::Sender<Result<(), String>>>,
    /// A best-effort submission's room in the queue, given back once it is published.
    _room: Option<OwnedSemaphorePermit>,
}

/// A node's journal: a handle to its group-commit task.
#[derive(Clone)]
pub(crate) struct Journal {
    tx: mpsc::UnboundedSender<Entry>,
    room: Arc<Semaphore>,
    /// Ends the journal's pause for best-effort events: a session is waiting.
    urgent: Arc<Notify>,
    /// Sessions with a statement at the target whose events will be handed over with its
    /// answer (see [`Journal::pending`]).
    pending: Arc<AtomicUsize>,
    bus: EventBus,
}

/// A session's statement is at the target and its events follow with the answer: while any
/// is, a batch waits a few scheduler turns (each polls the sockets) to take them along.
pub(crate) struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Journal {
    /// Start the task (on the current runtime); it ends when every handle is dropped.
    pub(crate) fn start(bus: EventBus) -> Self {
        let handle = bus.clone();
        let (tx, mut rx) = mpsc::unbounded_channel::<Entry>();
        let waiting = Arc::new(Notify::new());
        let urgent = waiting.clone();
        let pending = Arc::new(AtomicUsize::new(0));
        let at_target = pending.clone();
        let counters = Counters::new();
        tokio::spawn(async move {
            let mut entries = Vec::with_capacity(MAX_ENTRIES);
            let mut envs = Vec::new();
            while rx.recv_many(&mut entries, MAX_ENTRIES).await > 0 {
                // Let the sessions that are ready to run reach their next record first: one
                // more turn of the scheduler, no timer, often a much bigger batch.
                tokio::task::yield_now().await;
                take_queued(&mut rx, &mut entries);
                // Sessions wait for this batch, and others have statements at their targets
                // whose answers may be in already: a few more turns (each polls the sockets,
                // no timer) to publish them in the same message. A bus message costs the bus
                // far more than a turn costs here.
                if entries.iter().any(|e| e.done.is_some()) {
                    for _ in 0..MAX_TURNS {
                        if at_target.load(Ordering::Relaxed) == 0 || entries.len() >= MAX_ENTRIES {
                            break;
                        }
                        tokio::task::yield_now().await;
                        take_queued(&mut rx, &mut entries);
                    }
                }
                // Nobody waits for a batch of best-effort events: let it fill for a moment,
                // fewer and larger messages cost the bus and this node less. Meanwhile the
                // task does not watch the queue, so handing over events wakes nobody; a
                // session that waits for its record cuts the pause short.
                if entries.iter().all(|e| e.done.is_none()) {
                    tokio::select! {
                        _ = tokio::time::sleep(LINGER) => {}
                        _ = waiting.notified() => {}
                    }
                    take_queued(&mut rx, &mut entries);
                }
                envs.clear();
                let mut waiters = Vec::with_capacity(entries.len());
                let mut unwaited = 0;
                for mut e in entries.drain(..) {
                    match e.done.take() {
                        Some(done) => waiters.push(done),
                        None => unwaited += e.envs.len(),
                    }
                    envs.append(&mut e.envs);
                }
                counters.count(&envs);
                let result = bus.publish_batch(&envs).await.map_err(|e| e.to_string());
                match &result {
                    Ok(()) => counters.published.increment(envs.len() as u64),
                    Err(_) => counters.unpublished.increment(envs.len() as u64),
                }
                if let (Err(e), true) = (&result, unwaited > 0) {
                    warn!(events = unwaited, error = %e, "events of best-effort sessions were not recorded");
                }
                for done in waiters {
                    // A session that stopped waiting has ended; nothing to tell it.
                    let _ = done.send(result.clone());
                }
            }
        });
        Self { tx, room: Arc::new(Semaphore::new(MAX_UNPUBLISHED)), urgent, pending, bus: handle }
    }

    /// The most bytes one encoded event may take on the bus ([`EventBus::max_event_bytes`]).
    pub(crate) fn max_event_bytes(&self) -> usize {
        self.bus.max_event_bytes()
    }

    /// Note a statement at the target whose events follow with its answer, until dropped.
    pub(crate) fn pending(&self) -> Pending {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Pending(self.pending.clone())
    }

    /// Publish `envs` with whatever other sessions are publishing; `Ok` once acknowledged.
    pub(crate) async fn record(&self, envs: Vec<Envelope>) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Entry { envs, done: Some(done), _room: None }).map_err(|_| STOPPED.to_string())?;
        self.urgent.notify_one();
        wait.await.map_err(|_| STOPPED.to_string())?
    }

    /// Queue `envs` for publishing without waiting for it (once there is room for them).
    pub(crate) async fn submit(&self, envs: Vec<Envelope>) -> Result<(), String> {
        let n = u32::try_from(envs.len().clamp(1, MAX_UNPUBLISHED)).unwrap_or(u32::MAX);
        let room = self.room.clone().acquire_many_owned(n).await.map_err(|_| STOPPED.to_string())?;
        self.tx.send(Entry { envs, done: None, _room: Some(room) }).map_err(|_| STOPPED.to_string())
    }
}

/// The node's Prometheus counters, read off the events it publishes (each statement's decision
/// and answer, each session's start and end): handles made once, so counting is an atomic add.
struct Counters {
    allowed: metrics::Counter,
    denied: metrics::Counter,
    held: metrics::Counter,
    failed: metrics::Counter,
    duration: metrics::Histogram,
    sessions_started: metrics::Counter,
    sessions_ended: metrics::Counter,
    published: metrics::Counter,
    unpublished: metrics::Counter,
}

impl Counters {
    fn new() -> Self {
        use metrics::{counter, histogram};
        let statements = |d: &'static str| counter!("airlock_statements_total", "decision" => d);
        Self {
            allowed: statements("allow"),
            denied: statements("deny"),
            held: statements("hold"),
            failed: counter!("airlock_statement_errors_total"),
            duration: histogram!("airlock_statement_duration_seconds"),
            sessions_started: counter!("airlock_sessions_started_total"),
            sessions_ended: counter!("airlock_sessions_ended_total"),
            published: counter!("airlock_events_published_total"),
            unpublished: counter!("airlock_events_unpublished_total"),
        }
    }

    fn count(&self, envs: &[Envelope]) {
        use proto::events::{Decision, Event};
        for e in envs {
            match &e.event {
                Event::PolicyDecided { decision, .. } => match decision {
                    Decision::Allow => &self.allowed,
                    Decision::Deny => &self.denied,
                    Decision::Hold => &self.held,
                }
                .increment(1),
                Event::ResponseSent { error, duration_us, .. } => {
                    self.duration.record(*duration_us as f64 / 1e6);
                    if error.is_some() {
                        self.failed.increment(1);
                    }
                }
                Event::SessionStarted { .. } => self.sessions_started.increment(1),
                Event::SessionEnded { .. } => self.sessions_ended.increment(1),
                _ => {}
            }
        }
    }
}

/// Take what is queued now, up to [`MAX_ENTRIES`] in all.
fn take_queued(rx: &mut mpsc::UnboundedReceiver<Entry>, entries: &mut Vec<Entry>) {
    while entries.len() < MAX_ENTRIES {
        match rx.try_recv() {
            Ok(e) => entries.push(e),
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::time::Duration;

    use proto::events::Event;
    use uuid::Uuid;

    use super::*;

    /// A journal publishing to a real NATS server, and a durable consumer of what it publishes.
    async fn journal_on_nats() -> (testkit::Nats, eventbus::Durable, Journal) {
        let nats = testkit::Nats::start().expect("nats");
        testkit::init_crypto();
        let cfg = eventbus::NatsConfig { url: nats.url.clone(), ..Default::default() };
        let bus = EventBus::connect_nats(&cfg).await.expect("connect");
        let durable = bus.durable("journal", proto::subjects::ALL_SESSION_EVENTS).await.expect("durable");
        (nats, durable, Journal::start(bus))
    }

    /// 20 concurrent sessions hand over 50 events each, waiting for each acknowledgement
    /// (`strict`) or not. Checks that every session's events arrive complete and in order, and
    /// returns how many bus messages carried them.
    async fn twenty_sessions(strict: bool) -> usize {
        let (_nats, mut durable, journal) = journal_on_nats().await;
        let sessions: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
        let tasks: Vec<_> = sessions
            .iter()
            .map(|&s| {
                let j = journal.clone();
                tokio::spawn(async move {
                    for seq in 1..=50 {
                        let ev = Event::RequestReceived {
                            seq,
                            statement: "select 1".into(),
                            parameters: Default::default(),
                        };
                        let envs = vec![Envelope::new(s, ev)];
                        if strict {
                            j.record(envs).await.expect("recorded");
                        } else {
                            j.submit(envs).await.expect("queued");
                            // A session's statements are spread out in time.
                            tokio::time::sleep(Duration::from_micros(100 * (seq % 7))).await;
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("session task");
        }
        let mut seen: HashMap<Uuid, Vec<u64>> = Default::default();
        let mut messages = HashSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.values().map(Vec::len).sum::<usize>() < 1000 {
            assert!(std::time::Instant::now() < deadline, "events missing");
            for d in durable.next_batch(1000, Duration::from_millis(100)).await.expect("fetch") {
                messages.insert(d.stream_seq);
                d.ack().await.expect("ack");
                if let Event::RequestReceived { seq, .. } = d.envelope.event {
                    seen.entry(d.envelope.session).or_default().push(seq);
                }
            }
        }
        assert_eq!(seen.len(), 20);
        for s in &sessions {
            assert_eq!(seen[s], (1..=50).collect::<Vec<_>>(), "session {s} out of order or incomplete");
        }
        messages.len()
    }

    /// One session waits for its record while another's statement is at the target: the batch
    /// waits a few turns and takes the second session's events along, in one bus message; and a
    /// statement that stays at the target does not hold a batch back for more than those turns.
    #[tokio::test]
    async fn a_batch_waits_a_few_turns_for_answers_at_the_target_but_no_longer() {
        let (_nats, mut durable, journal) = journal_on_nats().await;
        let env = |s: Uuid| {
            vec![Envelope::new(
                s,
                Event::RequestReceived {
                    seq: 1,
                    statement: "select 1".into(),
                    parameters: Default::default(),
                },
            )]
        };
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let at_target = journal.pending();
        let first = {
            let (j, e) = (journal.clone(), env(a));
            tokio::spawn(async move { j.record(e).await })
        };
        let second = {
            let (j, e) = (journal.clone(), env(b));
            tokio::spawn(async move {
                // The answer comes in a few turns later.
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                drop(at_target);
                j.record(e).await
            })
        };
        first.await.expect("task").expect("recorded");
        second.await.expect("task").expect("recorded");
        let got = durable.next_batch(10, Duration::from_secs(5)).await.expect("fetch");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].stream_seq, got[1].stream_seq, "one bus message for both sessions");

        let _stuck = journal.pending();
        tokio::time::timeout(Duration::from_secs(5), journal.record(env(a)))
            .await
            .expect("not held back by a statement that stays at the target")
            .expect("recorded");
    }

    #[tokio::test]
    async fn concurrent_sessions_are_published_together_and_each_in_order() {
        let messages = twenty_sessions(true).await;
        // 1000 events from 20 concurrent sessions: group commit puts many in each message.
        assert!(messages < 500, "{messages} bus messages for 1000 events");
    }

    #[tokio::test]
    async fn best_effort_events_are_published_complete_in_order_and_together() {
        let messages = twenty_sessions(false).await;
        assert!(messages < 250, "{messages} bus messages for 1000 events");
    }
}
