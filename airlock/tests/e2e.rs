//! End to end: the real `airlock` binary, split into its four processes or run as `airlock up`,
//! against a real PostgreSQL, NATS JetStream, S3 server and OIDC issuer, driven by a real
//! Postgres client.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{
    Ports, airlock, apply_policy_file, connect, connect_when_ready, gateway_toml, seed_shop,
    shop_connection_yaml, spawn,
};
use testkit::{Nats, OidcIssuer, Postgres, S3, free_port, wait_for_port};
use tokio_postgres::SimpleQueryMessage;

const ETL_KEY: &str = "ak_test_etl_0123456789";

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Create the target database, the gateway's own role, and some rows.
fn seed(pg: &Postgres) {
    seed_shop(
        pg,
        " CREATE TABLE payments (id int primary key, amount int); \
         INSERT INTO payments VALUES (1, 10), (2, 20);",
    );
}

fn policy_yaml(pg: &Postgres) -> String {
    format!(
        r#"{connections}rules:
  - name: order-writes-need-approval
    connections: [shop]
    principals: {{ groups: [agents] }}
    match: {{ operations: [delete, update], tables: [orders] }}
    action: hold
    approvers: {{ groups: [dba] }}
    timeout: 60s
  - name: payment-deletes-expire-fast
    match: {{ operations: [delete], tables: [payments] }}
    action: hold
    timeout: 2s
  - name: no-ddl-for-agents
    match: {{ operations: [create, drop, alter, grant] }}
    action: deny
service_accounts:
  - name: etl
    groups: [agents]
    api_key_sha256: {hash}
"#,
        connections = shop_connection_yaml(pg),
        hash = sha256_hex(ETL_KEY)
    )
}

/// airlock.toml for a deployment.
fn config(dir: &Path, ports: &Ports, oidc: &OidcIssuer, nats: Option<&Nats>, s3: Option<&S3>) -> PathBuf {
    let mut c = gateway_toml(dir, ports, oidc);
    if let Some(n) = nats {
        // Ample for every record while NATS is up; short enough that the test taking NATS down
        // sees its sessions fail soon.
        c.push_str(&format!("\n[nats]\nurl = \"{}\"\nack_timeout = \"2s\"\n", n.url));
    }
    if let Some(s) = s3 {
        c.push_str(&format!(
            "\n[storage]\nurl = \"s3://{}\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nallow_http = true\n",
            s.bucket, s.endpoint, s.region, s.access_key_id, s.secret_access_key
        ));
    }
    let path = dir.join("airlock.toml");
    std::fs::write(&path, c).unwrap();
    path
}

/// A seeded target, an OIDC issuer, free ports and a config for `airlock up` on its embedded
/// defaults (no NATS, no S3) in a folder of its own.
struct Local {
    pg: Postgres,
    oidc: OidcIssuer,
    dir: tempfile::TempDir,
    ports: Ports,
    cfg: PathBuf,
}

impl Local {
    fn start() -> Self {
        testkit::init_crypto();
        let pg = Postgres::start().unwrap();
        seed(&pg);
        let oidc = OidcIssuer::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ports = Ports::new();
        let cfg = config(dir.path(), &ports, &oidc, None, None);
        Self { pg, oidc, dir, ports, cfg }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn apply_policy(dir: &Path, cfg: &Path, yaml: &str) {
    let file = dir.join("policy.yaml");
    std::fs::write(&file, yaml).unwrap();
    let o = apply_policy_file(dir, cfg, &file);
    assert!(stdout(&o).contains("version"), "{}", stdout(&o));
}

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_string()).collect())
            }
            _ => None,
        })
        .collect()
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_else(|| format!("no db error: {e}"))
}

/// The server's message (tokio-postgres' Display only says "db error").
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
}

fn hold_id_from(notice: &str) -> String {
    let after = notice.split("hold ").nth(1).expect("notice names the hold");
    after.split_whitespace().next().unwrap().to_string()
}

