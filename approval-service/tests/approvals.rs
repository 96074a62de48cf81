//! The approval service end to end: hold requests published as a proxy would, decisions observed
//! on the bus, the REST API driven through `ApprovalsClient`. Against a real nats-server and
//! against the in-process bus.

mod common;

use std::time::Duration;

use anyhow::{Context, bail};
use approval_service::client::{ApprovalsClient, PendingHold};
use approval_service::{ApprovalError, ApprovalsConfig};
use common::{
    Service, TOKEN, WAIT, decision_within, hold_request, hold_request_at, nats_bus, next_decision,
    request_hold,
};
use eventbus::EventBus;
use proto::events::{HoldOutcome, Timestamp};
use proto::subjects;
use reqwest::StatusCode;
use uuid::Uuid;

/// The service with an admin token, through `approval_service::run`.
async fn start(bus: EventBus) -> anyhow::Result<Service> {
    Service::start_plain(bus, ApprovalsConfig { admin_token: Some(TOKEN.into()), ..Default::default() }).await
}

/// Poll the API until the hold is listed.
async fn listed(client: &ApprovalsClient, id: Uuid) -> anyhow::Result<PendingHold> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(h) = client.list().await?.into_iter().find(|h| h.id == id) {
            return Ok(h);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("hold {id} was not listed within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn approve_flow(bus: EventBus) -> anyhow::Result<()> {
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = start(bus.clone()).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    let session = request_hold(&bus, &req).await?;

    let shown = listed(&svc.client(), req.hold_id).await?;
    assert_eq!(shown.session, session);
    assert_eq!(shown.connection, "shop");
    assert_eq!(shown.principal.subject, "agent-7");
    assert_eq!(shown.principal.groups, vec!["agents".to_string()]);
    assert_eq!(shown.statement, req.statement);
    assert_eq!(shown.rule, "writes-need-approval");
    assert_eq!(shown.reason, "delete on orders");
    assert_eq!(shown.expires_at, req.expires_at);
    assert_eq!(svc.client().get(req.hold_id).await?, shown);

    let view = svc.client().approve(req.hold_id, Some("alice")).await?;
    assert_eq!(view.outcome, Some(HoldOutcome::Approved));
    assert_eq!(view.decided_by, "alice");
    assert_eq!(view.session, session);

    let (env, d) = decision_within(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!(env.session, session, "the decision is on the hold's session");
    assert_eq!(env.subject(), subjects::session_subject(session, "hold_decided"));
    assert_eq!(d.outcome, HoldOutcome::Approved);
    assert_eq!(d.decided_by, "alice");

    assert!(svc.client().list().await?.is_empty(), "a decided hold is no longer pending");
    let again = svc.client().approve(req.hold_id, None).await.unwrap_err();
    assert_eq!(again.status(), Some(StatusCode::NOT_FOUND));
    svc.stop().await
}

#[tokio::test]
async fn nats_approve_publishes_approved_on_the_hold_session() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    approve_flow(nats_bus(&nats).await?).await
}

#[tokio::test]
async fn memory_bus_approve_publishes_approved_on_the_hold_session() -> anyhow::Result<()> {
    let bus = EventBus::memory();
    // The in-process durable only queues events published after it exists: create it first, as
    // `airlock up` does before the proxy accepts connections.
    bus.durable(subjects::APPROVALS_DURABLE, subjects::HOLD_REQUESTED).await?;
    approve_flow(bus).await
}

#[tokio::test]
async fn deny_requires_a_reason_and_publishes_it() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = start(bus.clone()).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    let session = request_hold(&bus, &req).await?;
    listed(&svc.client(), req.hold_id).await?;

    let http = reqwest::Client::new();
    let deny_url = format!("{}/v1/holds/{}/deny", svc.url, req.hold_id);
    for body in ["", "{}", r#"{"reason": "   "}"#, r#"{"approver": "bob"}"#, "{not json", r#"{"reasn":"x"}"#]
    {
        let resp = http.post(&deny_url).bearer_auth(TOKEN).body(body).send().await?;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "body {body:?}");
        let err: serde_json::Value = resp.json().await?;
        assert!(err["error"].as_str().is_some_and(|e| !e.is_empty()), "{err}");
    }
    assert_eq!(listed(&svc.client(), req.hold_id).await?.id, req.hold_id, "still pending after bad requests");

    let view = svc.client().deny(req.hold_id, "too risky on a Friday", None).await?;
    assert_eq!(view.outcome, Some(HoldOutcome::Denied));
    assert_eq!(view.decided_by, "admin");
    // The first decision seen is this one: the rejected requests published nothing.
    let (env, d) = decision_within(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!(env.session, session);
    assert_eq!(d.outcome, HoldOutcome::Denied);
    assert_eq!(d.reason.as_deref(), Some("too risky on a Friday"));
    assert_eq!(d.decided_by, "admin");
    svc.stop().await
}

#[tokio::test]
async fn wrong_or_missing_token_is_401_and_decides_nothing() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = start(bus.clone()).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    request_hold(&bus, &req).await?;
    listed(&svc.client(), req.hold_id).await?;

    let intruder = ApprovalsClient::new(&svc.url, "not-the-token");
    let err = intruder.approve(req.hold_id, Some("mallory")).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));
    assert_eq!(intruder.list().await.unwrap_err().status(), Some(StatusCode::UNAUTHORIZED));
    let err = intruder.deny(req.hold_id, "x", None).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));

    let http = reqwest::Client::new();
    let approve_url = format!("{}/v1/holds/{}/approve", svc.url, req.hold_id);
    let resp = http.post(&approve_url).send().await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));
    let resp = http.post(&approve_url).header("authorization", format!("Basic {TOKEN}")).send().await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = http.get(format!("{}/v1/holds", svc.url)).send().await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Health needs no token.
    let resp = http.get(format!("{}/healthz", svc.url)).send().await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await?, "ok");

    // Still pending; the first decision published is the legitimate one.
    listed(&svc.client(), req.hold_id).await?;
    svc.client().approve(req.hold_id, Some("alice")).await?;
    let (_, d) = decision_within(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!(d.decided_by, "alice");
    svc.stop().await
}

