//! The approval service under attack: forged approver and admin tokens on the REST API, Slack
//! callbacks with odd signatures and timestamps, one person approving under two identities or
//! their own agent's hold, two approvers racing on the last approval, and statements made to read
//! as something else in `airlock approvals show`. Against a real nats-server, the fake Slack and a
//! real OIDC issuer (testkit's).

mod common;

use std::time::Duration;

use anyhow::Context;
use approval_service::ApprovalsConfig;
use approval_service::client::{ApprovalsClient, render_hold, render_holds};
use approval_service::slack::APPROVE_ACTION;
use approval_service::slack::fake::{self, FakeSlack};
use common::{
    CHANNEL, DBA_RULE, SECRET, Service, WAIT, decision_for, entry, hold_request, nats_bus, no_decision_for,
    oidc_config, posted, request_hold, slack_config, token_with_email, visible,
};
use proto::events::{Event, HoldDecision, HoldOutcome, HoldRequest, Timestamp};
use proto::subjects;
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

const TOKEN: &str = "test-admin-token-0123456789";

/// What Slack told `user` (ephemerally) that contains `needle`, if anything.
async fn told(slack: &FakeSlack, user: &str, needle: &str) -> Option<Value> {
    slack
        .wait_for("chat.postEphemeral", WAIT, |b| b["user"] == user && b.to_string().contains(needle))
        .await
        .map(|c| c.body)
}

/// An approver's entry names them by Slack id only (and by a name that is not their OIDC `sub`):
/// their Slack profile e-mail is still one of their identifiers. So Alice, whose agent's token
/// carried her verified e-mail, cannot approve its hold from Slack, and her approval by token and
/// again in Slack counts once. (Before, a user mapped by id was never looked up: known by the
/// entry's name and Slack id only, Alice approved her own agent's hold, and was counted twice.)
#[tokio::test]
async fn a_slack_user_mapped_by_id_is_known_by_their_profile_email_too() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    let oidc = testkit::OidcIssuer::start()?;
    slack.add_user("U_ALICE", "Alice@Example.com");
    slack.add_user("U_DANA", "dana@example.com");
    let cfg = ApprovalsConfig {
        admin_token: Some(TOKEN.into()),
        oidc: Some(oidc_config(&oidc)),
        approvers: vec![
            entry("alice", None, Some("U_ALICE"), &["dba"]),
            entry("dana", Some("dana@example.com"), None, &["dba"]),
        ],
        slack: Some(slack_config(&slack)),
        ..Default::default()
    };
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = Service::start(bus.clone(), cfg, Some(DBA_RULE)).await?;

    // Alice's agent runs as her token: `sub` 00u1alice, her verified e-mail named in the hold.
    let mut own = hold_request(Duration::from_secs(300), 1);
    own.principal.subject = "00u1alice".into();
    own.requester_email = Some("alice@example.com".into());
    request_hold(&bus, &own).await?;
    posted(&slack, own.hold_id).await;
    svc.signed(&fake::click("U_ALICE", APPROVE_ACTION, own.hold_id, CHANNEL)).await?;
    assert!(told(&slack, "U_ALICE", "own hold").await.is_some(), "{:?}", slack.bodies("chat.postEphemeral"));
    no_decision_for(&mut decisions, own.hold_id, Duration::from_millis(500)).await;
    assert!(svc.client().get(own.hold_id).await?.approvals.is_empty());

    // Two approvals needed: Alice's token, then Alice in Slack, are one person.
    let req = hold_request(Duration::from_secs(300), 2);
    request_hold(&bus, &req).await?;
    posted(&slack, req.hold_id).await;
    let alice =
        ApprovalsClient::new(&svc.url, &token_with_email(&oidc, "00u1alice", "alice@example.com", &["dba"]));
    assert_eq!(alice.approve(req.hold_id, None).await?.approvals, vec!["00u1alice".to_string()]);
    svc.signed(&fake::click("U_ALICE", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    assert!(told(&slack, "U_ALICE", "already approved").await.is_some(), "Alice was not told");
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(500)).await;
    assert_eq!(svc.client().get(req.hold_id).await?.approvals, vec!["00u1alice".to_string()]);
    // Another person completes it.
    svc.signed(&fake::click("U_DANA", APPROVE_ACTION, req.hold_id, CHANNEL)).await?;
    let d = decision_for(&mut decisions, req.hold_id, WAIT).await?;
    assert_eq!((d.outcome, d.decided_by.as_str()), (HoldOutcome::Approved, "00u1alice, dana"));
    svc.stop().await
}

