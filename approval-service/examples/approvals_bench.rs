//! Approval latency on loopback: a real nats-server, the approval service in-process, a fake
//! Slack. For each of N holds (one after another), times
//! - hold created → Slack post: `HoldRequested` published until the fake Slack has recorded the
//!   hold's `chat.postMessage`;
//! - approving click → decision: a signed Approve callback sent until `HoldDecided` is seen on
//!   the bus (what a waiting proxy acts on).
//!
//! Prints a Markdown table row per measure: p50, p99, max. Run through `bench/approvals.sh`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use approval_service::config::{ApproverEntry, SlackConfig};
use approval_service::slack::APPROVE_ACTION;
use approval_service::slack::fake::{self, FakeSlack};
use eventbus::{EventBus, NatsConfig};
use proto::events::{ApproverSpec, Envelope, Event, HoldRequest, Principal, Timestamp};
use uuid::Uuid;

const SECRET: &str = "bench-secret";

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn row(what: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    println!(
        "| {what} | {} | {} | {} | {} |",
        v.len(),
        ms(pct(&v, 0.5)),
        ms(pct(&v, 0.99)),
        ms(v[v.len() - 1])
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    testkit::init_crypto();
    let nats = testkit::Nats::start()?;
    let bus = EventBus::connect_nats(&NatsConfig { url: nats.url.clone(), ..Default::default() }).await?;
    let slack = Arc::new(FakeSlack::start().await?);
    slack.add_user("U_DANA", "dana@example.com");
    let cfg = approval_service::ApprovalsConfig {
        admin_token: Some("bench".into()),
        approvers: vec![ApproverEntry {
            name: "dana".into(),
            email: None,
            slack_user: Some("U_DANA".into()),
            groups: vec!["dba".into()],
        }],
        slack: Some(SlackConfig {
            bot_token: Some("xoxb-bench".into()),
            bot_token_file: None,
            signing_secret: Some(SECRET.into()),
            signing_secret_file: None,
            api_url: slack.api_url.clone(),
            default_channel: Some("C_BENCH".into()),
        }),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let svc = tokio::spawn(approval_service::run(cfg, bus.clone(), listener, std::future::pending()));
    let mut decisions = bus.subscribe(proto::subjects::HOLD_DECIDED).await?;
    // Warm up connections (NATS KV, the Slack client) with one hold that is not counted.
    let mut post = Vec::with_capacity(n);
    let mut click = Vec::with_capacity(n);
    for i in 0..=n {
        let now = Timestamp::now();
        let id = Uuid::now_v7();
        let req = HoldRequest {
            hold_id: id,
            seq: 1,
            connection: "shop".into(),
            principal: Principal {
                subject: "agent-1".into(),
                groups: vec!["agents".into()],
                kind: "oidc".into(),
            },
            statement: format!("DELETE FROM orders WHERE id = {i}"),
            parameters: vec![],
            fingerprint: "f".into(),
            rule: "writes".into(),
            reason: "delete on orders".into(),
            approvers: ApproverSpec { groups: vec!["dba".into()], min: 1 },
            requested_at: now,
            expires_at: now.plus(Duration::from_secs(600)),
        };
        let needle = id.to_string();
        let t0 = Instant::now();
        bus.publish(&Envelope::new(Uuid::now_v7(), Event::HoldRequested(req))).await?;
        let posted = slack
            .wait_for("chat.postMessage", Duration::from_secs(10), |b| b.to_string().contains(&needle))
            .await
            .ok_or_else(|| anyhow::anyhow!("hold {i} never posted"))?;
        let t_post = posted.at.duration_since(t0);
        // The post is recorded before the service stores the message ts; clicks may come sooner.
        let body = fake::click("U_DANA", APPROVE_ACTION, id, "C_BENCH");
        let t1 = Instant::now();
        let status = fake::send(&url, SECRET, &body).await?;
        anyhow::ensure!(status == 200, "click answered {status}");
        loop {
            let env = tokio::time::timeout(Duration::from_secs(10), decisions.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("bus closed"))?;
            if matches!(&env.event, Event::HoldDecided(d) if d.hold_id == id) {
                break;
            }
        }
        let t_click = t1.elapsed();
        if i > 0 {
            post.push(t_post);
            click.push(t_click);
        }
    }
    println!("| measure | holds | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    row("hold created → Slack post", post);
    row("approving click → HoldDecided on the bus", click);
    svc.abort();
    Ok(())
}
