//! Slack approvals end to end: the real `airlock` binary (policy store, approval service, proxy)
//! against a real PostgreSQL, NATS JetStream and OIDC issuer, with a fake Slack that records
//! every Web API call. A signed click in "Slack" makes the held statement run on PostgreSQL.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use approval_service::slack::fake::{self, FakeSlack};
use approval_service::slack::{APPROVE_ACTION, DENY_ACTION};
use common::{
    Agent, Ports, airlock, apply_policy_file, connect_when_ready, gateway_toml, seed_shop,
    shop_connection_yaml, spawn,
};
use testkit::{Nats, OidcIssuer, Postgres, Proc, wait_for_port};

const SECRET: &str = "e2e-signing-secret";
const CHANNEL: &str = "C_DBA";

struct Env {
    dir: tempfile::TempDir,
    cfg: PathBuf,
    proxy: u16,
    approvals: u16,
}

/// airlock.toml with Slack pointed at `slack`, and the policy applied.
fn setup(pg: &Postgres, nats: &Nats, oidc: &OidcIssuer, slack: &FakeSlack) -> (Env, Proc) {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[nats]
url = "{nats}"

{gateway}
[approvals.slack]
bot_token = "xoxb-e2e"
signing_secret = "{SECRET}"
api_url = "{api}"
[[approvals.approvers]]
name = "dana"
email = "dana@example.com"
groups = ["dba"]
"#,
            nats = nats.url,
            gateway = gateway_toml(dir.path(), &ports, oidc),
            api = slack.api_url,
        ),
    )
    .unwrap();
    slack.add_user("U_DANA", "dana@example.com");
    let store_proc = spawn(dir.path(), &cfg, &["policy-store"], "policy-store");
    wait_for_port(ports.store, Duration::from_secs(20)).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            r#"{connections}rules:
  - name: order-writes-need-approval
    connections: [shop]
    match: {{ operations: [delete, update], tables: [orders] }}
    action: hold
    approvers: {{ groups: [dba] }}
    timeout: 60s
    slack: {{ channel: {CHANNEL} }}
masking:
  - detectors: [email]
"#,
            connections = shop_connection_yaml(pg)
        ),
    )
    .unwrap();
    apply_policy_file(dir.path(), &cfg, &policy);
    (Env { dir, cfg, proxy: ports.proxy, approvals: ports.approvals }, store_proc)
}

fn hold_id_from(notice: &str) -> uuid::Uuid {
    let after = notice.split("hold ").nth(1).expect("notice names the hold");
    uuid::Uuid::parse_str(after.split_whitespace().next().unwrap().trim_end_matches([',', '.', ';'])).unwrap()
}