/// A Slack callback signed with the right secret but a timestamp no clock could give gets 401,
/// not a panic (the verifier's `now - ts` overflowed near `i64::MIN`). Signatures in the wrong
/// form get 401 too (regression: the `v0=` prefix, its case, the hex's case), and so does a
/// callback with one character of its body, signature or timestamp changed.
#[tokio::test]
async fn absurd_timestamps_and_misshapen_signatures_get_401() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let slack = FakeSlack::start().await?;
    slack.add_user("U_DANA", "dana@example.com");
    let cfg = ApprovalsConfig {
        admin_token: Some(TOKEN.into()),
        approvers: vec![entry("dana", Some("dana@example.com"), None, &["dba"])],
        slack: Some(slack_config(&slack)),
        ..Default::default()
    };
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = Service::start(bus.clone(), cfg, Some(DBA_RULE)).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    request_hold(&bus, &req).await?;
    posted(&slack, req.hold_id).await;
    let body = fake::click("U_DANA", APPROVE_ACTION, req.hold_id, CHANNEL);

    for ts in [i64::MIN.to_string(), (i64::MIN + 1).to_string(), i64::MAX.to_string(), "-1".into()] {
        let (status, _) = svc.callback(&body, Some(&ts), Some(&fake::sign(SECRET, &ts, &body))).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "timestamp {ts}");
    }
    let now = fake::now_ts();
    let good = fake::sign(SECRET, &now, &body);
    let hex = good.strip_prefix("v0=").context("v0=")?;
    for (what, sig) in [
        ("no v0= prefix", hex.to_string()),
        ("V0= prefix", format!("V0={hex}")),
        ("v1= prefix", format!("v1={hex}")),
        ("upper-case hex", format!("v0={}", hex.to_uppercase())),
        ("a second signature after it", format!("{good},v0={}", "0".repeat(64))),
        ("only half of it", good[..good.len() / 2].to_string()),
    ] {
        assert_eq!(svc.callback(&body, Some(&now), Some(&sig)).await?.0, StatusCode::UNAUTHORIZED, "{what}");
    }
    // One character of the body, the signature or the timestamp changed, the rest as signed.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    let mut next = |n: usize| rand::Rng::random_range(&mut rng, 0..n);
    let changed = |text: &str, at: usize, c: u8| {
        let mut t = text.as_bytes().to_vec();
        (t[at] != c).then(|| {
            t[at] = c;
            String::from_utf8_lossy(&t).into_owned()
        })
    };
    let alphabet = b"0123456789abcdefABCDEF%&=_-+.";
    for _ in 0..40 {
        let c = alphabet[next(alphabet.len())];
        if let Some(b) = changed(&body, next(body.len()), c) {
            assert_eq!(
                svc.callback(&b, Some(&now), Some(&good)).await?.0,
                StatusCode::UNAUTHORIZED,
                "body {b}"
            );
        }
        if let Some(sig) = changed(&good, 3 + next(good.len() - 3), c) {
            assert_eq!(
                svc.callback(&body, Some(&now), Some(&sig)).await?.0,
                StatusCode::UNAUTHORIZED,
                "{sig}"
            );
        }
        if let Some(ts) = changed(&now, next(now.len()), c) {
            assert_eq!(
                svc.callback(&body, Some(&ts), Some(&good)).await?.0,
                StatusCode::UNAUTHORIZED,
                "ts {ts}"
            );
        }
    }
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(300)).await;
    assert!(svc.client().get(req.hold_id).await?.approvals.is_empty());
    // The service is still there, and takes a proper click.
    assert_eq!(svc.signed(&body).await?.0, StatusCode::OK);
    assert_eq!(decision_for(&mut decisions, req.hold_id, WAIT).await?.decided_by, "dana");
    svc.stop().await
}

