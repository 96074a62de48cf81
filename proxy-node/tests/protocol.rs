//! The proxy against a real PostgreSQL with real clients: the extended protocol, pipelining,
//! transactions, prepared statements, COPY, cancel, and bad input. The proxy runs in-process on
//! the in-memory event bus; holds are decided by publishing decisions as the approval service
//! would.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Holds, Node, ORDERS_AND_PAYMENTS, sqlstate};
use eventbus::EventBus;
use futures::SinkExt;
use proto::events::{Envelope, Event, HoldOutcome};
use testkit::Postgres;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{NoTls, SimpleQueryMessage};

const KEY: &str = "ak_protocol_tests_0123456789";
/// The proxy's `auth_timeout` in these tests.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// The node, the hold requests it publishes, and where it reaches the target.
struct Harness {
    node: Node,
    holds: Holds,
    /// `upstream.host`: 127.0.0.1, or the directory of the target's Unix-domain socket.
    upstream_host: String,
}

common::deref_to_node!(Harness);

fn policy(host: &str, pg_port: u16, pw_file: &str, rules: &str) -> String {
    common::agent_policy(host, pg_port, pw_file, rules, KEY)
}

async fn start(rules: &str) -> Harness {
    start_on(rules, false).await
}

/// The harness, with the proxy reaching PostgreSQL through its Unix-domain socket when
/// `unix_socket`, else over TCP.
async fn start_on(rules: &str, unix_socket: bool) -> Harness {
    common::init_tracing("proxy_node=debug");
    let cfg = proxy_node::ProxyConfig {
        hold_grace: Duration::from_secs(1),
        // Long enough for any client to log in on a loaded machine.
        auth_timeout: AUTH_TIMEOUT,
        ..Default::default()
    };
    let host = |pg: &Postgres| {
        if unix_socket { pg.socket_dir().display().to_string() } else { "127.0.0.1".to_string() }
    };
    let node = Node::start(ORDERS_AND_PAYMENTS, cfg, EventBus::memory(), |pg, pw| {
        policy(&host(pg), pg.port, pw, rules)
    })
    .await;
    let holds = Holds::subscribe(&node.bus).await;
    let upstream_host = host(&node.pg);
    Harness { node, holds, upstream_host }
}

impl Harness {
    async fn connect(&self) -> tokio_postgres::Client {
        self.connect_as("agent", KEY).await
    }

    /// Polls `sql` on the target (directly, not through the proxy) until it returns `want`;
    /// panics saying `what` did not happen after 15 s.
    async fn wait_for(&self, sql: &str, want: &str, what: &str) {
        common::wait_for_target(&self.pg, sql, want, Duration::from_secs(15), what).await;
    }

    /// Replace the proxy's policy with `rules`, as version `version`.
    fn apply(&self, version: u64, rules: &str) {
        self.apply_yaml(version, &policy(&self.upstream_host, self.pg.port, &self.pw_file, rules));
    }
}

