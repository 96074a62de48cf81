//! Approvals through Slack, OIDC approvers, webhooks, grants and replicas: the service against a
//! real nats-server and a fake Slack that records every Web API call.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use approval_service::ApprovalsConfig;
use approval_service::client::ApprovalsClient;
use approval_service::config::WebhookConfig;
use approval_service::slack::fake::{self, FakeSlack};
use approval_service::slack::{APPROVE_ACTION, DENY_ACTION};
use common::{
    CHANNEL, DBA_RULE, SECRET, Service, TOKEN, WAIT, decision_for, entry, hold_request, nats_bus,
    no_decision_for, oidc_config, posted, request_hold, slack_config, token_with_email, visible,
};
use proto::events::{ApproverSpec, Envelope, Event, HoldOutcome, HoldRequest, Principal, Timestamp};
use proto::subjects;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A service config wired to `slack`, with these Slack users:
/// `U_DANA`, `U_ERIN` (dba, by e-mail), `U_OLLY` (support, by e-mail), `U_AGENT` (the requester
/// `agent-7`, by explicit mapping, in dba), `U_STRANGER` (an e-mail no approver has).
fn config(slack: &FakeSlack) -> ApprovalsConfig {
    for (u, e) in [
        ("U_DANA", "dana@example.com"),
        ("U_ERIN", "Erin@Example.com"),
        ("U_OLLY", "olly@example.com"),
        ("U_STRANGER", "stranger@example.com"),
        ("U_AGENT", "agent-7@example.com"),
    ] {
        slack.add_user(u, e);
    }
    ApprovalsConfig {
        admin_token: Some(TOKEN.into()),
        approvers: vec![
            entry("dana", Some("dana@example.com"), None, &["dba"]),
            entry("erin", Some("erin@example.com"), None, &["dba"]),
            entry("olly", Some("olly@example.com"), None, &["support"]),
            entry("agent-7", None, Some("U_AGENT"), &["dba"]),
        ],
        slack: Some(slack_config(slack)),
        ..Default::default()
    }
}

fn text_of(v: &Value) -> String {
    v.to_string()
}

/// Waits until `svc` lists `n` pending holds.
async fn lists(svc: &Service, n: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listed = svc.client().list().await?.len();
        if listed == n {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "lists {listed} holds, not {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn updated(slack: &FakeSlack, needle: &str) -> Value {
    slack
        .wait_for("chat.update", WAIT, |b| text_of(b).contains(needle))
        .await
        .unwrap_or_else(|| panic!("no chat.update containing {needle:?}: {:?}", slack.bodies("chat.update")))
        .body
}

#[tokio::test]
async fn slack_approve_click_publishes_the_approval_and_updates_the_message() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = Service::start(bus.clone(), config(&slack), None).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    request_hold(&bus, &req).await?;

    let msg = posted(&slack, req.hold_id).await;
    assert_eq!(msg["channel"], CHANNEL);
    let text = text_of(&msg);
    for needle in [
        "agent-7",
        "agents",
        "shop",
        "DELETE FROM orders WHERE id = 42",
        "writes-need-approval",
        "delete on orders",
        APPROVE_ACTION,
        DENY_ACTION,
    ] {
        assert!(text.contains(needle), "message lacks {needle}: {text}");
    }

    let (status, _) = svc.signed(&fake::click("U_DANA", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    assert_eq!(status, StatusCode::OK);
    let d = decision_for(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!((d.outcome, d.decided_by.as_str()), (HoldOutcome::Approved, "dana"));
    let upd = updated(&slack, "Approved").await;
    assert!(text_of(&upd).contains("by dana"), "{upd}");
    assert_eq!(upd["ts"], "1700000000.000001");
    assert!(!text_of(&upd).contains(APPROVE_ACTION), "buttons are gone: {upd}");
    // users.info mapped the clicker by e-mail.
    assert!(slack.bodies("users.info").iter().any(|b| b["user"] == "U_DANA"));
    // A second click changes nothing.
    svc.signed(&fake::click("U_ERIN", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(500)).await;
    svc.stop().await
}

#[tokio::test]
async fn slack_deny_opens_a_modal_and_its_reason_denies() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = Service::start(bus.clone(), config(&slack), None).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    request_hold(&bus, &req).await?;
    posted(&slack, req.hold_id).await;

    let (status, _) = svc.signed(&fake::click("U_DANA", DENY_ACTION, req.hold_id, CHANNEL)).await?;
    assert_eq!(status, StatusCode::OK);
    let modal = slack.wait_for("views.open", WAIT, |_| true).await.context("no modal")?.body;
    assert_eq!(modal["view"]["private_metadata"], req.hold_id.to_string());
    assert_eq!(modal["trigger_id"], format!("trigger-U_DANA-{}", req.hold_id));
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(300)).await;

    // An empty reason keeps the modal open with an error.
    let (status, body) = svc.signed(&fake::deny_submission("U_DANA", req.hold_id, "  ")).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"response_action\":\"errors\""), "{body}");

    let (status, _) =
        svc.signed(&fake::deny_submission("U_DANA", req.hold_id, "not during the sale")).await?;
    assert_eq!(status, StatusCode::OK);
    let d = decision_for(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!(d.outcome, HoldOutcome::Denied);
    assert_eq!((d.decided_by.as_str(), d.reason.as_deref()), ("dana", Some("not during the sale")));
    updated(&slack, "Denied* by dana: not during the sale").await;
    svc.stop().await
}

#[tokio::test]
async fn forged_stale_tampered_and_unsigned_callbacks_get_401_and_change_nothing() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = Service::start(bus.clone(), config(&slack), None).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    request_hold(&bus, &req).await?;
    posted(&slack, req.hold_id).await;
    let users_info_before = slack.bodies("users.info").len();

    let body = fake::click("U_DANA", APPROVE_ACTION, req.hold_id, CHANNEL);
    let now = fake::now_ts();
    let stale = (now.parse::<i64>()? - 301).to_string();
    let future = (now.parse::<i64>()? + 301).to_string();
    let tampered = fake::click("U_ERIN", APPROVE_ACTION, req.hold_id, CHANNEL);
    let cases: Vec<(&str, String, Option<String>, Option<String>)> = vec![
        (
            "forged signature",
            body.clone(),
            Some(now.clone()),
            Some(fake::sign("not-the-secret", &now, &body)),
        ),
        ("garbage signature", body.clone(), Some(now.clone()), Some("v0=deadbeef".into())),
        (
            "stale timestamp, validly signed",
            body.clone(),
            Some(stale.clone()),
            Some(fake::sign(SECRET, &stale, &body)),
        ),
        (
            "future timestamp, validly signed",
            body.clone(),
            Some(future.clone()),
            Some(fake::sign(SECRET, &future, &body)),
        ),
        (
            "replayed signature with a new timestamp",
            body.clone(),
            Some(now.clone()),
            Some(fake::sign(SECRET, &stale, &body)),
        ),
        ("tampered body", tampered, Some(now.clone()), Some(fake::sign(SECRET, &now, &body))),
        ("missing signature", body.clone(), Some(now.clone()), None),
        ("missing timestamp", body.clone(), None, Some(fake::sign(SECRET, &now, &body))),
        ("no headers", body.clone(), None, None),
        ("non-numeric timestamp", body.clone(), Some("soon".into()), Some(fake::sign(SECRET, "soon", &body))),
    ];
    for (what, body, ts, sig) in cases {
        let (status, _) = svc.callback(&body, ts.as_deref(), sig.as_deref()).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
    }
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(500)).await;
    assert_eq!(slack.bodies("users.info").len(), users_info_before, "nothing was even looked up");
    assert!(slack.bodies("chat.update").is_empty());
    assert_eq!(svc.client().get(req.hold_id).await?.approvals, Vec::<String>::new());
    svc.stop().await
}