#[tokio::test]
async fn unknown_or_malformed_hold_ids_get_clear_errors() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let svc = start(nats_bus(&nats).await?).await?;
    let unknown = Uuid::now_v7();
    assert_eq!(svc.client().approve(unknown, None).await.unwrap_err().status(), Some(StatusCode::NOT_FOUND));
    assert_eq!(
        svc.client().deny(unknown, "no", None).await.unwrap_err().status(),
        Some(StatusCode::NOT_FOUND)
    );
    assert_eq!(svc.client().get(unknown).await.unwrap_err().status(), Some(StatusCode::NOT_FOUND));

    let http = reqwest::Client::new();
    let resp =
        http.post(format!("{}/v1/holds/not-a-uuid/approve", svc.url)).bearer_auth(TOKEN).send().await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = http.get(format!("{}/v1/nothing-here", svc.url)).bearer_auth(TOKEN).send().await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    svc.stop().await
}

#[tokio::test]
async fn hold_expires_when_nobody_answers() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = start(bus.clone()).await?;
    let req = hold_request(Duration::from_secs(1), 1);
    let session = request_hold(&bus, &req).await?;

    let (env, d) = decision_within(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!(env.session, session);
    assert_eq!(d.outcome, HoldOutcome::Expired);
    assert_eq!(d.decided_by, "approval-service");
    assert_eq!(d.reason.as_deref(), Some("no decision within 1s"));
    assert!(env.at >= req.expires_at, "not expired early");
    assert!(svc.client().list().await?.is_empty());
    // Exactly once: no second expiry for the same hold.
    let second =
        tokio::time::timeout(Duration::from_secs(2), next_decision(&mut decisions, req.hold_id)).await;
    assert!(second.is_err(), "a second decision was published: {second:?}");
    svc.stop().await
}

