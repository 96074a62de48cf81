//! Holds: who may decide ([`Decider`]), how votes become a decision, and this replica's share of
//! the work (the deliveries it holds and their deadlines).
//!
//! The state of every hold is a [`HoldRecord`] in the shared [`Store`]; a vote is a
//! compare-and-set on it, so with several replicas each hold is decided once. The winner
//! publishes `HoldDecided` with an event id derived from the hold id, so a republish (after a
//! crash between the write and the publish) is deduplicated by JetStream. Only then is the
//! hold's delivery acked: a replica killed in between gets the request redelivered, finds the
//! record decided, republishes if needed and acks.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use eventbus::{Delivery, EventBus};
use proto::events::{Envelope, Event, HoldDecision, HoldId, HoldOutcome, HoldRequest, SessionId, Timestamp};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::approver::Person;
use crate::error::{HoldError, StoreError};
use crate::routes::Routes;
use crate::store::{Approval, Change, GrantInfo, HoldRecord, Status, Store};

/// The `decided_by` of holds this service expires.
pub const SERVICE_IDENTITY: &str = "approval-service";
/// How many decided hold ids are remembered for deduplication.
const REMEMBERED_DECISIONS: usize = 100_000;
/// Deadlines further out than this are treated as this far out.
const MAX_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Republishing a decision whose first publish failed: first wait, doubling to the cap.
const REPUBLISH_FIRST: Duration = Duration::from_millis(200);
const REPUBLISH_CAP: Duration = Duration::from_secs(10);

/// How an approver reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A REST call with the approver's OIDC token.
    Oidc,
    /// A Slack button or modal.
    Slack,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Oidc => "oidc",
            Via::Slack => "slack",
        }
    }
}

/// Who decides a hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decider {
    /// Break-glass: a caller holding the admin token; `approver` is the name it gave, if any.
    /// Its approval decides at once, whatever the rule's groups and `min`.
    Admin { approver: Option<String> },
    /// A known approver (only [`crate::approver::Directory`] makes these: nobody else is one),
    /// recorded as `identity` and compared with the requester and other approvers as `person`.
    Approver { identity: String, person: Person, groups: Vec<String>, via: Via },
    /// This service itself (expiry).
    Service,
}

impl Decider {
    /// The identity recorded as `decided_by`.
    pub fn identity(&self) -> String {
        match self {
            Decider::Admin { approver: Some(name) } => name.clone(),
            Decider::Admin { approver: None } => "admin".to_string(),
            Decider::Approver { identity, .. } => identity.clone(),
            Decider::Service => SERVICE_IDENTITY.to_string(),
        }
    }

