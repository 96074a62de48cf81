//! Hold records: the state machine every replica shares.
//!
//! A record is `pending` until a decision moves it, once, to `approved`, `denied` or `expired`.
//! Every change is a compare-and-set on the record's revision: on NATS, a JetStream key-value
//! bucket ([`BUCKET`]); in-process (`airlock up`), a map with revisions. Two replicas racing to
//! decide a hold both read revision N; only one write of N+1 succeeds, the other re-reads, sees
//! the decision and stops. That is what makes a decision (and the Slack post) happen once.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::TryStreamExt;
use proto::events::{HoldDecision, HoldId, HoldOutcome, HoldRequest, SessionId, Timestamp};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// The key-value bucket of hold records.
pub const BUCKET: &str = "AIRLOCK_HOLDS";
/// How long records are kept (decided holds must be remembered past any redelivery).
const KEEP: Duration = Duration::from_secs(14 * 24 * 3600);
/// The in-process store prunes old decisions once it holds this many records.
const PRUNE_ABOVE: usize = 10_000;
/// Compare-and-set attempts before giving up.
const MAX_ATTEMPTS: usize = 32;

/// Where a hold stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Approved,
    Denied,
    Expired,
}

impl From<HoldOutcome> for Status {
    fn from(o: HoldOutcome) -> Self {
        match o {
            HoldOutcome::Approved => Status::Approved,
            HoldOutcome::Denied => Status::Denied,
            HoldOutcome::Expired => Status::Expired,
        }
    }
}

/// One approval counted towards the rule's `min`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub by: String,
    pub at: Timestamp,
    /// `admin`, `oidc` or `slack`.
    pub via: String,
    /// Every identifier known for the approver, so that one person counts once.
    #[serde(default, skip_serializing_if = "crate::approver::Person::is_empty")]
    pub person: crate::approver::Person,
}

/// The hold's Slack message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlackMessage {
    pub channel: String,
    pub ts: String,
}

/// A just-in-time grant given by approving an access request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    pub grant_id: uuid::Uuid,
    pub until: Timestamp,
    #[serde(default)]
    pub revoked: Option<String>,
}

/// Everything known about one hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldRecord {
    pub session: SessionId,
    pub request: HoldRequest,
    pub status: Status,
    #[serde(default)]
    pub approvals: Vec<Approval>,
    #[serde(default)]
    pub decision: Option<HoldDecision>,
    #[serde(default)]
    pub decided_at: Option<Timestamp>,
    /// The decision event is acknowledged by the bus.
    #[serde(default)]
    pub published: bool,
    /// A replica claimed the Slack post at this time (so only one posts).
    #[serde(default)]
    pub slack_claimed_at: Option<Timestamp>,
    #[serde(default)]
    pub slack: Option<SlackMessage>,
    /// The Slack message already shows the decision.
    #[serde(default)]
    pub slack_final: bool,
    #[serde(default)]
    pub grant: Option<GrantInfo>,
}

impl HoldRecord {
    pub fn new(session: SessionId, request: HoldRequest) -> Self {
        Self {
            session,
            request,
            status: Status::Pending,
            approvals: Vec::new(),
            decision: None,
            decided_at: None,
            published: false,
            slack_claimed_at: None,
            slack: None,
            slack_final: false,
            grant: None,
        }
    }

    pub fn id(&self) -> HoldId {
        self.request.hold_id
    }

    pub fn is_pending(&self) -> bool {
        self.status == Status::Pending
    }
}

/// The shared hold records.
pub enum Store {
    Memory(Mutex<HashMap<HoldId, (HoldRecord, u64)>>),
    Kv(Box<kv::Store>),
}

/// What [`Store::modify`]'s closure decided.
pub enum Change<T> {
    /// Write the changed record, then return `T`.
    Write(T),
    /// Leave the record as it is and return `T`.
    Keep(T),
}

impl Store {
    /// An in-process store.
    pub fn memory() -> Self {
        Self::Memory(Mutex::new(HashMap::new()))
    }

