//! The harness the recorder's integration tests share: the recorder running on a bus and a
//! store, the buses and stores themselves, and the events sessions are made of.
#![allow(dead_code)]

pub(crate) mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use eventbus::{EventBus, NatsConfig};
use object_store::ObjectStore;
use proto::events::{
    ApproverSpec, Decision, Envelope, Event, HoldDecision, HoldOutcome, HoldRequest, Principal,
    ResultCapture, Timestamp,
};
use proto::subjects;
use recorder::{RecorderConfig, StorageConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A recorder running in this process.
pub(crate) struct Running {
    pub(crate) stop: oneshot::Sender<()>,
    pub(crate) task: JoinHandle<Result<(), recorder::RecorderError>>,
}

/// Runs a recorder with `cfg` on `bus`, writing to `store`.
pub(crate) fn start_recorder(bus: &EventBus, store: &Arc<dyn ObjectStore>, cfg: RecorderConfig) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(recorder::run(cfg, bus.clone(), store.clone(), async move {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

impl Running {
    /// Stops the recorder and waits for it to return cleanly.
    pub(crate) async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("recorder did not stop")??
            .context("recorder failed")
    }
}

/// A bus on `nats`.
pub(crate) async fn nats_bus(nats: &testkit::Nats) -> Result<EventBus> {
    testkit::init_crypto();
    let cfg = NatsConfig { url: nats.url.clone(), ..Default::default() };
    EventBus::connect_nats(&cfg).await.context("connecting to NATS")
}

/// The store under `prefix` in `s3`'s bucket.
pub(crate) fn s3_store(s3: &testkit::S3, prefix: &str) -> Result<Arc<dyn ObjectStore>> {
    testkit::init_crypto();
    Ok(recorder::open_store(&StorageConfig {
        url: format!("s3://{}/{prefix}", s3.bucket),
        endpoint: Some(s3.endpoint.clone()),
        region: Some(s3.region.clone()),
        access_key_id: Some(s3.access_key_id.clone()),
        secret_access_key: Some(s3.secret_access_key.clone()),
        allow_http: true,
        // No retries inside object_store: outages go through the recorder's own retry loop.
        max_retries: 0,
        retry_timeout: Duration::from_secs(1),
    })?)
}

/// The in-process bus and a store in the local directory `dir`. The bus only queues events for
/// durables that exist: the recorder's is created before anything is published, as `airlock up`
/// does by starting the recorder first.
pub(crate) async fn local_setup(dir: &std::path::Path) -> Result<(EventBus, Arc<dyn ObjectStore>)> {
    let store = recorder::open_store(&StorageConfig {
        url: format!("file://{}", dir.display()),
        ..Default::default()
    })?;
    let bus = EventBus::memory();
    bus.durable(subjects::RECORDER_DURABLE, subjects::ALL_SESSION_EVENTS).await?;
    Ok((bus, store))
}

/// A member of `agents`, known by OIDC.
pub(crate) fn agent(subject: &str) -> Principal {
    Principal { subject: subject.into(), groups: vec!["agents".into()], kind: "oidc".into() }
}

/// `p`'s session on `shop` started.
pub(crate) fn session_started(p: &Principal) -> Event {
    Event::SessionStarted {
        principal: p.clone(),
        connection: "shop".into(),
        protocol: "postgres".into(),
        client_addr: "127.0.0.1:5000".into(),
        node: "n1".into(),
        policy_version: 1,
    }
}

/// Statement `seq`, a select on `table`, got `decision` (from rule `rule-{decision}`).
pub(crate) fn policy_decided(seq: u64, decision: Decision, table: &str, reason: &str) -> Event {
    Event::PolicyDecided {
        seq,
        decision,
        rule: Some(format!("rule-{decision}").into()),
        operations: ["select".into()].into(),
        tables: [table.into()].into(),
        reason: reason.into(),
        policy_version: 1,
    }
}

/// `p`'s statement `seq` held at `start` for a minute (for one of `dba`, by `rule-hold`), with no
/// text of its own, and alice's approval of it.
pub(crate) fn approved_hold(p: &Principal, seq: u64, start: i64) -> (HoldRequest, HoldDecision) {
    let hold_id = Uuid::now_v7();
    let request = HoldRequest {
        hold_id,
        seq,
        connection: "shop".into(),
        principal: p.clone(),
        requester_email: None,
        statement: String::new(),
        parameters: Default::default(),
        fingerprint: String::new(),
        rule: "rule-hold".into(),
        reason: "".into(),
        approvers: ApproverSpec { groups: vec!["dba".into()], min: 1 },
        requested_at: Timestamp(start),
        expires_at: Timestamp(start + 60_000_000),
    };
    let decision =
        HoldDecision { hold_id, outcome: HoldOutcome::Approved, decided_by: "alice".into(), reason: None };
    (request, decision)
}

/// Statement `seq` answered with one row (`SELECT 1`) after `duration_us`, with `result` if kept.
pub(crate) fn response_sent(seq: u64, duration_us: u64, result: Option<ResultCapture>) -> Event {
    Event::ResponseSent {
        seq,
        rows: 1,
        duration_us,
        command_tag: Some("SELECT 1".into()),
        error: None,
        result,
    }
}

/// `events` as session `id`'s envelopes, 1ms apart from `start`.
pub(crate) fn envelopes(id: Uuid, events: Vec<Event>, start: i64) -> Vec<Envelope> {
    testkit::sessions::spaced(events, start, 1_000, |event, at| Envelope {
        at: Timestamp(at),
        ..Envelope::new(id, event)
    })
}
