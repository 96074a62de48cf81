//! Policy propagation to whole proxy processes (run by `bench/policy_propagation_proxies.sh`).
//!
//! Starts a real PostgreSQL and nats-server (testkit), a 3-node `airlock policy-store` cluster and
//! `PROXIES` `airlock proxy` processes, each following a different store node first, with one
//! agent session open through each proxy. Then `CHANGES` changes, applied one after another: each
//! denies `SELECT` on a table under a new rule name, and is timed from the start of `Apply` until
//! a query through every proxy is refused naming that rule (p50, p99, max). Then apply
//! throughput with 16 concurrent writers through all three nodes, while the proxies follow.
//!
//!   proxy_propagation_bench AIRLOCK_BINARY CHANGES PROXIES

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use policy_store::client::PolicyClient;

/// The store's tokens: every node has both; changes are applied with the admin token and the
/// proxies follow with the read token.
const ADMIN_TOKEN: &str = "bench-admin-token";
const READ_TOKEN: &str = "bench-read-token";
use testkit::{Proc, free_port, wait_for_port};

const DB_PASSWORD: &str = "svc-Pa55word";
const KEY: &str = "ak_bench_agent_0123456789";

fn doc(pg_port: u16, rule: &str) -> String {
    format!(
        "connections:\n  - name: shop\n    kind: postgres\n    \
         upstream: {{ host: 127.0.0.1, port: {pg_port}, database: shop, tls: disable }}\n    \
         credentials: {{ user: airlock_svc, password_env: SHOP_DB_PASSWORD }}\n\
         rules:\n  - name: {rule}\n    match: {{ operations: [select], tables: [orders] }}\n    action: deny\n\
         service_accounts:\n  - name: bench\n    groups: [agents]\n    api_key_sha256: {}\n",
        proxy_node::identity::hash_api_key(KEY)
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn spawn(bin: &Path, config: &Path, what: &str, name: &str) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(config).arg(what).env("SHOP_DB_PASSWORD", DB_PASSWORD).env("RUST_LOG", "warn");
    Proc::spawn(cmd, name)
}

/// Query through `client` until it is refused naming `rule`.
async fn until_denied(client: &tokio_postgres::Client, rule: &str) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Err(e) = client.simple_query("SELECT id FROM orders").await {
            let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
            if msg.contains(rule) {
                return Ok(Instant::now());
            }
            ensure!(msg.contains("bench-"), "unexpected error: {msg}");
        }
        ensure!(Instant::now() < deadline, "{rule} not enforced within 30 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let bin = PathBuf::from(args.next().context("usage: proxy_propagation_bench AIRLOCK CHANGES PROXIES")?);
    let changes: usize = args.next().context("CHANGES")?.parse()?;
    let proxies: usize = args.next().context("PROXIES")?.parse()?;
    testkit::init_crypto();
    let dir = tempfile::tempdir()?;
    let pg = testkit::Postgres::start()?;
    pg.psql("postgres", &format!("CREATE ROLE airlock_svc LOGIN PASSWORD '{DB_PASSWORD}'"))?;
    pg.psql("postgres", "CREATE DATABASE shop OWNER airlock_svc")?;
    pg.psql(
        "shop",
        "SET ROLE airlock_svc; CREATE TABLE orders (id int primary key); INSERT INTO orders VALUES (1);",
    )?;
    let nats = testkit::Nats::start()?;

    // Three store nodes.
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let endpoints: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let mut procs = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let id = i + 1;
        let peers: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, p)| format!("{} = \"127.0.0.1:{p}\"", j + 1))
            .collect();
        let config = dir.path().join(format!("store-{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[policy_store]\nnode_id = {id}\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\npeers = {{ {} }}\n\
                 admin_token = \"{ADMIN_TOKEN}\"\nread_token = \"{READ_TOKEN}\"\n",
                dir.path().join(format!("store-{id}")).display(),
                peers.join(", ")
            ),
        )?;
        procs.push(spawn(&bin, &config, "policy-store", &format!("policy-store-{id}"))?);
    }
    for p in &ports {
        wait_for_port(*p, Duration::from_secs(20))?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        let attempt = async {
            let mut c = PolicyClient::connect(&endpoints[0], ADMIN_TOKEN).await?;
            c.apply(&doc(pg.port, "bench-0000"), "bench").await?;
            anyhow::Ok(c)
        };
        match attempt.await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the cluster: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    };

    // The proxies, each with one agent session.
    let mut agents = Vec::new();
    for i in 0..proxies {
        let port = free_port();
        let mut stores = endpoints.clone();
        stores.rotate_left(i % 3);
        let stores = stores.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
        let config = dir.path().join(format!("proxy-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:{port}\"\npolicy_store = [{stores}]\npolicy_store_token = \"{READ_TOKEN}\"\n\n[nats]\nurl = \"{}\"\n",
                nats.url
            ),
        )?;
        procs.push(spawn(&bin, &config, "proxy", &format!("proxy-{i}"))?);
        wait_for_port(port, Duration::from_secs(20))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let agent = loop {
            let connected = tokio_postgres::Config::new()
                .host("127.0.0.1")
                .port(port)
                .user("bench")
                .password(KEY)
                .dbname("shop")
                .connect(tokio_postgres::NoTls)
                .await;
            match connected {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    break c;
                }
                Err(e) if Instant::now() > deadline => bail!("proxy {i}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        until_denied(&agent, "bench-0000").await?;
        agents.push(agent);
    }

    let mut latencies = Vec::with_capacity(changes);
    for n in 1..=changes {
        let rule = format!("bench-{n:04}");
        let started = Instant::now();
        client.apply(&doc(pg.port, &rule), "bench").await?;
        let checks = agents.iter().map(|a| until_denied(a, &rule));
        let done = futures::future::try_join_all(checks).await?;
        let last = done.into_iter().max().unwrap_or(started);
        latencies.push(last.saturating_duration_since(started));
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "apply -> enforced by {proxies} `airlock proxy` processes (a query through each is refused by the new rule), {changes} changes, 3 store nodes:"
    );
    println!(
        "  p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms   (target p99 < 200 ms)",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies[latencies.len() - 1])
    );

    let writers = 16;
    let per_writer = changes.max(writers) / writers * 4;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let endpoint = endpoints[w % endpoints.len()].clone();
        let yaml = doc(pg.port, &format!("bench-w{w}"));
        tasks.push(tokio::spawn(async move {
            let mut c = PolicyClient::connect(&endpoint, ADMIN_TOKEN).await?;
            for n in 0..per_writer {
                c.apply(&format!("{yaml}# change {n}\n"), "bench").await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let total = writers * per_writer;
    let elapsed = started.elapsed();
    println!(
        "apply throughput: {total} changes by {writers} concurrent writers (through every node, {proxies} proxies following) in {:.2} s = {:.0} changes/s",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    drop(agents);
    drop(procs);
    Ok(())
}
