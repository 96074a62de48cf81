//! The pending holds of this process, and how one is decided.
//!
//! Each hold keeps its bus delivery until it is decided: a decision is published first, then the
//! hold leaves the pending set and its delivery is acked. If publishing fails the hold stays
//! pending. Holds are deduplicated by id, and ids decided recently are remembered so that a
//! redelivered request (or one decided elsewhere before it reached us) is acked, not re-opened.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use eventbus::{Delivery, EventBus};
use proto::events::{Envelope, Event, HoldDecision, HoldId, HoldOutcome, HoldRequest, SessionId, Timestamp};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::error::HoldError;

/// The `decided_by` of holds this service expires.
pub const SERVICE_IDENTITY: &str = "approval-service";
/// How many decided hold ids are remembered for deduplication.
const REMEMBERED_DECISIONS: usize = 100_000;
/// Deadlines further out than this are treated as this far out.
const MAX_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Who decides a hold. Approver identities from OIDC and Slack will be further variants; each
/// variant says in [`Decider::check`] whether it may decide a given hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decider {
    /// A caller holding the REST API's admin token; `approver` is the name it gave, if any.
    Admin { approver: Option<String> },
    /// This service itself (expiry).
    Service,
}

impl Decider {
    /// The identity recorded as `decided_by`.
    pub fn identity(&self) -> String {
        match self {
            Decider::Admin { approver: Some(name) } => name.clone(),
            Decider::Admin { approver: None } => "admin".to_string(),
            Decider::Service => SERVICE_IDENTITY.to_string(),
        }
    }

    /// Whether this decider may give `outcome` to `hold`; `Err` says why not.
    pub fn check(&self, hold: &HoldRequest, outcome: HoldOutcome) -> Result<(), String> {
        match self {
            Decider::Admin { approver: Some(name) }
                if outcome == HoldOutcome::Approved && *name == hold.principal.subject =>
            {
                Err("a requester can never approve its own hold".to_string())
            }
            Decider::Admin { .. } => Ok(()),
            Decider::Service if outcome == HoldOutcome::Expired => Ok(()),
            Decider::Service => Err("the service only expires holds".to_string()),
        }
    }
}

/// A pending hold as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Hold {
    /// The session the hold belongs to (from the request's envelope).
    pub session: SessionId,
    pub request: HoldRequest,
}

/// A published decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub session: SessionId,
    pub decision: HoldDecision,
}

/// What [`Holds::admit`] did with a hold request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// A new pending hold.
    New,
    /// A redelivery of a pending hold: it keeps the newer delivery.
    Redelivered,
    /// The hold was already decided: its delivery was acked.
    AlreadyDecided,
}

struct Pending {
    hold: Hold,
    delivery: Option<Arc<Delivery>>,
    deadline: Instant,
    /// A decision is being published; nobody else may decide it meanwhile.
    deciding: bool,
}

#[derive(Default)]
struct State {
    pending: HashMap<HoldId, Pending>,
    decided: HashSet<HoldId>,
    decided_order: VecDeque<HoldId>,
}

impl State {
    fn remember_decided(&mut self, id: HoldId) {
        if self.decided.insert(id) {
            self.decided_order.push_back(id);
            while self.decided_order.len() > REMEMBERED_DECISIONS {
                if let Some(old) = self.decided_order.pop_front() {
                    self.decided.remove(&old);
                }
            }
        }
    }
}

/// The pending holds of this process.
pub struct Holds {
    bus: EventBus,
    state: Mutex<State>,
    /// Woken when the set of deadlines changes.
    changed: Notify,
}