/// Tokens that are not an approver's valid token for this service get 401 on the REST API and
/// decide nothing: another audience, expired past the leeway, not yet valid, `alg: none`, signed
/// by another key under the issuer's `kid`, and near misses of the admin token. (Regression
/// tests: the service already refused these.)
#[tokio::test]
async fn forged_and_foreign_tokens_decide_nothing() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let oidc = testkit::OidcIssuer::start()?;
    let cfg = ApprovalsConfig {
        admin_token: Some(TOKEN.into()),
        oidc: Some(oidc_config(&oidc)),
        ..Default::default()
    };
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let svc = Service::start(bus.clone(), cfg, Some(DBA_RULE)).await?;
    let req = hold_request(Duration::from_secs(300), 1);
    request_hold(&bus, &req).await?;
    visible(&svc.client(), req.hold_id).await?;

    let now = Timestamp::now().as_micros() / 1_000_000;
    let dana = |set: Value| {
        let mut c = oidc.claims("dana", &["dba"]);
        for (k, v) in set.as_object().unwrap() {
            c[k] = v.clone();
        }
        oidc.token_with(c)
    };
    let other = testkit::OidcIssuer::start()?;
    let cases = [
        ("another audience", dana(serde_json::json!({ "aud": "grafana" }))),
        ("expired past the leeway", dana(serde_json::json!({ "exp": now - 120 }))),
        ("not yet valid", dana(serde_json::json!({ "nbf": now + 120 }))),
        ("another issuer", dana(serde_json::json!({ "iss": other.issuer }))),
        ("alg none", oidc.token_alg_none("dana", &["dba"])),
        ("another key under the issuer's kid", oidc.token_signed_by_stranger("dana", &["dba"])),
        ("the admin token's prefix", TOKEN[..TOKEN.len() - 1].to_string()),
        ("the admin token and more", format!("{TOKEN}0")),
        ("the admin token, upper case", TOKEN.to_uppercase()),
        ("the admin token, twice", format!("{TOKEN}{TOKEN}")),
    ];
    for (what, token) in &cases {
        let c = ApprovalsClient::new(&svc.url, token);
        let e = c.approve(req.hold_id, Some("dana")).await.err().context(*what)?;
        assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{what}: {e}");
        assert_eq!(c.list().await.err().and_then(|e| e.status()), Some(StatusCode::UNAUTHORIZED), "{what}");
    }
    no_decision_for(&mut decisions, req.hold_id, Duration::from_millis(300)).await;
    // Dana's own valid token decides.
    let ok = ApprovalsClient::new(&svc.url, &oidc.token("dana", &["dba"]));
    assert_eq!(ok.approve(req.hold_id, None).await?.outcome, Some(HoldOutcome::Approved));
    assert_eq!(decision_for(&mut decisions, req.hold_id, WAIT).await?.decided_by, "dana");
    svc.stop().await
}