    fn via(&self) -> &'static str {
        match self {
            Decider::Admin { .. } => "admin",
            Decider::Approver { via, .. } => via.as_str(),
            Decider::Service => "service",
        }
    }

    /// The person behind the vote, when it is an approver's.
    fn person(&self) -> Option<&Person> {
        match self {
            Decider::Approver { person, .. } => Some(person),
            _ => None,
        }
    }

    /// Whether this decider may give `outcome` to `hold`; `Err` says why not.
    ///
    /// An approver whose OIDC subject is unknown (a Slack user with no `[[approvals.approvers]]`
    /// entry) cannot be told apart from the requester, whom the hold knows by subject only, nor
    /// from their own earlier vote made with a token: they may approve only a service account's
    /// hold (a service account is no person) that needs a single approval.
    pub fn check(&self, hold: &HoldRequest, outcome: HoldOutcome) -> Result<(), String> {
        let own = || "a requester can never approve its own hold".to_string();
        match self {
            Decider::Admin { approver: Some(name) }
                if outcome == HoldOutcome::Approved && *name == hold.principal.subject =>
            {
                Err(own())
            }
            Decider::Admin { .. } if outcome == HoldOutcome::Expired => {
                Err("only the service expires holds".to_string())
            }
            Decider::Admin { .. } => Ok(()),
            Decider::Approver { identity, person, groups, .. } => {
                if outcome == HoldOutcome::Expired {
                    return Err("only the service expires holds".to_string());
                }
                let subject = &hold.principal.subject;
                // The requester's verified e-mail, which the proxy names in the hold, is one of
                // its identifiers too (an approver entry named otherwise than its `sub`).
                let by_email = hold.requester_email.as_deref().is_some_and(|e| person.is_email(e));
                if outcome == HoldOutcome::Approved && (identity == subject || person.is(subject) || by_email)
                {
                    return Err(own());
                }
                if outcome == HoldOutcome::Approved
                    && !person.subject_known()
                    && (hold.principal.kind != "service_account" || hold.approvers.min > 1)
                {
                    return Err(
                        "Airlock cannot tell you apart from the requester or the other approvers: approving \
                         this hold needs an [[approvals.approvers]] entry naming your OIDC subject (or use \
                         `airlock approvals approve` with your token)"
                            .to_string(),
                    );
                }
                let wanted = &hold.approvers.groups;
                if !wanted.is_empty() && !wanted.iter().any(|g| groups.contains(g)) {
                    return Err(format!("not in the rule's approver groups ({})", wanted.join(", ")));
                }
                Ok(())
            }
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
    /// Approvals so far (a rule with `min: 2` needs two).
    pub approvals: Vec<String>,
}

impl From<&HoldRecord> for Hold {
    fn from(r: &HoldRecord) -> Self {
        Self {
            session: r.session,
            request: r.request.clone(),
            approvals: r.approvals.iter().map(|a| a.by.clone()).collect(),
        }
    }
}

/// The result of a vote.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub session: SessionId,
    /// The published decision; `None` while more approvals are needed.
    pub decision: Option<HoldDecision>,
    /// Who has approved so far.
    pub approvals: Vec<String>,
    /// Approvals the rule needs.
    pub min: u32,
    /// The grant, when the hold was an access request.
    pub grant: Option<GrantInfo>,
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
    /// The store could not be reached: the delivery is left for redelivery.
    Deferred,
}

/// What happened to a hold, for Slack and webhooks (handled off the decision path).
#[derive(Debug, Clone)]
pub enum Notice {
    /// This replica created the hold's record.
    Created(HoldRecord),
    /// A pending hold came back to this replica (restart, or another replica died).
    Resumed(HoldRecord),
    /// This replica moved the record to its decision.
    Decided(HoldRecord),
}

struct Pending {
    delivery: Option<Arc<Delivery>>,
    deadline: Instant,
    timeout: Duration,
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

/// The holds: the shared records plus this replica's deliveries.
pub struct Holds {
    bus: EventBus,
    store: Store,
    routes: Routes,
    state: Mutex<State>,
    /// Woken when the set of deadlines changes.
    changed: Notify,
    notices: mpsc::UnboundedSender<Notice>,
}

impl Holds {
    /// Holds over `store`; notices go to the returned receiver.
    pub fn new(bus: EventBus, store: Store, routes: Routes) -> (Self, mpsc::UnboundedReceiver<Notice>) {
        let (notices, rx) = mpsc::unbounded_channel();
        let holds =
            Self { bus, store, routes, state: Mutex::new(State::default()), changed: Notify::new(), notices };
        (holds, rx)
    }

    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notice(&self, n: Notice) {
        // The receiver lives as long as the service; after shutdown nobody needs notices.
        let _ = self.notices.send(n);
    }