const RULES: &str = r#"  - name: order-deletes-held
    match: { operations: [delete], tables: [orders] }
    action: hold
    timeout: 30s
  - name: no-ddl
    match: { operations: [create, drop, alter] }
    action: deny
  - name: payments-read-only
    match: { operations: [insert, update, delete, copy, truncate], tables: [payments] }
    action: deny
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_with_text_binary_named_and_pipelined_statements() {
    let h = start(RULES).await;
    let c = h.connect().await;
    // tokio-postgres sends parameters in binary and prepares named statements.
    let rows = c.query("SELECT id, item FROM orders WHERE id >= $1 ORDER BY id", &[&2i32]).await.unwrap();
    let got: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![(2, "pear".into()), (3, "plum".into())]);
    let stmt = c.prepare("SELECT item FROM orders WHERE id = $1").await.unwrap();
    for (id, item) in [(1, "apple"), (3, "plum")] {
        let r = c.query_one(&stmt, &[&id]).await.unwrap();
        assert_eq!(r.get::<_, String>(0), item);
    }
    // Several queries in flight at once are pipelined on one connection.
    let (a, b, d) = tokio::join!(
        c.query_one("SELECT count(*) FROM orders", &[]),
        c.query_one("SELECT $1::text", &[&"text param"]),
        c.query_one("SELECT amount FROM payments WHERE id = $1", &[&1i32]),
    );
    assert_eq!(a.unwrap().get::<_, i64>(0), 3);
    assert_eq!(b.unwrap().get::<_, String>(0), "text param");
    assert_eq!(d.unwrap().get::<_, i32>(0), 10);
    // NULL parameters and an empty result.
    let none: Option<i32> = None;
    assert!(c.query("SELECT id FROM orders WHERE id = $1", &[&none]).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_parse_fails_like_the_server_and_the_connection_goes_on() {
    let h = start(RULES).await;
    let c = h.connect().await;
    let e = c.query("CREATE TABLE stolen AS SELECT * FROM orders", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let e = c.execute("INSERT INTO payments VALUES ($1, $2)", &[&9i32, &1i32]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    // The next statements on the same connection work.
    assert_eq!(c.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0), 3);
    assert_eq!(h.sql("SELECT count(*) FROM pg_tables WHERE tablename = 'stolen'"), "0");
    assert_eq!(h.sql("SELECT count(*) FROM payments"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_execute_binds_its_parameters_and_runs_only_when_approved() {
    let mut h = start(RULES).await;
    let c = Arc::new(h.connect().await);
    let c2 = c.clone();
    let del = tokio::spawn(async move { c2.execute("DELETE FROM orders WHERE id = $1", &[&1i32]).await });
    let req = h.holds.decide(HoldOutcome::Approved).await;
    assert_eq!(req.statement, "DELETE FROM orders WHERE id = $1");
    assert_eq!(req.parameters, vec![Some("\\x00000001".to_string())], "binary int4 parameter");
    assert_eq!(del.await.unwrap().unwrap(), 1);
    assert_eq!(h.sql("SELECT count(*) FROM orders WHERE id = 1"), "0");

    let c2 = c.clone();
    let del = tokio::spawn(async move { c2.execute("DELETE FROM orders WHERE id = $1", &[&2i32]).await });
    h.holds.decide(HoldOutcome::Denied).await;
    assert_eq!(sqlstate(&del.await.unwrap().unwrap_err()), "42501");
    assert_eq!(h.sql("SELECT count(*) FROM orders WHERE id = 2"), "1");
    // Same statement text, other parameters: a new hold, not the old approval.
    let c2 = c.clone();
    let del = tokio::spawn(async move { c2.execute("DELETE FROM orders WHERE id = $1", &[&3i32]).await });
    let req = h.holds.decide(HoldOutcome::Denied).await;
    assert_eq!(req.parameters, vec![Some("\\x00000003".to_string())]);
    assert!(del.await.unwrap().is_err());
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_inside_a_transaction_fails_it_like_postgres_does() {
    let h = start(RULES).await;
    let c = h.connect().await;
    c.simple_query("BEGIN").await.unwrap();
    c.simple_query("INSERT INTO orders VALUES (10, 'fig')").await.unwrap();
    let e = c.simple_query("DROP TABLE orders").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02", "the transaction is aborted on the target too");
    let msgs = c.simple_query("COMMIT").await.unwrap();
    let tag = msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert!(tag.is_some());
    assert_eq!(h.sql("SELECT count(*) FROM orders WHERE id = 10"), "0", "COMMIT rolled back");
    // Extended protocol inside a transaction block behaves the same.
    let mut c = h.connect().await;
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO orders VALUES ($1, 'kiwi')", &[&11i32]).await.unwrap();
    assert_eq!(sqlstate(&tx.execute("INSERT INTO payments VALUES (5, 5)", &[]).await.unwrap_err()), "42501");
    // COMMIT of a failed transaction is a ROLLBACK, as in PostgreSQL.
    let _ = tx.commit().await;
    assert_eq!(h.sql("SELECT count(*) FROM orders WHERE id = 11"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_and_execute_cannot_launder_a_write() {
    let mut h = start(RULES).await;
    let c = Arc::new(h.connect().await);
    // The PREPARE of a held write is itself held: approve it, so the target has it.
    let c2 = c.clone();
    let prep =
        tokio::spawn(
            async move { c2.simple_query("PREPARE p(int) AS DELETE FROM orders WHERE id = $1").await },
        );
    h.holds.decide(HoldOutcome::Approved).await;
    prep.await.unwrap().unwrap();
    // A PREPARE that fails on the target (the name exists) must not rename what p runs.
    assert!(c.simple_query("PREPARE p(int) AS SELECT $1").await.is_err());
    // tokio-postgres returns the error before the ReadyForQuery after it: until the proxy has
    // that too, `p` may be what the failed PREPARE made it (of unknown effect). A round trip
    // makes sure it has.
    c.simple_query("SELECT 1").await.unwrap();
    // EXECUTE p runs the DELETE: it is held again, and denied here.
    let c2 = c.clone();
    let exec = tokio::spawn(async move { c2.simple_query("EXECUTE p(1)").await });
    let req = h.holds.decide(HoldOutcome::Denied).await;
    assert_eq!(req.statement, "EXECUTE p(1)");
    assert!(exec.await.unwrap().is_err());
    assert_eq!(h.sql("SELECT count(*) FROM orders WHERE id = 1"), "1");
    // A protocol-level named statement is in the same namespace as SQL PREPARE.
    {
        use testkit::pgwire::{contains, parse, query, read_until, read_until_ready, sync};
        let mut raw = testkit::pgwire::connect(h.port, "agent", "shop", KEY).await;
        raw.write_all(&[parse("w2", "DELETE FROM orders WHERE id = 2"), sync()].concat()).await.unwrap();
        read_until_ready(&mut raw).await;
        raw.write_all(&query("EXECUTE w2")).await.unwrap();
        let req = h.holds.decide(HoldOutcome::Denied).await;
        assert_eq!((req.statement.as_str(), req.rule.as_str()), ("EXECUTE w2", "order-deletes-held"));
        let seen = read_until(&mut raw, b'Z').await;
        assert!(contains(&seen, "42501"), "{}", String::from_utf8_lossy(&seen));
    }
    assert_eq!(h.sql("SELECT count(*) FROM orders WHERE id = 2"), "1");
    // Unknown names take unknown_operation (deny by default).
    let e = c.simple_query("EXECUTE nosuch").await.expect_err("unknown");
    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(message.contains("defaults.unknown_operation"), "{e:?}");
    // DEALLOCATE and PREPARE sent through the extended protocol change what the name runs
    // too: an approved PREPARE of a DELETE does not run as the SELECT the name once was.
    let fresh = Arc::new(h.connect().await);
    fresh.simple_query("PREPARE q AS SELECT 1").await.unwrap();
    fresh.execute("DEALLOCATE q", &[]).await.unwrap();
    let c2 = fresh.clone();
    let prep =
        tokio::spawn(async move { c2.execute("PREPARE q AS DELETE FROM orders WHERE id = 3", &[]).await });
    h.holds.decide(HoldOutcome::Approved).await;
    prep.await.unwrap().unwrap();
    fresh.simple_query("SELECT 1").await.unwrap();
    let c2 = fresh.clone();
    let exec = tokio::spawn(async move { c2.simple_query("EXECUTE q").await });
    let req = h.holds.decide(HoldOutcome::Denied).await;
    assert_eq!(req.statement, "EXECUTE q");
    assert!(exec.await.unwrap().is_err());
    assert_eq!(h.sql("SELECT count(*) FROM orders WHERE id = 3"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_are_relayed_and_decided() {
    let h = start(RULES).await;
    let c = h.connect().await;
    let sink = c.copy_in("COPY orders (id, item) FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"20\tmango\n21\tlime\n")).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    assert_eq!(h.sql("SELECT count(*) FROM orders WHERE id IN (20, 21)"), "2");
    let out = c.copy_out("COPY (SELECT item FROM orders WHERE id = 20) TO STDOUT").await.unwrap();
    let data: Vec<bytes::Bytes> = futures::TryStreamExt::try_collect(out).await.unwrap();
    assert_eq!(data.concat(), b"mango\n");
    let e = c.copy_in::<_, bytes::Bytes>("COPY payments FROM STDIN").await.err().expect("denied");
    assert_eq!(sqlstate(&e), "42501");
    assert_eq!(c.query_one("SELECT 1::int", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_reach_the_right_backend() {
    let h = start(RULES).await;
    common::cancel_a_long_query(&h.pg, h.connect().await, NoTls).await;
}

/// `upstream.host` as a socket directory: sessions, the catalog side connection (a function
/// lookup) and cancel requests all go through the target's Unix-domain socket, and policy is
/// enforced exactly as over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_on_a_unix_socket_is_served_cancelled_and_guarded() {
    let h = start_on(RULES, true).await;
    let c = h.connect().await;
    // The target sees a Unix-socket client: no server address.
    let row = c.query_one("SELECT inet_server_addr() IS NULL, count(*) FROM orders", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0), "the session did not come through the socket");
    assert_eq!(row.get::<_, i64>(1), 3);
    h.pg.psql(
        "shop",
        "CREATE FUNCTION shout(t text) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT upper(t)'",
    )
    .unwrap();
    let row = c.query_one("SELECT shout(item) FROM orders WHERE id = $1", &[&1i32]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "APPLE");
    let e = c.batch_execute("DROP TABLE payments").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    assert_eq!(h.sql("SELECT count(*) FROM payments"), "1");
    let sockets = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'airlock_svc' AND client_port = -1";
    assert_ne!(h.sql(sockets), "0", "no target session on the socket");
    common::cancel_a_long_query(&h.pg, c, NoTls).await;
}

/// The proxy's own SCRAM-SHA-256 client logs in to a real PostgreSQL: again and again (its
/// salted password kept), with a password SASLprep changes (the server prepared it the same way
/// when it stored it), and not with a wrong password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_to_the_target_prepares_the_password_and_fails_with_a_wrong_one() {
    let h = start(RULES).await;
    // A no-break space (SASLprep: a space) and a soft hyphen (SASLprep: nothing).
    let stored = "p\u{e4}ss\u{a0}word\u{ad}";
    h.pg.psql("postgres", &format!("CREATE ROLE scram_user LOGIN PASSWORD '{stored}'")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let doc = proto::policy::parse(&policy("127.0.0.1", h.pg.port, "/unused", RULES)).unwrap();
    let connect = async |password: &str| {
        let file = dir.path().join("pw");
        std::fs::write(&file, password).unwrap();
        let mut c = doc.connections[0].clone();
        c.credentials.user = "scram_user".into();
        c.credentials.password_file = Some(file.display().to_string());
        let sources =
            proxy_node::upstream::PasswordSources { dir: Some(dir.path().into()), ..Default::default() };
        proxy_node::upstream::connect(&c, &[], Duration::from_secs(10), 1 << 20, false, &sources).await
    };
    for password in [stored, stored, "p\u{e4}ss word"] {
        let up = connect(password).await.unwrap_or_else(|e| panic!("{password:?}: {e}"));
        assert!(up.backend_key.is_some(), "{password:?}: no session");
    }
    for wrong in ["p\u{e4}ssword", "pass word", ""] {
        match connect(wrong).await {
            Err(proxy_node::upstream::UpstreamError::Rejected { code, .. }) => {
                assert_eq!(code, "28P01", "{wrong:?}")
            }
            Err(e) => panic!("{wrong:?}: {e}"),
            Ok(_) => panic!("{wrong:?} logged in"),
        }
    }
}

/// A statement too large for approvers to be sent whole (a hold's record may take an eighth of
/// a bus event) is refused, not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_too_large_to_hold_is_refused() {
    let h = start(RULES).await;
    let c = h.connect().await;
    let padding = "x".repeat(200_000);
    let sql = format!("DELETE FROM orders WHERE id = 3 /* {padding} */");
    let e = tokio::time::timeout(Duration::from_secs(10), c.simple_query(&sql))
        .await
        .expect("held instead of refused")
        .expect_err("ran");
    assert_eq!(sqlstate(&e), "42501");
    let why = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(why.contains("held for approval, but"), "{why}");
    assert_eq!(h.sql("SELECT count(*) FROM orders WHERE id = 3"), "1");
}

/// Catalog lookups borrow side connections from the node: sessions one after another reuse
/// one target backend for them instead of opening (and authenticating) one each, and a pooled
/// connection the target closed meanwhile is replaced, not turned into a failed lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_share_catalog_connections_and_survive_one_being_closed() {
    let h = start(RULES).await;
    h.pg.psql(
        "shop",
        "CREATE FUNCTION shout(t text) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT upper(t)'",
    )
    .unwrap();
    let catalog_pids = format!(
        "SELECT coalesce(string_agg(pid::text, ',' ORDER BY pid), '') FROM pg_stat_activity \
         WHERE usename = 'airlock_svc' AND application_name = '{}'",
        proxy_node::catalog::APPLICATION_NAME
    );
    // The function is served only if the catalog says it is immutable (otherwise: an unknown
    // effect, held for approval).
    let shout = async |c: &tokio_postgres::Client| {
        let q = c.query_one("SELECT shout(item) FROM orders WHERE id = 1", &[]);
        let row =
            tokio::time::timeout(Duration::from_secs(10), q).await.expect("held: no catalog answer").unwrap();
        assert_eq!(row.get::<_, String>(0), "APPLE");
    };
    let mut first = String::new();
    for i in 0..4 {
        let c = h.connect().await;
        shout(&c).await;
        let pids = h.sql(&catalog_pids);
        assert_eq!(pids.split(',').count(), 1, "session {i}: catalog backends {pids:?}");
        if i == 0 {
            first = pids;
        } else {
            assert_eq!(pids, first, "session {i} opened a catalog connection of its own");
        }
    }
    // The target ends the idle catalog backend; the next lookup opens a new one.
    h.sql(&format!("SELECT pg_terminate_backend({first})"));
    h.wait_for(&catalog_pids, "", "the catalog backend to end").await;
    let c = h.connect().await;
    shout(&c).await;
    let pids = h.sql(&catalog_pids);
    assert!(!pids.is_empty() && pids != first, "catalog backends after the restart: {pids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_huge_messages_close_only_their_own_session() {
    let h = start(RULES).await;
    let good = h.connect().await;
    for garbage in [
        // A startup packet with a nonsense length.
        vec![0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0],
        // A startup packet with an unterminated parameter.
        vec![0, 0, 0, 12, 0, 3, 0, 0, b'u', b's', b'e', b'r'],
        // An SSL request, then a protocol version that does not exist.
        vec![0, 0, 0, 8, 4, 210, 22, 47, 0, 0, 0, 8, 0, 9, 0, 0],
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
        s.write_all(&garbage).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.unwrap();
    }
    // A client that connects and says nothing is dropped after auth_timeout.
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(AUTH_TIMEOUT * 2, idle.read_to_end(&mut buf))
        .await
        .expect("idle client dropped")
        .unwrap();
    // A client not yet authenticated whose password message claims 1 MiB: refused at once.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    let startup = [&[0u8, 0, 0, 23, 0, 3, 0, 0][..], b"user\0agent\0\0"].concat();
    let startup = [&((startup.len() as u32).to_be_bytes())[..], &startup[4..]].concat();
    s.write_all(&startup).await.unwrap();
    s.write_all(&[b'p', 0, 0x10, 0, 0]).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.contains("08P01") && text.contains("exceeds"), "{text}");
    // An authenticated session that sends a message claiming to be 1 GiB.
    let mut s = testkit::pgwire::connect(h.port, "agent", "shop", KEY).await;
    s.write_all(&[b'Q', 0x40, 0, 0, 0]).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.contains("08P01") && text.contains("exceeds"), "{text}");
    // The well-behaved session is unaffected.
    assert_eq!(good.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0), 3);
}

/// Every trick an agent might use to write to `orders` while the policy forbids it. Each must
/// be refused by the gateway itself (42501), and the target must be unchanged afterwards.
const BYPASSES: &[&str] = &[
    // Writes hidden in a CTE, EXPLAIN ANALYZE, PREPARE.
    "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
    "WITH u AS (UPDATE orders SET item = 'x' RETURNING 1) SELECT count(*) FROM u",
    "EXPLAIN ANALYZE DELETE FROM orders",
    "EXPLAIN (ANALYZE, FORMAT JSON) UPDATE orders SET item = 'x'",
    "PREPARE p1 AS DELETE FROM orders",
    // New tables from queries.
    "SELECT * INTO stolen FROM orders",
    "CREATE TABLE stolen AS SELECT * FROM orders",
    "CREATE TEMP TABLE stolen AS SELECT * FROM orders",
    // MERGE and upserts.
    "MERGE INTO orders o USING (SELECT 1 AS id) s ON o.id = s.id WHEN MATCHED THEN DELETE",
    "INSERT INTO orders VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET item = 'pwned'",
    "INSERT INTO orders SELECT id + 100, item FROM orders",
    // COPY, DO, CALL and functions.
    "COPY orders FROM STDIN",
    "DO $$ BEGIN DELETE FROM orders; END $$",
    "CALL wipe_orders()",
    "SELECT wipe_orders_fn()",
    "SELECT * FROM wipe_orders_fn()",
    "SELECT pg_catalog.set_config('default_transaction_read_only', 'off', false)",
    "SELECT lo_import('/etc/passwd')",
    "SELECT pg_read_file('/etc/passwd')",
    // Case, quoting, schemas, comments, several statements.
    "select 1; DELETE FROM orders",
    "/* hello */ DeLeTe /* x */ FROM \"orders\"",
    "DELETE FROM public.orders",
    "DELETE FROM \"public\".\"orders\"",
    "DELETE -- a line comment\r FROM orders",
    "DELETE /* nested /* comment */ still */ FROM orders",
    "UPDATE orders SET item = $$'; --$$ WHERE true",
    "TRUNCATE orders",
    "TRUNCATE TABLE ONLY public.orders CASCADE",
    "ALTER TABLE orders RENAME TO orders_gone",
    "DROP TABLE orders",
    "GRANT ALL ON orders TO PUBLIC",
    // Strings the gateway must read exactly as the server does.
    "SELECT 'a\\'; DELETE FROM orders; --'",
    "SELECT E'\\''; DELETE FROM orders; --'",
    "SELECT $a$ $$ ; $a$; DELETE FROM orders",
    "DELETE FROM U&\"ord\\0065rs\"",
    "DELETE FROM U&\"ord!0065rs\" UESCAPE '!'",
    // Session state that widens rights.
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION postgres",
    "RESET ALL",
    "BEGIN READ WRITE",
    "SET default_transaction_read_only = off",
    // Operators that run into comments: the server reads `?` or `>` and a comment, the parser
    // an operator and a string that hides what follows.
    "SELECT '{}'::jsonb ?-- '\nversion(); DELETE FROM orders; --'",
    "SELECT id FROM orders ORDER BY id USING >/*, '*/; DELETE FROM orders; --'",
    "SELECT '{}'::jsonb ?-- '\nwipe_orders_fn()::text --'",
    // The parser takes the lines after `COPY … FROM STDIN;` as data; the server runs them.
    "COPY payments FROM STDIN;\nDELETE FROM orders;",
    // Calls the parser gives nodes of their own, resolved by search_path: the user's wins.
    "SELECT ceil(1)",
    "SELECT floor(2)",
    "SELECT substring(1, 2)",
];

const DENY_ORDER_WRITES: &str = r#"  - name: orders-are-read-only
    match: { operations: [insert, update, delete, merge, truncate, create, drop, alter, grant, revoke, copy, call, do, escalate], tables: [orders] }
    action: deny
  - name: no-ddl
    match: { operations: [create, drop, alter, grant, revoke, escalate] }
    action: deny
"#;

/// The harness under [`DENY_ORDER_WRITES`], where nothing waits for a human
/// (`unknown_operation: deny`).
async fn start_guarded() -> Harness {
    start(&format!("{DENY_ORDER_WRITES}defaults: {{ unknown_operation: deny }}\n")).await
}

fn snapshot(h: &Harness) -> String {
    h.sql(
        "SELECT (SELECT string_agg(id || ':' || item, ',' ORDER BY id) FROM orders) || ' | ' || \
         (SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_class c \
          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast'))",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_bypass_reaches_the_target() {
    let h = start_guarded().await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE PROCEDURE wipe_orders() LANGUAGE sql AS 'DELETE FROM orders'; \
         CREATE FUNCTION wipe_orders_fn() RETURNS int LANGUAGE sql AS 'DELETE FROM orders RETURNING 1'; \
         CREATE FUNCTION order_count() RETURNS bigint STABLE LANGUAGE sql AS 'SELECT count(*) FROM orders'; \
         CREATE FUNCTION public.ceil(int) RETURNS int LANGUAGE sql AS 'DELETE FROM orders RETURNING 1'; \
         CREATE FUNCTION public.floor(int) RETURNS int LANGUAGE sql AS 'DELETE FROM orders RETURNING 1'; \
         CREATE FUNCTION public.substring(int, int) RETURNS int LANGUAGE sql AS 'DELETE FROM orders RETURNING 1';",
    )
    .unwrap();
    let before = snapshot(&h);
    let c = h.connect().await;
    for sql in BYPASSES {
        let simple = tokio::time::timeout(Duration::from_secs(5), c.simple_query(sql)).await;
        let refused = matches!(&simple, Ok(Err(e)) if sqlstate(e) == "42501");
        assert!(refused, "simple protocol let through {sql:?}: {simple:?}");
        // The extended protocol (where a single statement is allowed).
        if !sql.contains(';') || sql.starts_with("DO") {
            let ext = tokio::time::timeout(Duration::from_secs(5), c.query(*sql, &[])).await;
            let refused = matches!(&ext, Ok(Err(e)) if sqlstate(e) == "42501");
            assert!(refused, "extended protocol let through {sql:?}: {ext:?}");
        }
        // The connection stays usable after every refusal.
        c.simple_query("ROLLBACK").await.unwrap();
    }
    assert_eq!(snapshot(&h), before, "the target changed");
    // A stable user function is judged read-only by its volatility in pg_proc.
    assert_eq!(c.query_one("SELECT order_count()", &[]).await.unwrap().get::<_, i64>(0), 3);
    // Reads still work.
    assert_eq!(c.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0), 3);
}

/// Writes to orders denied, DDL allowed, and whatever has an unknown effect denied (so nothing
/// waits for a human).
const WRITES_DENIED_DDL_ALLOWED: &str = r#"  - name: orders-are-read-only
    match: { operations: [insert, update, delete, merge, truncate], tables: [orders] }
    action: deny
defaults: { unknown_operation: deny }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_made_volatile_in_the_session_ends_the_reads_that_call_it() {
    // The session repeats a statement whose function the catalog judged read-only (it keeps
    // that resolution and its verdict), then makes the function volatile itself.
    let h = start(WRITES_DENIED_DDL_ALLOWED).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE FUNCTION order_count() RETURNS bigint STABLE LANGUAGE sql AS 'SELECT count(*) FROM orders';",
    )
    .unwrap();
    let c = h.connect().await;
    for _ in 0..3 {
        assert_eq!(c.query_one("SELECT order_count()", &[]).await.unwrap().get::<_, i64>(0), 3);
        let rows = c.simple_query("SELECT order_count()").await.unwrap();
        assert!(rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("3"))));
    }
    c.simple_query("ALTER FUNCTION order_count() VOLATILE").await.unwrap();
    let e = c.query_one("SELECT order_count()", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "extended: {e}");
    let e = c.simple_query("SELECT order_count()").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "simple: {e}");
    // And back: read-only again, allowed again.
    c.simple_query("ALTER FUNCTION order_count() STABLE").await.unwrap();
    assert_eq!(c.query_one("SELECT order_count()", &[]).await.unwrap().get::<_, i64>(0), 3);
}

/// With DDL allowed, a view the session creates where the catalog's side connection cannot see
/// it (temporary, or in the session's open transaction) is of unknown effect when read: its
/// definition may call a function the session then made volatile and writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_view_the_catalog_cannot_see_is_of_unknown_effect() {
    let h = start(WRITES_DENIED_DDL_ALLOWED).await;
    let c = h.connect().await;
    for sql in [
        "CREATE FUNCTION quiet() RETURNS int STABLE LANGUAGE sql AS 'SELECT 1'",
        "CREATE TEMP VIEW tv AS SELECT quiet() AS n",
        "CREATE OR REPLACE FUNCTION quiet() RETURNS int VOLATILE LANGUAGE sql AS 'DELETE FROM orders RETURNING 1'",
    ] {
        c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    for read in ["SELECT * FROM tv", "SELECT * FROM pg_temp.tv"] {
        let e = c.simple_query(read).await.expect_err(read);
        assert_eq!(sqlstate(&e), "42501", "{read}: {e}");
    }
    for sql in [
        "CREATE FUNCTION calm() RETURNS int STABLE LANGUAGE sql AS 'SELECT 1'",
        "BEGIN",
        "CREATE VIEW uncommitted AS SELECT calm() AS n",
        "CREATE OR REPLACE FUNCTION calm() RETURNS int VOLATILE LANGUAGE sql AS 'DELETE FROM orders RETURNING 1'",
    ] {
        c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let e = c.simple_query("SELECT * FROM uncommitted").await.expect_err("uncommitted view");
    assert_eq!(sqlstate(&e), "42501", "{e}");
    c.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "a view wrote through the gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_that_may_not_write_gets_a_read_only_target_session() {
    // Writes are denied everywhere, but unknown effects are (carelessly) allowed.
    let rules = r#"  - name: agents-never-write
    principals: { groups: [agents] }
    match: { operations: [insert, update, delete, merge, truncate, create, drop, alter, grant, revoke, copy, call, do] }
    action: deny
defaults: { unknown_operation: allow }
"#;
    let h = start(rules).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; CREATE FUNCTION wipe_orders_fn() RETURNS int LANGUAGE sql AS 'DELETE FROM orders RETURNING 1';",
    )
    .unwrap();
    let c = h.connect().await;
    // The function's write slips past the classifier, and the target refuses it.
    let e = c.simple_query("SELECT wipe_orders_fn()").await.unwrap_err();
    assert_eq!(sqlstate(&e), "25006", "read_only_sql_transaction");
    // Undoing read-only is refused by the gateway.
    for sql in
        ["SET default_transaction_read_only = off", "BEGIN READ WRITE", "RESET ALL", "SET ROLE postgres"]
    {
        let e = c.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "{sql}");
        c.simple_query("ROLLBACK").await.unwrap();
    }
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3");
    assert_eq!(c.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_query_releases_its_target_backend() {
    let h = start(RULES).await;
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(h.port)
        .user("agent")
        .password(KEY)
        .dbname("shop")
        .connect(NoTls)
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60)%'";
    let q = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    h.wait_for(running, "1", "query never started").await;
    // The client vanishes (its socket closes).
    conn_task.abort();
    q.abort();
    h.wait_for(running, "0", "the target kept running the abandoned query").await;
}

/// Sessions keep the verdicts of statements they repeat: a new policy must still decide the
/// next statement of a session that is already open, in both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_policy_decides_the_next_statement_of_an_open_session() {
    let reads = |action: &str| {
        format!(
            "  - name: order-reads\n    match: {{ operations: [select], tables: [orders] }}\n    action: {action}\n"
        )
    };
    let h = start(&reads("allow")).await;
    let c = h.connect().await;
    for id in 1..=3 {
        let rows = c.query("SELECT item FROM orders WHERE id = $1", &[&id]).await.unwrap();
        assert_eq!(rows.len(), 1);
        c.simple_query(&format!("SELECT item FROM orders WHERE id = {id}")).await.unwrap();
    }
    h.apply(2, &reads("deny"));
    let e = c.query("SELECT item FROM orders WHERE id = $1", &[&1i32]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    let e = c.simple_query("SELECT item FROM orders WHERE id = 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    // And back: the denials were not kept either.
    h.apply(3, &reads("allow"));
    assert_eq!(c.query("SELECT item FROM orders WHERE id = $1", &[&2i32]).await.unwrap().len(), 1);
    c.simple_query("SELECT item FROM orders WHERE id = 2").await.unwrap();
}

/// An allow rule naming a schema stops matching unqualified names once the session may have
/// changed `search_path`, even for a statement the session ran (and had allowed) before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touching_search_path_ends_schema_allow_rules_for_repeated_statements_too() {
    let rules = "  - name: public-order-reads\n    match: { operations: [select], tables: [public.orders] }\n    action: allow\n\
                 defaults: { no_match: deny }\n";
    let h = start(rules).await;
    let c = h.connect().await;
    for _ in 0..2 {
        c.simple_query("SELECT item FROM orders WHERE id = 1").await.unwrap();
        assert_eq!(c.query("SELECT item FROM orders WHERE id = $1", &[&1i32]).await.unwrap().len(), 1);
    }
    // Denied (no rule allows SET), but the gateway can no longer be sure where `orders` resolves.
    c.simple_query("SET search_path TO public").await.unwrap_err();
    let e = c.simple_query("SELECT item FROM orders WHERE id = 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    let e = c.query("SELECT item FROM orders WHERE id = $1", &[&1i32]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    c.simple_query("SELECT item FROM public.orders WHERE id = 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_lets_statements_through_until_it_expires_or_is_revoked() {
    let rules = r#"  - name: order-writes-by-access-request
    match: { operations: [delete, update], tables: [orders] }
    action: hold
    timeout: 30s
    grant: { max: 1h }
"#;
    // A write that changes nothing: held, or let through by a grant.
    const PROBE: &str = "DELETE FROM orders WHERE false";
    let mut h = start(rules).await;
    let c = Arc::new(h.connect().await);
    let grant = |until: proto::events::Timestamp| proto::events::GrantDecision {
        grant_id: uuid::Uuid::now_v7(),
        hold_id: uuid::Uuid::now_v7(),
        principal: "agent".into(),
        connection: "shop".into(),
        rule: "order-writes-by-access-request".into(),
        granted_by: "dana".into(),
        from: proto::events::Timestamp::now(),
        until,
    };
    let session = uuid::Uuid::now_v7();
    // Long enough that waiting for the node to take it up cannot use it up.
    let lasts = Duration::from_secs(5);
    let granted_at = std::time::Instant::now();
    let g = grant(proto::events::Timestamp::now().plus(lasts));
    h.bus.publish(&Envelope::new(session, Event::GrantDecided(g))).await.unwrap();
    h.holds.wait_until_held(&c, PROBE, false).await;
    // Under the grant: no hold.
    let n =
        tokio::time::timeout(Duration::from_secs(5), c.execute("DELETE FROM orders WHERE id = $1", &[&1i32]))
            .await
            .expect("not held")
            .unwrap();
    assert_eq!(n, 1);
    // After it ends: held again.
    tokio::time::sleep_until((granted_at + lasts + Duration::from_millis(300)).into()).await;
    let c2 = c.clone();
    let del = tokio::spawn(async move { c2.execute("DELETE FROM orders WHERE id = $1", &[&2i32]).await });
    h.holds.decide(HoldOutcome::Denied).await;
    assert!(del.await.unwrap().is_err());
    // A revoked grant stops at once.
    let g = grant(proto::events::Timestamp::now().plus(Duration::from_secs(3600)));
    let grant_id = g.grant_id;
    let hold_id = g.hold_id;
    h.bus.publish(&Envelope::new(session, Event::GrantDecided(g))).await.unwrap();
    h.holds.wait_until_held(&c, PROBE, false).await;
    c.execute("UPDATE orders SET item = 'x' WHERE id = 3", &[]).await.unwrap();
    let r = proto::events::GrantRevocation { grant_id, hold_id, revoked_by: "dana".into(), reason: None };
    h.bus.publish(&Envelope::new(session, Event::GrantRevoked(r))).await.unwrap();
    h.holds.wait_until_held(&c, PROBE, true).await;
    let c2 = c.clone();
    let del = tokio::spawn(async move { c2.execute("DELETE FROM orders WHERE id = $1", &[&3i32]).await });
    h.holds.decide(HoldOutcome::Denied).await;
    assert!(del.await.unwrap().is_err());
    assert_eq!(h.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM orders"), "2,3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_policy_store_is_tolerated_until_the_staleness_limit_then_fails_closed() {
    testkit::init_crypto();
    let pg = Postgres::start().unwrap();
    common::create_shop(&pg);
    let dir = tempfile::tempdir().unwrap();
    let pw = common::write_password(dir.path());
    // A real policy store, in-process.
    let store_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", store_listener.local_addr().unwrap());
    let store_cfg = policy_store::PolicyStoreConfig {
        listen: store_listener.local_addr().unwrap(),
        data_dir: dir.path().join("store"),
        admin_token: Some("test-admin-token".into()),
        read_token: Some("test-read-token".into()),
        ..Default::default()
    };
    let (stop_store, store_stopped) = tokio::sync::oneshot::channel::<()>();
    let store = tokio::spawn(policy_store::run(store_cfg, store_listener, async {
        let _ = store_stopped.await;
    }));
    let mut client = loop {
        match policy_store::client::PolicyClient::connect(&endpoint, "test-admin-token").await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let yaml = policy(
        "127.0.0.1",
        pg.port,
        &pw,
        "  - { name: no-ddl, match: { operations: [create] }, action: deny }\n",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while client.apply(&yaml, "test").await.is_err() {
        assert!(std::time::Instant::now() < deadline, "store never accepted the policy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let follower = policy_store::client::follow(vec![endpoint], "test-read-token").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Long enough that the checks just after the store stops run well inside the limit.
    let cfg = proxy_node::ProxyConfig {
        policy_max_staleness: Duration::from_secs(6),
        target_password_dir: Some(dir.path().display().to_string()),
        ..Default::default()
    };
    tokio::spawn(proxy_node::run(cfg, EventBus::memory(), follower, listener, std::future::pending()));
    let connect = || async move {
        tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user("agent")
            .password(KEY)
            .dbname("shop")
            .connect(NoTls)
            .await
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let c = loop {
        match connect().await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                break c;
            }
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "proxy never got the policy: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    c.simple_query("SELECT 1").await.unwrap();
    // The store goes away: the last version is still enforced for a while...
    let _ = stop_store.send(());
    let _ = store.await;
    c.simple_query("SELECT 1").await.unwrap();
    assert_eq!(sqlstate(&c.simple_query("CREATE TABLE t (x int)").await.unwrap_err()), "42501");
    // ...and past the limit the node refuses, saying why.
    tokio::time::sleep(Duration::from_millis(6600)).await;
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
    assert!(msg.contains("stale"), "{msg}");
    let e = connect().await.err().expect("new sessions refused");
    assert_eq!(sqlstate(&e), "57P03");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_read_as_the_server_reads_them() {
    let h = start_guarded().await;
    let before = snapshot(&h);
    let c = h.connect().await;
    // With standard_conforming_strings off the server reads `'x\' , 1 -- '` as one literal, so
    // the DELETE below would run, while a reader with it on sees a comment: refused instead.
    c.simple_query("SET standard_conforming_strings = off").await.unwrap();
    let sneaky = r"SELECT 'x\' , 1 -- '; DELETE FROM orders; --";
    let e = c.simple_query(sneaky).await.expect_err("refused");
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    assert!(format!("{e:?}").contains("standard_conforming_strings"), "{e:?}");
    let e = c.query(r"SELECT 'a\'b'", &[]).await.expect_err("refused in the extended protocol too");
    assert_eq!(sqlstate(&e), "42501");
    // Statements without backslashes read the same either way and still run.
    assert_eq!(c.query_one("SELECT 'plain'", &[]).await.unwrap().get::<_, String>(0), "plain");
    c.simple_query("SET standard_conforming_strings = on").await.unwrap();
    let rows = c.simple_query(r"SELECT 'x\' , 1 -- '").await.unwrap();
    assert!(rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some(r"x\"))));
    // A client encoding other than UTF-8: non-ASCII text is refused, ASCII still runs.
    c.simple_query("SET client_encoding = 'LATIN1'").await.unwrap();
    let e = c.simple_query("SELECT 'café'").await.expect_err("refused");
    assert!(format!("{e:?}").contains("client_encoding"), "{e:?}");
    c.simple_query("SELECT 1").await.unwrap();
    c.simple_query("SET client_encoding = 'UTF8'").await.unwrap();
    c.simple_query("SELECT 'café'").await.unwrap();
    assert_eq!(snapshot(&h), before, "the target changed");
}

/// A session remembers how it classified the statement text it saw last (clients repeat one
/// statement). That memory must not outlive what it depended on: a text allowed while
/// standard_conforming_strings was on is read again, and refused, once it is off; and a
/// different text is never taken for the remembered one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_statement_is_read_again_when_the_session_reads_text_differently() {
    let h = start_guarded().await;
    let before = snapshot(&h);
    let c = h.connect().await;
    // With the setting on, both the gateway and the server read a literal, then a comment.
    let sneaky = r"SELECT 'x\' , 1 -- '; DELETE FROM orders; --";
    for _ in 0..3 {
        c.simple_query(sneaky).await.unwrap();
    }
    // Off, the server would read `'x\' , 1 -- '` as one literal and run the DELETE after it.
    // Turned off by executing a statement prepared before: no new text in between, so the
    // sneaky text is still the one the session classified last.
    let off = c.prepare("SET standard_conforming_strings = off").await.unwrap();
    c.simple_query(sneaky).await.unwrap();
    c.execute(&off, &[]).await.unwrap();
    let e = c.simple_query(sneaky).await.expect_err("refused");
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    assert!(format!("{e:?}").contains("standard_conforming_strings"), "{e:?}");
    c.simple_query("SET standard_conforming_strings = on").await.unwrap();
    // Texts that differ from the remembered one by a character are decided on their own.
    let read = "SELECT item FROM orders WHERE id = $1";
    for _ in 0..3 {
        assert_eq!(c.query(read, &[&1i32]).await.unwrap().len(), 1);
    }
    for write in ["DELETE FROM orders WHERE id = $1", "UPDATE orders SET item = item WHERE id = $1"] {
        let e = c.query(write, &[&1i32]).await.expect_err(write);
        assert_eq!(sqlstate(&e), "42501", "{write}: {e:?}");
    }
    assert_eq!(c.query(read, &[&2i32]).await.unwrap().len(), 1);
    assert_eq!(snapshot(&h), before, "the target changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_pipelined_behind_a_setting_change_is_not_read_with_the_old_setting() {
    let h = start_guarded().await;
    let before = snapshot(&h);
    let c = h.connect().await;
    // Sent together, before the target answers the SET: the server reads the second text with
    // standard_conforming_strings off (a literal `'x\' , 1 -- '`, then the DELETE).
    let sneaky = r"SELECT 'x\' , 1 -- '; DELETE FROM orders; --";
    let (set, read) =
        tokio::join!(c.simple_query("SET standard_conforming_strings = off"), c.simple_query(sneaky));
    set.unwrap();
    let e = read.expect_err("refused");
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    // Refused for the unanswered SET, or, when the client's two writes reach the proxy after
    // the SET was answered (a busy machine), for the setting it then knows.
    let why = format!("{e:?}");
    assert!(
        why.contains("has not been answered yet") || why.contains("standard_conforming_strings is off"),
        "{e:?}"
    );
    // Once the answer is in, the setting is known, and the text is refused for it.
    let e = c.simple_query(sneaky).await.expect_err("refused");
    assert!(format!("{e:?}").contains("standard_conforming_strings is off"), "{e:?}");
    // Behind a plain read, text with backslashes is read as usual.
    c.simple_query("SET standard_conforming_strings = on").await.unwrap();
    let (a, b) = tokio::join!(c.simple_query("SELECT 1"), c.simple_query(r"SELECT 'a\b'"));
    a.unwrap();
    b.unwrap();
    assert_eq!(snapshot(&h), before, "the target changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_the_target_reports_at_startup_are_how_the_first_statement_is_read() {
    let h = start_guarded().await;
    // A role default the agent never sent: the server reads backslashes as escapes from the
    // session's first statement.
    h.pg.psql("postgres", "ALTER ROLE airlock_svc SET standard_conforming_strings = off").unwrap();
    let before = snapshot(&h);
    let c = h.connect().await;
    let sneaky = r"SELECT 'x\' , 1 -- '; DELETE FROM orders; --";
    let e = c.simple_query(sneaky).await.expect_err("refused");
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    assert!(format!("{e:?}").contains("standard_conforming_strings is off"), "{e:?}");
    assert_eq!(snapshot(&h), before, "the target changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_portal_stays_the_statement_it_was_bound_to() {
    let rules = "  - { name: hold-deletes, match: { operations: [delete], tables: [orders] }, action: hold }\n\
                 defaults: { unknown_operation: deny }\n";
    let mut h = start(rules).await;
    let before = snapshot(&h);
    let mut c = h.connect().await;
    // These leave portals open on the server (only DISCARD ALL, CLOSE and the end of the
    // transaction close them): executing the portal still runs the DELETE, so it is held.
    for between in ["DISCARD SEQUENCES", "DISCARD PLANS", "DISCARD TEMP", "DEALLOCATE ALL"] {
        let tx = c.transaction().await.unwrap();
        let st = tx.prepare("DELETE FROM orders WHERE id > $1").await.unwrap();
        let portal = tx.bind(&st, &[&0i32]).await.unwrap();
        tx.batch_execute(between).await.unwrap();
        let (run, req) = tokio::join!(tx.query_portal(&portal, 0), h.holds.decide(HoldOutcome::Denied));
        assert!(run.is_err(), "{between}: the held DELETE ran");
        assert_eq!(req.statement, "DELETE FROM orders WHERE id > $1", "{between}");
        // Bound in binary format: recorded as hex.
        assert_eq!(req.parameters, [Some(r"\x00000000".to_string())], "{between}");
        drop(tx);
    }
    assert_eq!(snapshot(&h), before, "the target changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_name_tables_as_the_server_stores_them() {
    let long = format!("t_{}", "x".repeat(61));
    let rules = [
        "  - { name: keep-users, match: { operations: [delete, update], tables: [User] }, action: deny }"
            .to_string(),
        format!(
            "  - {{ name: keep-long, match: {{ operations: [delete], tables: [{long}] }}, action: deny }}"
        ),
        "defaults: { no_match: allow, unknown_operation: deny }\n".to_string(),
    ]
    .join("\n");
    let h = start(&rules).await;
    h.pg.psql(
        "shop",
        &format!(
            "SET ROLE airlock_svc; CREATE TABLE \"User\" (id int); INSERT INTO \"User\" VALUES (1); \
             CREATE TABLE {long} (id int); INSERT INTO {long} VALUES (1);"
        ),
    )
    .unwrap();
    let count = |t: &str| h.sql(&format!("SELECT count(*) FROM {t}"));
    let c = h.connect().await;
    // A deny rule on `User` holds for the quoted, case-kept name however it is spelled.
    for sql in [r#"DELETE FROM "User""#, r#"UPDATE public."User" SET id = 2"#] {
        let e = c.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e), "42501", "{sql}: {e:?}");
    }
    // PostgreSQL keeps 63 bytes of a name: a longer one is the table the rule names.
    let e = c.simple_query(&format!("DELETE FROM {long}_and_more")).await.expect_err("cut to the long name");
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    assert_eq!((count(r#""User""#), count(&long)), ("1".to_string(), "1".to_string()));
}

/// A value bound in binary as whatever type the statement declared.
#[derive(Debug)]
struct AnyInt4(i32);

impl tokio_postgres::types::ToSql for AnyInt4 {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0.to_be_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parameter_declared_of_a_user_type_is_an_unknown_effect() {
    let h = start_guarded().await;
    // A domain whose CHECK writes: binding a value of it runs the CHECK.
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE FUNCTION w_orders() RETURNS int VOLATILE LANGUAGE sql AS $f$ DELETE FROM orders RETURNING 1 $f$; \
         CREATE DOMAIN sneaky_int AS int CHECK (VALUE + w_orders() > 0); \
         CREATE FUNCTION takes(sneaky_int) RETURNS int STABLE LANGUAGE sql AS $f$ SELECT 1 $f$;",
    )
    .unwrap();
    let oid: u32 = h.sql("SELECT 'sneaky_int'::regtype::oid").trim().parse().unwrap();
    let sneaky = tokio_postgres::types::Type::new(
        "sneaky_int".into(),
        oid,
        tokio_postgres::types::Kind::Domain(tokio_postgres::types::Type::INT4),
        "public".into(),
    );
    let before = snapshot(&h);
    let c = h.connect().await;
    // The text is a plain read; the declared type is not.
    let refused = match c.prepare_typed("SELECT $1", &[sneaky]).await {
        Ok(st) => c.query(&st, &[&AnyInt4(1)]).await.map(|_| ()).map_err(|e| format!("{e:?}")),
        Err(e) => Err(sqlstate(&e)),
    };
    assert_eq!(snapshot(&h), before, "binding a value ran the domain's CHECK");
    assert_eq!(refused, Err("42501".to_string()), "refused at Parse");
    // Other ways to convert a value to the type: a PREPARE's parameters, a table function's
    // column list, a function's argument.
    for sql in [
        "PREPARE p(sneaky_int) AS SELECT $1; EXECUTE p(1)",
        r#"SELECT * FROM jsonb_to_record('{"a": 1}') AS t(a sneaky_int)"#,
        "SELECT takes(1)",
    ] {
        let r = c.simple_query(sql).await;
        assert_eq!(snapshot(&h), before, "{sql} ran the domain's CHECK");
        assert_eq!(sqlstate(&r.expect_err(sql)), "42501", "{sql}");
    }
    // Built-in types are read as before.
    let read = c.prepare_typed("SELECT $1", &[tokio_postgres::types::Type::INT4]).await.unwrap();
    assert_eq!(c.query(&read, &[&AnyInt4(5)]).await.unwrap().len(), 1);
    assert_eq!(snapshot(&h), before, "the target changed");
}

/// After an error in an extended-protocol pipeline the target skips everything up to the
/// Sync, a simple Query included; the relay's bookkeeping must skip the same, or the answers
/// that follow are matched to the wrong messages (here: a held DELETE parsed under a name the
/// relay still took for `SELECT 1`, then executed unheld).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_skipped_after_a_pipeline_error_does_not_shift_what_names_mean() {
    use testkit::pgwire::{bind, contains, execute, parse, query, read_until_ready, sync};
    let h = start(RULES).await;
    let mut s = testkit::pgwire::connect(h.port, "agent", "shop", KEY).await;
    let steps: [Vec<u8>; 4] = [
        [
            parse("s1", "SELECT 1/0"),
            bind("p1", "s1", &[]),
            execute("p1"),
            query("SELECT 1"),
            parse("w", "SELECT 1"),
            sync(),
        ]
        .concat(),
        [parse("w", "DELETE FROM orders"), sync()].concat(),
        [parse("x", "SELECT nocol FROM orders"), sync()].concat(),
        [bind("", "w", &[]), execute(""), sync()].concat(),
    ];
    for step in &steps[..3] {
        s.write_all(step).await.unwrap();
        read_until_ready(&mut s).await;
    }
    s.write_all(&steps[3]).await.unwrap();
    // Held (or refused, or the session ended): never run.
    let mut buf = [0u8; 4096];
    let seen = match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].to_vec(),
        _ => Vec::new(),
    };
    assert!(!contains(&seen, "DELETE"), "{}", String::from_utf8_lossy(&seen));
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the DELETE ran unapproved");
}

/// A policy version that takes away what an open session was opened on ends the session at
/// its next statement: its service account removed, given another key or other groups, its
/// connection changed or removed. A version that only changes rules leaves it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_revokes_a_sessions_key_or_connection_ends_the_session() {
    let h = start(RULES).await;
    let good = policy(&h.upstream_host, h.pg.port, &h.pw_file, RULES);
    let c = h.connect().await;
    h.apply(
        2,
        &format!("{RULES}  - {{ name: no-truncate, match: {{ operations: [truncate] }}, action: deny }}\n"),
    );
    c.simple_query("SELECT 1").await.expect("a change of rules leaves the session open");
    let hash = proxy_node::identity::hash_api_key(KEY);
    let revocations = [
        ("the service account \"agent\" was removed", good.replace("name: agent,", "name: agent-2,")),
        ("the key of the service account \"agent\" was replaced", good.replace(&hash, &"ab".repeat(32))),
        (
            "the groups of the service account \"agent\" changed",
            good.replace("groups: [agents]", "groups: [agents, dba]"),
        ),
        ("the connection \"shop\" was changed", good.replace("user: airlock_svc", "user: postgres")),
        ("the connection \"shop\" was removed", good.replace("name: shop", "name: shop2")),
    ];
    let mut version = 3;
    for (why, yaml) in revocations {
        assert_ne!(yaml, good, "{why}: the policy is unchanged");
        h.apply_yaml(version, &good);
        let c = h.connect().await;
        c.simple_query("SELECT 1").await.expect(why);
        h.apply_yaml(version + 1, &yaml);
        version += 2;
        let e = c.simple_query("SELECT 1").await.expect_err(why);
        let db = e.as_db_error().unwrap_or_else(|| panic!("{why}: {e:?}"));
        assert_eq!(db.code().code(), "57P03", "{why}: {e:?}");
        assert!(db.message().contains(why), "{why}: {}", db.message());
        assert!(c.is_closed() || c.simple_query("SELECT 1").await.is_err(), "{why}: the session went on");
    }
}

/// After an extended-protocol error the target skips every message up to the client's next
/// Sync, a simple Query included. A client that waits for the error before sending them gets
/// them skipped by the proxy too: expected, they would take the answers of what follows, and
/// a name the target holds as a DELETE would pass for `SELECT 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_after_a_pipeline_error_are_skipped_like_the_target_skips_them() {
    use testkit::pgwire::{contains, message, parse, query, read_until, read_until_ready, sync};
    let h = start(RULES).await;
    let mut s = testkit::pgwire::connect(h.port, "agent", "shop", KEY).await;
    s.write_all(&[parse("e", "SELECT nocol FROM orders"), message(b'H', &[])].concat()).await.unwrap();
    let seen = read_until(&mut s, b'E').await;
    assert!(contains(&seen, "nocol"), "{}", String::from_utf8_lossy(&seen));
    // Skipped by the target: no answer but the Sync's.
    s.write_all(&[query("SELECT 1"), parse("w", "SELECT 1"), sync()].concat()).await.unwrap();
    let seen = read_until_ready(&mut s).await;
    assert_eq!(testkit::pgwire::tags(&seen), b"Z", "{}", String::from_utf8_lossy(&seen));
    for step in [
        [parse("w", "DELETE FROM orders"), sync()].concat(),
        [parse("e2", "SELECT nocol FROM orders"), sync()].concat(),
    ] {
        s.write_all(&step).await.unwrap();
        read_until_ready(&mut s).await;
    }
    executing_w_is_held(&h, &mut s).await;
}

/// The target ignores Sync (and Flush) during COPY FROM STDIN: a Sync sent then is answered by
/// nothing, so the proxy expects nothing for it, and the answers after the COPY stay matched
/// to their statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_sent_during_copy_from_stdin_expects_no_answer() {
    use testkit::pgwire::{contains, message, parse, query, read_until, read_until_ready, sync};
    let h = start(RULES).await;
    let mut s = testkit::pgwire::connect(h.port, "agent", "shop", KEY).await;
    s.write_all(&[parse("w", "DELETE FROM orders"), sync()].concat()).await.unwrap();
    read_until_ready(&mut s).await;
    s.write_all(&query("COPY orders FROM STDIN")).await.unwrap();
    read_until(&mut s, b'G').await;
    s.write_all(&[sync(), message(b'H', &[]), message(b'c', &[])].concat()).await.unwrap();
    let seen = read_until_ready(&mut s).await;
    assert!(contains(&seen, "COPY 0"), "{}", String::from_utf8_lossy(&seen));
    // The name is taken: an error, and `w` is still the DELETE.
    s.write_all(&query("PREPARE w AS SELECT 1")).await.unwrap();
    let seen = read_until_ready(&mut s).await;
    assert!(contains(&seen, "already exists"), "{}", String::from_utf8_lossy(&seen));
    s.write_all(&query("SELECT 1")).await.unwrap();
    let seen = read_until_ready(&mut s).await;
    assert!(contains(&seen, "SELECT 1"), "{}", String::from_utf8_lossy(&seen));
    executing_w_is_held(&h, &mut s).await;
}

/// A client may send its COPY data right behind `COPY … FROM STDIN`, without waiting for the
/// CopyInResponse: the data reaches the target as data (the gateway used to drop it as copy
/// messages outside a COPY, and the target waited for it forever). Through the extended
/// protocol too, and when the target refuses the COPY at Execute (its error must not wait for
/// the Sync the gateway holds back while it waits for the target's answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_data_sent_right_behind_copy_from_stdin_is_copied() {
    use testkit::pgwire::{bind, contains, execute, message, parse, query, read_answers, sync};
    let h = start(RULES).await;
    h.as_owner("CREATE TABLE scratch (x int)");
    h.sql("CREATE TABLE locked (x int)");
    let mut s = testkit::pgwire::connect(h.port, "agent", "shop", KEY).await;
    let data = [message(b'd', b"1\n2\n"), message(b'd', b"3\n"), message(b'c', &[])].concat();
    s.write_all(&[query("COPY scratch FROM STDIN"), data.clone()].concat()).await.unwrap();
    let seen = read_answers(&mut s, 1).await;
    assert!(seen.contains("COPY 3"), "{seen}");
    let extended =
        [parse("", "COPY scratch FROM STDIN"), bind("", "", &[]), execute(""), data.clone(), sync()];
    s.write_all(&extended.concat()).await.unwrap();
    let seen = read_answers(&mut s, 1).await;
    assert!(seen.contains("COPY 3"), "{seen}");
    assert_eq!(h.sql("SELECT count(*), sum(x) FROM scratch"), "6|12");
    // The target refuses the COPY (no privilege on `locked`): its error, then the data ignored.
    let refused = [parse("", "COPY locked FROM STDIN"), bind("", "", &[]), execute(""), data, sync()];
    s.write_all(&refused.concat()).await.unwrap();
    let seen = read_answers(&mut s, 1).await;
    assert!(seen.contains("42501") && seen.contains("locked"), "{seen}");
    s.write_all(&query("SELECT 'still in step'")).await.unwrap();
    let seen = read_answers(&mut s, 1).await;
    assert!(contains(seen.as_bytes(), "still in step"), "{seen}");
}

/// `EXECUTE w`, where `w` is the target's `DELETE FROM orders`: held (the notice says so), and
/// never run.
async fn executing_w_is_held(h: &Harness, s: &mut tokio::net::TcpStream) {
    use testkit::pgwire::{contains, query, read_until};
    s.write_all(&query("EXECUTE w")).await.unwrap();
    let seen = read_until(s, b'N').await;
    assert!(contains(&seen, "waiting for approval"), "{}", String::from_utf8_lossy(&seen));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the DELETE ran unapproved");
}

/// A Parse or Bind the target may refuse or skip (its name is in use; an earlier error skips
/// it) is not what a message after the next Sync runs: the target may still hold an older
/// statement or portal of that name. Sent in one write, before any answer comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_redefined_across_a_sync_is_not_trusted_before_the_target_answers() {
    use testkit::pgwire::{bind, close, contains, execute, parse, query, sync};
    let h = start(RULES).await;
    let sequences: [(&str, Vec<u8>); 3] = [
        (
            "a second Parse of a name in use",
            [
                parse("w", "DELETE FROM orders"),
                parse("w", "SELECT 1"),
                sync(),
                bind("p", "w", &[]),
                execute("p"),
                sync(),
            ]
            .concat(),
        ),
        (
            "an unnamed Parse skipped after an error",
            [
                parse("", "DELETE FROM orders"),
                sync(),
                parse("junk", "SELEC"),
                parse("", "SELECT 1"),
                sync(),
                bind("", "", &[]),
                execute(""),
                sync(),
            ]
            .concat(),
        ),
        (
            "a second Bind of a portal in use",
            [
                query("BEGIN"),
                parse("d", "DELETE FROM orders"),
                parse("r", "SELECT 1"),
                bind("p", "d", &[]),
                sync(),
                bind("p", "r", &[]),
                sync(),
                execute("p"),
                sync(),
                query("COMMIT"),
            ]
            .concat(),
        ),
    ];
    let sequences = sequences.into_iter().chain([
        (
            "SQL EXECUTE of a name a pending Close and Parse redefine",
            [close(b'S', "w2"), parse("w2", "DELETE FROM orders"), sync(), query("EXECUTE w2")].concat(),
        ),
        (
            "a parsed `EXECUTE p` run after p was redefined",
            [
                parse("p4", "SELECT 1"),
                parse("x4", "EXECUTE p4"),
                sync(),
                close(b'S', "p4"),
                parse("p4", "DELETE FROM orders"),
                sync(),
                bind("", "x4", &[]),
                execute(""),
                sync(),
            ]
            .concat(),
        ),
        (
            "EXECUTE before a PREPARE of the same name in one message",
            [
                parse("p5", "DELETE FROM orders"),
                sync(),
                query("EXECUTE p5; DEALLOCATE p5; PREPARE p5 AS SELECT 1"),
            ]
            .concat(),
        ),
    ]);
    for (what, messages) in sequences {
        let mut s = testkit::pgwire::connect(h.port, "agent", "shop", KEY).await;
        // A harmless statement of the name used last, confirmed before the rest is sent.
        s.write_all(&[parse("w2", "SELECT 'x'::text"), sync()].concat()).await.unwrap();
        testkit::pgwire::read_until_ready(&mut s).await;
        s.write_all(&messages).await.unwrap();
        // Held (or refused): never run.
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(!contains(&seen, "DELETE 3"), "{what}: {}", String::from_utf8_lossy(&seen));
        assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "{what}: the DELETE ran unapproved");
    }
}

/// An error at a Sync (a deferred constraint failing as the implicit transaction commits) is
/// answered with that Sync's ReadyForQuery: the relay keeps the two together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_at_a_sync_keeps_the_answers_in_step() {
    use testkit::pgwire::{bind, contains, execute, parse, query, read_until_ready, sync};
    let h = start(RULES).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; CREATE TABLE pair (id int PRIMARY KEY, other int \
         REFERENCES pair (id) DEFERRABLE INITIALLY DEFERRED);",
    )
    .unwrap();
    let mut s = testkit::pgwire::connect(h.port, "agent", "shop", KEY).await;
    // The insert succeeds; committing it at the Sync fails; a Query pipelined behind it runs.
    s.write_all(
        &[
            parse("", "INSERT INTO pair VALUES (1, 2)"),
            bind("", "", &[]),
            execute(""),
            sync(),
            query("SELECT 'after' || 'wards'"),
        ]
        .concat(),
    )
    .await
    .unwrap();
    let first = read_until_ready(&mut s).await;
    assert!(contains(&first, "23503"), "{}", String::from_utf8_lossy(&first));
    let mut seen = first;
    while testkit::pgwire::tags(&seen).iter().filter(|&&t| t == b'Z').count() < 2 {
        seen.extend(read_until_ready(&mut s).await);
    }
    assert!(contains(&seen, "afterwards"), "{}", String::from_utf8_lossy(&seen));
    // The session goes on, in step.
    s.write_all(&query("SELECT 'still' || 'here'")).await.unwrap();
    let seen = read_until_ready(&mut s).await;
    assert!(contains(&seen, "stillhere"), "{}", String::from_utf8_lossy(&seen));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execute_names_a_bound_portal_or_a_declared_cursor() {
    use testkit::pgwire::{contains, execute, query, read_until_ready, sync};
    let h = start_guarded().await;
    let mut s = testkit::pgwire::connect(h.port, "agent", "shop", KEY).await;
    s.write_all(&query("BEGIN; DECLARE cur CURSOR FOR SELECT item FROM orders ORDER BY id")).await.unwrap();
    let seen = read_until_ready(&mut s).await;
    assert!(!contains(&seen, "42501"), "{}", String::from_utf8_lossy(&seen));
    // A cursor the session declared is fetched by an Execute of its name.
    s.write_all(&[execute("cur"), sync()].concat()).await.unwrap();
    let seen = read_until_ready(&mut s).await;
    assert!(contains(&seen, "apple"), "{}", String::from_utf8_lossy(&seen));
    // A name nothing in the session made is not known to be harmless.
    s.write_all(&[execute("elsewhere"), sync()].concat()).await.unwrap();
    let seen = read_until_ready(&mut s).await;
    assert!(
        contains(&seen, "42501") && contains(&seen, "neither bound nor declared"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_on_a_table_hold_for_its_partitions_children_and_views() {
    let rules = r#"  - { name: keep, match: { operations: [delete, update, truncate], tables: [ledger, base_items, orders, kid] }, action: deny }
  - { name: secret-ledger, match: { operations: [select], tables: [ledger] }, action: deny }
defaults: { no_match: allow, unknown_operation: deny }
"#;
    let h = start(rules).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE TABLE ledger (id int, region text) PARTITION BY LIST (region); \
         CREATE TABLE ledger_eu PARTITION OF ledger FOR VALUES IN ('eu'); \
         CREATE TABLE ledger_eu_sub (LIKE ledger_eu); \
         INSERT INTO ledger VALUES (1, 'eu'); \
         CREATE TABLE base_items (id int); CREATE TABLE child_items () INHERITS (base_items); \
         INSERT INTO child_items VALUES (1); \
         CREATE VIEW live_orders AS SELECT * FROM orders; \
         CREATE TABLE parent_t (id int); CREATE TABLE kid () INHERITS (parent_t); INSERT INTO kid VALUES (1); \
         CREATE VIEW live_live_orders AS SELECT * FROM live_orders;",
    )
    .unwrap();
    let state = || {
        h.sql("SELECT (SELECT count(*) FROM ledger) || ',' || (SELECT count(*) FROM base_items) || ',' || (SELECT count(*) FROM orders) || ',' || (SELECT count(*) FROM parent_t)")
    };
    let before = state();
    assert_eq!(before, "1,1,3,1");
    let c = h.connect().await;
    for sql in [
        "DELETE FROM ledger_eu",
        "UPDATE ledger_eu SET id = 2",
        "TRUNCATE ledger_eu",
        "DELETE FROM public.ledger_eu WHERE id = 1",
        "DELETE FROM child_items",
        "UPDATE child_items SET id = 2",
        "DELETE FROM live_orders",
        "UPDATE live_orders SET item = 'x'",
        "DELETE FROM live_live_orders",
        // A statement on a parent acts on its children's rows.
        "DELETE FROM parent_t",
        "SELECT * FROM ledger_eu",
    ] {
        let e = c.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e), "42501", "{sql}: {e:?}");
        let e = c.query(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&e), "42501", "extended {sql}: {e:?}");
    }
    assert_eq!(state(), before, "the target changed");
    // What the rules do not restrict still runs: reading the base table through its view,
    // adding a row to a child.
    assert_eq!(c.query("SELECT * FROM live_orders", &[]).await.unwrap().len(), 3);
    c.simple_query("INSERT INTO child_items VALUES (3)").await.unwrap();
    // What a statement reaches is remembered for the session's recent statements, and
    // forgotten when the session changes the schema: a table made a child of a protected one
    // in between is protected from then on, however often its statement ran before.
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; CREATE TABLE late_child (id int); INSERT INTO late_child VALUES (7);",
    )
    .unwrap();
    for _ in 0..3 {
        for sql in ["DELETE FROM late_child WHERE id = 0", "SELECT count(*) FROM orders", "SELECT 1 FROM kid"]
        {
            c.simple_query(sql).await.expect(sql);
        }
    }
    c.simple_query("ALTER TABLE late_child INHERIT base_items").await.unwrap();
    let e = c.simple_query("DELETE FROM late_child WHERE id = 7").await.expect_err("now a child");
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    assert_eq!(h.sql("SELECT count(*) FROM late_child"), "1", "the target changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portals_names_and_settings_cannot_run_a_held_statement() {
    use testkit::pgwire::{
        bind, contains, execute, message, parse, query, read_to_close, read_until_ready, sync,
    };
    let rules = "  - { name: hold-deletes, match: { operations: [delete], tables: [orders] }, action: hold }\n\
                 defaults: { unknown_operation: deny }\n";
    let h = start(rules).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE FUNCTION w_orders() RETURNS int VOLATILE LANGUAGE sql AS $f$ DELETE FROM orders RETURNING 1 $f$; \
         CREATE FUNCTION looks_read_only() RETURNS int STABLE LANGUAGE sql RETURN w_orders();",
    )
    .unwrap();
    let before = snapshot(&h);
    let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    // SQL FETCH of a portal bound through the protocol runs the portal's statement.
    let mut s = testkit::pgwire::connect(h.port, "agent", "shop", KEY).await;
    s.write_all(&query("BEGIN")).await.unwrap();
    read_until_ready(&mut s).await;
    s.write_all(&[parse("s1", "DELETE FROM orders RETURNING id"), bind("p", "s1", &[]), sync()].concat())
        .await
        .unwrap();
    read_until_ready(&mut s).await;
    s.write_all(&query("FETCH ALL FROM p")).await.unwrap();
    let seen = read_until_ready(&mut s).await;
    assert!(contains(&seen, "42501") && contains(&seen, "not a cursor"), "{}", show(&seen));
    // A SQL-standard function body is kept parsed, not as text: it is not known to read only.
    s.write_all(&query("ROLLBACK; SELECT looks_read_only()")).await.unwrap();
    let seen = read_until_ready(&mut s).await;
    assert!(contains(&seen, "42501"), "{}", show(&seen));
    // Names the server would cut to 63 bytes.
    let long = "n".repeat(64);
    s.write_all(&[parse(&long, "SELECT 1"), sync()].concat()).await.unwrap();
    let seen = read_to_close(&mut s).await;
    assert!(contains(&seen, "08P01") && contains(&seen, "longer than 63 bytes"), "{}", show(&seen));
    // A setting changed by an Execute is reported only before ReadyForQuery: until then, text
    // pipelined behind it is not read with the old setting.
    let mut s = testkit::pgwire::connect(h.port, "agent", "shop", KEY).await;
    s.write_all(
        &[
            parse("", "SET standard_conforming_strings = off"),
            bind("", "", &[]),
            execute(""),
            message(b'H', &[]),
        ]
        .concat(),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !testkit::pgwire::tags(&seen).contains(&b'C') {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {}", show(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    s.write_all(&query(r"SELECT 'a\', ' ; DELETE FROM orders; -- '")).await.unwrap();
    s.write_all(&sync()).await.unwrap();
    // Two ReadyForQuery: the Query's and the Sync's.
    let mut seen = Vec::new();
    while testkit::pgwire::tags(&seen).iter().filter(|&&t| t == b'Z').count() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {}", show(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(contains(&seen, "42501"), "{}", show(&seen));
    assert_eq!(snapshot(&h), before, "the target changed");
}

/// Code the gateway does not read (a procedure, a function) can move `search_path` with
/// `set_config` where the statement's text does not show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_moved_by_a_procedure_or_function_ends_schema_allow_rules() {
    let rules = r#"  - { name: public-orders, match: { operations: [select], tables: [public.orders] }, action: allow }
  - { name: procedures, match: { operations: [call] }, action: allow }
defaults: { no_match: deny, unknown_operation: allow }
"#;
    let h = start(rules).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; CREATE SCHEMA secret; CREATE TABLE secret.orders (id int, item text); \
         INSERT INTO secret.orders VALUES (1, 'top secret'); \
         CREATE PROCEDURE tidy() LANGUAGE plpgsql AS $p$ BEGIN \
           PERFORM pg_catalog.set_config('search' || '_path', 'secret, public', false); END $p$; \
         CREATE FUNCTION tidy_fn() RETURNS int LANGUAGE plpgsql AS $p$ BEGIN \
           PERFORM pg_catalog.set_config('search' || '_path', 'secret, public', false); RETURN 1; END $p$;",
    )
    .unwrap();
    for moves in ["CALL tidy()", "SELECT tidy_fn() FROM public.orders LIMIT 1"] {
        let c = h.connect().await;
        let first = c.simple_query("SELECT item FROM orders ORDER BY id LIMIT 1").await.unwrap();
        assert!(format!("{first:?}").contains("apple"), "{first:?}");
        c.simple_query(moves).await.unwrap();
        // The target now reads `orders` as secret.orders.
        match c.simple_query("SELECT item FROM orders ORDER BY id LIMIT 1").await {
            Ok(rows) => panic!("after `{moves}`, read {rows:?}"),
            Err(e) => assert_eq!(sqlstate(&e), "42501", "{moves}: {e:?}"),
        }
        let e = c.query("SELECT item FROM orders", &[]).await.expect_err("extended protocol too");
        assert_eq!(sqlstate(&e), "42501");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_cannot_redirect_an_allow_rule() {
    // Changing roles is allowed too (with a write, so the session is not opened read-only).
    let rules = r#"  - { name: public-orders, match: { operations: [select], tables: [public.orders] }, action: allow }
  - { name: settings, match: { operations: [set, show, transaction, escalate] }, action: allow }
  - { name: pay, match: { operations: [insert], tables: [payments] }, action: allow }
defaults: { no_match: deny, unknown_operation: deny }
"#;
    let h = start(rules).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; CREATE SCHEMA secret; CREATE TABLE secret.orders (id int, item text); \
         INSERT INTO secret.orders VALUES (1, 'top secret'); RESET ROLE; \
         CREATE ROLE sneaky; GRANT sneaky TO airlock_svc; CREATE SCHEMA sneaky AUTHORIZATION sneaky; \
         SET ROLE sneaky; CREATE TABLE sneaky.orders (id int, item text); \
         INSERT INTO sneaky.orders VALUES (1, 'top secret');",
    )
    .unwrap();
    let c = h.connect().await;
    let items = |rows: Vec<SimpleQueryMessage>| -> Vec<String> {
        rows.iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect()
    };
    // The default search_path: `orders` is public.orders, which the rule allows.
    assert_eq!(
        items(c.simple_query("SELECT item FROM orders ORDER BY id LIMIT 1").await.unwrap()),
        ["apple"]
    );
    let e = c.simple_query("SELECT item FROM secret.orders").await.expect_err("not allowed");
    assert_eq!(sqlstate(&e), "42501");
    // Once the session may have moved its search_path, `orders` could be secret.orders.
    c.simple_query("SET search_path = secret, public").await.unwrap();
    let e = c.simple_query("SELECT item FROM orders").await.expect_err("no longer provably public.orders");
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    let e = c.query("SELECT item FROM orders", &[]).await.expect_err("extended protocol too");
    assert_eq!(sqlstate(&e), "42501");
    assert_eq!(
        items(c.simple_query("SELECT item FROM public.orders ORDER BY id LIMIT 1").await.unwrap()),
        ["apple"]
    );
    // `SET SCHEMA` is the same setting by another name.
    let c = h.connect().await;
    for sql in
        ["SELECT item FROM orders ORDER BY id LIMIT 1", "SET SCHEMA 'secret'", "SELECT item FROM orders"]
    {
        match c.simple_query(sql).await {
            Ok(rows) => assert_ne!(items(rows), ["top secret"], "{sql}"),
            Err(e) => assert_eq!(sqlstate(&e), "42501", "{sql}: {e:?}"),
        }
    }
    let e = c.simple_query("SELECT item FROM orders").await.expect_err("no longer provably public.orders");
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    // The default search_path starts with "$user": a new role can bring its own `orders`.
    let c = h.connect().await;
    assert_eq!(
        items(c.simple_query("SELECT item FROM orders ORDER BY id LIMIT 1").await.unwrap()),
        ["apple"]
    );
    c.simple_query("SET ROLE sneaky").await.unwrap();
    match c.simple_query("SELECT item FROM orders").await {
        Ok(rows) => assert_ne!(items(rows), ["top secret"], "read sneaky.orders"),
        Err(e) => assert_eq!(sqlstate(&e), "42501", "{e:?}"),
    }
}

/// Refuses `sql` (simple and extended protocol) with 42501.
/// Each of `sqls` refused ([`refused`]), and again once the catalog's answers are cached.
async fn refused_twice(c: &tokio_postgres::Client, sqls: &[&str]) {
    for _ in 0..2 {
        for sql in sqls {
            refused(c, sql).await;
        }
    }
}

async fn refused(c: &tokio_postgres::Client, sql: &str) {
    let e = c.simple_query(sql).await.expect_err(sql);
    assert_eq!(sqlstate(&e), "42501", "{sql}: {e:?}");
    let e = c.query(sql, &[]).await.expect_err(sql);
    assert_eq!(sqlstate(&e), "42501", "extended {sql}: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_on_a_table_hold_for_what_foreign_keys_write_there() {
    let rules = r#"  - { name: keep, match: { operations: [delete, update, truncate], tables: [orders] }, action: deny }
  - { name: kids-fixed, match: { operations: [update], tables: [kids] }, action: deny }
defaults: { no_match: allow, unknown_operation: deny }
"#;
    let h = start(rules).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE TABLE regions (id int primary key); INSERT INTO regions VALUES (1); \
         CREATE TABLE customers (id int primary key, region_id int REFERENCES regions ON DELETE CASCADE); \
         INSERT INTO customers VALUES (1, 1), (2, 1), (3, 1); \
         ALTER TABLE orders ADD COLUMN customer_id int REFERENCES customers ON DELETE CASCADE; \
         UPDATE orders SET customer_id = id; \
         CREATE TABLE parent (id int primary key); INSERT INTO parent VALUES (1); \
         CREATE TABLE kids (id int, parent_id int REFERENCES parent ON DELETE SET NULL, \
           parent_ref int REFERENCES parent ON UPDATE CASCADE); \
         INSERT INTO kids VALUES (1, 1, 1); \
         CREATE TABLE plain (id int); INSERT INTO plain VALUES (1), (2), (3);",
    )
    .unwrap();
    let state = || {
        h.sql(
            "SELECT (SELECT string_agg(id || ':' || customer_id, ',' ORDER BY id) FROM orders) || ' ' || \
             (SELECT count(*) FROM customers) || ' ' || (SELECT count(*) FROM regions) || ' ' || \
             (SELECT string_agg(id || ':' || parent_id || ':' || parent_ref, ',') FROM kids)",
        )
    };
    let before = state();
    assert_eq!(before, "1:1,2:2,3:3 3 1 1:1:1");
    let c = h.connect().await;
    for sql in [
        // ON DELETE CASCADE deletes orders; through two keys from regions.
        "DELETE FROM customers",
        "DELETE FROM customers WHERE id = 1",
        "DELETE FROM public.customers WHERE id = 2",
        "DELETE FROM regions",
        // TRUNCATE ... CASCADE truncates every referencing table, whatever the key's action.
        "TRUNCATE customers CASCADE",
        "TRUNCATE regions CASCADE",
        "TRUNCATE customers",
        "WITH gone AS (DELETE FROM customers RETURNING id) SELECT count(*) FROM gone",
        // ON DELETE SET NULL updates kids; ON UPDATE CASCADE too.
        "DELETE FROM parent",
        "UPDATE parent SET id = 5",
    ] {
        refused(&c, sql).await;
    }
    assert_eq!(state(), before, "the target changed");
    // Writes that set nothing off still run, and are remembered as such for the session (the
    // keys have no ON UPDATE action, and inserting fires none).
    for id in [4, 5] {
        c.simple_query("UPDATE customers SET region_id = 1 WHERE id = 3").await.unwrap();
        c.simple_query(&format!("INSERT INTO customers VALUES ({id}, 1)")).await.unwrap();
        c.simple_query(&format!("INSERT INTO parent VALUES ({id})")).await.unwrap();
        c.simple_query("UPDATE kids SET parent_id = NULL WHERE false").await.expect_err("kids-fixed");
    }
    c.simple_query("DELETE FROM plain WHERE id = 1").await.unwrap();
    c.query("DELETE FROM plain WHERE id = $1", &[&2i32]).await.unwrap();
    c.simple_query("TRUNCATE plain").await.unwrap();
    assert_eq!(h.sql("SELECT count(*) FROM plain"), "0");
    assert_eq!(state(), "1:1,2:2,3:3 5 1 1:1:1", "the target changed");
    // A key referencing its own table ends; a chain of keys longer than the gateway follows
    // is of unknown effect (a shorter one is followed to its end).
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE TABLE staff (id int primary key, boss int REFERENCES staff ON DELETE CASCADE); \
         CREATE TABLE chain_0 (id int primary key); \
         DO $d$ BEGIN FOR i IN 1..20 LOOP EXECUTE format( \
           'CREATE TABLE chain_%s (id int primary key REFERENCES chain_%s ON DELETE CASCADE)', i, i - 1); \
         END LOOP; END $d$;",
    )
    .unwrap();
    let c = h.connect().await;
    c.simple_query("DELETE FROM staff").await.unwrap();
    c.simple_query("DELETE FROM chain_10").await.unwrap();
    refused(&c, "DELETE FROM chain_0").await;
}

/// Keeps `orders` (no DELETE, UPDATE or TRUNCATE), lets other statements through, and refuses
/// those of unknown effect.
const KEEP_ORDERS: &str = r#"  - { name: keep, match: { operations: [delete, update, truncate], tables: [orders] }, action: deny }
defaults: { no_match: allow, unknown_operation: deny }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fires_a_trigger_or_rule_is_of_unknown_effect() {
    let h = start(KEEP_ORDERS).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE FUNCTION zap_orders() RETURNS trigger LANGUAGE plpgsql AS \
           $f$ BEGIN DELETE FROM orders; RETURN NEW; END $f$; \
         CREATE TABLE audit_me (id int); \
         CREATE TRIGGER audit_trg AFTER INSERT ON audit_me FOR EACH ROW EXECUTE FUNCTION zap_orders(); \
         CREATE TABLE ruled (id int); \
         CREATE RULE ruled_zap AS ON INSERT TO ruled DO ALSO DELETE FROM orders; \
         CREATE VIEW audit_view AS SELECT * FROM audit_me; \
         CREATE TABLE quiet (id int); \
         CREATE TRIGGER quiet_trg AFTER INSERT ON quiet FOR EACH ROW EXECUTE FUNCTION zap_orders(); \
         ALTER TABLE quiet DISABLE TRIGGER quiet_trg; \
         CREATE TABLE plain (id int); CREATE VIEW plain_view AS SELECT * FROM plain;",
    )
    .unwrap();
    let c = h.connect().await;
    refused_twice(
        &c,
        &[
            "INSERT INTO audit_me VALUES (1)",
            "INSERT INTO public.audit_me VALUES (1)",
            "INSERT INTO ruled VALUES (1)",
            // Through a view: the base table's trigger fires.
            "INSERT INTO audit_view VALUES (1)",
            "WITH x AS (INSERT INTO ruled VALUES (1) RETURNING id) SELECT * FROM x",
        ],
    )
    .await;
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the target changed");
    // Reading such a table runs nothing; a disabled trigger does not fire; a view's own
    // (SELECT) rule is no write rule.
    c.simple_query("SELECT * FROM audit_me").await.unwrap();
    c.simple_query("SELECT * FROM ruled").await.unwrap();
    c.simple_query("INSERT INTO quiet VALUES (1)").await.unwrap();
    c.simple_query("INSERT INTO plain_view VALUES (1)").await.unwrap();
    c.simple_query("DELETE FROM plain_view").await.unwrap();
    c.simple_query("INSERT INTO plain VALUES (1)").await.unwrap();
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the target changed");
    // A trigger the session itself adds counts from its next statement, however often the
    // write ran before.
    c.simple_query(
        "CREATE TRIGGER late_trg AFTER INSERT ON plain FOR EACH ROW EXECUTE FUNCTION zap_orders()",
    )
    .await
    .unwrap();
    refused(&c, "INSERT INTO plain VALUES (1)").await;
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the target changed");
}

/// `zap()` deletes every order; `zapi()` and `zapb(int)` are declared IMMUTABLE (as defaults,
/// index expressions and partition keys require), but call `zap()`, which PostgreSQL lets write.
const ZAP: &str = "SET ROLE airlock_svc; \
     CREATE FUNCTION zap() RETURNS int VOLATILE LANGUAGE plpgsql AS \
       $f$ BEGIN DELETE FROM orders; RETURN 1; END $f$; \
     CREATE FUNCTION zapi() RETURNS int IMMUTABLE LANGUAGE plpgsql AS $f$ BEGIN RETURN zap(); END $f$; \
     CREATE FUNCTION zapb(int) RETURNS bool IMMUTABLE LANGUAGE plpgsql AS \
       $f$ BEGIN PERFORM zap(); RETURN true; END $f$;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_runs_a_user_function_in_a_default_constraint_or_index_is_of_unknown_effect() {
    let h = start(KEEP_ORDERS).await;
    h.pg.psql(
        "shop",
        &format!(
            "{ZAP} \
         CREATE TABLE by_default (x int DEFAULT zapi(), y int); INSERT INTO by_default VALUES (1, 1); \
         CREATE DOMAIN zap_default AS int DEFAULT zapi(); \
         CREATE TABLE by_domain_default (x zap_default, y int); \
         CREATE TABLE checked (x int); INSERT INTO checked VALUES (1); \
         ALTER TABLE checked ADD CHECK (zapb(x)) NOT VALID; \
         CREATE DOMAIN zap_checked AS int CHECK (zapb(VALUE)); \
         CREATE DOMAIN zap_checked_too AS zap_checked; \
         CREATE TABLE by_domain (x zap_checked_too[], y int); \
         CREATE TABLE by_domain_null (x zap_checked, y int); \
         CREATE TABLE indexed (x int); CREATE INDEX ON indexed ((x + zapi())); \
         CREATE TABLE partial (x int); CREATE INDEX ON partial (x) WHERE zapb(x); \
         CREATE TABLE keyed (x int) PARTITION BY RANGE ((x + zapi())); \
         CREATE TABLE keyed_1 PARTITION OF keyed FOR VALUES FROM (0) TO (100); \
         CREATE TABLE computed (x int, y int GENERATED ALWAYS AS (x + zapi()) STORED); \
         CREATE TABLE counted (x int); CREATE STATISTICS counted_s ON (x + zapi()) FROM counted; \
         CREATE FUNCTION positive(int) RETURNS bool IMMUTABLE LANGUAGE sql AS $f$ SELECT $1 > 0 $f$; \
         CREATE DOMAIN short_text AS text CHECK (length(VALUE) < 10) DEFAULT 'x'; \
         CREATE TABLE plain (id serial PRIMARY KEY, at timestamptz DEFAULT now(), \
           name text CHECK (name <> ''), n int CHECK (positive(n)), s short_text); \
         CREATE INDEX ON plain (lower(name)) WHERE n > 0; \
         DELETE FROM orders; INSERT INTO orders VALUES (1, 'apple'), (2, 'pear'), (3, 'plum');"
        ),
    )
    .unwrap();
    let c = h.connect().await;
    refused_twice(&c, &[
            // A column default, directly or through its domain.
            "INSERT INTO by_default (y) VALUES (1)",
            "INSERT INTO by_default VALUES (DEFAULT, 1)",
            "INSERT INTO by_default DEFAULT VALUES",
            "UPDATE by_default SET x = DEFAULT",
            "MERGE INTO by_default t USING (SELECT 1 AS y) s ON false WHEN NOT MATCHED THEN INSERT (y) VALUES (s.y)",
            "COPY by_default (y) FROM STDIN",
            "INSERT INTO by_domain_default (y) VALUES (1)",
            // A CHECK constraint; a domain's, of a domain under an array of one, and for the
            // NULL an omitted column gets.
            "INSERT INTO checked VALUES (1)",
            "UPDATE checked SET x = 2",
            "WITH w AS (INSERT INTO checked VALUES (3) RETURNING x) SELECT * FROM w",
            "INSERT INTO by_domain VALUES ('{1}', 1)",
            "INSERT INTO by_domain_null (y) VALUES (1)",
            // An index expression, a partial index's predicate, a partition key (also for a
            // row written to the partition itself), a generated column.
            "INSERT INTO indexed VALUES (1)",
            "INSERT INTO partial VALUES (1)",
            "INSERT INTO keyed VALUES (1)",
            "INSERT INTO keyed_1 VALUES (1)",
            "INSERT INTO computed (x) VALUES (1)",
            // VACUUM FULL rebuilds indexes, ANALYZE computes index and statistics expressions,
            // VALIDATE CONSTRAINT checks every row.
            "VACUUM FULL indexed",
            "ANALYZE indexed",
            "ANALYZE counted",
            "ALTER TABLE checked VALIDATE CONSTRAINT checked_x_check",
            // An IMMUTABLE function that calls a VOLATILE one, called directly.
            "SELECT zapi()",
    ])
    .await;
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the target changed");
    // Deleting runs no default, constraint or index expression; built-ins and a SQL function
    // that only computes are known.
    c.simple_query("DELETE FROM checked").await.unwrap();
    c.simple_query("DELETE FROM by_default").await.unwrap();
    for _ in 0..2 {
        c.simple_query("INSERT INTO plain (name, n) VALUES ('a', 1)").await.unwrap();
        c.simple_query("UPDATE plain SET n = 2, s = DEFAULT").await.unwrap();
    }
    assert_eq!(h.sql("SELECT count(*) || ' ' || min(s) FROM plain"), "2 x");
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the target changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_security_policies_that_call_user_functions_are_of_unknown_effect() {
    let h = start(KEEP_ORDERS).await;
    h.pg.psql(
        "shop",
        &format!(
            "{ZAP} \
         CREATE TABLE guarded (id int); INSERT INTO guarded VALUES (1); \
         CREATE POLICY zap_rows ON guarded USING (zapb(id)); \
         ALTER TABLE guarded ENABLE ROW LEVEL SECURITY; ALTER TABLE guarded FORCE ROW LEVEL SECURITY; \
         CREATE VIEW guarded_view AS SELECT * FROM guarded; \
         CREATE VIEW zapping AS SELECT zap() AS z; \
         CREATE TABLE nested (id int); INSERT INTO nested VALUES (1); \
         CREATE POLICY through_view ON nested USING ((SELECT z FROM zapping) = 1); \
         ALTER TABLE nested ENABLE ROW LEVEL SECURITY; ALTER TABLE nested FORCE ROW LEVEL SECURITY; \
         CREATE TABLE owners (name text); INSERT INTO owners VALUES ('airlock_svc'); \
         CREATE TABLE mine (id int, owner text); INSERT INTO mine VALUES (1, 'airlock_svc'); \
         CREATE POLICY own ON mine USING (owner = current_user AND owner IN (SELECT name FROM owners)); \
         ALTER TABLE mine ENABLE ROW LEVEL SECURITY; ALTER TABLE mine FORCE ROW LEVEL SECURITY; \
         CREATE TABLE off (id int); CREATE POLICY zap_off ON off USING (zapb(id));"
        ),
    )
    .unwrap();
    let c = h.connect().await;
    refused_twice(
        &c,
        &[
            "SELECT * FROM guarded",
            "SELECT count(*) FROM public.guarded",
            "SELECT * FROM guarded_view",
            "INSERT INTO guarded VALUES (2)",
            "UPDATE guarded SET id = 3",
            "DELETE FROM guarded",
            // A policy that reads a view, which calls a function.
            "SELECT * FROM nested",
        ],
    )
    .await;
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the target changed");
    // A policy of built-ins reading a plain table, and one on a table without row security,
    // run no user code.
    for _ in 0..2 {
        let rows = c.simple_query("SELECT * FROM mine").await.unwrap();
        assert_eq!(rows.iter().filter(|m| matches!(m, SimpleQueryMessage::Row(_))).count(), 1);
        c.simple_query("SELECT * FROM off").await.unwrap();
        c.simple_query("INSERT INTO off VALUES (1)").await.unwrap();
    }
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the target changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn casts_operators_and_what_function_bodies_read_run_user_code() {
    let h = start(KEEP_ORDERS).await;
    h.pg.psql(
        "shop",
        &format!(
            "{ZAP} \
         CREATE TYPE mood AS ENUM ('happy', 'sad'); \
         CREATE FUNCTION to_mood(text) RETURNS mood LANGUAGE plpgsql AS \
           $f$ BEGIN PERFORM zap(); RETURN enum_first(NULL::mood); END $f$; \
         CREATE CAST (text AS mood) WITH FUNCTION to_mood(text) AS ASSIGNMENT; \
         CREATE FUNCTION from_mood(mood) RETURNS text LANGUAGE plpgsql AS \
           $f$ BEGIN PERFORM zap(); RETURN 'x'; END $f$; \
         CREATE CAST (mood AS text) WITH FUNCTION from_mood(mood) AS IMPLICIT; \
         CREATE TABLE moods (m mood); INSERT INTO moods VALUES ('sad'); \
         CREATE TYPE feeling AS ENUM ('calm'); CREATE TABLE feelings (f feeling); \
         INSERT INTO feelings VALUES ('calm'); \
         CREATE VIEW zapping AS SELECT zap() AS z; \
         CREATE FUNCTION reads_view() RETURNS bigint STABLE LANGUAGE sql AS \
           $f$ SELECT count(*) FROM zapping $f$; \
         CREATE TABLE guarded (id int); INSERT INTO guarded VALUES (1); \
         CREATE POLICY zap_rows ON guarded USING (zapb(id)); \
         ALTER TABLE guarded ENABLE ROW LEVEL SECURITY; ALTER TABLE guarded FORCE ROW LEVEL SECURITY; \
         CREATE FUNCTION reads_guarded() RETURNS bigint STABLE LANGUAGE sql AS \
           $f$ SELECT count(*) FROM guarded $f$; \
         CREATE FUNCTION lower(int) RETURNS text VOLATILE LANGUAGE plpgsql AS \
           $f$ BEGIN PERFORM zap(); RETURN 'x'; END $f$; \
         CREATE FUNCTION shadowed() RETURNS text STABLE LANGUAGE sql AS $f$ SELECT lower(5) $f$; \
         CREATE FUNCTION reads_orders() RETURNS bigint STABLE LANGUAGE sql AS \
           $f$ SELECT count(*) FROM orders $f$;"
        ),
    )
    .unwrap();
    let c = h.connect().await;
    refused_twice(
        &c,
        &[
            // A user cast, run on assignment or implicitly.
            "INSERT INTO moods SELECT item FROM orders LIMIT 1",
            "SELECT upper(m) FROM moods",
            // A STABLE SQL function that reads a view calling a writing function, or a table
            // whose row security calls one, or calls a user function shadowing a built-in.
            "SELECT reads_view()",
            "SELECT reads_guarded()",
            "SELECT shadowed()",
        ],
    )
    .await;
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the target changed");
    for _ in 0..2 {
        c.simple_query("SELECT reads_orders(), upper(f::text) FROM feelings").await.unwrap();
        c.simple_query("SELECT item || item FROM orders").await.unwrap();
    }
    // A user operator on built-in types, applied to a table's columns.
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE FUNCTION zap_plus(text, text) RETURNS text LANGUAGE plpgsql AS \
           $f$ BEGIN PERFORM zap(); RETURN $1; END $f$; \
         CREATE OPERATOR + (leftarg = text, rightarg = text, function = zap_plus);",
    )
    .unwrap();
    let c = h.connect().await;
    refused(&c, "SELECT item + item FROM orders").await;
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the target changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_lookups_run_no_user_operator() {
    let h = start(KEEP_ORDERS).await;
    // Operators for exactly the argument types the catalog queries could write (an OID and an
    // integer, arrays of OIDs), and for OIDs alike with a search_path that puts pg_catalog
    // after public: the first call on a catalog connection turns its read-only default off,
    // the next deletes every order.
    let mut sql = String::from(
        "SET ROLE airlock_svc; \
         CREATE FUNCTION hook() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN \
           IF current_setting('transaction_read_only') = 'on' THEN \
             PERFORM set_config('default_transaction_read_only', 'off', false); \
           ELSE DELETE FROM orders; END IF; END $f$; \
         ALTER ROLE airlock_svc SET search_path = public, pg_catalog;",
    );
    for (i, (op, left, right, body)) in [
        (">=", "oid", "integer", "$1 OPERATOR(pg_catalog.>=) $2::oid"),
        ("<>", "oid", "integer", "$1 OPERATOR(pg_catalog.<>) $2::oid"),
        ("=", "oid", "integer", "$1 OPERATOR(pg_catalog.=) $2::oid"),
        ("=", "oid", "regclass", "$1 OPERATOR(pg_catalog.=) $2::oid"),
        ("=", "oid", "oid", "$1 OPERATOR(pg_catalog.=) $2"),
        ("&&", "oid[]", "oid[]", "$1 OPERATOR(pg_catalog.&&) $2"),
    ]
    .into_iter()
    .enumerate()
    {
        sql.push_str(&format!(
            "CREATE FUNCTION hooked_{i}(a {left}, b {right}) RETURNS bool LANGUAGE plpgsql AS \
               $f$ BEGIN PERFORM hook(); RETURN {body}; END $f$; \
             CREATE OPERATOR {op} (leftarg = {left}, rightarg = {right}, function = hooked_{i});"
        ));
    }
    sql.push_str(
        "CREATE FUNCTION hooked_cat(a oid[], b oid) RETURNS oid[] LANGUAGE plpgsql AS \
           $f$ BEGIN PERFORM hook(); RETURN pg_catalog.array_append(a, b); END $f$; \
         CREATE OPERATOR || (leftarg = oid[], rightarg = oid, function = hooked_cat); \
         CREATE TABLE plain (id int);",
    );
    h.pg.psql("shop", &sql).unwrap();
    for _ in 0..2 {
        let c = h.connect().await;
        for sql in [
            "SELECT lower(item) FROM orders",
            "SELECT upper(o.item) FROM orders o",
            "SELECT * FROM orders",
            "INSERT INTO plain VALUES (1)",
            "SELECT * FROM plain p JOIN orders o ON o.id = p.id",
        ] {
            // Run, or refused: reading a column of a type with such an operator may run it.
            if let Err(e) = c.simple_query(sql).await {
                assert_eq!(sqlstate(&e), "42501", "{sql}: {e:?}");
            }
        }
        assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the target changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builtin_that_makes_a_value_of_a_named_type_is_of_unknown_effect() {
    let h = start(KEEP_ORDERS).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE FUNCTION zap(int) RETURNS bool VOLATILE LANGUAGE plpgsql AS \
           $f$ BEGIN DELETE FROM orders; RETURN true; END $f$; \
         CREATE DOMAIN sneaky_int AS int CHECK (zap(VALUE)); \
         CREATE TABLE holder (x sneaky_int);",
    )
    .unwrap();
    let c = h.connect().await;
    for sql in [
        "SELECT domain_in('5', 'sneaky_int'::regtype, -1) IS NULL",
        "SELECT pg_catalog.domain_in('5', 'sneaky_int'::regtype, -1) IS NULL",
        "SELECT array_in('{5}', 'sneaky_int'::regtype, -1) IS NULL",
        "SELECT jsonb_populate_record(h, '{\"x\": 7}') IS NULL FROM (SELECT 1) s LEFT JOIN holder h ON false",
        // A cast in FROM, which sqlparser reads as a table function `cast`.
        "SELECT * FROM CAST(5 AS sneaky_int) f",
        "SELECT * FROM cast(5 as SNEAKY_INT) AS f(x)",
    ] {
        refused(&c, sql).await;
    }
    assert_eq!(h.sql("SELECT count(*) FROM orders"), "3", "the target changed");
    // Other built-ins still read.
    c.simple_query("SELECT lower('A'), int4in('5') IS NULL, now() IS NULL").await.unwrap();
    c.simple_query("SELECT * FROM CAST(5 AS int) f").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_on_a_table_meets_statements_that_name_it_outside_a_from_clause() {
    let rules = r#"  - { name: orders-untouchable, match: { tables: [orders] }, action: deny }
defaults: { no_match: allow, unknown_operation: deny }
"#;
    let h = start(rules).await;
    h.pg.psql("shop", "SET ROLE airlock_svc; COMMENT ON TABLE orders IS 'what was sold';").unwrap();
    // Its comments, privileges, statistics, storage and triggers, read on the target directly.
    let state = |t: &str| {
        h.sql(&format!(
            "SELECT concat_ws(' | ', coalesce(obj_description(c.oid, 'pg_class'), 'no comment'), \
               coalesce(col_description(c.oid, 2), 'no column comment'), coalesce(c.relacl::text, 'default acl'), \
               c.reltuples, pg_relation_filenode(c.oid), (SELECT count(*) FROM pg_trigger WHERE tgrelid = c.oid)) \
             FROM pg_class c WHERE c.oid = '{t}'::regclass"
        ))
    };
    let before = state("orders");
    let c = h.connect().await;
    for sql in [
        "COMMENT ON TABLE orders IS 'x'",
        "COMMENT ON TABLE public.Orders IS NULL",
        "COMMENT ON COLUMN orders.item IS 'x'",
        "GRANT ALL ON orders TO PUBLIC",
        "GRANT SELECT (item) ON TABLE public.orders TO PUBLIC",
        "REVOKE ALL ON orders FROM airlock_svc",
        // Every table of the schema, or of the database.
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO PUBLIC",
        "VACUUM orders",
        "VACUUM FULL orders",
        "VACUUM FULL",
        "VACUUM VERBOSE",
        "ANALYZE",
        "ANALYZE VERBOSE",
        "CREATE TRIGGER keep BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        // A read of orders.
        "SELECT * FROM (TABLE orders) o",
    ] {
        refused(&c, sql).await;
    }
    assert_eq!(state("orders"), before, "orders changed");
    // The same statements on a table no rule names go through.
    let before = state("payments");
    for sql in
        ["COMMENT ON TABLE payments IS 'paid'", "GRANT SELECT ON payments TO PUBLIC", "VACUUM payments"]
    {
        c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let after = state("payments");
    assert!(after.starts_with("paid | ") && after.contains("=r/airlock_svc"), "{before} -> {after}");
    assert_eq!(h.sql("SELECT reltuples FROM pg_class WHERE oid = 'payments'::regclass"), "1", "not vacuumed");
}

/// `DROP … CASCADE` drops what depends on the object wherever it is: a type's columns, a
/// sequence's defaults, views. Which tables those are is not in the text, so a rule on any table
/// meets it; without CASCADE only the object is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_cascade_meets_a_rule_on_any_table_it_could_reach() {
    let rules = r#"  - { name: orders-untouchable, match: { operations: [drop, alter], tables: [orders] }, action: deny }
defaults: { no_match: allow, unknown_operation: deny }
"#;
    let h = start(rules).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; CREATE TYPE mood AS ENUM ('ok', 'sad'); \
         CREATE SEQUENCE order_no; CREATE DOMAIN posint AS int CHECK (VALUE > 0); \
         ALTER TABLE orders ADD COLUMN mood mood, ADD COLUMN no int DEFAULT nextval('order_no'), \
           ADD COLUMN qty posint; \
         CREATE TYPE spare AS ENUM ('x');",
    )
    .unwrap();
    let columns = || {
        h.sql(
            "SELECT string_agg(attname || ':' || coalesce(pg_get_expr(d.adbin, d.adrelid), ''), ',' ORDER BY attnum) \
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE attrelid = 'orders'::regclass AND attnum > 0 AND NOT attisdropped",
        )
    };
    let before = columns();
    assert!(before.contains("mood:") && before.contains("nextval") && before.contains("qty:"), "{before}");
    let c = h.connect().await;
    for sql in ["DROP TYPE mood CASCADE", "DROP SEQUENCE order_no CASCADE", "DROP DOMAIN posint CASCADE"] {
        refused(&c, sql).await;
    }
    assert_eq!(columns(), before, "orders lost a column or a default");
    // Without CASCADE, and for an object nothing of orders depends on, it goes through.
    c.simple_query("DROP TYPE spare").await.unwrap();
}

/// Writes to the seeded tables and DDL denied (other writes allowed, so the target session is
/// writable), `orders.item` masked.
const FUZZ_POLICY: &str = r#"  - name: seeded-tables-read-only
    match: { operations: [insert, update, delete, merge, truncate, copy, call, do, lock], tables: [orders, payments] }
    action: deny
  - name: no-ddl
    match: { operations: [create, drop, alter, grant, revoke, escalate] }
    action: deny
defaults: { unknown_operation: deny }
masking:
  - columns: [orders.item]
    strategy: redact
"#;

/// Statement texts the fuzzer sends, simple or extended: reads, denied writes (plain, with
/// parameters, in CTEs, behind PREPARE), transaction and cursor control, names that collide
/// with portals, junk and several statements at once.
const FUZZ_SQL: &[&str] = &[
    "SELECT item FROM orders",
    "SELECT item FROM orders WHERE id = $1",
    "SELECT id, item FROM orders ORDER BY id",
    "SELECT 1",
    "SELECT $1::text",
    "DELETE FROM orders",
    "DELETE FROM orders WHERE id = $1",
    "UPDATE payments SET amount = 0",
    "INSERT INTO orders VALUES ($1, 'x')",
    "WITH d AS (DELETE FROM orders RETURNING item) SELECT * FROM d",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT s",
    "ROLLBACK TO s",
    "DECLARE c CURSOR WITH HOLD FOR SELECT item FROM orders",
    "DECLARE p CURSOR FOR SELECT item FROM orders",
    "FETCH c",
    "FETCH ALL p",
    "CLOSE c",
    "PREPARE a AS DELETE FROM orders",
    "PREPARE b AS SELECT item FROM orders",
    "EXECUTE a",
    "EXECUTE b",
    "DEALLOCATE a",
    "SELECT 1; DELETE FROM orders",
    "COPY orders TO STDOUT",
    "COPY (SELECT id, item FROM orders) TO STDOUT (FORMAT csv)",
    "SELEC",
    "",
];

/// Statement and portal names: the unnamed ones, and names that collide with the SQL-level
/// prepared statements and cursors above.
const FUZZ_NAMES: &[&str] = &["", "a", "b", "c", "p"];

/// A random pipeline of 1 to 12 extended-protocol messages and Queries, then a Sync, and how
/// many ReadyForQuery answer it. A Query comes only after a Sync (one is put in before it
/// otherwise): after an error the server skips every message up to the next Sync, a Query too,
/// and which message fails is what is being tested, so only there is its answer certain.
fn fuzz_pipeline(rng: &mut common::Rng) -> (Vec<u8>, usize) {
    use testkit::pgwire::{close, describe, execute, message, parse, query, sync};
    let (mut out, mut readies, mut synced) = (Vec::new(), 1, true);
    for _ in 0..=rng.below(12) {
        let name = rng.pick(FUZZ_NAMES);
        let kind = rng.pick(b"SP");
        let choice = rng.below(13);
        let simple = matches!(choice, 0 | 1 | 11);
        if simple && !synced {
            out.extend(sync());
            readies += 1;
        }
        synced = simple;
        out.extend(match choice {
            0 | 1 => {
                readies += 1;
                query(rng.pick(FUZZ_SQL))
            }
            // COPY FROM STDIN (allowed into `scratch`, denied into the seeded tables), its data
            // and its end. No Sync in between: the server ignores one during COPY.
            11 => {
                readies += 1;
                let mut copy = query(rng.pick(&["COPY scratch FROM STDIN", "COPY orders FROM STDIN"]));
                for _ in 0..rng.below(3) {
                    copy.extend(message(b'd', rng.pick(&[&b"7\n"[..], b"8\n9\n", b"oops\tx\n", b""])));
                }
                copy.extend(if rng.chance(70) { message(b'c', &[]) } else { message(b'f', b"stop\0") });
                copy
            }
            // Copy messages outside a COPY, which the server ignores.
            12 => message(rng.pick(b"dcf"), b"stray\0"),
            2 | 3 => parse(name, rng.pick(FUZZ_SQL)),
            4 | 5 => {
                let params: &[&str] = if rng.chance(50) { &["1"] } else { &[] };
                testkit::pgwire::bind_results(
                    name,
                    rng.pick(FUZZ_NAMES),
                    params,
                    &[u16::from(rng.chance(30))],
                )
            }
            6 => describe(kind, name),
            7 | 8 => execute(name),
            9 => close(kind, name),
            _ if rng.chance(50) => {
                readies += 1;
                synced = true;
                sync()
            }
            _ => message(b'H', &[]),
        });
    }
    out.extend(sync());
    (out, readies)
}

/// Send `msgs` and read until `readies` ReadyForQuery have come: everything the gateway sent,
/// or `None` if it closed the session. Panics (naming `what`) if the answers stop short.
async fn exchange(s: &mut tokio::net::TcpStream, msgs: &[u8], readies: usize, what: &str) -> Option<Vec<u8>> {
    s.write_all(msgs).await.ok()?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let (tags, partial) = testkit::pgwire::whole_tags(&seen);
        let got = tags.iter().filter(|&&t| t == b'Z').count();
        assert!(got <= readies, "{what}: more answers than asked for: {}", String::from_utf8_lossy(&seen));
        if got == readies && partial == 0 {
            return Some(seen);
        }
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        let n = read.unwrap_or_else(|_| {
            panic!("{what}: {got} of {readies} answers within 10 s: {}", String::from_utf8_lossy(&seen))
        });
        match n {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// Random pipelines of the extended protocol and Queries, with colliding names, binary
/// results, errors mid-pipeline and Flushes, through the gateway to a writable target session:
/// every pipeline is answered in order (no hang), the target's tables and catalog are unchanged
/// after each (then a COMMIT, so nothing left open hides a write), no masked value is in any
/// byte the client gets, and another session is unaffected throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_pipelines_change_nothing_leak_nothing_and_stay_in_step() {
    let seed = common::env_number("PIPELINE_SEED", 0x0f0f_5eed);
    let runs = common::env_number("PIPELINE_RUNS", 400);
    let h = start(FUZZ_POLICY).await;
    let secrets = ["zq1-s3cr3t-item", "zq2-s3cr3t-item", "zq3-s3cr3t-item"];
    h.as_owner("UPDATE orders SET item = 'zq' || id || '-s3cr3t-item'; CREATE TABLE scratch (x int)");
    let state = || {
        h.sql(
            "SELECT (SELECT string_agg(id || ':' || item, ',' ORDER BY id) FROM orders), \
             (SELECT string_agg(id || ':' || amount, ',' ORDER BY id) FROM payments), \
             (SELECT count(*) FROM pg_class)",
        )
    };
    let before = state();
    let bystander = h.connect().await;
    let mut s = h.raw_as("agent", KEY).await;
    // The target session is writable (an allowed write goes through): the gateway alone keeps
    // the denied ones out.
    let write = testkit::pgwire::query("INSERT INTO scratch VALUES (1)");
    let wrote = exchange(&mut s, &write, 1, "an allowed write").await;
    assert!(
        wrote.is_some_and(|w| testkit::pgwire::contains(&w, "INSERT 0 1")),
        "the target session is writable"
    );
    let mut rng = common::Rng::new(seed);
    let (mut answered, mut closed, mut rows, mut errors, mut masked) = (0, 0, 0, 0, 0);
    for run in 0..runs {
        let (pipeline, readies) = fuzz_pipeline(&mut rng);
        let what = format!("seed {seed} run {run}, {:?}", String::from_utf8_lossy(&pipeline));
        let Some(seen) = exchange(&mut s, &pipeline, readies, &what).await else {
            // The target may end its own session: PostgreSQL 15 exits on `EXECUTE b` of a
            // `SAVEPOINT` prepared by Parse outside a block (FATAL: DefineSavepoint: unexpected
            // state STARTED), and the gateway ends the client's with it.
            closed += 1;
            s = h.raw_as("agent", KEY).await;
            continue;
        };
        answered += 1;
        let (tags, _) = testkit::pgwire::whole_tags(&seen);
        rows += tags.iter().filter(|&&t| t == b'D').count();
        errors += tags.iter().filter(|&&t| t == b'E').count();
        masked += usize::from(testkit::pgwire::contains(&seen, "[redacted]"));
        for secret in secrets {
            assert!(!testkit::pgwire::contains(&seen, secret), "{what}: {secret} leaked");
        }
        // Commit whatever the pipeline left open, and free the names it made.
        for sql in ["COMMIT", "DEALLOCATE ALL", "CLOSE ALL"] {
            if exchange(&mut s, &testkit::pgwire::query(sql), 1, &what).await.is_none() {
                s = h.raw_as("agent", KEY).await;
            }
        }
        assert_eq!(state(), before, "{what}: the target changed");
    }
    println!(
        "{runs} pipelines: {answered} answered, {closed} sessions closed, {rows} rows, {errors} errors, \
         {masked} with masked values"
    );
    // Not vacuous: the pipelines were answered, with rows (masked ones among them) and errors.
    assert!(
        answered * 2 >= runs as usize && rows > 0 && errors > 0 && masked > 0,
        "{answered} answered, {rows} rows, {errors} errors"
    );
    assert_eq!(bystander.simple_query("SELECT 1").await.map(|m| m.len()).ok(), Some(3), "the other session");
}

/// A read allowed to run before it is recorded, skipped by the target because a message ahead
/// of it in the pipeline failed (here its own Bind, with a parameter too many): its answers
/// are not withheld forever waiting for a response that never comes (found by the pipeline
/// fuzzer: the session stalled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_skipped_after_a_failed_bind_does_not_stall_the_session() {
    use testkit::pgwire::{execute, parse, query, sync};
    let h = start(RULES).await;
    let mut s = h.raw_as("agent", KEY).await;
    for sql in ["BEGIN", "SELECT 1"] {
        let pipeline =
            [parse("c", sql), testkit::pgwire::bind("c", "c", &["1"]), execute("c"), sync()].concat();
        let seen = exchange(&mut s, &pipeline, 1, sql).await.expect("answered");
        let seen = String::from_utf8_lossy(&seen);
        assert!(seen.contains("bind message supplies 1 parameters"), "{seen}");
        let seen = exchange(&mut s, &[close_statement("c"), query("SELECT 'next'")].concat(), 2, sql).await;
        assert!(seen.is_some_and(|s| testkit::pgwire::contains(&s, "next")), "{sql}: the session goes on");
    }
}

/// Close the prepared statement `name`, then Sync.
fn close_statement(name: &str) -> Vec<u8> {
    [testkit::pgwire::close(b'S', name), testkit::pgwire::sync()].concat()
}