#[tokio::test]
async fn hold_already_past_its_expiry_on_arrival_expires_at_once() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    // Published while no approval service runs; it expired a minute ago.
    let req =
        hold_request_at(Timestamp(Timestamp::now().as_micros() - 61_000_000), Duration::from_secs(60), 1);
    let session = request_hold(&bus, &req).await?;
    let svc = start(bus.clone()).await?;
    let (env, d) = decision_within(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!(env.session, session);
    assert_eq!(d.outcome, HoldOutcome::Expired);
    assert_eq!(d.reason.as_deref(), Some("no decision within 1m"));
    svc.stop().await
}

#[tokio::test]
async fn restarted_service_gets_undecided_holds_again() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    // Create the consumer with a short ack wait so the test need not wait the default 30 s for
    // the redelivery; the service reuses an existing consumer's configuration.
    let EventBus::Nats(raw) = &bus else { unreachable!("connected to NATS") };
    raw.durable_with_ack_wait(subjects::APPROVALS_DURABLE, subjects::HOLD_REQUESTED, Duration::from_secs(2))
        .await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;

    let first = start(nats_bus(&nats).await?).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    let session = request_hold(&bus, &req).await?;
    listed(&first.client(), req.hold_id).await?;
    // Redeliveries while pending (ack wait 2 s) keep it listed once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ids: Vec<Uuid> = first.client().list().await?.iter().map(|h| h.id).collect();
    assert_eq!(ids, vec![req.hold_id]);
    first.stop().await?;

    let second = start(nats_bus(&nats).await?).await?;
    let shown = listed(&second.client(), req.hold_id).await?;
    assert_eq!(shown.session, session);
    second.client().approve(req.hold_id, Some("carol")).await?;
    let (env, d) = decision_within(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!(env.session, session);
    assert_eq!((d.outcome, d.decided_by.as_str()), (HoldOutcome::Approved, "carol"));
    // Acked once decided: not redelivered to a third instance.
    second.stop().await?;
    let third = start(nats_bus(&nats).await?).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(third.client().list().await?.is_empty(), "a decided hold came back");
    third.stop().await
}

#[tokio::test(start_paused = true)]
async fn memory_bus_hold_expires_on_the_paused_clock() -> anyhow::Result<()> {
    let bus = EventBus::memory();
    bus.durable(subjects::APPROVALS_DURABLE, subjects::HOLD_REQUESTED).await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    let session = request_hold(&bus, &req).await?;
    let svc = start(bus.clone()).await?;

    let started = tokio::time::Instant::now();
    let (env, d) = next_decision(&mut decisions, req.hold_id).await?;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(299), "expired after {waited:?}");
    assert!(waited <= Duration::from_secs(301), "expired after {waited:?}");
    assert_eq!(env.session, session);
    assert_eq!(d.outcome, HoldOutcome::Expired);
    assert_eq!(d.reason.as_deref(), Some("no decision within 5m"));
    let _ = svc.stop.send(());
    svc.task.await??;
    Ok(())
}

#[tokio::test]
async fn the_service_refuses_to_start_with_approvers_oidc_weaker_than_the_proxys() -> anyhow::Result<()> {
    let oidc: proxy_node::identity::OidcConfig = serde_json::from_value(
        serde_json::json!({ "issuer": "http://127.0.0.1:1", "algorithms": ["HS256"] }),
    )?;
    let cfg = ApprovalsConfig { oidc: Some(oidc), ..Default::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let run = approval_service::run(cfg, EventBus::memory(), listener, std::future::pending());
    let e = tokio::time::timeout(WAIT, run).await.context("the service started")?.unwrap_err();
    assert!(matches!(e, ApprovalError::Oidc(_)), "{e}");
    assert!(e.to_string().contains("approvals.oidc.algorithms"), "{e}");
    Ok(())
}