    /// Take in a hold request delivered on `session`; `delivery` is acked once it is decided.
    pub async fn admit(
        &self,
        session: SessionId,
        request: HoldRequest,
        delivery: Option<Delivery>,
    ) -> Admitted {
        let id = request.hold_id;
        enum Known {
            Decided(Option<Delivery>),
            Pending,
            New(Option<Delivery>),
        }
        let known = {
            let mut st = self.state();
            if st.decided.contains(&id) {
                Known::Decided(delivery)
            } else if let Some(p) = st.pending.get_mut(&id) {
                if let Some(d) = delivery {
                    p.delivery = Some(Arc::new(d));
                }
                Known::Pending
            } else {
                Known::New(delivery)
            }
        };
        let delivery = match known {
            Known::Decided(delivery) => {
                debug!(hold.id = %id, session.id = %session, "hold already decided; acking its redelivery");
                if let Some(d) = delivery {
                    ack(&d, id).await;
                }
                return Admitted::AlreadyDecided;
            }
            Known::Pending => {
                debug!(hold.id = %id, session.id = %session, "hold redelivered while pending");
                return Admitted::Redelivered;
            }
            Known::New(delivery) => delivery,
        };
        let (rec, created) = match self.store.create(HoldRecord::new(session, request)).await {
            Ok(r) => r,
            Err(e) => {
                warn!(hold.id = %id, session.id = %session, error = %e, "storing a hold failed; it will be redelivered");
                return Admitted::Deferred;
            }
        };
        if !rec.is_pending() {
            if !rec.published
                && let Err(e) = self.publish(&rec).await
            {
                warn!(hold.id = %id, error = %e, "republishing a decision failed; it will be redelivered");
                return Admitted::Deferred;
            }
            self.state().remember_decided(id);
            if let Some(d) = delivery {
                ack(&d, id).await;
            }
            return Admitted::AlreadyDecided;
        }
        {
            let mut st = self.state();
            let deadline = deadline_for(rec.request.expires_at);
            let timeout = timeout_of(&rec.request);
            let delivery = delivery.map(Arc::new);
            st.pending.insert(id, Pending { delivery, deadline, timeout });
        }
        self.changed.notify_one();
        if created {
            info!(hold.id = %id, session.id = %session, rule = %rec.request.rule, "hold pending");
            self.notice(Notice::Created(rec));
            Admitted::New
        } else {
            info!(hold.id = %id, session.id = %session, "pending hold taken over");
            self.notice(Notice::Resumed(rec));
            Admitted::New
        }
    }

    /// A decision seen on the bus (ours, another replica's, or a proxy's). Drops the hold from
    /// this replica and acks its delivery; if the record was still pending (a proxy's own
    /// timeout), records the decision. Returns whether the hold was pending here.
    pub async fn observe(&self, decision: &HoldDecision) -> bool {
        let id = decision.hold_id;
        let was_local = self.forget_local(id).await;
        let recorded = self
            .store
            .modify(id, |rec| {
                if !rec.is_pending() {
                    return Ok::<_, StoreError>(Change::Keep(false));
                }
                rec.status = Status::from(decision.outcome);
                rec.decision = Some(decision.clone());
                rec.decided_at = Some(Timestamp::now());
                rec.published = true;
                Ok(Change::Write(true))
            })
            .await;
        match recorded {
            Ok(Some((true, rec))) => {
                info!(
                    hold.id = %id, session.id = %rec.session, outcome = %decision.outcome,
                    decided_by = %decision.decided_by, "hold decided elsewhere"
                );
                self.notice(Notice::Decided(rec));
            }
            Ok(_) => {}
            Err(e) => warn!(hold.id = %id, error = %e, "recording a decision made elsewhere failed"),
        }
        was_local
    }

    /// Drop `id` from this replica, remember it as decided, ack its delivery.
    async fn forget_local(&self, id: HoldId) -> bool {
        let removed = {
            let mut st = self.state();
            st.remember_decided(id);
            st.pending.remove(&id)
        };
        match removed {
            Some(p) => {
                self.changed.notify_one();
                if let Some(d) = p.delivery {
                    ack(&d, id).await;
                }
                true
            }
            None => false,
        }
    }

