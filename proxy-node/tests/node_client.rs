//! node-postgres (`pg` 8.x), unmodified, through the gateway: the simple and extended protocols,
//! named statements, transactions and a refused statement. The script lives in `tests/node/`;
//! its dependencies are installed with `npm ci` from the committed lock file the first time.
//! The proxy runs in-process against a real PostgreSQL, as in `clients.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Node;

const KEY: &str = "ak_node_client_tests_0123456789";

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

    let g = Node::no_ddl(KEY).await;
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