#[tokio::test]
async fn unknown_users_outsiders_and_the_requester_cannot_decide_from_slack() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = Service::start(bus.clone(), config(&slack), None).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    request_hold(&bus, &req).await?;
    posted(&slack, req.hold_id).await;

    for (user, why) in [
        ("U_NOBODY", "not a Slack user"),
        ("U_STRANGER", "not a known approver"),
        ("U_OLLY", "not in the approver groups"),
        ("U_AGENT", "the requester itself"),
    ] {
        let (status, _) = svc.signed(&fake::click(user, APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
        assert_eq!(status, StatusCode::OK, "{why}");
        let told = slack
            .wait_for("chat.postEphemeral", WAIT, |b| b["user"] == user)
            .await
            .unwrap_or_else(|| panic!("{why}: the user was not told"));
        assert_eq!(told.body["channel"], CHANNEL);
    }
    // An approver's Slack id, clicking from another workspace (the other side of a shared
    // channel): not of `slack.team_id`, so not an approver here.
    let foreign = fake::click("U_DANA", APPROVE_ACTION, req.hold_id, CHANNEL).replace("T0001", "T0666");
    svc.signed(&foreign).await?;
    let told = slack.wait_for("chat.postEphemeral", WAIT, |b| b["user"] == "U_DANA").await.expect("told");
    assert!(
        told.body["text"].as_str().unwrap_or_default().contains("Only members of this workspace"),
        "{}",
        told.body
    );
    let (_, body) =
        svc.signed(&fake::deny_submission("U_DANA", req.hold_id, "no").replace("T0001", "T0666")).await?;
    assert!(body.contains("Only members of this workspace"), "{body}");
    // Olly cannot deny either.
    let (_, body) = svc.signed(&fake::deny_submission("U_OLLY", req.hold_id, "no")).await?;
    assert!(body.contains("approver groups"), "{body}");
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(500)).await;
    assert!(slack.bodies("chat.update").is_empty());
    let still = svc.client().get(req.hold_id).await?;
    assert!(still.approvals.is_empty(), "{still:?}");
    svc.stop().await
}