    /// Vote on a hold: approve (counted towards the rule's `min`), deny, or expire. Publishes
    /// the decision once one is reached.
    pub async fn decide(
        &self,
        id: HoldId,
        outcome: HoldOutcome,
        decider: &Decider,
        reason: Option<String>,
    ) -> Result<Decided, HoldError> {
        self.decide_for(id, outcome, decider, reason, None).await
    }

    /// [`Holds::decide`], with the grant's duration when the hold is an access request
    /// (default and cap: the rule's `grant.max`).
    pub async fn decide_for(
        &self,
        id: HoldId,
        outcome: HoldOutcome,
        decider: &Decider,
        reason: Option<String>,
        grant_for: Option<Duration>,
    ) -> Result<Decided, HoldError> {
        if outcome != HoldOutcome::Expired {
            let local = self.state().pending.get(&id).map(|p| p.deadline);
            let late = match local {
                Some(deadline) => Instant::now() >= deadline,
                None => false,
            };
            if late {
                // Too late for a human answer; the expiry task publishes the outcome.
                self.changed.notify_one();
                return Err(HoldError::Expired(id));
            }
        }
        let now = Timestamp::now();
        let result = self
            .store
            .modify(id, |rec| {
                if !rec.is_pending() {
                    return Err(HoldError::NotFound(id));
                }
                if outcome != HoldOutcome::Expired
                    && now >= rec.request.expires_at
                    && !self.state().pending.contains_key(&id)
                {
                    return Err(HoldError::Expired(id));
                }
                decider.check(&rec.request, outcome).map_err(|why| HoldError::NotAllowed {
                    id,
                    decider: decider.identity(),
                    why,
                })?;
                let who = decider.identity();
                let by_vote = matches!(decider, Decider::Approver { .. }) && outcome == HoldOutcome::Approved;
                let person = decider.person().cloned().unwrap_or_default();
                if by_vote {
                    // One person, whatever identifier each vote came with (a token's `sub`, a Slack
                    // user's entry or e-mail), counts once.
                    let same = |a: &Approval| a.by == who || person.is(&a.by) || a.person.same_as(&person);
                    if let Some(earlier) = rec.approvals.iter().find(|a| same(a)) {
                        return Err(HoldError::AlreadyApproved { id, decider: earlier.by.clone() });
                    }
                    rec.approvals.push(Approval {
                        by: who.clone(),
                        at: now,
                        via: decider.via().into(),
                        person: person.clone(),
                    });
                    if u32::try_from(rec.approvals.len()).unwrap_or(u32::MAX)
                        < rec.request.approvers.min.max(1)
                    {
                        return Ok(Change::Write(()));
                    }
                } else if outcome == HoldOutcome::Approved {
                    rec.approvals.push(Approval {
                        by: who.clone(),
                        at: now,
                        via: decider.via().into(),
                        person,
                    });
                }
                let decided_by = if by_vote {
                    rec.approvals.iter().map(|a| a.by.as_str()).collect::<Vec<_>>().join(", ")
                } else {
                    who
                };
                rec.status = Status::from(outcome);
                rec.decision =
                    Some(HoldDecision { hold_id: id, outcome, decided_by, reason: reason.clone() });
                rec.decided_at = Some(now);
                if outcome == HoldOutcome::Approved
                    && let Some(max) = self.routes.for_rule(&rec.request.rule).grant_max
                {
                    let dur = grant_for.unwrap_or(max).min(max);
                    rec.grant = Some(GrantInfo {
                        grant_id: derived_id("grant", id),
                        until: now.plus(dur),
                        revoked: None,
                    });
                }
                Ok(Change::Write(()))
            })
            .await;
        let rec = match result {
            Ok(Some(((), rec))) => rec,
            Ok(None) => return Err(HoldError::NotFound(id)),
            Err(HoldError::NotFound(_)) => {
                // Decided elsewhere and we missed it: stop tracking it here.
                self.forget_local(id).await;
                return Err(HoldError::NotFound(id));
            }
            Err(e) => return Err(e),
        };
        let view = Decided {
            session: rec.session,
            decision: rec.decision.clone(),
            approvals: rec.approvals.iter().map(|a| a.by.clone()).collect(),
            min: rec.request.approvers.min.max(1),
            grant: rec.grant.clone(),
        };
        let Some(decision) = rec.decision.clone() else {
            info!(
                hold.id = %id, session.id = %rec.session, approver = %decider.identity(),
                approvals = view.approvals.len(), min = view.min, "approval recorded; more needed"
            );
            return Ok(view);
        };
        if let Err(source) = self.publish(&rec).await {
            warn!(hold.id = %id, session.id = %rec.session, error = %source, "publishing a hold decision failed; retrying in the background");
            self.republish_later(rec);
            return Err(HoldError::Publish { id, source });
        }
        info!(
            hold.id = %id, session.id = %rec.session, outcome = %outcome,
            decided_by = %decision.decided_by, "hold decided"
        );
        self.after_publish(rec).await;
        Ok(view)
    }