impl Holds {
    pub fn new(bus: EventBus) -> Self {
        Self { bus, state: Mutex::new(State::default()), changed: Notify::new() }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take in a hold request delivered on `session`; `delivery` is acked once it is decided.
    pub async fn admit(
        &self,
        session: SessionId,
        request: HoldRequest,
        delivery: Option<Delivery>,
    ) -> Admitted {
        let id = request.hold_id;
        let outcome = {
            let mut st = self.state();
            if st.decided.contains(&id) {
                Err(delivery)
            } else if let Some(p) = st.pending.get_mut(&id) {
                if let Some(d) = delivery {
                    p.delivery = Some(Arc::new(d));
                }
                Ok(Admitted::Redelivered)
            } else {
                let deadline = deadline_for(request.expires_at);
                let hold = Hold { session, request };
                let delivery = delivery.map(Arc::new);
                st.pending.insert(id, Pending { hold, delivery, deadline, deciding: false });
                Ok(Admitted::New)
            }
        };
        match outcome {
            Ok(admitted) => {
                if admitted == Admitted::New {
                    info!(hold.id = %id, session.id = %session, "hold pending");
                    self.changed.notify_one();
                } else {
                    debug!(hold.id = %id, session.id = %session, "hold redelivered while pending");
                }
                admitted
            }
            Err(delivery) => {
                debug!(hold.id = %id, session.id = %session, "hold already decided; acking its redelivery");
                if let Some(d) = delivery {
                    ack(&d, id).await;
                }
                Admitted::AlreadyDecided
            }
        }
    }

    /// A decision seen on the bus (ours, another replica's, or a proxy's). Drops the hold if it
    /// was pending and acks its delivery; returns whether it was pending.
    pub async fn observe(&self, decision: &HoldDecision) -> bool {
        let id = decision.hold_id;
        let removed = {
            let mut st = self.state();
            st.remember_decided(id);
            st.pending.remove(&id)
        };
        match removed {
            Some(p) => {
                info!(
                    hold.id = %id, session.id = %p.hold.session, outcome = %decision.outcome,
                    decided_by = %decision.decided_by, "hold decided elsewhere"
                );
                self.changed.notify_one();
                if let Some(d) = p.delivery {
                    ack(&d, id).await;
                }
                true
            }
            None => false,
        }
    }

    /// Decide a pending hold: publish the decision, then drop the hold and ack its delivery.
    pub async fn decide(
        &self,
        id: HoldId,
        outcome: HoldOutcome,
        decider: &Decider,
        reason: Option<String>,
    ) -> Result<Decided, HoldError> {
        let session = {
            let mut st = self.state();
            let p = st.pending.get_mut(&id).ok_or(HoldError::NotFound(id))?;
            if p.deciding {
                return Err(HoldError::Busy(id));
            }
            decider.check(&p.hold.request, outcome).map_err(|why| HoldError::NotAllowed {
                id,
                decider: decider.identity(),
                why,
            })?;
            if outcome != HoldOutcome::Expired && Instant::now() >= p.deadline {
                // Too late for a human answer; the expiry task publishes the outcome.
                self.changed.notify_one();
                return Err(HoldError::Expired(id));
            }
            p.deciding = true;
            p.hold.session
        };
        let decision = HoldDecision { hold_id: id, outcome, decided_by: decider.identity(), reason };
        let env = Envelope::new(session, Event::HoldDecided(decision.clone()));
        if let Err(source) = self.bus.publish(&env).await {
            warn!(hold.id = %id, session.id = %session, error = %source, "publishing a hold decision failed");
            if let Some(p) = self.state().pending.get_mut(&id) {
                p.deciding = false;
            }
            self.changed.notify_one();
            return Err(HoldError::Publish { id, source });
        }
        info!(
            hold.id = %id, session.id = %session, outcome = %outcome,
            decided_by = %decision.decided_by, "hold decided"
        );
        let removed = {
            let mut st = self.state();
            st.remember_decided(id);
            st.pending.remove(&id)
        };
        self.changed.notify_one();
        if let Some(d) = removed.and_then(|p| p.delivery) {
            ack(&d, id).await;
        }
        Ok(Decided { session, decision })
    }

    /// The pending holds, oldest request first.
    pub fn pending(&self) -> Vec<Hold> {
        let mut holds: Vec<Hold> = self.state().pending.values().map(|p| p.hold.clone()).collect();
        holds.sort_by_key(|h| (h.request.requested_at, h.request.hold_id));
        holds
    }

    /// One pending hold.
    pub fn get(&self, id: HoldId) -> Option<Hold> {
        self.state().pending.get(&id).map(|p| p.hold.clone())
    }

    /// The deliveries of pending holds (to report progress on).
    pub(crate) fn deliveries(&self) -> Vec<(HoldId, Arc<Delivery>)> {
        self.state().pending.iter().filter_map(|(id, p)| p.delivery.clone().map(|d| (*id, d))).collect()
    }

    /// The earliest deadline of a hold that is not being decided.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.state().pending.values().filter(|p| !p.deciding).map(|p| p.deadline).min()
    }