async fn callback(port: u16, body: &str) -> u16 {
    fake::send(&format!("http://127.0.0.1:{port}"), SECRET, body).await.expect("the approval service answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_slack_click_runs_the_held_statement_and_a_slack_denial_keeps_it_from_running() {
    testkit::init_crypto();
    let pg = Postgres::start().unwrap();
    seed_shop(&pg, "");
    let nats = Nats::start().unwrap();
    let oidc = OidcIssuer::start().unwrap();
    let slack = FakeSlack::start().await.unwrap();
    let (env, _store) = setup(&pg, &nats, &oidc, &slack);
    let _approvals = spawn(env.dir.path(), &env.cfg, &["approvals"], "approvals");
    let _proxy = spawn(env.dir.path(), &env.cfg, &["proxy"], "proxy");
    wait_for_port(env.approvals, Duration::from_secs(20)).unwrap();
    wait_for_port(env.proxy, Duration::from_secs(20)).unwrap();

    let Agent { client, mut notices } =
        connect_when_ready(env.proxy, &oidc.token("agent-7", &["agents"])).await;
    let del = tokio::spawn(async move {
        let r = client.simple_query("DELETE FROM orders WHERE id = 1").await.map(|_| ());
        (client, r)
    });
    let notice = tokio::time::timeout(Duration::from_secs(10), notices.recv()).await.unwrap().unwrap();
    let id = hold_id_from(&notice);
    let posted = slack
        .wait_for("chat.postMessage", Duration::from_secs(10), |b| b.to_string().contains(&id.to_string()))
        .await
        .expect("the hold was posted to Slack");
    assert_eq!(posted.body["channel"], CHANNEL);
    assert!(posted.body.to_string().contains("DELETE FROM orders WHERE id = 1"));
    // The CLI shows the same hold in full.
    let url = format!("http://127.0.0.1:{}", env.approvals);
    let shown = airlock(
        env.dir.path(),
        &env.cfg,
        &["approvals", "show", &id.to_string(), "--url", &url, "--token", "test-admin-token"],
    );
    let shown = String::from_utf8_lossy(&shown.stdout);
    for needle in
        ["DELETE FROM orders WHERE id = 1", "agent-7", "order-writes-need-approval", "dba, 1 needed"]
    {
        assert!(shown.contains(needle), "show lacks {needle}: {shown}");
    }
    assert_eq!(
        pg.psql("shop", "SELECT count(*) FROM orders WHERE id = 1").unwrap(),
        "1",
        "not before approval"
    );

    assert_eq!(callback(env.approvals, &fake::click("U_DANA", APPROVE_ACTION, id, CHANNEL)).await, 200);
    let (client, r) = tokio::time::timeout(Duration::from_secs(10), del).await.unwrap().unwrap();
    r.unwrap();
    assert_eq!(pg.psql("shop", "SELECT count(*) FROM orders WHERE id = 1").unwrap(), "0");
    slack
        .wait_for("chat.update", Duration::from_secs(10), |b| b.to_string().contains("Approved* by dana"))
        .await
        .expect("the message says who approved");

    // Deny from Slack: the modal's reason reaches the agent and the row stays.
    let del = tokio::spawn(async move {
        let r = client
            .simple_query("DELETE FROM orders WHERE id = 2 AND item <> 'carol@example.org'")
            .await
            .map(|_| ());
        (client, r)
    });
    let notice = tokio::time::timeout(Duration::from_secs(10), notices.recv()).await.unwrap().unwrap();
    let id = hold_id_from(&notice);
    let posted = slack
        .wait_for("chat.postMessage", Duration::from_secs(10), |b| b.to_string().contains(&id.to_string()))
        .await
        .expect("posted");
    // Approvers see the statement already masked.
    let text = posted.body.to_string();
    assert!(text.contains("[redacted:email]") && !text.contains("carol@example.org"), "{text}");
    assert_eq!(callback(env.approvals, &fake::click("U_DANA", DENY_ACTION, id, CHANNEL)).await, 200);
    slack.wait_for("views.open", Duration::from_secs(10), |_| true).await.expect("the deny modal opened");
    assert_eq!(
        callback(env.approvals, &fake::deny_submission("U_DANA", id, "not during the sale")).await,
        200
    );
    let (_client, r) = tokio::time::timeout(Duration::from_secs(10), del).await.unwrap().unwrap();
    let e = r.unwrap_err();
    let db = e.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "42501");
    assert!(db.message().contains("not during the sale"), "{}", db.message());
    assert_eq!(pg.psql("shop", "SELECT count(*) FROM orders WHERE id = 2").unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_pending_when_the_service_is_killed_with_9_completes_after_a_restart() {
    testkit::init_crypto();
    let pg = Postgres::start().unwrap();
    seed_shop(&pg, "");
    let nats = Nats::start().unwrap();
    let oidc = OidcIssuer::start().unwrap();
    let slack = FakeSlack::start().await.unwrap();
    let (env, _store) = setup(&pg, &nats, &oidc, &slack);
    // A short ack wait, so the killed service's delivery comes back in 2 s rather than 30 s; the
    // service reuses an existing consumer's configuration.
    let bus = eventbus::EventBus::connect_nats(&eventbus::NatsConfig {
        url: nats.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let eventbus::EventBus::Nats(raw) = &bus else { unreachable!("connected to NATS") };
    raw.durable_with_ack_wait(
        proto::subjects::APPROVALS_DURABLE,
        proto::subjects::HOLD_REQUESTED,
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    let mut approvals = spawn(env.dir.path(), &env.cfg, &["approvals"], "approvals");
    let _proxy = spawn(env.dir.path(), &env.cfg, &["proxy"], "proxy");
    wait_for_port(env.approvals, Duration::from_secs(20)).unwrap();
    wait_for_port(env.proxy, Duration::from_secs(20)).unwrap();

    let Agent { client, mut notices } =
        connect_when_ready(env.proxy, &oidc.token("agent-7", &["agents"])).await;
    let del = tokio::spawn(async move {
        let r = client.simple_query("DELETE FROM orders WHERE id = 3").await.map(|_| ());
        (client, r)
    });
    let notice = tokio::time::timeout(Duration::from_secs(10), notices.recv()).await.unwrap().unwrap();
    let id = hold_id_from(&notice);
    slack
        .wait_for("chat.postMessage", Duration::from_secs(10), |b| b.to_string().contains(&id.to_string()))
        .await
        .expect("posted before the kill");
    // Wait until the service recorded the message's ts in the shared store (a kill between the
    // post and that write leaves a message nobody can update; the hold itself still completes).
    let holds = approval_service::store::Store::nats(raw.client().clone()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rec = holds.get(id).await.unwrap().map(|(rec, _)| rec);
        if rec.as_ref().is_some_and(|r| r.slack.is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "the message's ts was never recorded: {rec:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    approvals.kill9();
    let restarted = spawn(env.dir.path(), &env.cfg, &["approvals"], "approvals-restarted");
    wait_for_port(env.approvals, Duration::from_secs(20)).unwrap();
    // The click reaches the new process; it knows the hold from the shared store.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = callback(env.approvals, &fake::click("U_DANA", APPROVE_ACTION, id, CHANNEL)).await;
        assert_eq!(status, 200);
        if slack
            .wait_for("chat.update", Duration::from_millis(500), |b| {
                b.to_string().contains("Approved* by dana")
            })
            .await
            .is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted service never decided the hold");
    }
    let (_client, r) = tokio::time::timeout(Duration::from_secs(10), del).await.unwrap().unwrap();
    r.unwrap();
    assert_eq!(pg.psql("shop", "SELECT count(*) FROM orders WHERE id = 3").unwrap(), "0");
    // One message for the hold, across both processes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let posts =
        slack.bodies("chat.postMessage").iter().filter(|b| b.to_string().contains(&id.to_string())).count();
    assert_eq!(posts, 1);
    drop(restarted);
}