    async fn publish(&self, rec: &HoldRecord) -> Result<(), eventbus::BusError> {
        publish_record(&self.bus, rec).await
    }

    /// Mark published, drop locally, ack, tell Slack and webhooks.
    async fn after_publish(&self, rec: HoldRecord) {
        let id = rec.id();
        let marked = self
            .store
            .modify(id, |r| {
                if r.published {
                    Ok::<_, StoreError>(Change::Keep(()))
                } else {
                    r.published = true;
                    Ok(Change::Write(()))
                }
            })
            .await;
        if let Err(e) = marked {
            debug!(hold.id = %id, error = %e, "marking a decision published failed (a redelivery republishes it)");
        }
        self.forget_local(id).await;
        self.notice(Notice::Decided(rec));
    }

    fn republish_later(&self, rec: HoldRecord) {
        let bus = self.bus.clone();
        let notices = self.notices.clone();
        tokio::spawn(async move {
            let id = rec.id();
            let mut wait = REPUBLISH_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                match publish_record(&bus, &rec).await {
                    Ok(()) => {
                        info!(hold.id = %id, "decision published after a retry");
                        let _ = notices.send(Notice::Decided(rec));
                        return;
                    }
                    Err(e) => warn!(hold.id = %id, error = %e, "republishing a decision failed; retrying"),
                }
                wait = (wait * 2).min(REPUBLISH_CAP);
            }
        });
    }

    /// The pending holds, oldest request first.
    pub async fn pending(&self) -> Result<Vec<Hold>, StoreError> {
        let mut holds: Vec<Hold> =
            self.store.all().await?.iter().filter(|r| r.is_pending()).map(Hold::from).collect();
        holds.sort_by_key(|h| (h.request.requested_at, h.request.hold_id));
        Ok(holds)
    }

    /// One pending hold.
    pub async fn get(&self, id: HoldId) -> Result<Option<Hold>, StoreError> {
        Ok(self.store.get(id).await?.filter(|(r, _)| r.is_pending()).map(|(r, _)| Hold::from(&r)))
    }

    /// One record, whatever its state.
    pub async fn record(&self, id: HoldId) -> Result<Option<HoldRecord>, StoreError> {
        Ok(self.store.get(id).await?.map(|(r, _)| r))
    }

    /// Every record.
    pub async fn records(&self) -> Result<Vec<HoldRecord>, StoreError> {
        self.store.all().await
    }

    /// Read-modify-write one record (Slack post bookkeeping, grant revocation).
    pub async fn modify<T>(
        &self,
        id: HoldId,
        f: impl FnMut(&mut HoldRecord) -> Result<Change<T>, StoreError>,
    ) -> Result<Option<(T, HoldRecord)>, StoreError> {
        self.store.modify(id, f).await
    }

    /// Publish an event on a session (grant revocations).
    pub async fn publish_event(&self, env: &Envelope) -> Result<(), eventbus::BusError> {
        self.bus.publish(env).await
    }