    /// Holds past their deadline at `now` and not being decided, with their timeouts.
    pub(crate) fn due(&self, now: Instant) -> Vec<(HoldId, Duration)> {
        self.state()
            .pending
            .iter()
            .filter(|(_, p)| !p.deciding && p.deadline <= now)
            .map(|(id, p)| (*id, timeout_of(&p.hold.request)))
            .collect()
    }

    /// Try expiring `id` again no earlier than `at` (after a failed publish).
    pub(crate) fn postpone(&self, id: HoldId, at: Instant) {
        if let Some(p) = self.state().pending.get_mut(&id) {
            p.deadline = p.deadline.max(at);
        }
    }

    /// Resolves when deadlines may have changed.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// The hold's timeout as the rule set it: `expires_at - requested_at`.
fn timeout_of(req: &HoldRequest) -> Duration {
    let micros = req.expires_at.as_micros().saturating_sub(req.requested_at.as_micros());
    Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

/// When, on the tokio clock, a hold expiring at `expires_at` (wall clock) is due.
fn deadline_for(expires_at: Timestamp) -> Instant {
    let left = expires_at.as_micros().saturating_sub(Timestamp::now().as_micros());
    let left = Duration::from_micros(u64::try_from(left).unwrap_or(0)).min(MAX_WAIT);
    let now = Instant::now();
    now.checked_add(left).unwrap_or(now)
}

async fn ack(d: &Delivery, id: HoldId) {
    if let Err(e) = d.ack().await {
        // The hold will be redelivered; it is remembered as decided and acked then.
        warn!(hold.id = %id, error = %e, "acking a decided hold failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::events::{ApproverSpec, Principal};
    use uuid::Uuid;

    fn request(expires_in: Duration) -> HoldRequest {
        let now = Timestamp::now();
        HoldRequest {
            hold_id: Uuid::now_v7(),
            seq: 1,
            connection: "shop".into(),
            principal: Principal {
                subject: "agent-1".into(),
                groups: vec!["agents".into()],
                kind: "oidc".into(),
            },
            statement: "delete from orders".into(),
            fingerprint: "ab".into(),
            rule: "writes-need-approval".into(),
            reason: "matched rule".into(),
            approvers: ApproverSpec { groups: vec!["dba".into()], min: 1 },
            requested_at: now,
            expires_at: now.plus(expires_in),
        }
    }

    fn admin(name: &str) -> Decider {
        Decider::Admin { approver: Some(name.into()) }
    }

    #[test]
    fn decider_identity_defaults_to_admin() {
        assert_eq!(Decider::Admin { approver: None }.identity(), "admin");
        assert_eq!(admin("alice").identity(), "alice");
        assert_eq!(Decider::Service.identity(), "approval-service");
    }

    #[test]
    fn requester_cannot_approve_its_own_hold() {
        let req = request(Duration::from_secs(60));
        assert!(admin("agent-1").check(&req, HoldOutcome::Approved).is_err());
        assert!(admin("agent-1").check(&req, HoldOutcome::Denied).is_ok());
        assert!(admin("alice").check(&req, HoldOutcome::Approved).is_ok());
        assert!(Decider::Service.check(&req, HoldOutcome::Approved).is_err());
    }

    #[test]
    fn timeout_is_expires_minus_requested() {
        let req = request(Duration::from_secs(300));
        assert_eq!(timeout_of(&req), Duration::from_secs(300));
    }

    #[tokio::test]
    async fn decide_publishes_on_the_hold_session_then_forgets_the_hold() {
        let bus = EventBus::memory();
        let mut sub = bus.subscribe(proto::subjects::HOLD_DECIDED).await.unwrap();
        let holds = Holds::new(bus);
        let session = Uuid::now_v7();
        let req = request(Duration::from_secs(60));
        let id = req.hold_id;
        assert_eq!(holds.admit(session, req, None).await, Admitted::New);
        assert_eq!(holds.pending().len(), 1);

        let decided = holds.decide(id, HoldOutcome::Approved, &admin("alice"), None).await.unwrap();
        assert_eq!(decided.session, session);
        let env = sub.next().await.unwrap();
        assert_eq!(env.session, session);
        assert_eq!(env.event, Event::HoldDecided(decided.decision));
        assert!(holds.pending().is_empty());
        assert!(matches!(
            holds.decide(id, HoldOutcome::Denied, &admin("bob"), None).await,
            Err(HoldError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn redelivered_and_already_decided_holds_are_not_reopened() {
        let holds = Holds::new(EventBus::memory());
        let session = Uuid::now_v7();
        let req = request(Duration::from_secs(60));
        let id = req.hold_id;
        assert_eq!(holds.admit(session, req.clone(), None).await, Admitted::New);
        assert_eq!(holds.admit(session, req.clone(), None).await, Admitted::Redelivered);
        assert_eq!(holds.pending().len(), 1);
        holds.decide(id, HoldOutcome::Denied, &admin("alice"), Some("no".into())).await.unwrap();
        assert_eq!(holds.admit(session, req, None).await, Admitted::AlreadyDecided);
        assert!(holds.pending().is_empty());
    }

    #[tokio::test]
    async fn a_decision_seen_on_the_bus_drops_the_pending_hold() {
        let holds = Holds::new(EventBus::memory());
        let req = request(Duration::from_secs(60));
        let id = req.hold_id;
        holds.admit(Uuid::now_v7(), req.clone(), None).await;
        let elsewhere = HoldDecision {
            hold_id: id,
            outcome: HoldOutcome::Approved,
            decided_by: "other".into(),
            reason: None,
        };
        assert!(holds.observe(&elsewhere).await);
        assert!(holds.get(id).is_none());
        assert!(!holds.observe(&elsewhere).await);
        // A decision that arrives before its request keeps the request from opening.
        let late = request(Duration::from_secs(60));
        let early = HoldDecision { hold_id: late.hold_id, ..elsewhere };
        assert!(!holds.observe(&early).await);
        assert_eq!(holds.admit(Uuid::now_v7(), late, None).await, Admitted::AlreadyDecided);
    }

    #[tokio::test]
    async fn past_deadline_holds_are_due_and_cannot_be_approved() {
        let holds = Holds::new(EventBus::memory());
        let mut req = request(Duration::ZERO);
        req.requested_at = Timestamp(req.requested_at.as_micros() - 5_000_000);
        let id = req.hold_id;
        holds.admit(Uuid::now_v7(), req, None).await;
        assert_eq!(holds.due(Instant::now()), vec![(id, Duration::from_secs(5))]);
        assert!(matches!(
            holds.decide(id, HoldOutcome::Approved, &admin("alice"), None).await,
            Err(HoldError::Expired(_))
        ));
        holds.decide(id, HoldOutcome::Expired, &Decider::Service, None).await.unwrap();
        assert!(holds.due(Instant::now()).is_empty());
    }
}
