//! The policy store as a real cluster: `airlock policy-store` processes on loopback ports, killed
//! with SIGKILL, restarted from disk, cut off by a TCP fault proxy, grown and shrunk with the
//! `airlock policy-store` admin commands. Most tests stand proxies in with
//! [`policy_store::client::follow`], the follower every proxy node runs; the propagation test
//! `every_proxy_process_enforces_an_applied_change_within_a_second` runs real `airlock proxy`
//! processes in front of a real PostgreSQL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use policy_store::client::{AdminClient, Follower, PolicyClient, follow};
use proto::pb::PolicyVersion;
use testkit::{FaultProxy, Proc, free_port, wait_for_port};

const TOKEN: &str = "cluster-test-admin-token";
/// The read token: what followers and proxies use.
const READ: &str = "cluster-test-read-token";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_airlock"))
}

/// A valid document that differs for every `n`.
fn doc(n: u64) -> String {
    format!("rules:\n  - name: rule-{n}\n    match: {{ operations: [drop] }}\n    action: deny\n")
}

/// One `airlock policy-store` process and what it needs to be restarted.
struct StoreNode {
    id: u64,
    port: u64,
    config: PathBuf,
    proc: Option<Proc>,
}

impl StoreNode {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin());
        cmd.arg("-c").arg(&self.config).arg("policy-store").env("RUST_LOG", "info,openraft=warn");
        let proc = Proc::spawn(cmd, &format!("policy-store-{}", self.id))?;
        wait_for_port(self.port as u16, Duration::from_secs(20))?;
        self.proc = Some(proc);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill9();
        }
        self.proc = None;
    }
}

/// Write a node's config into `dir` (which also holds its data).
fn write_config(
    dir: &Path,
    id: u64,
    port: u16,
    peers: &BTreeMap<u64, String>,
    join: bool,
) -> anyhow::Result<PathBuf> {
    let peers = peers.iter().map(|(id, addr)| format!("{id} = \"{addr}\"")).collect::<Vec<_>>().join(", ");
    let text = format!(
        "[policy_store]\nnode_id = {id}\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\npeers = {{ {peers} }}\n\
         join = {join}\nadmin_token = \"{TOKEN}\"\nread_token = \"{READ}\"\n",
        dir.join("data").display()
    );
    let path = dir.join("airlock.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

struct Cluster {
    nodes: Vec<StoreNode>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    /// `n` nodes that each reach node j at `route(i, j)` (default: j's own port).
    fn start(n: u64, route: impl Fn(u64, u64, u16) -> String) -> anyhow::Result<Cluster> {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut dirs = Vec::new();
        let mut nodes = Vec::new();
        for i in 1..=n {
            let dir = tempfile::tempdir()?;
            let peers: BTreeMap<u64, String> =
                (1..=n).filter(|j| *j != i).map(|j| (j, route(i, j, ports[j as usize - 1]))).collect();
            let config = write_config(dir.path(), i, ports[i as usize - 1], &peers, false)?;
            nodes.push(StoreNode { id: i, port: u64::from(ports[i as usize - 1]), config, proc: None });
            dirs.push(dir);
        }
        for node in &mut nodes {
            node.start()?;
        }
        Ok(Cluster { nodes, _dirs: dirs })
    }

    fn node(&mut self, id: u64) -> &mut StoreNode {
        self.nodes.iter_mut().find(|n| n.id == id).expect("a node with this id")
    }

    fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(StoreNode::endpoint).collect()
    }
}

fn direct(_from: u64, _to: u64, port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// The leader that a running node reports, other than `not`.
async fn leader(endpoints: &[String], not: Option<u64>) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for e in endpoints {
            if let Ok(mut admin) = AdminClient::connect(e, TOKEN).await
                && let Ok(s) = admin.status().await
                && s.leader_id != 0
                && Some(s.leader_id) != not
            {
                return Ok(s.leader_id);
            }
        }
        ensure!(Instant::now() < deadline, "no leader elected within 15s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Apply through `endpoint`, retrying while the cluster has no leader (an election under way).
async fn apply(endpoint: &str, yaml: &str, author: &str) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let attempt = async { PolicyClient::connect(endpoint, TOKEN).await?.apply(yaml, author).await };
        match attempt.await {
            Ok(r) => return Ok(r.version),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "apply failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => bail!("apply through {endpoint} kept failing: {e}"),
        }
    }
}

async fn history(endpoint: &str) -> anyhow::Result<Vec<PolicyVersion>> {
    Ok(PolicyClient::connect(endpoint, READ).await?.history().await?)
}

/// Wait until `endpoint` (not linearizable: its own state) has at least `version`.
async fn caught_up(endpoint: &str, version: u64) -> anyhow::Result<Vec<PolicyVersion>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(h) = history(endpoint).await
            && h.last().is_some_and(|v| v.version >= version)
        {
            return Ok(h);
        }
        ensure!(Instant::now() < deadline, "{endpoint} did not reach version {version} within 15s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until every follower enforces `version`; how long it took.
async fn enforced(followers: &mut [Follower], version: u64, within: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for f in followers.iter_mut() {
        let waited = tokio::time::timeout(within.saturating_sub(start.elapsed()), async {
            f.policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version >= version)).await.map(|_| ())
        })
        .await;
        match waited {
            Ok(Ok(())) => {}
            Ok(Err(_)) => bail!("a follower stopped"),
            Err(_) => bail!("a follower did not enforce version {version} within {within:?}"),
        }
    }
    Ok(start.elapsed())
}