    /// The deliveries of pending holds (to report progress on).
    pub(crate) fn deliveries(&self) -> Vec<(HoldId, Arc<Delivery>)> {
        self.state().pending.iter().filter_map(|(id, p)| p.delivery.clone().map(|d| (*id, d))).collect()
    }

    /// The earliest deadline of a pending hold here.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.state().pending.values().map(|p| p.deadline).min()
    }

    /// Holds past their deadline at `now`, with their timeouts.
    pub(crate) fn due(&self, now: Instant) -> Vec<(HoldId, Duration)> {
        self.state()
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, p)| (*id, p.timeout))
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

/// Publish a decided record's events, with ids derived from the hold id (so a republish is
/// deduplicated by JetStream).
async fn publish_record(bus: &EventBus, rec: &HoldRecord) -> Result<(), eventbus::BusError> {
    let Some(decision) = rec.decision.clone() else { return Ok(()) };
    let id = rec.id();
    let at = rec.decided_at.unwrap_or_else(Timestamp::now);
    let mut envs = vec![Envelope {
        v: proto::events::ENVELOPE_VERSION,
        id: derived_id("hold_decided", id),
        session: rec.session,
        at,
        event: Event::HoldDecided(decision),
    }];
    envs.extend(crate::grant::events(rec, at));
    bus.publish_all(&envs).await
}