/// Two approvers, on two replicas, give a `min: 2` hold its second approval at the same time:
/// it is decided once, by two people, and the other vote is told the hold is gone. (Regression
/// test: the compare-and-set on the hold's record already made this so.)
#[tokio::test]
async fn racing_on_the_last_approval_decides_once() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let oidc = testkit::OidcIssuer::start()?;
    let cfg = || ApprovalsConfig { oidc: Some(oidc_config(&oidc)), ..Default::default() };
    let mut decisions = bus.subscribe(subjects::HOLD_DECIDED).await?;
    let a = Service::start(nats_bus(&nats).await?, cfg(), Some(DBA_RULE)).await?;
    let b = Service::start(nats_bus(&nats).await?, cfg(), Some(DBA_RULE)).await?;
    let dana = ApprovalsClient::new(&a.url, &oidc.token("dana", &["dba"]));
    let erin = ApprovalsClient::new(&a.url, &oidc.token("erin", &["dba"]));
    let frank = ApprovalsClient::new(&b.url, &oidc.token("frank", &["dba"]));
    let reqs: Vec<HoldRequest> = (0..8).map(|_| hold_request(Duration::from_secs(300), 2)).collect();
    for r in &reqs {
        request_hold(&bus, r).await?;
    }
    for r in &reqs {
        visible(&dana, r.hold_id).await?;
        visible(&frank, r.hold_id).await?;
        assert_eq!(dana.approve(r.hold_id, None).await?.outcome, None, "one of two");
        let (e, f) = tokio::join!(erin.approve(r.hold_id, None), frank.approve(r.hold_id, None));
        let (won, lost) = match (e, f) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            (e, f) => panic!("both or neither decided: {e:?} {f:?}"),
        };
        assert_eq!(won.outcome, Some(HoldOutcome::Approved));
        assert_eq!(won.approvals.len(), 2, "{won:?}");
        assert_eq!(lost.status(), Some(StatusCode::NOT_FOUND), "{lost}");
    }
    let mut seen = std::collections::HashMap::<Uuid, Vec<HoldDecision>>::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(env) = decisions.next().await {
            if let Event::HoldDecided(d) = env.event {
                seen.entry(d.hold_id).or_default().push(d);
            }
        }
    })
    .await;
    for r in &reqs {
        let ds = seen.get(&r.hold_id).cloned().unwrap_or_default();
        assert_eq!(ds.len(), 1, "hold {} decided {} times: {ds:?}", r.hold_id, ds.len());
        assert!(ds[0].decided_by.starts_with("dana, "), "{:?}", ds[0]);
    }
    a.stop().await?;
    b.stop().await
}

/// `airlock approvals show` and `list` show what a reader would not see, as Slack does: a bidi
/// override that makes a statement read backwards, zero-width characters in the agent's name,
/// and a line break that would make a field pass for another field's line. (Before, `show`
/// printed them as they were: the terminal reordered the text.)
#[tokio::test]
async fn the_cli_shows_what_a_statement_hides() -> anyhow::Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let svc = Service::start(
        bus.clone(),
        ApprovalsConfig { admin_token: Some(TOKEN.into()), ..Default::default() },
        Some(DBA_RULE),
    )
    .await?;
    let mut req = hold_request(Duration::from_secs(300), 1);
    // Reads as `... WHERE id = 42 /* keep */` with the rest hidden behind the override.
    req.statement = "DELETE FROM orders WHERE id = 42 /*\u{202E} OR true --*/".into();
    req.principal.subject = "dana\u{200B}".into();
    req.reason = "delete on orders\napprovals:   dana, erin".into();
    request_hold(&bus, &req).await?;
    visible(&svc.client(), req.hold_id).await?;

    let shown = render_hold(&svc.client().get(req.hold_id).await?);
    let listed = render_holds(&svc.client().list().await?);
    for text in [&shown, &listed] {
        assert!(!text.contains('\u{202E}') && !text.contains('\u{200B}'), "{text}");
        assert!(text.contains("\\u{202E}"), "{text}");
        assert!(text.contains("dana\\u{200B}"), "{text}");
    }
    let approvals: Vec<&str> = shown.lines().filter(|l| l.starts_with("approvals:")).collect();
    assert_eq!(approvals, vec!["approvals:   none"], "{shown}");
    assert!(shown.contains("delete on orders\\u{000A}approvals:   dana, erin"), "{shown}");
    svc.stop().await
}
