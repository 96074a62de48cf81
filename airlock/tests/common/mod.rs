//! The harness the end-to-end tests of the `airlock` binary share: its processes and commands,
//! the target database and the gateway's config, and agents' sessions through the proxy.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use futures::StreamExt;
use testkit::{OidcIssuer, Postgres, Proc, free_port};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

/// The gateway's own role's password on the target.
pub(crate) const DB_PASSWORD: &str = "svc-Pa55word";

/// The `airlock` binary under test.
pub(crate) fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_airlock"))
}

/// Creates the gateway's own role and the `shop` database with its `orders`, then runs `more`
/// there as that role.
pub(crate) fn seed_shop(pg: &Postgres, more: &str) {
    pg.psql("postgres", &format!("CREATE ROLE airlock_svc LOGIN PASSWORD '{DB_PASSWORD}'")).unwrap();
    pg.psql("postgres", "CREATE DATABASE shop OWNER airlock_svc").unwrap();
    pg.psql(
        "shop",
        &format!(
            "SET ROLE airlock_svc; \
             CREATE TABLE orders (id int primary key, item text); \
             INSERT INTO orders VALUES (1, 'apple'), (2, 'pear'), (3, 'plum');{more}"
        ),
    )
    .unwrap();
}

/// The policy's `connections:`: `shop`, on the target at `pg`, as the gateway's own role.
pub(crate) fn shop_connection_yaml(pg: &Postgres) -> String {
    format!(
        r#"connections:
  - name: shop
    kind: postgres
    upstream: {{ host: 127.0.0.1, port: {port}, database: shop, tls: disable }}
    credentials: {{ user: airlock_svc, password_env: SHOP_DB_PASSWORD }}
"#,
        port = pg.port
    )
}

/// The ports a deployment listens on.
pub(crate) struct Ports {
    pub(crate) proxy: u16,
    pub(crate) approvals: u16,
    pub(crate) store: u16,
}

impl Ports {
    /// Free ports for the proxy, the approval service and the policy store.
    pub(crate) fn new() -> Self {
        Self { proxy: free_port(), approvals: free_port(), store: free_port() }
    }
}

/// airlock.toml's `[proxy]`, `[approvals]` and `[policy_store]` (its data under `dir`), the proxy
/// trusting `oidc`.
pub(crate) fn gateway_toml(dir: &Path, ports: &Ports, oidc: &OidcIssuer) -> String {
    format!(
        r#"[proxy]
listen = "127.0.0.1:{proxy}"
policy_store = ["http://127.0.0.1:{store}"]
policy_store_token = "test-read-token"
hold_grace = "2s"

[proxy.oidc]
issuer = "{issuer}"
audience = "{aud}"

[approvals]
listen = "127.0.0.1:{approvals}"
admin_token = "test-admin-token"

[policy_store]
listen = "127.0.0.1:{store}"
data_dir = "{data}/policy-store"
admin_token = "test-store-admin-token"
read_token = "test-read-token"
"#,
        proxy = ports.proxy,
        store = ports.store,
        approvals = ports.approvals,
        issuer = oidc.issuer,
        aud = oidc.audience,
        data = dir.join("data").display(),
    )
}

/// Starts `airlock -c cfg ARGS` in `dir`, with the target's password in its environment.
pub(crate) fn spawn(dir: &Path, cfg: &Path, args: &[&str], name: &str) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.arg("-c")
        .arg(cfg)
        .args(args)
        .current_dir(dir)
        .env("SHOP_DB_PASSWORD", DB_PASSWORD)
        .env("RUST_LOG", "info");
    Proc::spawn(cmd, name).unwrap()
}

/// Run an admin command to completion.
pub(crate) fn airlock(dir: &Path, cfg: &Path, args: &[&str]) -> Output {
    Command::new(bin()).arg("-c").arg(cfg).args(args).current_dir(dir).output().unwrap()
}

/// `airlock policy apply -f file`, retried until the policy store takes it; its output.
pub(crate) fn apply_policy_file(dir: &Path, cfg: &Path, file: &Path) -> Output {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = airlock(dir, cfg, &["policy", "apply", "-f", file.to_str().unwrap()]);
        if o.status.success() {
            return o;
        }
        assert!(Instant::now() < deadline, "policy apply failed: {}", String::from_utf8_lossy(&o.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An agent's session through the proxy, and the notices it is sent.
pub(crate) struct Agent {
    pub(crate) client: tokio_postgres::Client,
    pub(crate) notices: mpsc::UnboundedReceiver<String>,
}

/// Log in as `agent` to `shop` through the proxy on `port`.
pub(crate) async fn connect(port: u16, password: &str) -> Result<Agent, tokio_postgres::Error> {
    let (client, mut conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("agent")
        .password(password)
        .dbname("shop")
        .connect_timeout(Duration::from_secs(10))
        .connect(NoTls)
        .await?;
    let (tx, notices) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let AsyncMessage::Notice(n) = m {
                let _ = tx.send(n.message().to_string());
            }
        }
    });
    Ok(Agent { client, notices })
}

/// Connect, retrying while the proxy is still receiving its first policy.
pub(crate) async fn connect_when_ready(port: u16, password: &str) -> Agent {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match connect(port, password).await {
            Ok(a) => return a,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot connect through the gateway: {e}"),
        }
    }
}