/// A stable id derived from a hold id: the same hold always gets the same decision event id,
/// so JetStream deduplicates a republished decision.
pub fn derived_id(kind: &str, hold: HoldId) -> Uuid {
    let digest = Sha256::new().chain_update(kind.as_bytes()).chain_update(hold.as_bytes()).finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
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

    fn request(expires_in: Duration) -> HoldRequest {
        let now = Timestamp::now();
        HoldRequest {
            requester_email: None,
            hold_id: Uuid::now_v7(),
            seq: 1,
            connection: "shop".into(),
            principal: Principal {
                subject: "agent-1".into(),
                groups: vec!["agents".into()],
                kind: "oidc".into(),
            },
            statement: "delete from orders".into(),
            parameters: vec![],
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

    fn approver(name: &str, groups: &[&str]) -> Decider {
        let mut person = Person::default();
        person.add_subject(Some(name));
        let groups = groups.iter().map(|g| g.to_string()).collect();
        Decider::Approver { identity: name.into(), person, groups, via: Via::Oidc }
    }

    fn dba(name: &str) -> Decider {
        approver(name, &["dba"])
    }

    fn holds(bus: EventBus) -> Holds {
        Holds::new(bus, Store::memory(), Routes::new(None, None)).0
    }

    #[test]
    fn decider_identity_defaults_to_admin() {
        assert_eq!(Decider::Admin { approver: None }.identity(), "admin");
        assert_eq!(admin("alice").identity(), "alice");
        assert_eq!(dba("dana").identity(), "dana");
        assert_eq!(Decider::Service.identity(), "approval-service");
    }

    #[test]
    fn requester_cannot_approve_its_own_hold() {
        let req = request(Duration::from_secs(60));
        assert!(admin("agent-1").check(&req, HoldOutcome::Approved).is_err());
        assert!(admin("agent-1").check(&req, HoldOutcome::Denied).is_ok());
        assert!(admin("alice").check(&req, HoldOutcome::Approved).is_ok());
        assert!(dba("agent-1").check(&req, HoldOutcome::Approved).unwrap_err().contains("own hold"));
        assert!(Decider::Service.check(&req, HoldOutcome::Approved).is_err());
    }

    /// A member of `dba` deciding in Slack as `person`.
    fn slack_dba(identity: &str, person: Person) -> Decider {
        Decider::Approver { identity: identity.into(), person, groups: vec!["dba".into()], via: Via::Slack }
    }

    #[test]
    fn approvers_are_compared_with_the_requester_as_people() {
        let mut req = request(Duration::from_secs(60));
        req.principal.subject = "Dana@Example.com".into();
        let mut dana = Person::default();
        dana.add_subject(Some("dana"));
        dana.add_email(Some("dana@example.com"));
        let slack_dana = slack_dba("dana", dana);
        assert!(slack_dana.check(&req, HoldOutcome::Approved).unwrap_err().contains("own hold"));
        assert!(slack_dana.check(&req, HoldOutcome::Denied).is_ok());
        // Known by e-mail and Slack id only: not the requester as far as anyone can tell, but
        // not provably someone else either.
        let mut unmapped = Person::default();
        unmapped.add_email(Some("gus@example.com"));
        unmapped.add_slack_user(Some("U0GUS"));
        let gus = slack_dba("gus@example.com", unmapped);
        assert!(gus.check(&req, HoldOutcome::Approved).unwrap_err().contains("cannot tell you apart"));
        assert!(gus.check(&req, HoldOutcome::Denied).is_ok());
        req.principal.kind = "service_account".into();
        assert!(gus.check(&req, HoldOutcome::Approved).is_ok());
        req.approvers.min = 2;
        assert!(gus.check(&req, HoldOutcome::Approved).is_err(), "two approvals must come from two people");
    }

    /// The requester's token carried a verified e-mail: an approver known by that e-mail is the
    /// requester, whatever subject its entry names (say, a name that is not its OIDC `sub`).
    #[test]
    fn a_requester_known_by_its_verified_email_cannot_approve_its_own_hold() {
        let mut req = request(Duration::from_secs(60));
        req.principal.subject = "00u1dana".into();
        req.requester_email = Some("Dana@Example.com".into());
        let mut dana = Person::default();
        dana.add_subject(Some("dana"));
        dana.add_email(Some("dana@example.com"));
        dana.add_slack_user(Some("U0DANA"));
        let slack_dana = slack_dba("dana", dana);
        assert!(slack_dana.check(&req, HoldOutcome::Approved).unwrap_err().contains("own hold"));
        assert!(slack_dana.check(&req, HoldOutcome::Denied).is_ok());
        req.requester_email = Some("someone.else@example.com".into());
        assert!(slack_dana.check(&req, HoldOutcome::Approved).is_ok());
    }

    #[test]
    fn approvers_outside_the_rule_groups_may_not_decide() {
        let req = request(Duration::from_secs(60));
        let outsider = approver("eve", &["agents"]);
        assert!(outsider.check(&req, HoldOutcome::Approved).unwrap_err().contains("dba"));
        assert!(outsider.check(&req, HoldOutcome::Denied).is_err());
        assert!(dba("dana").check(&req, HoldOutcome::Approved).is_ok());
        assert!(dba("dana").check(&req, HoldOutcome::Expired).is_err());
        let mut open = req.clone();
        open.approvers.groups.clear();
        assert!(outsider.check(&open, HoldOutcome::Approved).is_ok());
    }

    #[test]
    fn timeout_is_expires_minus_requested() {
        let req = request(Duration::from_secs(300));
        assert_eq!(timeout_of(&req), Duration::from_secs(300));
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let h = Uuid::now_v7();
        assert_eq!(derived_id("hold_decided", h), derived_id("hold_decided", h));
        assert_ne!(derived_id("hold_decided", h), derived_id("grant", h));
        assert_ne!(derived_id("hold_decided", h), derived_id("hold_decided", Uuid::now_v7()));
    }

    #[tokio::test]
    async fn decide_publishes_on_the_hold_session_then_forgets_the_hold() {
        let bus = EventBus::memory();
        let mut sub = bus.subscribe(proto::subjects::HOLD_DECIDED).await.unwrap();
        let holds = holds(bus);
        let session = Uuid::now_v7();
        let req = request(Duration::from_secs(60));
        let id = req.hold_id;
        assert_eq!(holds.admit(session, req, None).await, Admitted::New);
        assert_eq!(holds.pending().await.unwrap().len(), 1);

        let decided = holds.decide(id, HoldOutcome::Approved, &admin("alice"), None).await.unwrap();
        assert_eq!(decided.session, session);
        let env = sub.next().await.unwrap();
        assert_eq!(env.session, session);
        assert_eq!(env.id, derived_id("hold_decided", id));
        assert_eq!(env.event, Event::HoldDecided(decided.decision.unwrap()));
        assert!(holds.pending().await.unwrap().is_empty());
        assert!(matches!(
            holds.decide(id, HoldOutcome::Denied, &admin("bob"), None).await,
            Err(HoldError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn min_two_needs_two_distinct_approvers() {
        let bus = EventBus::memory();
        let mut sub = bus.subscribe(proto::subjects::HOLD_DECIDED).await.unwrap();
        let holds = holds(bus);
        let mut req = request(Duration::from_secs(60));
        req.approvers.min = 2;
        let id = req.hold_id;
        holds.admit(Uuid::now_v7(), req, None).await;
        let first = holds.decide(id, HoldOutcome::Approved, &dba("dana"), None).await.unwrap();
        assert_eq!((first.decision, first.approvals.clone(), first.min), (None, vec!["dana".to_string()], 2));
        assert_eq!(holds.get(id).await.unwrap().unwrap().approvals, vec!["dana".to_string()]);
        assert!(matches!(
            holds.decide(id, HoldOutcome::Approved, &dba("dana"), None).await,
            Err(HoldError::AlreadyApproved { .. })
        ));
        let second = holds.decide(id, HoldOutcome::Approved, &dba("erin"), None).await.unwrap();
        let d = second.decision.unwrap();
        assert_eq!((d.outcome, d.decided_by.as_str()), (HoldOutcome::Approved, "dana, erin"));
        let Event::HoldDecided(seen) = sub.next().await.unwrap().event else { panic!("not a decision") };
        assert_eq!(seen, d);
    }

    #[tokio::test]
    async fn redelivered_and_already_decided_holds_are_not_reopened() {
        let holds = holds(EventBus::memory());
        let session = Uuid::now_v7();
        let req = request(Duration::from_secs(60));
        let id = req.hold_id;
        assert_eq!(holds.admit(session, req.clone(), None).await, Admitted::New);
        assert_eq!(holds.admit(session, req.clone(), None).await, Admitted::Redelivered);
        assert_eq!(holds.pending().await.unwrap().len(), 1);
        holds.decide(id, HoldOutcome::Denied, &admin("alice"), Some("no".into())).await.unwrap();
        assert_eq!(holds.admit(session, req, None).await, Admitted::AlreadyDecided);
        assert!(holds.pending().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_decision_seen_on_the_bus_drops_the_pending_hold() {
        let holds = holds(EventBus::memory());
        let req = request(Duration::from_secs(60));
        let id = req.hold_id;
        holds.admit(Uuid::now_v7(), req.clone(), None).await;
        let elsewhere = HoldDecision {
            hold_id: id,
            outcome: HoldOutcome::Expired,
            decided_by: "proxy".into(),
            reason: None,
        };
        assert!(holds.observe(&elsewhere).await);
        assert!(holds.get(id).await.unwrap().is_none());
        assert_eq!(holds.record(id).await.unwrap().unwrap().status, Status::Expired);
        assert!(!holds.observe(&elsewhere).await);
        // A decision that arrives before its request keeps the request from opening.
        let late = request(Duration::from_secs(60));
        let early = HoldDecision { hold_id: late.hold_id, ..elsewhere };
        assert!(!holds.observe(&early).await);
        assert_eq!(holds.admit(Uuid::now_v7(), late, None).await, Admitted::AlreadyDecided);
    }

    #[tokio::test]
    async fn past_deadline_holds_are_due_and_cannot_be_approved() {
        let holds = holds(EventBus::memory());
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
