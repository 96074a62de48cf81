//! Approval latency on loopback: a real nats-server and PostgreSQL, the proxy and the approval
//! service in-process, a fake Slack. For each of N holds (one after another), an agent sends an
//! UPDATE that a rule holds, and the bench times
//! - hold created → Slack post: from the statement leaving the client (the proxy then decides,
//!   records and publishes the hold) until the fake Slack has recorded its `chat.postMessage`;
//! - approving click → statement run: from a signed Approve callback until the agent has the
//!   UPDATE's result back, having run on PostgreSQL.
//!
//! Prints a Markdown table row per measure: p50, p99, max. Run through `bench/approvals.sh`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use approval_service::config::{ApproverEntry, SlackConfig};
use approval_service::slack::APPROVE_ACTION;
use approval_service::slack::fake::{self, FakeSlack};
use eventbus::{EventBus, NatsConfig};
use proto::events::Event;
use uuid::Uuid;

const SECRET: &str = "bench-secret";
const KEY: &str = "ak_bench_approvals_0123456789";
const DB_PASSWORD: &str = "bench-Pa55word";

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
            team_id: Some("T0001".into()),
        }),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let svc = tokio::spawn(approval_service::run(cfg, bus.clone(), listener, std::future::pending()));
    // The target and the proxy.
    let pg = testkit::Postgres::start()?;
    pg.psql("postgres", &format!("CREATE ROLE airlock_svc LOGIN PASSWORD '{DB_PASSWORD}'"))?;
    pg.psql("postgres", "CREATE DATABASE shop OWNER airlock_svc")?;
    pg.psql("shop", "SET ROLE airlock_svc; CREATE TABLE counters (id int primary key, n int); INSERT INTO counters VALUES (1, 0);")?;
    let dir = tempfile::tempdir()?;
    let pw = dir.path().join("pw");
    std::fs::write(&pw, DB_PASSWORD)?;
    let yaml = format!(
        r#"connections:
  - name: shop
    kind: postgres
    upstream: {{ host: 127.0.0.1, port: {port}, database: shop, tls: disable }}
    credentials: {{ user: airlock_svc, password_file: {pw} }}
rules:
  - name: counter-writes
    match: {{ operations: [update], tables: [counters] }}
    action: hold
    approvers: {{ groups: [dba] }}
    timeout: 10m
service_accounts:
  - {{ name: agent-1, groups: [agents], api_key_sha256: {hash} }}
"#,
        port = pg.port,
        pw = pw.display(),
        hash = proxy_node::identity::hash_api_key(KEY)
    );
    let doc = proto::policy::parse(&yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let active = policy_store::client::ActivePolicy { version: 1, document: doc, digest: "bench".into() };
    let (_policy_tx, policy_rx) = tokio::sync::watch::channel(Some(Arc::new(active)));
    let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_port = proxy_listener.local_addr()?.port();
    let proxy_cfg = proxy_node::ProxyConfig {
        target_password_dir: Some(dir.path().display().to_string()),
        ..Default::default()
    };
    tokio::spawn(proxy_node::run(proxy_cfg, bus.clone(), policy_rx, proxy_listener, std::future::pending()));
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(proxy_port)
        .user("agent-1")
        .password(KEY)
        .dbname("shop")
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(conn);
    let client = Arc::new(client);
    let mut holds = bus.subscribe(proto::subjects::HOLD_REQUESTED).await?;

    // The first hold warms up connections (NATS KV, the Slack client) and is not counted.
    let mut post = Vec::with_capacity(n);
    let mut click = Vec::with_capacity(n);
    for i in 0..=n {
        let c = client.clone();
        let t0 = Instant::now();
        let update =
            tokio::spawn(async move { c.simple_query("UPDATE counters SET n = n + 1 WHERE id = 1").await });
        let id: Uuid = loop {
            let env = tokio::time::timeout(Duration::from_secs(10), holds.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("bus closed"))?;
            if let Event::HoldRequested(h) = env.event {
                break h.hold_id;
            }
        };
        let needle = id.to_string();
        let posted = slack
            .wait_for("chat.postMessage", Duration::from_secs(10), |b| b.to_string().contains(&needle))
            .await
            .ok_or_else(|| anyhow::anyhow!("hold {i} never posted"))?;
        let t_post = posted.at.duration_since(t0);
        let body = fake::click("U_DANA", APPROVE_ACTION, id, "C_BENCH");
        let t1 = Instant::now();
        let status = fake::send(&url, SECRET, &body).await?;
        anyhow::ensure!(status == 200, "click answered {status}");
        tokio::time::timeout(Duration::from_secs(10), update).await???;
        let t_click = t1.elapsed();
        if i > 0 {
            post.push(t_post);
            click.push(t_click);
        }
    }
    anyhow::ensure!(
        pg.psql("shop", "SELECT n FROM counters")? == (n + 1).to_string(),
        "every approved UPDATE ran once"
    );
    println!("| measure | holds | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    row("hold created → Slack post", post);
    row("approving click → statement run on PostgreSQL", click);
    svc.abort();
    Ok(())
}