#[tokio::test]
async fn min_two_leaves_the_hold_pending_after_one_approval_and_releases_on_the_second() -> anyhow::Result<()>
{
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = Service::start(bus.clone(), config(&slack), None).await?;
    let req = hold_request(Duration::from_secs(300), 2);
    request_hold(&bus, &req).await?;
    assert!(text_of(&posted(&slack, req.hold_id).await).contains("approvals 0/2"));

    svc.signed(&fake::click("U_DANA", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    updated(&slack, "approvals 1/2 (dana)").await;
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(500)).await;
    let pending = svc.client().get(req.hold_id).await?;
    assert_eq!((pending.approvals.clone(), pending.min), (vec!["dana".to_string()], 2));
    // The same approver twice still counts once.
    svc.signed(&fake::click("U_DANA", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(300)).await;

    svc.signed(&fake::click("U_ERIN", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    let d = decision_for(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!((d.outcome, d.decided_by.as_str()), (HoldOutcome::Approved, "dana, erin"));
    updated(&slack, "Approved* by dana, erin").await;
    svc.stop().await
}

/// Between the fake Slack and the service: passes every call through at once, but holds back the
/// answers to `chat.postMessage` (so the service does not know the message's ts) until released.
struct SlowPosts {
    api_url: String,
    open: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SlowPosts {
    async fn start(slack: &FakeSlack) -> anyhow::Result<SlowPosts> {
        use axum::extract::{Path, RawQuery};
        use axum::http::{HeaderMap, Method, header::CONTENT_TYPE};
        let (open, opened) = watch::channel(false);
        let upstream = slack.api_url.clone();
        let relay = move |method: Method,
                          Path(api): Path<String>,
                          RawQuery(q): RawQuery,
                          headers: HeaderMap,
                          body: axum::body::Bytes| {
            let (upstream, mut opened) = (upstream.clone(), opened.clone());
            async move {
                let url = format!("{upstream}/{api}{}", q.map(|q| format!("?{q}")).unwrap_or_default());
                let client = reqwest::Client::new();
                let mut req =
                    if method == Method::GET { client.get(url) } else { client.post(url).body(body) };
                if let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
                    req = req.header("content-type", ct);
                }
                let answer = req.send().await.expect("the fake Slack answers").bytes().await.expect("a body");
                if api == "chat.postMessage" {
                    let _ = opened.wait_for(|open| *open).await;
                }
                ([(CONTENT_TYPE, "application/json")], answer)
            }
        };
        let app = axum::Router::new().route("/api/{method}", axum::routing::any(relay));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let api_url = format!("http://{}/api", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(SlowPosts { api_url, open, task })
    }

    /// Let the held-back answers (and all later ones) through.
    fn release(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for SlowPosts {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_vote_while_the_post_is_in_flight_shows_once_the_message_is_recorded() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let slow = SlowPosts::start(&slack).await?;
    let mut cfg = config(&slack);
    cfg.slack.as_mut().context("slack configured")?.api_url = slow.api_url.clone();
    let svc = Service::start(bus.clone(), cfg, None).await?;
    let req = hold_request(Duration::from_secs(300), 2);
    request_hold(&bus, &req).await?;
    // Slack has the message, but the service does not know its ts yet.
    posted(&slack, req.hold_id).await;
    let (status, _) = svc.signed(&fake::click("U_DANA", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(svc.client().get(req.hold_id).await?.approvals, vec!["dana".to_string()]);
    assert!(slack.bodies("chat.update").is_empty(), "no message to update yet");
    slow.release();
    let upd = updated(&slack, "approvals 1/2 (dana)").await;
    assert_eq!(upd["ts"], "1700000000.000001");
    svc.stop().await
}

#[tokio::test]
async fn an_expired_hold_is_denied_and_its_message_says_so() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = Service::start(bus.clone(), config(&slack), None).await?;
    // Long enough that the hold is posted before it expires, even on a loaded machine.
    let req = hold_request(Duration::from_secs(5), 1);
    request_hold(&bus, &req).await?;
    posted(&slack, req.hold_id).await;
    let d = decision_for(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!(d.outcome, HoldOutcome::Expired);
    updated(&slack, "Expired*: no decision within 5s").await;
    // A late click changes nothing.
    svc.signed(&fake::click("U_DANA", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(500)).await;
    assert_eq!(slack.bodies("chat.update").len(), 1);
    svc.stop().await
}

#[tokio::test]
async fn two_replicas_post_each_hold_once_and_decide_it_once() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let a = Service::start(nats_bus(&nats).await?, config(&slack), None).await?;
    let b = Service::start(nats_bus(&nats).await?, config(&slack), None).await?;
    let reqs: Vec<HoldRequest> = (0..6).map(|_| hold_request(Duration::from_secs(300), 1)).collect();
    for r in &reqs {
        request_hold(&bus, r).await?;
    }
    for r in &reqs {
        posted(&slack, r.hold_id).await;
    }
    // Both replicas see every hold. Only one of them posted, so the other may still be reading the
    // last request when the posts are all in.
    lists(&a, 6).await?;
    lists(&b, 6).await?;
    // Each hold clicked on both replicas at once, by two approvers.
    for r in &reqs {
        let click_a = fake::click("U_DANA", APPROVE_ACTION, r.hold_id, CHANNEL);
        let click_b = fake::click("U_ERIN", APPROVE_ACTION, r.hold_id, CHANNEL);
        let (ra, rb) = tokio::join!(a.signed(&click_a), b.signed(&click_b));
        assert_eq!(ra?.0, StatusCode::OK);
        assert_eq!(rb?.0, StatusCode::OK);
    }
    // Every hold's decision, then a little longer for any duplicate.
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    let mut count = |env: Envelope| {
        if let Event::HoldDecided(d) = env.event {
            *seen.entry(d.hold_id).or_default() += 1;
        }
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut pending: std::collections::HashSet<Uuid> = reqs.iter().map(|r| r.hold_id).collect();
    while !pending.is_empty() {
        let env = tokio::time::timeout_at(deadline, decisions.next())
            .await
            .with_context(|| format!("undecided holds: {pending:?}"))?
            .context("the bus closed")?;
        if let Event::HoldDecided(d) = &env.event {
            pending.remove(&d.hold_id);
        }
        count(env);
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(env) = decisions.next().await {
            count(env);
        }
    })
    .await;
    for r in &reqs {
        assert_eq!(
            seen.get(&r.hold_id),
            Some(&1),
            "hold {} decided {:?} times",
            r.hold_id,
            seen.get(&r.hold_id)
        );
    }
    for r in &reqs {
        let id = r.hold_id.to_string();
        let posts = slack.bodies("chat.postMessage").iter().filter(|b| text_of(b).contains(&id)).count();
        assert_eq!(posts, 1, "hold {id} posted {posts} times");
    }
    a.stop().await?;
    b.stop().await
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_never_block_a_decision() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    // A receiver that fails every first and second attempt of each delivery.
    type Got = Arc<Mutex<Vec<(HashMap<String, String>, String)>>>;
    let got: Got = Arc::default();
    let app = {
        let got = got.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let got = got.clone();
                async move {
                    let h: HashMap<String, String> = headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
                        .collect();
                    let mut g = got.lock().unwrap();
                    let delivery = h.get("x-airlock-delivery").cloned().unwrap_or_default();
                    let tries =
                        g.iter().filter(|(x, _)| x.get("x-airlock-delivery") == Some(&delivery)).count();
                    g.push((h, body));
                    if tries < 2 { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK }
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let mut cfg = ApprovalsConfig { admin_token: Some(TOKEN.into()), ..Default::default() };
    cfg.webhooks.insert("pager".into(), pager(hook_url, 5));
    let policy = "rules:\n  - name: writes-need-approval\n    action: hold\n    webhook: pager\n";
    let svc = Service::start(bus.clone(), cfg, Some(policy)).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    request_hold(&bus, &req).await?;
    visible(&svc.client(), req.hold_id).await?;
    // From the approval on: the hold.created deliveries are failing and being retried meanwhile.
    let started = std::time::Instant::now();
    svc.client().approve(req.hold_id, Some("dana")).await?;
    decision_for(&mut decisions, req.hold_id, WAIT).await?;
    let decided_in = started.elapsed();

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ok = got.lock().unwrap().len() >= 6;
        if ok {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "deliveries: {:?}", got.lock().unwrap().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = got.lock().unwrap().clone();
    let mut events: HashMap<String, usize> = HashMap::new();
    for (h, body) in &got {
        let ts = &h["x-airlock-timestamp"];
        assert_eq!(
            h["x-airlock-signature"],
            approval_service::webhook::sign("hook-secret", ts, body.as_bytes())
        );
        assert_ne!(h["x-airlock-signature"], approval_service::webhook::sign("other", ts, body.as_bytes()));
        let v: Value = serde_json::from_str(body)?;
        assert_eq!(v["hold"]["id"], req.hold_id.to_string());
        assert_eq!(v["event"], h["x-airlock-event"]);
        *events.entry(h["x-airlock-event"].clone()).or_default() += 1;
    }
    assert_eq!(events.get("hold.created"), Some(&3), "two failures then success: {events:?}");
    assert_eq!(events.get("hold.decided"), Some(&3), "{events:?}");
    let decided = got.iter().find(|(h, _)| h["x-airlock-event"] == "hold.decided").unwrap();
    let v: Value = serde_json::from_str(&decided.1)?;
    assert_eq!((v["status"].as_str(), v["decided_by"].as_str()), (Some("approved"), Some("dana")));
    assert!(decided_in < Duration::from_secs(5), "the failing webhook did not hold the decision up");
    svc.stop().await
}

#[tokio::test]
async fn oidc_approvers_act_as_their_token_and_their_groups_are_enforced() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let oidc = testkit::OidcIssuer::start()?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let cfg = ApprovalsConfig { oidc: Some(oidc_config(&oidc)), ..Default::default() };
    // The rule makes `dba` an approver group: a token in it is an approver's.
    let svc = Service::start(bus.clone(), cfg, Some(DBA_RULE)).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    request_hold(&bus, &req).await?;

    let dana = ApprovalsClient::new(&svc.url, &oidc.token("dana", &["dba"]));
    visible(&dana, req.hold_id).await?;
    let outsider = ApprovalsClient::new(&svc.url, &oidc.token("olly", &["support"]));
    assert_eq!(outsider.approve(req.hold_id, None).await.unwrap_err().status(), Some(StatusCode::FORBIDDEN));
    let requester = ApprovalsClient::new(&svc.url, &oidc.token("agent-7", &["dba"]));
    let e = requester.approve(req.hold_id, None).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN));
    assert!(e.to_string().contains("own hold"), "{e}");
    let forged = ApprovalsClient::new(&svc.url, &oidc.token_signed_by_stranger("dana", &["dba"]));
    assert_eq!(forged.approve(req.hold_id, None).await.unwrap_err().status(), Some(StatusCode::UNAUTHORIZED));
    // No admin token is configured: nothing else gets in.
    let guess = ApprovalsClient::new(&svc.url, TOKEN);
    assert_eq!(guess.list().await.unwrap_err().status(), Some(StatusCode::UNAUTHORIZED));
    // An approver cannot claim to be someone else.
    assert_eq!(
        dana.approve(req.hold_id, Some("erin")).await.unwrap_err().status(),
        Some(StatusCode::FORBIDDEN)
    );
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(300)).await;

    let view = dana.approve(req.hold_id, None).await?;
    assert_eq!((view.outcome, view.decided_by.as_str()), (Some(HoldOutcome::Approved), "dana"));
    let d = decision_for(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!(d.decided_by, "dana");
    svc.stop().await
}

#[tokio::test]
async fn approving_an_access_request_grants_until_a_capped_time_and_the_grant_can_be_revoked()
-> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let svc = Service::start(
        bus.clone(),
        ApprovalsConfig { admin_token: Some(TOKEN.into()), ..Default::default() },
        Some("rules:\n  - name: writes-need-approval\n    action: hold\n    grant: { max: 1h }\n"),
    )
    .await?;
    let req = hold_request(Duration::from_secs(300), 1);
    request_hold(&bus, &req).await?;
    let c = svc.client();
    visible(&c, req.hold_id).await?;
    let before = Timestamp::now();
    let view = c.approve_for(req.hold_id, Some("dana"), Some("3h")).await?;
    let until = view.grant_until.clone().context("a grant")?;
    let until = Timestamp::from(humantime::parse_rfc3339_weak(&until)?);
    let hour = Duration::from_secs(3600);
    assert!(
        until <= Timestamp::now().plus(hour) && until >= before.plus(hour - Duration::from_secs(5)),
        "capped at 1h"
    );
    let grants = c.grants().await?;
    assert_eq!(grants.len(), 1);
    assert_eq!((grants[0].principal.as_str(), grants[0].connection.as_str()), ("agent-7", "shop"));
    let revoked = c.revoke(grants[0].grant_id, Some("done")).await?;
    assert_eq!(revoked.revoked.as_deref(), Some("admin"));
    assert!(c.grants().await?.is_empty());
    svc.stop().await
}

#[tokio::test]
async fn approver_groups_in_the_policy_let_their_members_approve_and_nobody_else() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let oidc = testkit::OidcIssuer::start()?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let cfg = ApprovalsConfig { oidc: Some(oidc_config(&oidc)), ..config(&slack) };
    slack.add_user("U0GUS", "gus@example.com");
    // `dba` is known only to the policy: no token below carries it, and no Slack mapping has it.
    let policy = "approver_groups:\n  - name: dba\n    members: [Carol@Example.com, sub-frank]\n    \
                  slack_users: [U0GUS]\n  - name: support\n    members: [mallory]\n";
    let svc = Service::start(bus.clone(), cfg, Some(policy)).await?;
    let req = hold_request(Duration::from_secs(300), 2);
    request_hold(&bus, &req).await?;
    posted(&slack, req.hold_id).await;

    let with_email = |sub: &str, email: &str, verified: bool| {
        let mut claims = oidc.claims(sub, &["staff"]);
        claims["email"] = email.into();
        claims["email_verified"] = verified.into();
        ApprovalsClient::new(&svc.url, &oidc.token_with(claims))
    };
    // Non-members: another policy group, an unverified e-mail of a member, a mapped approver of
    // another group, and a Slack user the policy does not list.
    let mallory = with_email("mallory", "mallory@example.com", true);
    assert_eq!(mallory.approve(req.hold_id, None).await.unwrap_err().status(), Some(StatusCode::FORBIDDEN));
    let eve = with_email("eve", "carol@example.com", false);
    assert_eq!(eve.approve(req.hold_id, None).await.unwrap_err().status(), Some(StatusCode::FORBIDDEN));
    // No `email_verified` claim at all, or a provider's string "false": not verified either.
    for verified in [None, Some("false")] {
        let mut claims = oidc.claims("eve", &["staff"]);
        claims["email"] = "carol@example.com".into();
        if let Some(v) = verified {
            claims["email_verified"] = v.into();
        }
        let eve = ApprovalsClient::new(&svc.url, &oidc.token_with(claims));
        assert_eq!(
            eve.approve(req.hold_id, None).await.unwrap_err().status(),
            Some(StatusCode::FORBIDDEN),
            "email_verified {verified:?}"
        );
    }
    for (user, told) in [("U_OLLY", "approver groups"), ("U_STRANGER", "not a known Airlock approver")] {
        svc.signed(&fake::click(user, APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
        let e = slack.wait_for("chat.postEphemeral", WAIT, |b| b["user"] == user).await;
        assert!(e.is_some_and(|e| text_of(&e.body).contains(told)), "{user} was not told `{told}`");
    }
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(300)).await;
    assert!(svc.client().get(req.hold_id).await?.approvals.is_empty());

    // Members: by verified e-mail claim, by OIDC subject.
    let carol = with_email("sub-carol", "carol@example.com", true);
    assert_eq!(carol.approve(req.hold_id, None).await?.approvals, vec!["sub-carol".to_string()]);
    // A member by Slack user id only, with no `[[approvals.approvers]]` entry: nothing says
    // whether Gus is the requester or Carol, so his approval does not count here.
    svc.signed(&fake::click("U0GUS", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    let told = slack.wait_for("chat.postEphemeral", WAIT, |b| b["user"] == "U0GUS").await;
    assert!(told.is_some_and(|e| text_of(&e.body).contains("cannot tell you apart")), "Gus was not told why");
    assert_eq!(svc.client().get(req.hold_id).await?.approvals, vec!["sub-carol".to_string()]);
    let frank = ApprovalsClient::new(&svc.url, &oidc.token("sub-frank", &[]));
    assert_eq!(frank.approve(req.hold_id, None).await?.approvals.len(), 2);
    let d = decision_for(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!((d.outcome, d.decided_by.as_str()), (HoldOutcome::Approved, "sub-carol, sub-frank"));
    svc.stop().await
}

/// Every string in a JSON value (a Slack message's texts, as a person would read them), one per
/// line, unescaped.
fn all_text(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s}\n"),
        Value::Array(a) => a.iter().map(all_text).collect(),
        Value::Object(o) => o.values().map(all_text).collect(),
        _ => String::new(),
    }
}

#[tokio::test]
async fn tokens_of_people_no_approver_group_lists_are_refused_on_every_route() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let oidc = testkit::OidcIssuer::start()?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let cfg = ApprovalsConfig { oidc: Some(oidc_config(&oidc)), ..Default::default() };
    let policy = "approver_groups:\n  - name: dba\n    members: [sub-dana]\nrules:\n  - name: writes-need-approval\n    \
                  action: hold\n    approvers: { groups: [dba] }\n";
    let svc = Service::start(bus.clone(), cfg, Some(policy)).await?;
    // A hold no rule's `approvers` covers, as `defaults.unknown_operation` makes one (`SELECT f()`).
    let mut open = hold_request(Duration::from_secs(300), 1);
    open.rule = "defaults.unknown_operation".into();
    open.approvers = ApproverSpec { groups: vec![], min: 1 };
    request_hold(&bus, &open).await?;
    let dba_hold = hold_request(Duration::from_secs(300), 1);
    request_hold(&bus, &dba_hold).await?;
    let dana = ApprovalsClient::new(&svc.url, &oidc.token("sub-dana", &[]));
    visible(&dana, open.hold_id).await?;
    visible(&dana, dba_hold.hold_id).await?;

    // Another agent, the requester itself, and a staff member with a verified e-mail: valid tokens
    // from the same issuer, but nothing lists them as approvers.
    let outsiders = [
        ("another agent", oidc.token("agent-8", &["agents"])),
        ("the requester", oidc.token("agent-7", &["agents"])),
        ("staff", token_with_email(&oidc, "sub-sam", "sam@example.com", &["staff"])),
    ];
    for (who, token) in &outsiders {
        let c = ApprovalsClient::new(&svc.url, token);
        let forbidden = |r: Option<StatusCode>| assert_eq!(r, Some(StatusCode::FORBIDDEN), "{who}");
        forbidden(c.approve(open.hold_id, None).await.err().and_then(|e| e.status()));
        forbidden(c.deny(open.hold_id, "no", None).await.err().and_then(|e| e.status()));
        forbidden(c.list().await.err().and_then(|e| e.status()));
        forbidden(c.get(open.hold_id).await.err().and_then(|e| e.status()));
        forbidden(c.grants().await.err().and_then(|e| e.status()));
        forbidden(c.revoke(Uuid::now_v7(), None).await.err().and_then(|e| e.status()));
    }
    no_decision_for(&mut decisions, open.hold_id, Duration::from_millis(300)).await;
    assert!(dana.get(open.hold_id).await?.approvals.is_empty());

    // Approvers still decide: a member of a policy group decides the hold that names no group,
    // and a token whose groups claim holds a group a rule names is an approver's.
    let view = dana.approve(open.hold_id, None).await?;
    assert_eq!((view.outcome, view.decided_by.as_str()), (Some(HoldOutcome::Approved), "sub-dana"));
    assert_eq!(decision_for(&mut decisions, open.hold_id, WAIT).await?.decided_by, "sub-dana");
    let erin = ApprovalsClient::new(&svc.url, &oidc.token("sub-erin", &["dba"]));
    assert_eq!(erin.list().await?.len(), 1);
    erin.approve(dba_hold.hold_id, None).await?;
    assert_eq!(decision_for(&mut decisions, dba_hold.hold_id, WAIT).await?.decided_by, "sub-erin");
    svc.stop().await
}

#[tokio::test]
async fn one_person_approving_by_token_and_in_slack_counts_once() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let oidc = testkit::OidcIssuer::start()?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let mut cfg = ApprovalsConfig { oidc: Some(oidc_config(&oidc)), ..config(&slack) };
    // Alice's entry is named `alice`, her token's `sub` is `00u1alice`; the e-mails differ in case.
    cfg.approvers.push(entry("alice", Some("alice@example.com"), None, &["dba"]));
    slack.add_user("U_ALICE", "Alice@Example.COM");
    let svc = Service::start(bus.clone(), cfg, None).await?;
    let alice =
        ApprovalsClient::new(&svc.url, &token_with_email(&oidc, "00u1alice", "ALICE@example.com", &[]));

    // Token first, then Slack.
    let req = hold_request(Duration::from_secs(300), 2);
    request_hold(&bus, &req).await?;
    posted(&slack, req.hold_id).await;
    assert_eq!(alice.approve(req.hold_id, None).await?.approvals, vec!["00u1alice".to_string()]);
    svc.signed(&fake::click("U_ALICE", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    let told = slack.wait_for("chat.postEphemeral", WAIT, |b| b["user"] == "U_ALICE").await;
    assert!(told.is_some_and(|e| text_of(&e.body).contains("already approved")), "Alice was not told");
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(500)).await;
    assert_eq!(svc.client().get(req.hold_id).await?.approvals, vec!["00u1alice".to_string()]);
    svc.signed(&fake::click("U_DANA", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    let d = decision_for(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!(d.decided_by, "00u1alice, dana");

    // Slack first, then the token.
    let req = hold_request(Duration::from_secs(300), 2);
    request_hold(&bus, &req).await?;
    posted(&slack, req.hold_id).await;
    svc.signed(&fake::click("U_ALICE", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    updated(&slack, "approvals 1/2 (alice)").await;
    let e = alice.approve(req.hold_id, None).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::CONFLICT), "{e}");
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(500)).await;
    assert_eq!(svc.client().get(req.hold_id).await?.approvals, vec!["alice".to_string()]);
    svc.stop().await
}

#[tokio::test]
async fn a_requester_cannot_approve_its_own_hold_under_another_identifier() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    // Alice has no `[[approvals.approvers]]` entry: the policy lists her e-mail in `dba`.
    slack.add_user("U_ALICE", "alice@example.com");
    let policy = "approver_groups:\n  - name: dba\n    members: [alice@example.com, dana]\n";
    let svc = Service::start(bus.clone(), config(&slack), Some(policy)).await?;
    let refused = |user: &'static str, needle: &'static str| {
        let slack = &slack;
        async move {
            let told = slack
                .wait_for("chat.postEphemeral", WAIT, |b| b["user"] == user && text_of(b).contains(needle))
                .await;
            assert!(
                told.is_some(),
                "{user} was not told `{needle}`: {:?}",
                slack.bodies("chat.postEphemeral")
            );
        }
    };

    // Alice's agent runs as her token (`sub` 00u1alice); she clicks Approve in Slack, where she is
    // known by e-mail only. Nothing links the two, so the service cannot rule her out.
    let mut own = hold_request(Duration::from_secs(300), 1);
    own.principal.subject = "00u1alice".into();
    request_hold(&bus, &own).await?;
    posted(&slack, own.hold_id).await;
    svc.signed(&fake::click("U_ALICE", APPROVE_ACTION, own.hold_id, CHANNEL)).await?;
    refused("U_ALICE", "cannot tell you apart").await;
    no_decision_for(&mut decisions, own.hold_id, Duration::from_millis(500)).await;

    // An issuer whose subjects are e-mail addresses: Dana's agent is `Dana@Example.com`, and Dana
    // approves in Slack through her entry `dana` (dana@example.com).
    let mut own = hold_request(Duration::from_secs(300), 1);
    own.principal.subject = "Dana@Example.com".into();
    request_hold(&bus, &own).await?;
    posted(&slack, own.hold_id).await;
    svc.signed(&fake::click("U_DANA", APPROVE_ACTION, own.hold_id, CHANNEL)).await?;
    refused("U_DANA", "own hold").await;
    no_decision_for(&mut decisions, own.hold_id, Duration::from_millis(500)).await;
    assert!(svc.client().get(own.hold_id).await?.approvals.is_empty());

    // A service account is nobody's own: Alice may approve its hold from Slack.
    let mut etl = hold_request(Duration::from_secs(300), 1);
    etl.principal = Principal { subject: "etl".into(), groups: vec![], kind: "service_account".into() };
    request_hold(&bus, &etl).await?;
    posted(&slack, etl.hold_id).await;
    svc.signed(&fake::click("U_ALICE", APPROVE_ACTION, etl.hold_id, CHANNEL)).await?;
    let d = decision_for(&mut decisions, etl.hold_id, WAIT).await?;
    assert_eq!((d.outcome, d.decided_by.as_str()), (HoldOutcome::Approved, "alice@example.com"));
    svc.stop().await
}

/// A receiver for webhooks that keeps every body.
async fn webhook_receiver() -> anyhow::Result<(String, Arc<Mutex<Vec<Value>>>)> {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let keep = keep.clone();
            async move {
                if let Ok(v) = serde_json::from_str(&body) {
                    keep.lock().unwrap().push(v);
                }
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, got))
}

/// The `pager` webhook, signed with `hook-secret`, tried `attempts` times.
fn pager(url: String, attempts: u32) -> WebhookConfig {
    WebhookConfig {
        url,
        secret: Some("hook-secret".into()),
        secret_file: None,
        max_attempts: attempts,
        backoff: Duration::from_millis(50),
        timeout: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn approvers_see_the_bound_parameters_in_slack_rest_the_cli_and_webhooks() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let (hook_url, hooks) = webhook_receiver().await?;
    let mut cfg = config(&slack);
    cfg.webhooks.insert("pager".into(), pager(hook_url, 3));
    let policy = "rules:\n  - name: writes-need-approval\n    action: hold\n    webhook: pager\n";
    let svc = Service::start(bus.clone(), cfg, Some(policy)).await?;
    let mut req = hold_request(Duration::from_secs(300), 1);
    req.statement =
        "UPDATE users SET role = $1, note = $2, avatar = $3, name = $4, tag = $5 WHERE id = $6".into();
    let parameters: Vec<Option<String>> = vec![
        Some("admin".into()),
        None,
        Some("\\xdeadbeef".into()),
        Some("bob\u{202e}nimda".into()),
        Some("<!channel> it's".into()),
        Some("42".into()),
    ];
    req.parameters = parameters.clone();
    request_hold(&bus, &req).await?;

    // Slack: every value, NULL and bytes marked, the hidden character shown, nothing mentioned.
    let msg = posted(&slack, req.hold_id).await;
    let text = all_text(&msg["blocks"]);
    for needle in [
        "$1 = 'admin'",
        "$2 = NULL",
        "$3 = '\\xdeadbeef' (4 bytes, hex",
        "$4 = E'bob\\u202Enimda'",
        "$5 = '&lt;!channel&gt; it''s'",
        "$6 = '42'",
    ] {
        assert!(text.contains(needle), "the Slack message lacks {needle}: {text}");
    }
    assert!(!text.contains("<!channel>"), "{text}");
    assert!(text_of(&msg).contains(APPROVE_ACTION), "a short hold can be approved from Slack");

    // REST, and the CLI's `approvals show`.
    let raw: Value = reqwest::Client::new()
        .get(format!("{}/v1/holds/{}", svc.url, req.hold_id))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(raw["parameters"], serde_json::json!(parameters), "{raw}");
    let shown = approval_service::client::render_hold(&svc.client().get(req.hold_id).await?);
    assert!(shown.contains("$1 = 'admin'\n") && shown.contains("$2 = NULL\n"), "{shown}");
    assert!(shown.contains("$4 = E'bob\\u202Enimda'\n"), "{shown}");

    // The webhook's `hold.created`.
    let deadline = tokio::time::Instant::now() + WAIT;
    let created = loop {
        let found = hooks.lock().unwrap().iter().find(|v| v["event"] == "hold.created").cloned();
        if let Some(v) = found {
            break v;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no hold.created webhook");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(created["hold"]["parameters"], serde_json::json!(parameters), "{created}");
    svc.stop().await
}

#[tokio::test]
async fn a_statement_too_long_for_slack_shows_its_start_and_end_and_is_approved_elsewhere()
-> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = Service::start(bus.clone(), config(&slack), None).await?;
    let mut req = hold_request(Duration::from_secs(300), 1);
    req.statement = format!("DELETE FROM orders WHERE id = 42 /* {} */ OR true", "x".repeat(3000));
    request_hold(&bus, &req).await?;

    let msg = posted(&slack, req.hold_id).await;
    let text = all_text(&msg["blocks"]);
    assert!(text.contains("DELETE FROM orders WHERE id = 42 /* xxx"), "the start is shown: {text}");
    assert!(text.contains("xxx */ OR true"), "the end is shown: {text}");
    assert!(text.contains("characters not shown"), "{text}");
    assert!(text.contains(&format!("airlock approvals show {}", req.hold_id)), "{text}");
    assert!(!text_of(&msg).contains(APPROVE_ACTION), "no one-click approval: {msg}");
    assert!(text_of(&msg).contains(DENY_ACTION), "denying stays possible: {msg}");
    for block in msg["blocks"].as_array().context("blocks")? {
        let n = block["text"]["text"].as_str().map_or(0, |t| t.chars().count());
        assert!(n <= 3000, "a section Slack would refuse ({n} characters)");
    }

    // An Approve click (from an older message, say) is refused and said why.
    svc.signed(&fake::click("U_DANA", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    let told = slack.wait_for("chat.postEphemeral", WAIT, |b| b["user"] == "U_DANA").await;
    assert!(told.is_some_and(|e| text_of(&e.body).contains("approvals show")), "Dana was not told");
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(500)).await;
    // Having read it in full, an approver approves it through the API.
    assert_eq!(svc.client().get(req.hold_id).await?.statement, req.statement);
    svc.client().approve(req.hold_id, Some("dana")).await?;
    assert_eq!(decision_for(&mut decisions, req.hold_id, WAIT).await?.outcome, HoldOutcome::Approved);
    svc.stop().await
}