fn airlock(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin()).args(args).env("AIRLOCK_ADMIN_TOKEN", TOKEN).output()?;
    ensure!(
        out.status.success(),
        "airlock {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_follower_enforces_an_applied_change_within_a_second_on_three_nodes() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, direct)?;
    let endpoints = cluster.endpoints();
    leader(&endpoints, None).await?;
    apply(&endpoints[0], &doc(0), "setup").await?;
    // Six proxies, two attached to each node first.
    let mut followers: Vec<Follower> = (0..6)
        .map(|i| {
            let mut e = endpoints.clone();
            e.rotate_left(i % 3);
            follow(e, READ)
        })
        .collect::<Result<_, _>>()?;
    enforced(&mut followers, 1, Duration::from_secs(10)).await?;
    for n in 1..=5u64 {
        // Through every node in turn: followers forward to the leader.
        let applied_at = Instant::now();
        let version = apply(&endpoints[n as usize % 3], &doc(n), "alice").await?;
        assert_eq!(version, n + 1);
        let remaining = Duration::from_secs(1).saturating_sub(applied_at.elapsed());
        enforced(&mut followers, version, remaining).await?;
        assert!(applied_at.elapsed() < Duration::from_secs(1));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_loses_no_committed_version() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, direct)?;
    let endpoints = cluster.endpoints();
    let old = leader(&endpoints, None).await?;
    for n in 1..=3 {
        apply(&endpoints[0], &doc(n), "before").await?;
    }
    let mut follower = follow(endpoints.clone(), READ)?;
    cluster.node(old).kill9();

    let survivors: Vec<String> =
        cluster.nodes.iter().filter(|n| n.id != old).map(StoreNode::endpoint).collect();
    let new = leader(&survivors, Some(old)).await?;
    assert_ne!(new, old);
    for n in 4..=6 {
        assert_eq!(apply(&survivors[n as usize % 2], &doc(n), "after").await?, n);
    }
    let expected = PolicyClient::connect(&survivors[0], READ).await?.history_linearizable().await?;
    assert_eq!(expected.iter().map(|v| v.version).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>());
    // The follower moved to another node and has the latest version.
    enforced(std::slice::from_mut(&mut follower), 6, Duration::from_secs(10)).await?;

    // The killed node comes back from its disk and catches up.
    cluster.node(old).start()?;
    let back = caught_up(&cluster.node(old).endpoint(), 6).await?;
    assert_eq!(back, expected);

    // The whole cluster killed and restarted from disk has the same state, and takes writes.
    for n in &mut cluster.nodes {
        n.kill9();
    }
    for n in &mut cluster.nodes {
        n.start()?;
    }
    leader(&endpoints, None).await?;
    for e in &endpoints {
        assert_eq!(caught_up(e, 6).await?, expected, "{e} after a full restart");
    }
    assert_eq!(apply(&endpoints[1], &doc(7), "restarted").await?, 7);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_and_leave_through_the_cli_while_writes_continue() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, direct)?;
    let endpoints = cluster.endpoints();
    leader(&endpoints, None).await?;

    // A writer that keeps applying through node 2 (which stays) while the membership changes.
    let writer_endpoint = endpoints[1].clone();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        let mut n = 100;
        while !*stop_rx.borrow_and_update() {
            n += 1;
            acknowledged.push((
                apply(&writer_endpoint, &doc(n), "writer").await?,
                policy_store::version::digest(&doc(n)),
            ));
        }
        anyhow::Ok(acknowledged)
    });

    // Node 4 starts empty and waits to be added.
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let config = write_config(dir.path(), 4, port, &BTreeMap::new(), true)?;
    let mut node4 = StoreNode { id: 4, port: u64::from(port), config, proc: None };
    node4.start()?;
    let store = endpoints[0].clone();
    let added = airlock(&["policy-store", "add-learner", "4", &node4.addr(), "--store", &store])?;
    assert!(added.contains("node 4") && added.contains("learner"), "{added}");
    let promoted = airlock(&["policy-store", "promote", "4", "--store", &store])?;
    assert!(promoted.lines().any(|l| l.contains("node 4") && l.contains("voter")), "{promoted}");
    let removed = airlock(&["policy-store", "remove", "1", "--store", &endpoints[2]])?;
    assert!(!removed.contains("node 1 "), "{removed}");
    cluster.node(1).kill9();

    stop_tx.send(true)?;
    let acknowledged = writer.await??;
    assert!(acknowledged.len() >= 2, "the writer made progress: {acknowledged:?}");
    // Every acknowledged write is in the history of the new member, in order.
    let last = acknowledged.last().map_or(0, |(v, _)| *v);
    let on_node4 = caught_up(&node4.endpoint(), last).await?;
    for (version, digest) in &acknowledged {
        let found = on_node4.iter().find(|v| v.version == *version).context("acknowledged version lost")?;
        assert_eq!(&found.digest, digest);
    }
    // Node 4 learns of the removal when the membership change reaches it: ask until it has.
    let node1 = format!("127.0.0.1:{}", cluster.node(1).port);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = airlock(&["policy-store", "status", "--store", &node4.endpoint()]);
        if let Ok(status) = &status {
            let voters =
                status.lines().filter(|l| l.trim_start().starts_with("node ") && l.contains("voter")).count();
            if voters == 3 && !status.contains(&node1) {
                break;
            }
        }
        ensure!(Instant::now() < deadline, "node 4 never showed 3 voters without node 1: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_minority_refuses_writes_keeps_its_version_and_catches_up_after_healing()
-> anyhow::Result<()> {
    // Node i reaches node j through its own fault proxy, so links can be cut one by one.
    let ports: BTreeMap<u64, u16> = (1..=3).map(|i| (i, free_port())).collect();
    let mut links: BTreeMap<(u64, u64), FaultProxy> = BTreeMap::new();
    for &from in ports.keys() {
        for (&to, &port) in &ports {
            if from != to {
                links.insert((from, to), FaultProxy::start(0, ([127, 0, 0, 1], port).into())?);
            }
        }
    }
    let routes: BTreeMap<(u64, u64), String> =
        links.iter().map(|(k, p)| (*k, p.addr().to_string())).collect();
    // Cluster::start picks its own ports, so build the nodes here with the ones the proxies target.
    let mut dirs = Vec::new();
    let mut nodes = Vec::new();
    for (&id, &port) in &ports {
        let dir = tempfile::tempdir()?;
        let peers: BTreeMap<u64, String> =
            ports.keys().filter(|j| **j != id).map(|j| (*j, routes[&(id, *j)].clone())).collect();
        let config = write_config(dir.path(), id, port, &peers, false)?;
        nodes.push(StoreNode { id, port: u64::from(port), config, proc: None });
        dirs.push(dir);
    }
    for n in &mut nodes {
        n.start()?;
    }
    let cluster = Cluster { nodes, _dirs: dirs };
    let endpoints = cluster.endpoints();
    let leader_id = leader(&endpoints, None).await?;
    let minority = (1..=3).find(|id| *id != leader_id).context("a follower")?;
    let majority_endpoint =
        cluster.nodes.iter().find(|n| n.id != minority).map(StoreNode::endpoint).context("node")?;
    let minority_endpoint =
        cluster.nodes.iter().find(|n| n.id == minority).map(StoreNode::endpoint).context("node")?;
    apply(&majority_endpoint, &doc(1), "before").await?;
    let mut on_minority = follow(vec![minority_endpoint.clone()], READ)?;
    let mut on_majority = follow(vec![majority_endpoint.clone()], READ)?;
    enforced(std::slice::from_mut(&mut on_minority), 1, Duration::from_secs(10)).await?;
    // Fresh once the node it follows confirmed with the quorum that it is current (a heartbeat).
    let deadline = Instant::now() + Duration::from_secs(10);
    while on_minority.current(Duration::from_secs(30)).is_err() {
        ensure!(Instant::now() < deadline, "the follower of the minority never had a heartbeat");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for ((from, to), link) in &links {
        if *from == minority || *to == minority {
            link.cut();
        }
    }
    assert_eq!(apply(&majority_endpoint, &doc(2), "majority").await?, 2);
    enforced(std::slice::from_mut(&mut on_majority), 2, Duration::from_secs(10)).await?;
    let refused = PolicyClient::connect(&minority_endpoint, TOKEN).await?.apply(&doc(3), "minority").await;
    assert!(refused.is_err(), "the minority accepted a write: {refused:?}");
    // The proxy attached to the minority keeps enforcing the last version it has.
    let kept = on_minority.policy.borrow().clone().context("a version")?;
    assert_eq!(kept.version, 1);
    assert!(on_minority.current(Duration::from_secs(30)).is_ok());
    // ...but only within the staleness limit: the minority node cannot confirm with a quorum that
    // it is current, so it sends no heartbeats and ends its Watch streams, while the majority's
    // heartbeats keep its follower fresh.
    let limit = Duration::from_secs(3);
    let deadline = Instant::now() + Duration::from_secs(15);
    while on_minority.current(limit).is_ok() {
        ensure!(Instant::now() < deadline, "the follower of the cut-off minority stayed fresh");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(on_majority.current(limit).is_ok(), "the follower of the majority went stale");

    for link in links.values() {
        link.heal();
    }
    enforced(std::slice::from_mut(&mut on_minority), 2, Duration::from_secs(15)).await?;
    let healed = caught_up(&minority_endpoint, 2).await?;
    assert_eq!(healed, history(&majority_endpoint).await?);
    assert!(healed.iter().all(|v| !v.author.ends_with("minority")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_diff_and_rollback_through_the_cli() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let config = write_config(dir.path(), 1, port, &BTreeMap::new(), false)?;
    let mut node = StoreNode { id: 1, port: u64::from(port), config, proc: None };
    node.start()?;
    let store = node.endpoint();
    let v1 = dir.path().join("v1.yaml");
    let v2 = dir.path().join("v2.yaml");
    std::fs::write(&v1, doc(1))?;
    std::fs::write(&v2, doc(2))?;
    let file = |p: &Path| p.display().to_string();
    airlock(&["policy", "apply", "-f", &file(&v1), "--author", "alice", "--store", &store])?;
    airlock(&["policy", "apply", "-f", &file(&v2), "--author", "bob", "--store", &store])?;

    let diff = airlock(&["policy", "diff", "1", "2", "--store", &store])?;
    assert!(diff.contains("--- version 1\n+++ version 2\n"), "{diff}");
    assert!(diff.contains("\n-  - name: rule-1\n+  - name: rule-2\n"), "{diff}");

    let rolled = airlock(&["policy", "rollback", "1", "--author", "carol", "--store", &store])?;
    assert!(rolled.contains("as version 3"), "{rolled}");
    let latest = PolicyClient::connect(&store, READ).await?.get(0).await?;
    assert_eq!(
        (latest.version, latest.document_yaml.as_str(), latest.author.as_str()),
        (3, doc(1).as_str(), "admin-token:carol")
    );

    // The history names the token's role, then the claimed author.
    let listed = airlock(&["policy", "history", "--store", &store, "--token", READ])?;
    let authors: Vec<&str> = listed.lines().skip(1).filter_map(|l| l.split_whitespace().nth(2)).collect();
    assert_eq!(authors, vec!["admin-token:alice", "admin-token:bob", "admin-token:carol"], "{listed}");

    // The read token does not apply or roll back; no token at all does not even read.
    let as_reader =
        |args: &[&str]| Command::new(bin()).args(args).args(["--store", &store, "--token", READ]).output();
    for args in [&["policy", "apply", "-f", &file(&v2)][..], &["policy", "rollback", "2"]] {
        let out = as_reader(args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success() && err.contains("needs the admin token"), "{args:?}: {err}");
    }
    // (In a folder with no airlock.toml and no ./data/admin-token.)
    let elsewhere = tempfile::tempdir()?;
    let out = Command::new(bin())
        .args(["policy", "get", "--store", &store])
        .current_dir(elsewhere.path())
        .env_remove("AIRLOCK_ADMIN_TOKEN")
        .env_remove("AIRLOCK_CONFIG")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("no policy-store token"), "{err}");
    let out = Command::new(bin()).args(["policy", "get", "--store", &store, "--token", "wrong"]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("missing or wrong bearer token"), "{err}");
    assert_eq!(history(&store).await?.len(), 3);
    Ok(())
}

const DB_PASSWORD: &str = "svc-Pa55word";
const ETL_KEY: &str = "ak_cluster_test_etl_0123456789";

/// The proxies' policy: one connection, an API-key service account, and `extra` rules.
fn proxy_policy(pg_port: u16, extra: &str) -> String {
    format!(
        "connections:\n  - name: shop\n    kind: postgres\n    \
         upstream: {{ host: 127.0.0.1, port: {pg_port}, database: shop, tls: disable }}\n    \
         credentials: {{ user: airlock_svc, password_env: SHOP_DB_PASSWORD }}\n\
         rules:\n  - name: no-ddl\n    match: {{ operations: [create, drop, alter] }}\n    action: deny\n{extra}\
         service_accounts:\n  - name: etl\n    groups: [agents]\n    api_key_sha256: {}\n",
        proxy_node::identity::hash_api_key(ETL_KEY)
    )
}

/// One `airlock proxy` process following `stores` (the first one first).
fn start_proxy(dir: &Path, i: usize, stores: &[String], nats: &testkit::Nats) -> anyhow::Result<(Proc, u16)> {
    let port = free_port();
    let stores = stores.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\npolicy_store = [{stores}]\npolicy_store_token = \"{READ}\"\n\
         node_name = \"proxy-{i}\"\n\n\
         [nats]\nurl = \"{}\"\n",
        nats.url
    );
    let config = dir.join(format!("proxy-{i}.toml"));
    std::fs::write(&config, text)?;
    let mut cmd = Command::new(bin());
    cmd.arg("-c")
        .arg(&config)
        .arg("proxy")
        .current_dir(dir)
        .env("SHOP_DB_PASSWORD", DB_PASSWORD)
        .env("RUST_LOG", "info");
    let proc = Proc::spawn(cmd, &format!("proxy-{i}"))?;
    wait_for_port(port, Duration::from_secs(20))?;
    Ok((proc, port))
}

/// An agent session through the proxy on `port`, retried while the proxy gets its first policy.
async fn agent(port: u16) -> anyhow::Result<tokio_postgres::Client> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let connected = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user("etl")
            .password(ETL_KEY)
            .dbname("shop")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await;
        match connected {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                return Ok(client);
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "proxy not ready yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("no session through the proxy on {port}: {e}"),
        }
    }
}

/// Query through `client` until the query is denied by `rule`; when that happened.
async fn denied_by(
    client: &tokio_postgres::Client,
    sql: &str,
    rule: &str,
    within: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + within;
    loop {
        match client.simple_query(sql).await {
            Ok(_) => {}
            Err(e) => {
                let db = e.as_db_error().with_context(|| format!("not a database error: {e}"))?;
                ensure!(db.code().code() == "42501", "unexpected error: {e}");
                ensure!(db.message().contains(rule), "denied, but not by {rule}: {}", db.message());
                return Ok(Instant::now());
            }
        }
        ensure!(Instant::now() < deadline, "`{sql}` still allowed after {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxy_process_enforces_an_applied_change_within_a_second() -> anyhow::Result<()> {
    testkit::init_crypto();
    let pg = testkit::Postgres::start()?;
    pg.psql("postgres", &format!("CREATE ROLE airlock_svc LOGIN PASSWORD '{DB_PASSWORD}'"))?;
    pg.psql("postgres", "CREATE DATABASE shop OWNER airlock_svc")?;
    pg.psql(
        "shop",
        "SET ROLE airlock_svc; CREATE TABLE orders (id int primary key, item text); \
         INSERT INTO orders VALUES (1, 'apple');",
    )?;
    let nats = testkit::Nats::start()?;
    let cluster = Cluster::start(3, direct)?;
    let endpoints = cluster.endpoints();
    leader(&endpoints, None).await?;
    apply(&endpoints[0], &proxy_policy(pg.port, ""), "setup").await?;

    // Three proxy processes, each following a different store node first.
    let dir = tempfile::tempdir()?;
    let mut proxies = Vec::new();
    for i in 0..3 {
        let mut stores = endpoints.clone();
        stores.rotate_left(i);
        proxies.push(start_proxy(dir.path(), i, &stores, &nats)?);
    }
    let mut agents = Vec::new();
    for (_, port) in &proxies {
        let client = agent(*port).await?;
        let rows = client.simple_query("SELECT item FROM orders").await?;
        ensure!(rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))), "no rows");
        agents.push(client);
    }

    // The change: reading orders is now denied. Applied with the CLI through node 2.
    let file = dir.path().join("v2.yaml");
    let rule = "  - name: no-reading-orders\n    match: { operations: [select], tables: [orders] }\n    action: deny\n";
    std::fs::write(&file, proxy_policy(pg.port, rule))?;
    let out = airlock(&[
        "policy",
        "apply",
        "-f",
        &file.display().to_string(),
        "--author",
        "alice",
        "--store",
        &endpoints[1],
    ])?;
    let applied = Instant::now();
    ensure!(out.contains("as version 2"), "{out}");
    // Every proxy, on the session it already had, queried concurrently.
    let checks = agents
        .iter()
        .map(|c| denied_by(c, "SELECT item FROM orders", "no-reading-orders", Duration::from_secs(5)));
    let denied_at = futures::future::try_join_all(checks).await?;
    let slowest = denied_at.iter().map(|t| t.saturating_duration_since(applied)).max().unwrap_or_default();
    eprintln!("the slowest of 3 proxies enforced the change {slowest:?} after `policy apply` returned");
    ensure!(
        slowest < Duration::from_secs(1),
        "the slowest proxy enforced the change {slowest:?} after apply returned"
    );
    // A new session through each proxy is denied too.
    for (_, port) in &proxies {
        let client = agent(*port).await?;
        denied_by(&client, "SELECT id FROM orders", "no-reading-orders", Duration::from_millis(100)).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airlock_up_makes_its_own_store_tokens_and_everything_in_it_uses_them() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (proxy, approvals, store) = (free_port(), free_port(), free_port());
    let env = [
        ("AIRLOCK_PROXY__LISTEN", format!("127.0.0.1:{proxy}")),
        ("AIRLOCK_APPROVALS__LISTEN", format!("127.0.0.1:{approvals}")),
        ("AIRLOCK_POLICY_STORE__LISTEN", format!("127.0.0.1:{store}")),
    ];
    let command = |args: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.args(args).current_dir(dir.path()).env_remove("AIRLOCK_ADMIN_TOKEN").env_remove("AIRLOCK_CONFIG");
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd
    };
    let mut up = command(&["up"]);
    up.env("RUST_LOG", "info,openraft=warn");
    let up = Proc::spawn(up, "up")?;
    wait_for_port(proxy, Duration::from_secs(30))?;
    let endpoint = format!("http://127.0.0.1:{store}");

    // Both tokens were made in ./data, readable by the owner only.
    let admin = std::fs::read_to_string(dir.path().join("data/admin-token"))?;
    let read = std::fs::read_to_string(dir.path().join("data/policy-read-token"))?;
    ensure!(admin.starts_with("adm_") && read.starts_with("rd_") && admin != read);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("data/policy-read-token"))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The CLI finds the admin token in ./data, as it does for approvals.
    let file = dir.path().join("v1.yaml");
    std::fs::write(&file, doc(1))?;
    let out =
        command(&["policy", "apply", "-f", &file.display().to_string(), "--author", "dana"]).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let latest = PolicyClient::connect(&endpoint, &read).await?.get(0).await?;
    assert_eq!((latest.version, latest.author.as_str()), (1, "admin-token:dana"));

    // Without a token, or with the read token for a write, the store refuses.
    let mut stranger = PolicyClient::connect(&endpoint, "guess").await?;
    let refused = stranger.get(0).await.expect_err("no token").to_string();
    ensure!(refused.contains("missing or wrong bearer token"), "{refused}");
    let refused = PolicyClient::connect(&endpoint, &read).await?.apply(&doc(2), "mallory").await;
    let refused = refused.expect_err("reader wrote").to_string();
    ensure!(refused.contains("needs the admin token"), "{refused}");

    // The in-process proxy and approval service follow the store with the read token.
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.log().matches("policy version active").count() < 2 {
        ensure!(Instant::now() < deadline, "the followers of `up` never got version 1:\n{}", up.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(!up.log().contains("policy watch failed"), "{}", up.log());
    Ok(())
}
