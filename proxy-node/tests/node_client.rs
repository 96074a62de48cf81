//! node-postgres (`pg` 8.x), unmodified, through the gateway: the simple and extended protocols,
//! named statements, transactions and a refused statement. The script lives in `tests/node/`;
//! its dependencies are installed with `npm ci` from the committed lock file the first time.
//! The proxy runs in-process against a real PostgreSQL, as in `clients.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use eventbus::EventBus;
use policy_store::client::ActivePolicy;
use testkit::Postgres;
use tokio::sync::watch;

const KEY: &str = "ak_node_client_tests_0123456789";
const DB_PASSWORD: &str = "svc-Pa55word";

struct Gateway {
    pg: Postgres,
    port: u16,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn gateway() -> Gateway {
    testkit::init_crypto();
    let _ = tracing_subscriber::fmt().with_env_filter("proxy_node=debug").with_test_writer().try_init();
    let pg = Postgres::start().unwrap();
    pg.psql("postgres", &format!("CREATE ROLE airlock_svc LOGIN PASSWORD '{DB_PASSWORD}'")).unwrap();
    pg.psql("postgres", "CREATE DATABASE shop OWNER airlock_svc").unwrap();
    pg.psql(
        "shop",
        "SET ROLE airlock_svc; CREATE TABLE orders (id int primary key, item text); \
         INSERT INTO orders VALUES (1, 'apple');",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, DB_PASSWORD).unwrap();
    let yaml = format!(
        r#"connections:
  - name: shop
    kind: postgres
    upstream: {{ host: 127.0.0.1, port: {port}, database: shop, tls: disable }}
    credentials: {{ user: airlock_svc, password_file: {pw} }}
rules:
  - name: no-ddl
    match: {{ operations: [create, drop, alter] }}
    action: deny
service_accounts:
  - {{ name: agent, groups: [agents], api_key_sha256: {hash} }}
"#,
        port = pg.port,
        pw = pw.display(),
        hash = proxy_node::identity::hash_api_key(KEY)
    );
    let doc = proto::policy::parse(&yaml).unwrap();
    let (tx, rx) =
        watch::channel(Some(Arc::new(ActivePolicy { version: 1, document: doc, digest: "t".into() })));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cfg = proxy_node::ProxyConfig {
        target_password_dir: Some(dir.path().display().to_string()),
        ..Default::default()
    };
    tokio::spawn(async move {
        let _keep = tx;
        proxy_node::run(cfg, EventBus::memory(), rx, listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Gateway { pg, port, _dir: dir, _stop: stop }
}

fn script_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// `npm ci` from the lock file, unless `node_modules` is already there.
fn install(dir: &Path) {
    if dir.join("node_modules/pg/package.json").exists() {
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("running npm (install Node.js and npm, e.g. `apt-get install nodejs npm`): {e}")
        });
    assert!(
        out.status.success(),
        "npm ci in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_works_through_the_gateway() {
    let node = Command::new("node").arg("--version").output().unwrap_or_else(|e| {
        panic!("node is not installed (scripts/test.sh installs it; or `apt-get install nodejs npm`): {e}")
    });
    assert!(node.status.success(), "node --version failed");
    let dir = script_dir();
    tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || install(&dir)
    })
    .await
    .unwrap();

    let g = gateway().await;
    let mut cmd = Command::new("timeout");
    cmd.args(["60", "node", "client.js"])
        .current_dir(&dir)
        .env("AIRLOCK_PGHOST", "127.0.0.1")
        .env("AIRLOCK_PGPORT", g.port.to_string())
        .env("AIRLOCK_PGUSER", "agent")
        .env("AIRLOCK_PGPASSWORD", KEY)
        .env("AIRLOCK_PGDATABASE", "shop");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "node client.js: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value =
        serde_json::from_str(stdout.trim()).expect("the script prints one JSON object");

    assert_eq!(got["simple"], serde_json::json!(["apple"]), "{got}");
    assert_eq!(got["parameterized"], serde_json::json!([{ "item": "apple", "next": 2 }]), "{got}");
    assert_eq!(got["named"], serde_json::json!(["apple", "apple"]), "{got}");
    assert_eq!(got["transaction"]["countInside"], 2, "{got}");
    assert_eq!(got["denied"]["code"], "42501", "{got}");
    assert!(got["denied"]["message"].as_str().is_some_and(|m| m.contains("no-ddl")), "{got}");
    assert_eq!(got["deniedExtended"]["code"], "42501", "{got}");
    // The committed insert is there, the rolled-back one is not, and nothing was dropped.
    assert_eq!(got["afterDenied"], 2, "{got}");
    assert_eq!(
        g.pg.psql("shop", "SELECT string_agg(item, ',' ORDER BY id) FROM orders").unwrap(),
        "apple,pear"
    );
    assert_eq!(g.pg.psql("shop", "SELECT count(*) FROM pg_class WHERE relname = 'stolen'").unwrap(), "0");
}