/// The allow / deny / hold walk shared by both deployment modes. Returns the session's principal.
async fn allow_deny_hold(dir: &Path, cfg: &Path, pg: &Postgres, ports: &Ports, oidc: &OidcIssuer) {
    let token = oidc.token("agent-7", &["agents"]);
    let mut agent = connect_when_ready(ports.proxy, &token).await;

    // An allowed SELECT returns the target's rows.
    let r = agent.client.simple_query("SELECT id, item FROM orders ORDER BY id").await.unwrap();
    assert_eq!(rows(&r), vec![vec!["1", "apple"], vec!["2", "pear"], vec!["3", "plum"]]);

    // Denied DDL: 42501 naming the rule; the target is unchanged.
    let e = agent.client.simple_query("CREATE TABLE stolen AS SELECT * FROM orders").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    assert!(e.as_db_error().unwrap().message().contains("no-ddl-for-agents"), "{e}");
    assert_eq!(pg.psql("shop", "SELECT count(*) FROM pg_tables WHERE tablename = 'stolen'").unwrap(), "0");

    // A statement that does not parse takes the `unparsed` default: deny.
    let e = agent.client.simple_query("DELTE FROM orders").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501");

    // A held DELETE that is approved runs.
    let client = agent.client;
    let del = tokio::spawn(async move {
        let r = client.simple_query("DELETE FROM orders WHERE id = 1").await;
        (client, r)
    });
    let notice = tokio::time::timeout(Duration::from_secs(10), agent.notices.recv()).await.unwrap().unwrap();
    assert!(notice.contains("waiting for approval"), "{notice}");
    let id = hold_id_from(&notice);
    let approvals_url = format!("http://127.0.0.1:{}", ports.approvals);
    let base = ["--url", approvals_url.as_str(), "--token", "test-admin-token"];
    let list = wait_for_listed(dir, cfg, &base, &id);
    assert!(list.contains("DELETE FROM orders"), "{list}");
    assert_eq!(
        pg.psql("shop", "SELECT count(*) FROM orders WHERE id = 1").unwrap(),
        "1",
        "not before approval"
    );
    let o = airlock(dir, cfg, &[&["approvals", "approve", &id, "--as", "dana"][..], &base[..]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let (client, r) = tokio::time::timeout(Duration::from_secs(10), del).await.unwrap().unwrap();
    r.unwrap();
    assert_eq!(pg.psql("shop", "SELECT count(*) FROM orders WHERE id = 1").unwrap(), "0");

    // A held DELETE that is denied never runs.
    let del = tokio::spawn(async move {
        let r = client.simple_query("DELETE FROM orders WHERE id = 2").await;
        (client, r)
    });
    let notice = tokio::time::timeout(Duration::from_secs(10), agent.notices.recv()).await.unwrap().unwrap();
    let id = hold_id_from(&notice);
    wait_for_listed(dir, cfg, &base, &id);
    let o = airlock(
        dir,
        cfg,
        &[&["approvals", "deny", &id, "--reason", "not during the sale"][..], &base[..]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (client, r) = tokio::time::timeout(Duration::from_secs(10), del).await.unwrap().unwrap();
    let e = r.unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    assert!(message(&e).contains("not during the sale"), "{}", message(&e));
    assert_eq!(pg.psql("shop", "SELECT count(*) FROM orders WHERE id = 2").unwrap(), "1");

    // A held DELETE that nobody answers expires and never runs.
    let started = Instant::now();
    let e = client.simple_query("DELETE FROM payments WHERE id = 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    assert!(message(&e).contains("expired"), "{}", message(&e));
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(pg.psql("shop", "SELECT count(*) FROM payments WHERE id = 1").unwrap(), "1");

    // A service account's API key works too, and its groups apply.
    let etl = connect_when_ready(ports.proxy, ETL_KEY).await;
    let r = etl.client.simple_query("SELECT count(*) FROM payments").await.unwrap();
    assert_eq!(rows(&r), vec![vec!["2"]]);
    drop(etl);
    drop(client);
}

fn wait_for_listed(dir: &Path, cfg: &Path, base: &[&str], id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = airlock(dir, cfg, &[&["approvals", "list"][..], base].concat());
        let out = stdout(&o);
        if out.contains(id) {
            return out;
        }
        assert!(Instant::now() < deadline, "hold {id} never listed: {out} {}", stderr(&o));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The recorded session of `agent-7`, read back with `airlock audit`.
fn replay_of_agent_session(dir: &Path, cfg: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = airlock(dir, cfg, &["audit", "sessions"]);
        let listing = stdout(&o);
        let id = listing
            .lines()
            .find(|l| l.contains("agent-7"))
            .and_then(|l| l.split_whitespace().find(|w| uuid::Uuid::parse_str(w).is_ok()))
            .map(str::to_string);
        if let Some(id) = id {
            let o = airlock(dir, cfg, &["audit", "replay", &id]);
            let text = stdout(&o);
            if text.contains("expired") && text.to_lowercase().contains("ended") {
                return text;
            }
        }
        assert!(Instant::now() < deadline, "session never recorded: {listing} {}", stderr(&o));
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The policy store published the applied version, and the recorder archived it.
fn assert_policy_change_recorded(dir: &Path, cfg: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listing = stdout(&airlock(dir, cfg, &["audit", "sessions"]));
        for id in listing.split_whitespace().filter(|w| uuid::Uuid::parse_str(w).is_ok()) {
            let text = stdout(&airlock(dir, cfg, &["audit", "replay", id]));
            if text.contains("policy version 1 applied by") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no recorded policy change in: {listing}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn assert_replay_in_order(text: &str) {
    let order = [
        "SELECT id, item FROM orders",
        "CREATE TABLE stolen",
        "no-ddl-for-agents",
        "DELETE FROM orders WHERE id = 1",
        "approved",
        "DELETE FROM orders WHERE id = 2",
        "not during the sale",
        "DELETE FROM payments WHERE id = 1",
        "expired",
    ];
    let mut at = 0;
    for needle in order {
        match text[at..].find(needle) {
            Some(i) => at += i + needle.len(),
            None => panic!("replay lacks {needle:?} after byte {at}:\n{text}"),
        }
    }
    assert!(text.contains("apple"), "result rows are in the replay:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_deployment_allows_denies_holds_and_records() {
    testkit::init_crypto();
    let pg = Postgres::start().unwrap();
    seed(&pg);
    let mut nats = Nats::start().unwrap();
    let s3 = S3::start().unwrap();
    let oidc = OidcIssuer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let cfg = config(dir.path(), &ports, &oidc, Some(&nats), Some(&s3));

    let _store = spawn(dir.path(), &cfg, &["policy-store"], "policy-store");
    wait_for_port(ports.store, Duration::from_secs(20)).unwrap();
    apply_policy(dir.path(), &cfg, &policy_yaml(&pg));
    let _recorder = spawn(dir.path(), &cfg, &["recorder"], "recorder");
    let _approvals = spawn(dir.path(), &cfg, &["approvals"], "approvals");
    let _proxy = spawn(dir.path(), &cfg, &["proxy"], "proxy");
    wait_for_port(ports.approvals, Duration::from_secs(20)).unwrap();
    wait_for_port(ports.proxy, Duration::from_secs(20)).unwrap();

    allow_deny_hold(dir.path(), &cfg, &pg, &ports, &oidc).await;
    let text = replay_of_agent_session(dir.path(), &cfg);
    assert_replay_in_order(&text);
    assert_policy_change_recorded(dir.path(), &cfg);

    // NATS down: the gateway cannot record, so it serves nothing.
    let token = oidc.token("agent-8", &["agents"]);
    let agent = connect_when_ready(ports.proxy, &token).await;
    nats.stop();
    let e = agent.client.simple_query("SELECT 1").await.unwrap_err();
    assert!(message(&e).contains("record"), "{}", message(&e));
    assert!(connect(ports.proxy, &token).await.is_err(), "new sessions are refused while NATS is down");
    nats.start_again().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let agent = loop {
        match connect(ports.proxy, &token).await {
            Ok(a) => break a,
            Err(e) => {
                assert!(Instant::now() < deadline, "gateway never recovered: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let r = agent.client.simple_query("SELECT count(*) FROM orders").await.unwrap();
    assert_eq!(rows(&r), vec![vec!["2"]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airlock_up_alone_allows_denies_holds_and_records() {
    let Local { pg, oidc, dir, ports, cfg } = Local::start();
    let policy = dir.path().join("initial.yaml");
    std::fs::write(&policy, policy_yaml(&pg)).unwrap();
    let admin = with_admin_port(&cfg);
    let _up = spawn(dir.path(), &cfg, &["up", "-f", policy.to_str().unwrap()], "up");
    wait_for_port(ports.proxy, Duration::from_secs(30)).unwrap();

    allow_deny_hold(dir.path(), &cfg, &pg, &ports, &oidc).await;
    // The admin port: health, readiness (a policy, not stale), and what happened as metrics.
    assert!(http_get(admin, "/healthz").await.starts_with("HTTP/1.1 200"));
    let ready = http_get(admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = http_get(admin, "/metrics").await;
    let value = |line: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {line} in:\n{metrics}"))
    };
    for decision in ["allow", "deny", "hold"] {
        let n = value(&format!("airlock_statements_total{{decision=\"{decision}\"}}"));
        assert!(n >= 1.0, "{decision}: {n}");
    }
    assert!(value("airlock_sessions_started_total") >= 1.0);
    assert!(value("airlock_events_published_total") >= 1.0);
    assert!(value("airlock_statement_duration_seconds_count") >= 1.0);
    assert_eq!(value("airlock_policy_store_leader"), 1.0);
    assert_eq!(value("airlock_policy_store_latest_version"), 1.0);
    // `up` records to ./data/recordings, which is where `airlock audit` looks by default.
    let text = replay_of_agent_session(dir.path(), &cfg);
    assert_replay_in_order(&text);
    assert!(dir.path().join("data/recordings").exists());
}

/// A session lasts as long as the token it logged in with: past its `exp` (and the leeway) the
/// next statement is refused and the session ends, as a new login with it would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires() {
    let Local { pg, oidc, dir, ports, cfg } = Local::start();
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "[proxy.oidc]\n",
        "[proxy.oidc]\nleeway = \"0s\"\n",
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let policy = dir.path().join("initial.yaml");
    std::fs::write(&policy, policy_yaml(&pg)).unwrap();
    let _up = spawn(dir.path(), &cfg, &["up", "-f", policy.to_str().unwrap()], "up");
    wait_for_port(ports.proxy, Duration::from_secs(30)).unwrap();
    let mut claims = oidc.claims("agent-1", &["agents"]);
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3;
    claims["exp"] = serde_json::json!(exp);
    let token = oidc.token_with(claims);
    let agent = connect_when_ready(ports.proxy, &token).await;
    agent.client.simple_query("SELECT count(*) FROM orders").await.unwrap();
    // Wait past exp (whole seconds).
    while std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() <= exp {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = agent.client.simple_query("SELECT count(*) FROM orders").await.expect_err("ran past exp");
    assert!(format!("{e:?}").contains("expired"), "{e:?}");
    assert!(agent.client.simple_query("SELECT 1").await.is_err(), "the session goes on");
}

/// Give the config an admin port of its own (the default ones are shared by every test); its
/// port.
fn with_admin_port(cfg: &Path) -> u16 {
    let port = free_port();
    let mut text = std::fs::read_to_string(cfg).unwrap();
    text.push_str(&format!("\n[admin]\nlisten = \"127.0.0.1:{port}\"\n"));
    std::fs::write(cfg, text).unwrap();
    port
}

/// `GET path` on the admin port: the status line, headers and body.
async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A proxy that has no policy to enforce is alive but not ready, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_a_policy_is_live_but_not_ready() {
    let nats = Nats::start().unwrap();
    let oidc = OidcIssuer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let cfg = config(dir.path(), &ports, &oidc, Some(&nats), None);
    let admin = with_admin_port(&cfg);
    // No policy store at ports.store.
    let _proxy = spawn(dir.path(), &cfg, &["proxy"], "proxy");
    wait_for_port(admin, Duration::from_secs(30)).unwrap();
    assert!(http_get(admin, "/healthz").await.starts_with("HTTP/1.1 200"));
    let ready = http_get(admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503") && ready.contains("no policy version received"), "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_misaddressed_tokens_are_rejected_before_the_target() {
    let Local { pg, oidc, dir, ports, cfg } = Local::start();
    let policy = dir.path().join("initial.yaml");
    std::fs::write(&policy, policy_yaml(&pg)).unwrap();
    let _up = spawn(dir.path(), &cfg, &["up", "-f", policy.to_str().unwrap()], "up");
    wait_for_port(ports.proxy, Duration::from_secs(30)).unwrap();
    // A good token works (RS256 and ES256 are both pinned by default).
    connect_when_ready(ports.proxy, &oidc.token("agent-1", &["agents"])).await;
    connect(ports.proxy, &oidc.token_rs256("agent-1", &["agents"])).await.unwrap();

    let sessions =
        || pg.psql("postgres", "SELECT sessions FROM pg_stat_database WHERE datname = 'shop'").unwrap();
    // The baseline, once those sessions have left the target and its statistics have settled.
    let open =
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'shop' AND backend_type = 'client backend'";
    let deadline = Instant::now() + Duration::from_secs(15);
    let before = loop {
        let gone = pg.psql("postgres", open).unwrap() == "0";
        let first = sessions();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = sessions();
        if gone && first == second {
            break second;
        }
        assert!(Instant::now() < deadline, "the target's sessions never settled: {first} then {second}");
    };

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let mut wrong_aud = oidc.claims("agent-1", &["agents"]);
    wrong_aud["aud"] = "someone-else".into();
    let mut expired = oidc.claims("agent-1", &["agents"]);
    expired["exp"] = (now - 3600).into();
    expired["iat"] = (now - 7200).into();
    expired["nbf"] = (now - 7200).into();
    let mut not_yet = oidc.claims("agent-1", &["agents"]);
    not_yet["nbf"] = (now + 3600).into();
    let mut wrong_iss = oidc.claims("agent-1", &["agents"]);
    wrong_iss["iss"] = "http://127.0.0.1:1".into();
    let cases = [
        ("wrong signature", oidc.token_signed_by_stranger("agent-1", &["agents"])),
        ("wrong audience", oidc.token_with(wrong_aud)),
        ("expired", oidc.token_with(expired)),
        ("not yet valid", oidc.token_with(not_yet)),
        ("wrong issuer", oidc.token_with(wrong_iss)),
        ("alg none", oidc.token_alg_none("agent-1", &["agents"])),
        // A valid token whose subject is a service account's name would take its rules.
        ("the subject of a service account", oidc.token("etl", &["agents"])),
        ("garbage", "eyJhbGciOiJIUzI1NiJ9.e30.x".to_string()),
        ("unknown api key", "ak_not_a_key".to_string()),
        ("empty", String::new()),
    ];
    for (what, token) in cases {
        let e = match connect(ports.proxy, &token).await {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e,
        };
        assert_eq!(sqlstate(&e), "28P01", "{what}: {}", message(&e));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sessions(), before, "no rejected client reached the target");

    // The gateway keeps serving after all that.
    let ok = connect(ports.proxy, &oidc.token("agent-1", &["agents"])).await.unwrap();
    ok.client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policy_is_rejected_naming_field_and_line_and_changes_nothing() {
    testkit::init_crypto();
    let pg = Postgres::start().unwrap();
    let oidc = OidcIssuer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let cfg = config(dir.path(), &ports, &oidc, None, None);
    let _store = spawn(dir.path(), &cfg, &["policy-store"], "policy-store");
    wait_for_port(ports.store, Duration::from_secs(20)).unwrap();
    let good = policy_yaml(&pg);
    apply_policy(dir.path(), &cfg, &good);
    let history = || stdout(&airlock(dir.path(), &cfg, &["policy", "history"]));
    let before = history();
    assert!(before.contains("\n       1 "), "{before}");

    let bad = good.replace("action: deny", "action: dney");
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, &bad).unwrap();
    let o = airlock(dir.path(), &cfg, &["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = stderr(&o);
    let line = bad.lines().position(|l| l.contains("dney")).unwrap() + 1;
    assert!(err.contains(&format!("line {line}")) && err.contains("rules[2].action"), "{err}");
    // The same check without a store or token, for a policy repository's CI.
    let good_file = dir.path().join("good.yaml");
    std::fs::write(&good_file, &good).unwrap();
    let offline = dir.path().join("offline.toml");
    std::fs::write(&offline, "[policy_store]\nlisten = \"127.0.0.1:1\"\n").unwrap();
    let o = airlock(dir.path(), &offline, &["policy", "validate", good_file.to_str().unwrap()]);
    assert!(o.status.success() && stdout(&o).contains("good.yaml: valid"), "{}", stderr(&o));
    let o = airlock(
        dir.path(),
        &offline,
        &["policy", "validate", good_file.to_str().unwrap(), file.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad.yaml: policy document is invalid"), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("line {line}")), "{}", stderr(&o));

    let bad = good.replace("connections: [shop]", "connections: [shp]");
    std::fs::write(&file, &bad).unwrap();
    let o = airlock(dir.path(), &cfg, &["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown connection `shp`"), "{}", stderr(&o));
    assert_eq!(history(), before, "nothing changed");

    let o = airlock(dir.path(), &cfg, &["policy", "get"]);
    assert_eq!(stdout(&o), good);
}

#[test]
fn bad_config_exits_64_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(&cfg, "[proxy]\nlisten = \"nowhere\"\n").unwrap();
    let o = airlock(dir.path(), &cfg, &["proxy"]);
    assert_eq!(o.status.code(), Some(64));
    let err = stderr(&o);
    assert!(err.contains("listen") && err.lines().count() <= 3, "{err}");
    assert_eq!(err.matches("invalid socket address").count(), 1, "said once: {err}");
}