    /// The bucket on the NATS server behind `client`, created if missing.
    pub async fn nats(client: async_nats::Client) -> Result<Self, StoreError> {
        let js = async_nats::jetstream::new(client);
        let kv = match js.get_key_value(BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: BUCKET.to_string(),
                    history: 1,
                    max_age: KEEP,
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| StoreError::Kv(e.to_string()))?,
        };
        Ok(Self::Kv(Box::new(kv)))
    }

    fn key(id: HoldId) -> String {
        id.simple().to_string()
    }

    /// Create `rec` unless a record for its hold exists; returns the stored record and whether
    /// this call created it.
    pub async fn create(&self, rec: HoldRecord) -> Result<(HoldRecord, bool), StoreError> {
        let id = rec.id();
        match self {
            Store::Memory(m) => {
                let mut m = m.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some((existing, _)) = m.get(&id) {
                    return Ok((existing.clone(), false));
                }
                if m.len() >= PRUNE_ABOVE {
                    // Like the bucket's max age: forget decisions older than KEEP.
                    let cutoff =
                        Timestamp::now().as_micros() - i64::try_from(KEEP.as_micros()).unwrap_or(i64::MAX);
                    m.retain(|_, (r, _)| r.decided_at.is_none_or(|t| t.as_micros() > cutoff));
                }
                m.insert(id, (rec.clone(), 1));
                Ok((rec, true))
            }
            Store::Kv(kv) => {
                let bytes = serde_json::to_vec(&rec)?;
                match kv.create(Self::key(id), bytes.into()).await {
                    Ok(_) => Ok((rec, true)),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        let (existing, _) = self
                            .get(id)
                            .await?
                            .ok_or_else(|| StoreError::Kv(format!("record {id} exists and vanished")))?;
                        Ok((existing, false))
                    }
                    Err(e) => Err(StoreError::Kv(e.to_string())),
                }
            }
        }
    }

    /// A record and its revision.
    pub async fn get(&self, id: HoldId) -> Result<Option<(HoldRecord, u64)>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.lock().unwrap_or_else(PoisonError::into_inner).get(&id).cloned()),
            Store::Kv(kv) => {
                let entry = kv.entry(Self::key(id)).await.map_err(|e| StoreError::Kv(e.to_string()))?;
                match entry {
                    Some(e) if e.operation == kv::Operation::Put => {
                        Ok(Some((serde_json::from_slice(&e.value)?, e.revision)))
                    }
                    _ => Ok(None),
                }
            }
        }
    }

    /// Write `rec` if the record is still at `revision`; `Ok(false)` when someone else wrote first.
    async fn update(&self, rec: &HoldRecord, revision: u64) -> Result<bool, StoreError> {
        let id = rec.id();
        match self {
            Store::Memory(m) => {
                let mut m = m.lock().unwrap_or_else(PoisonError::into_inner);
                match m.get_mut(&id) {
                    Some((stored, rev)) if *rev == revision => {
                        *stored = rec.clone();
                        *rev += 1;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }
            Store::Kv(kv) => {
                let bytes = serde_json::to_vec(rec)?;
                match kv.update(Self::key(id), bytes.into(), revision).await {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                    Err(e) => Err(StoreError::Kv(e.to_string())),
                }
            }
        }
    }

    /// Read-modify-write with compare-and-set, retried on conflict. `f` sees the current record
    /// and says whether to write it; `Ok(None)` when there is no record.
    pub async fn modify<T, E>(
        &self,
        id: HoldId,
        mut f: impl FnMut(&mut HoldRecord) -> Result<Change<T>, E>,
    ) -> Result<Option<(T, HoldRecord)>, E>
    where
        E: From<StoreError>,
    {
        for _ in 0..MAX_ATTEMPTS {
            let Some((mut rec, rev)) = self.get(id).await? else { return Ok(None) };
            match f(&mut rec)? {
                Change::Keep(t) => return Ok(Some((t, rec))),
                Change::Write(t) => {
                    if self.update(&rec, rev).await? {
                        return Ok(Some((t, rec)));
                    }
                }
            }
        }
        Err(StoreError::Contention.into())
    }

    /// Every record.
    pub async fn all(&self) -> Result<Vec<HoldRecord>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .map(|(r, _)| r.clone())
                .collect()),
            Store::Kv(kv) => {
                let keys: Vec<String> = match kv.keys().await {
                    Ok(k) => k.try_collect().await.map_err(|e| StoreError::Kv(e.to_string()))?,
                    Err(e) => return Err(StoreError::Kv(e.to_string())),
                };
                let mut out = Vec::with_capacity(keys.len());
                for k in keys {
                    let Ok(id) = uuid::Uuid::parse_str(&k) else { continue };
                    if let Some((rec, _)) = self.get(id).await? {
                        out.push(rec);
                    }
                }
                Ok(out)
            }
        }
    }
}
