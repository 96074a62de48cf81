//! Unmodified clients through the gateway: psql, pgbench in its three query modes, and psycopg 3
//! in simple and extended mode. The proxy runs in-process against a real PostgreSQL.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{DB_PASSWORD, Node, pg_bindir};

const KEY: &str = "ak_clients_tests_0123456789";

/// [`Node::no_ddl`], with pgbench's tables made directly on the target.
async fn gateway() -> Node {
    let g = Node::no_ddl(KEY).await;
    let out = Command::new(pg_bindir().join("pgbench"))
        .args([
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            "127.0.0.1",
            "-p",
            &g.pg.port.to_string(),
            "-U",
            "airlock_svc",
            "shop",
        ])
        .env("PGPASSWORD", DB_PASSWORD)
        .output()
        .unwrap();
    assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    g
}

fn dsn(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=agent password={KEY} dbname=shop sslmode=disable")
}

async fn run(cmd: &mut Command) -> std::process::Output {
    let mut cmd = std::mem::replace(cmd, Command::new("true"));
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_queries_and_sees_refusals() {
    let g = gateway().await;
    let out = run(Command::new(pg_bindir().join("psql")).args([
        &dsn(g.port),
        "-X",
        "-At",
        "-c",
        "SELECT item FROM orders",
        "-c",
        "\\copy (SELECT id FROM orders) TO STDOUT",
    ]))
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "apple\n1\n");
    let out =
        run(Command::new(pg_bindir().join("psql")).args([&dsn(g.port), "-X", "-c", "DROP TABLE orders"]))
            .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-ddl"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(g.pg.psql("shop", "SELECT count(*) FROM orders").unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_in_simple_extended_and_prepared_modes() {
    let g = gateway().await;
    for mode in ["simple", "extended", "prepared"] {
        for select_only in [true, false] {
            let mut args = vec!["-n", "-M", mode, "-c", "2", "-j", "1", "-t", "50"];
            if select_only {
                args.push("-S");
            }
            let out = run(Command::new("timeout")
                .arg("30")
                .arg(pg_bindir().join("pgbench"))
                .args(&args)
                .args(["-h", "127.0.0.1", "-p", &g.port.to_string(), "-U", "agent", "shop"])
                .env("PGPASSWORD", KEY))
            .await;
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("number of failed transactions: 0"),
                "pgbench -M {mode} (select only: {select_only}): {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains("number of transactions actually processed: 100/100"), "{stdout}");
        }
    }
    // The TPC-B-like runs wrote through the gateway.
    assert_eq!(g.pg.psql("shop", "SELECT count(*) >= 300 FROM pgbench_history").unwrap(), "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_works_in_simple_and_extended_mode() {
    let g = gateway().await;
    let script = r#"
import sys, psycopg
dsn = sys.argv[1]
with psycopg.connect(dsn, autocommit=True) as conn:
    # Extended protocol with server-side parameters (psycopg's default cursor).
    assert conn.execute("SELECT item FROM orders WHERE id = %s", (1,)).fetchone() == ("apple",)
    # Prepared statements (prepare at once).
    for _ in range(3):
        assert conn.execute("SELECT count(*) FROM orders WHERE id > %s", (0,), prepare=True).fetchone() == (1,)
    # Simple protocol: client-side binding.
    cur = psycopg.ClientCursor(conn)
    cur.execute("SELECT %s::text, %s::int", ("it's", 7))
    assert cur.fetchone() == ("it's", 7)
    # A transaction with a refused statement fails as PostgreSQL would.
    try:
        with conn.transaction():
            conn.execute("INSERT INTO orders VALUES (%s, %s)", (2, "pear"))
            conn.execute("DROP TABLE orders")
    except psycopg.errors.InsufficientPrivilege as e:
        assert "no-ddl" in str(e), e
    else:
        raise AssertionError("DROP was not refused")
    # COPY in both directions.
    with conn.cursor().copy("COPY orders (id, item) FROM STDIN") as copy:
        copy.write_row((3, "plum"))
    with conn.cursor().copy("COPY (SELECT item FROM orders ORDER BY id) TO STDOUT") as copy:
        rows = [bytes(r) for r in copy]
    assert b"".join(rows) == b"apple\nplum\n", rows
print("ok")
"#;
    let out = run(Command::new("python3").args(["-c", script, &dsn(g.port)])).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(g.pg.psql("shop", "SELECT string_agg(id::text, ',' ORDER BY id) FROM orders").unwrap(), "1,3");
}
