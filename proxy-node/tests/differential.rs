//! The classifier against the server it speaks for. Every statement of a corpus, many of them
//! the tricks an agent would use to slip a write past a read-only rule, is classified with
//! [`proxy_node::policy::classify`] and run on a real PostgreSQL inside a transaction that is
//! rolled back. Whenever the server wrote (a transaction id was assigned, a seeded table or the
//! catalog changed, a sequence moved) the classifier must not have called the statement
//! read-only.
//!
//! Functions are judged as the gateway judges them: a called function that is not a known
//! read-only built-in counts as read-only only when its most volatile overload in any schema is
//! `STABLE` or `IMMUTABLE` (the `catalog` module's rule), and `EXECUTE` is resolved against the
//! statement prepared earlier on the same connection.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use proto::policy::Operation;
use proxy_node::policy::{Classification, FunctionRef, SessionEffect, classify};
use testkit::Postgres;
use tokio_postgres::{Client, SimpleQueryMessage};

mod common;
#[path = "differential/generate.rs"]
mod generate;

/// Operations that neither change data nor widen rights.
const READ_OPS: &[Operation] = &[
    Operation::Select,
    Operation::Show,
    Operation::Explain,
    Operation::Set,
    Operation::Transaction,
    Operation::Prepare,
    Operation::Deallocate,
    Operation::Cursor,
    Operation::Discard,
    Operation::Listen,
    Operation::Notify,
];

/// The target's objects. `shop_tpl` is kept pristine so `shop` can be remade when a statement
/// commits a change (`COMMIT; DELETE ...`).
const SEED: &str = r#"
CREATE TABLE orders (id int PRIMARY KEY, item text);
INSERT INTO orders VALUES (1, 'apple'), (2, 'pear'), (3, 'plum');
CREATE TABLE payments (id int PRIMARY KEY, order_id int, amount int);
INSERT INTO payments VALUES (1, 1, 10), (2, 2, 20);
CREATE TABLE "MixedCase" (id int);
INSERT INTO "MixedCase" VALUES (1);
CREATE SCHEMA app;
CREATE TABLE app."Audit" (id serial PRIMARY KEY, note text);
CREATE SEQUENCE order_seq;
CREATE MATERIALIZED VIEW mv_orders AS SELECT * FROM orders;
CREATE FUNCTION w_insert() RETURNS int VOLATILE LANGUAGE sql
    AS $f$ INSERT INTO app."Audit" (note) VALUES ('w_insert') RETURNING id $f$;
CREATE FUNCTION s_count() RETURNS bigint STABLE LANGUAGE sql AS $f$ SELECT count(*) FROM orders $f$;
CREATE FUNCTION i_double(int) RETURNS int IMMUTABLE LANGUAGE sql AS $f$ SELECT $1 * 2 $f$;
-- Declared STABLE, but calls a VOLATILE function that writes.
CREATE FUNCTION s_sneaky() RETURNS int STABLE LANGUAGE sql AS $f$ SELECT w_insert() $f$;
CREATE PROCEDURE p_insert() LANGUAGE sql AS $f$ INSERT INTO app."Audit" (note) VALUES ('p_insert') $f$;
-- A user function overloading a read-only built-in's name.
CREATE FUNCTION public.lower(int) RETURNS int VOLATILE LANGUAGE sql
    AS $f$ INSERT INTO app."Audit" (note) VALUES ('lower') RETURNING id $f$;
-- A user function shadowing a built-in when its schema comes first in search_path.
CREATE FUNCTION app.upper(text) RETURNS text VOLATILE LANGUAGE sql
    AS $f$ INSERT INTO app."Audit" (note) VALUES ('upper') RETURNING note $f$;
-- Objects that run a writing function without naming it.
CREATE VIEW v_sneaky AS SELECT w_insert() AS id;
CREATE FUNCTION op_write(int, int) RETURNS int VOLATILE LANGUAGE sql AS $f$ SELECT w_insert() $f$;
CREATE OPERATOR ### (LEFTARG = int, RIGHTARG = int, FUNCTION = op_write);
CREATE DOMAIN sneaky_int AS int CHECK (w_insert() > 0);
-- Called as a field of a row: `o.w_touch` is `w_touch(o)`.
CREATE FUNCTION w_touch(orders) RETURNS int VOLATILE LANGUAGE sql AS $f$ SELECT w_insert() $f$;
CREATE VIEW v_touch AS SELECT o.id, o.w_touch FROM orders o;
"#;

/// Tables whose contents are fingerprinted after each statement.
/// Qualified, so a statement that changes `search_path` cannot hide them.
const TABLES: &[&str] =
    &["public.orders", "public.payments", r#"public."MixedCase""#, r#"app."Audit""#, "public.mv_orders"];

/// Statements whose server-side write must be caught. `{file}` is replaced by the path of a
/// CSV file holding one row for `orders`.
const CORPUS: &[&str] = &[
    // Plain reads.
    "SELECT 1",
    "SELECT * FROM orders",
    "select id, item from ORDERS where id = 2",
    "SELECT o.item, p.amount FROM orders o JOIN payments p ON p.order_id = o.id",
    "SELECT (o).item, orders_alias.id FROM orders o, orders orders_alias WHERE o.id = orders_alias.id",
    "SELECT o.item FROM orders o WHERE length(o.item) > 1 ORDER BY o.id",
    "SELECT count(*) FROM public.orders",
    r#"SELECT * FROM app."Audit""#,
    r#"SELECT * FROM "MixedCase""#,
    "WITH x AS (SELECT id FROM orders) SELECT * FROM x",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT sum(n) FROM r",
    "SELECT s_count()",
    "SELECT i_double(21)",
    "SELECT length(item), btrim(item) FROM orders",
    "SELECT pg_catalog.lower('X')",
    "SHOW search_path",
    "SHOW ALL",
    "EXPLAIN SELECT * FROM orders",
    "EXPLAIN (COSTS OFF) SELECT * FROM orders WHERE id = 1",
    "EXPLAIN DELETE FROM orders",
    "SELECT now(), current_user, version()",
    "SELECT * FROM generate_series(1, 3)",
    "SELECT 1; SELECT 2",
    "/* leading comment */ SELECT 1",
    "SELECT 1 -- trailing comment\n",
    "SELECT $$DELETE FROM orders$$",
    "SELECT 'DELETE FROM orders'",
    "SELECT $tag$ ; DROP TABLE orders; $tag$",
    "SET search_path TO public",
    "SELECT * FROM orders ORDER BY id LIMIT 1 OFFSET 1",
    "VALUES (1), (2)",
    "TABLE orders",
    "SELECT EXISTS (SELECT 1 FROM payments)",
    "SELECT pg_typeof(1), gen_random_uuid(), random()",
    "SELECT * FROM mv_orders",
    "DECLARE c CURSOR FOR SELECT * FROM orders",
    "SELECT current_setting('search_path')",
    "SELECT last_value FROM order_seq",
    "SELECT pg_sleep(0)",
    "COPY orders TO STDOUT",
    "COPY (SELECT item FROM orders) TO STDOUT",
    // Plain writes.
    "INSERT INTO orders VALUES (10, 'kiwi')",
    "UPDATE orders SET item = 'x' WHERE id = 1",
    "DELETE FROM orders WHERE id = 1",
    "TRUNCATE payments",
    r#"INSERT INTO app."Audit" (note) VALUES ('direct')"#,
    // Writing CTEs.
    "WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM d",
    "WITH u AS (UPDATE orders SET item = 'y' RETURNING id) SELECT count(*) FROM u",
    "WITH i AS (INSERT INTO orders VALUES (11, 'fig') RETURNING id) SELECT 1",
    "WITH x AS (SELECT 1), d AS (DELETE FROM payments RETURNING 1) SELECT * FROM x",
    "WITH d AS (DELETE FROM payments) SELECT 1",
    "with D as (delete from PAYMENTS returning ID) select * from D",
    "WITH m AS (MERGE INTO orders USING payments p ON orders.id = p.id WHEN MATCHED THEN DELETE) SELECT 1",
    "WITH a AS (WITH b AS (DELETE FROM payments RETURNING id) SELECT * FROM b) SELECT * FROM a",
    // SELECT INTO, CREATE TABLE AS.
    "SELECT * INTO stolen FROM orders",
    "SELECT id INTO TEMP t1 FROM orders",
    "SELECT id INTO UNLOGGED TABLE t2 FROM orders",
    "CREATE TABLE t3 AS SELECT * FROM orders",
    "CREATE TEMP TABLE t4 AS SELECT 1",
    "CREATE MATERIALIZED VIEW mv2 AS SELECT * FROM orders",
    "REFRESH MATERIALIZED VIEW mv_orders",
    // EXPLAIN ANALYZE.
    "EXPLAIN ANALYZE DELETE FROM orders",
    "EXPLAIN (ANALYZE) UPDATE orders SET item = 'z'",
    "EXPLAIN (ANALYZE, BUFFERS) INSERT INTO orders VALUES (12, 'x')",
    "EXPLAIN ANALYZE SELECT w_insert()",
    "EXPLAIN ANALYZE WITH d AS (DELETE FROM orders RETURNING 1) SELECT * FROM d",
    "EXPLAIN ANALYZE CREATE TABLE t5 AS SELECT 1",
    "EXPLAIN ANALYZE SELECT * INTO t6 FROM orders",
    "explain analyse delete from orders",
    // PREPARE / EXECUTE in one message.
    "PREPARE p AS DELETE FROM orders; EXECUTE p",
    "prepare P as update orders set item = 'q'; execute p",
    "PREPARE p(int) AS INSERT INTO orders VALUES ($1, 'p'); EXECUTE p(50)",
    "PREPARE p AS SELECT w_insert(); EXECUTE p",
    "PREPARE p AS DELETE FROM orders; EXPLAIN ANALYZE EXECUTE p",
    "PREPARE p AS SELECT * FROM orders; EXECUTE p",
    // DO blocks.
    "DO $$ BEGIN DELETE FROM orders; END $$",
    "DO LANGUAGE plpgsql $x$ BEGIN INSERT INTO orders VALUES (13, 'do'); END $x$",
    "do 'begin update orders set item = ''d''; end'",
    "DO $$BEGIN PERFORM 1; END$$",
    "DO $$ BEGIN EXECUTE 'TRUNCATE ' || 'payments'; END $$",
    // CALL.
    "CALL p_insert()",
    "call public.p_insert()",
    "CALL P_INSERT()",
    // Functions.
    "SELECT w_insert()",
    "SELECT * FROM w_insert()",
    "SELECT public.w_insert()",
    "SELECT W_INSERT()",
    r#"SELECT "w_insert"()"#,
    r#"SELECT U&"w\005finsert"()"#,
    "SELECT s_sneaky()",
    "SELECT id FROM orders WHERE w_insert() > 0",
    "SELECT (SELECT w_insert())",
    "SELECT i_double(w_insert())",
    "SELECT coalesce(NULL, w_insert())",
    "VALUES (w_insert())",
    "SELECT 1 FROM orders ORDER BY w_insert()",
    "SELECT CASE WHEN true THEN w_insert() END",
    "SELECT ARRAY[w_insert()]",
    "SELECT count(w_insert())",
    "SELECT 1 WHERE EXISTS (SELECT w_insert())",
    "SELECT * FROM orders WHERE id IN (SELECT w_insert())",
    "SELECT * FROM orders, LATERAL w_insert()",
    "SELECT * FROM ROWS FROM (w_insert())",
    "SELECT count(*) FROM orders; SELECT w_insert()",
    "DECLARE c CURSOR FOR SELECT w_insert(); FETCH ALL FROM c",
    "SELECT lower(1)",
    r#"SELECT "lower"(1)"#,
    "SET search_path = app, pg_catalog, public; SELECT upper('x')",
    "SELECT app.upper('x')",
    "SELECT * FROM v_sneaky",
    "TABLE v_sneaky",
    "SELECT 1 ### 2",
    // Field selection that calls a function of the value.
    "SELECT (1).lower",
    "SELECT o.w_touch FROM orders o",
    "SELECT (o).w_touch FROM orders o",
    "SELECT orders.w_touch FROM orders",
    "SELECT public.orders.w_touch FROM orders",
    "SELECT id FROM orders o WHERE o.w_touch > 0",
    "SELECT ('order_seq'::regclass).nextval",
    "SELECT (0::oid).lo_create",
    // Field notation falls back to a cast to a type of that name: a domain's CHECK runs.
    "SELECT (5).sneaky_int",
    "SELECT * FROM v_touch",
    // SELECT INTO inside a set operation or parentheses creates a table.
    "SELECT 1 AS x INTO evil1 UNION SELECT 2",
    "(SELECT 1 AS x INTO evil2)",
    "SELECT 1 AS x INTO evil3 UNION ALL (SELECT 2 EXCEPT SELECT 3)",
    "SELECT 1 OPERATOR(public.###) 2",
    "SELECT 5::sneaky_int",
    "SELECT CAST(5 AS public.sneaky_int)",
    "SELECT * FROM ts_stat('DELETE FROM orders RETURNING to_tsvector(item)')",
    "SELECT query_to_xml('DELETE FROM orders RETURNING 1', true, true, '')",
    // Sequences.
    "SELECT nextval('order_seq')",
    "SELECT NEXTVAL('public.order_seq')",
    r#"SELECT pg_catalog.nextval('"order_seq"')"#,
    "SELECT setval('order_seq', 100)",
    "SELECT currval('order_seq')",
    "ALTER SEQUENCE order_seq RESTART WITH 5",
    "SELECT * FROM orders WHERE id = nextval('order_seq')",
    // Locks, transaction ids, notifications.
    "SELECT pg_advisory_lock(42)",
    "SELECT pg_try_advisory_xact_lock(1)",
    "SELECT pg_catalog.pg_advisory_lock(7)",
    "SELECT txid_current()",
    "SELECT pg_current_xact_id()",
    "SELECT pg_notify('ch', 'x')",
    "NOTIFY ch",
    "LISTEN ch",
    "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE",
    // Large objects.
    "SELECT lo_create(0)",
    "SELECT lo_import('/etc/hostname')",
    "SELECT pg_catalog.lo_creat(-1)",
    "SELECT LO_FROM_BYTEA(0, 'abc')",
    "SELECT lo_unlink(1)",
    // set_config and friends.
    "SELECT set_config('search_path', 'app', false)",
    "SELECT pg_catalog.set_config('transaction_read_only', 'off', true)",
    "SELECT SET_CONFIG('statement_timeout', '1s', false)",
    "SELECT pg_stat_reset()",
    "SELECT pg_create_restore_point('x')",
    // COPY.
    "COPY orders FROM STDIN",
    "copy ORDERS (id, item) from stdin",
    "COPY orders FROM PROGRAM 'echo 77,prog' WITH (FORMAT csv)",
    "COPY orders FROM '{file}' WITH (FORMAT csv)",
    "COPY (SELECT w_insert()) TO STDOUT",
    "COPY (DELETE FROM orders RETURNING *) TO STDOUT",
    "COPY (WITH d AS (DELETE FROM payments RETURNING id) SELECT * FROM d) TO STDOUT",
    // MERGE and upserts.
    "MERGE INTO orders o USING (SELECT 1 AS id) s ON o.id = s.id \
     WHEN MATCHED THEN UPDATE SET item = 'm' WHEN NOT MATCHED THEN INSERT VALUES (s.id, 'm')",
    "MERGE INTO orders USING payments p ON orders.id = p.id WHEN MATCHED THEN DELETE",
    "INSERT INTO orders VALUES (1, 'dup') ON CONFLICT (id) DO UPDATE SET item = excluded.item",
    "INSERT INTO orders VALUES (1, 'dup') ON CONFLICT DO NOTHING",
    "INSERT INTO orders SELECT 20, item FROM orders WHERE id = 1",
    // Row locks.
    "SELECT * FROM orders FOR UPDATE",
    "SELECT * FROM orders WHERE id = 1 FOR NO KEY UPDATE",
    "SELECT * FROM orders FOR SHARE",
    "SELECT * FROM orders FOR KEY SHARE",
    "SELECT * FROM orders FOR UPDATE SKIP LOCKED",
    "WITH x AS (SELECT * FROM orders FOR UPDATE) SELECT * FROM x",
    "SELECT * FROM (SELECT * FROM orders FOR UPDATE) s",
    "SELECT (SELECT item FROM orders WHERE id = 1 FOR UPDATE)",
    "SELECT * FROM orders WHERE id IN (SELECT id FROM orders FOR UPDATE)",
    // Comments, quoting and case.
    "/* nested /* comment */ still a comment */ DELETE FROM orders",
    "/* a /* b */ DELETE FROM orders; */ SELECT 1",
    "SELECT 1 /* x /* y */ ; DELETE FROM orders; */",
    "SELECT 1 --\r; DELETE FROM orders WHERE id = 1",
    "SELECT 1 --\n; DELETE FROM orders WHERE id = 1",
    "SELECT 'a' -- comment \r\n; UPDATE orders SET item = 'c'",
    "SELECT 1 -- comment \r DELETE FROM orders",
    "DeLeTe FrOm OrDeRs",
    r#"DELETE FROM "orders""#,
    r#"DELETE FROM public."orders""#,
    r#"UPDATE U&"ord\0065rs" SET item = 'u'"#,
    r#"UPDATE U&"ord!0065rs" UESCAPE '!' SET item = 'u'"#,
    r#"SELECT E'it\'s'; DELETE FROM orders"#,
    r#"SELECT E'\''; DELETE FROM orders; --'"#,
    r#"SELECT E'\'; DELETE FROM orders; --'"#,
    r#"SELECT '\'; DELETE FROM orders; --'"#,
    r#"SET standard_conforming_strings = off; SELECT 'a\'; DELETE FROM orders; --'"#,
    r#"SELECT U&'\0041'; DELETE FROM orders"#,
    "SELECT $$ $$; DELETE FROM orders; -- $$",
    "SELECT $a$ $b$ ; DELETE FROM orders $b$ $a$",
    "SELECT $_$x$_$; DELETE FROM orders",
    "SELECT $a$x$A$; DELETE FROM orders; $A$ $a$",
    // Tags the server takes and the parser does not: any non-ASCII byte is a tag character to
    // PostgreSQL, only Unicode alphanumerics are to sqlparser.
    "SELECT $a€$ , $$ $a€$; DELETE FROM orders; --$$",
    "SELECT $€$ , $$ $€$; DELETE FROM orders; --$$",
    "SELECT $a→$ , $$ $a→$; DELETE FROM orders; --$$",
    r#"SELECT 1 AS "$$"; DELETE FROM orders"#,
    r#"SELECT 1 AS "a""b"; DELETE FROM orders"#,
    "SELECT 1;DELETE FROM orders;",
    "SHOW search_path; TRUNCATE orders CASCADE",
    "BEGIN; DELETE FROM payments; COMMIT",
    "COMMIT; DELETE FROM payments",
    "ROLLBACK; INSERT INTO orders VALUES (30, 'after rollback')",
    "SELECT 1\\; DELETE FROM orders",
    "SELECT 1 \u{a0}; DELETE FROM orders",
    // DDL and maintenance.
    "CREATE TABLE x (id int)",
    "ALTER TABLE orders ADD COLUMN c int",
    "ALTER TABLE orders RENAME TO o2",
    "DROP TABLE payments",
    "DROP TABLE IF EXISTS nothing_here",
    "CREATE INDEX ON orders (item)",
    "COMMENT ON TABLE orders IS 'x'",
    "GRANT SELECT ON orders TO PUBLIC",
    "REVOKE ALL ON orders FROM PUBLIC",
    "CREATE ROLE r1",
    "CREATE FUNCTION f2() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE VIEW v2 AS SELECT 1",
    "CREATE SCHEMA s2",
    "CREATE SEQUENCE seq2",
    "CREATE TYPE mood AS ENUM ('sad', 'ok')",
    "CREATE POLICY pol ON orders USING (true)",
    "CREATE RULE r AS ON INSERT TO orders DO INSTEAD NOTHING",
    "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC",
    "ANALYZE orders",
    "VACUUM orders",
    "CLUSTER orders USING orders_pkey",
    "REINDEX TABLE orders",
    "CHECKPOINT",
    "SECURITY LABEL ON TABLE orders IS 'x'",
    "CREATE STATISTICS st ON id, item FROM orders",
    "ALTER SYSTEM SET work_mem = '1MB'",
    "SET ROLE postgres",
    "RESET ALL",
    "DISCARD ALL",
];

/// (run first on the same connection, then the statement): `EXECUTE` of a statement prepared
/// in an earlier message.
const PREPARED: &[(&str, &str)] = &[
    ("PREPARE pd AS DELETE FROM orders", "EXECUTE pd"),
    ("PREPARE pu(text) AS UPDATE orders SET item = $1", "EXECUTE pu('z')"),
    ("PREPARE pf AS SELECT w_insert()", "EXECUTE pf"),
    ("PREPARE pr AS SELECT * FROM orders", "EXECUTE pr"),
    ("PREPARE pe AS INSERT INTO orders VALUES (40, 'e')", "EXPLAIN ANALYZE EXECUTE pe"),
    ("PREPARE pc AS SELECT * FROM orders FOR UPDATE", "EXECUTE pc"),
];

/// Statements the classifier must call read-only (and the server must not write for), so the
/// test cannot pass by calling everything a write.
const MUST_BE_READ: &[&str] = &[
    "SELECT 1",
    "SELECT * FROM orders",
    "select id, item from ORDERS where id = 2",
    "SELECT o.item, p.amount FROM orders o JOIN payments p ON p.order_id = o.id",
    r#"SELECT * FROM app."Audit""#,
    "WITH x AS (SELECT id FROM orders) SELECT * FROM x",
    "SELECT s_count()",
    "SELECT i_double(21)",
    "SELECT length(item), btrim(item) FROM orders",
    "SHOW search_path",
    "EXPLAIN SELECT * FROM orders",
    "SELECT $$DELETE FROM orders$$",
    "SELECT $tag$ ; DROP TABLE orders; $tag$",
    "SELECT 1; SELECT 2",
];

/// Statements that write on the server while the classifier calls them read-only, known and
/// not yet fixed. Each is a bypass of a read-only rule (see the comment for why); the test fails
/// when one of them stops being a bypass, so the list is kept exact.
const KNOWN_BYPASSES: &[&str] = &[
    // Found by this test and fixed since: a STABLE function calling a VOLATILE one, user
    // functions shadowing read-only built-ins (by argument types or search_path), views calling
    // writing functions, user operators, casts to domains with writing CHECKs, row locks in
    // CTEs and subqueries, EXECUTE nested in EXPLAIN ANALYZE. Keep this list empty.
];

/// Statements that assign a transaction id without writing anything (they are `STABLE`).
const XID_WITHOUT_WRITE: &[&str] = &["SELECT txid_current()", "SELECT pg_current_xact_id()"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The server wrote (how it noticed).
    Wrote(&'static str),
    Clean,
    Failed,
}

struct Row {
    sql: String,
    verdict: Result<(), String>,
    outcome: Outcome,
    error: Option<String>,
}

fn wrote(r: &Row) -> bool {
    match r.outcome {
        Outcome::Wrote("transaction id assigned") => !XID_WITHOUT_WRITE.contains(&r.sql.as_str()),
        Outcome::Wrote(_) => true,
        _ => false,
    }
}

/// `Ok(())` when the gateway would read the statement as read-only, else why not.
fn judge(c: &Classification) -> Result<(), String> {
    if let Some(e) = &c.unparsed {
        return Err(format!("unparsed: {e}"));
    }
    if let Some(f) = &c.denied_function {
        return Err(format!("denied: {f}"));
    }
    if let Some(u) = c.unknown_effect() {
        return Err(format!("unknown: {u}"));
    }
    let writes: Vec<&str> = c
        .accesses
        .iter()
        .filter(|a| !READ_OPS.contains(&a.operation))
        .map(|a| a.operation.as_str())
        .collect();
    if writes.is_empty() { Ok(()) } else { Err(format!("operations: {}", writes.join(","))) }
}

fn prepared_of(c: &Classification) -> HashMap<String, Classification> {
    c.effects
        .iter()
        .filter_map(|e| match e {
            SessionEffect::Prepare(n, c) => Some((n.clone(), (**c).clone())),
            _ => None,
        })
        .collect()
}

/// The gateway's own catalog rule ([`proxy_node::catalog::Catalog::read_only`]), through a
/// fresh catalog connection, so the test judges functions exactly as the proxy does.
async fn resolve(pg: &Postgres, dir: &std::path::Path, c: &mut Classification) -> anyhow::Result<()> {
    let pw = dir.join("catalog-password");
    std::fs::write(&pw, &pg.password)?;
    let doc = proto::policy::parse(&format!(
        "connections:\n  - {{ name: shop, kind: postgres, upstream: {{ host: {host}, port: {port}, database: shop, tls: disable }}, \
         credentials: {{ user: {user}, password_file: {pw} }} }}\n",
        host = pg.host,
        port = pg.port,
        user = pg.superuser,
        pw = pw.display()
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let target = &doc.connections[0];
    let sources =
        proxy_node::upstream::PasswordSources { dir: Some(dir.to_path_buf()), ..Default::default() };
    let mut catalog =
        proxy_node::catalog::Catalog::new(std::sync::Arc::new(proxy_node::catalog::Pool::new(sources)));
    let mut read_only = Vec::new();
    for f in c.functions.iter().chain(&c.builtins) {
        if catalog.read_only(target, f, std::time::Duration::from_secs(10), 1 << 20).await {
            read_only.push(f.clone());
        }
    }
    c.resolve_functions(|f: &FunctionRef| read_only.contains(f));
    let reach =
        proxy_node::catalog::Reach { target, timeout: std::time::Duration::from_secs(10), max: 1 << 20 };
    let mut fields = Vec::new();
    for n in &c.attribute_calls {
        fields.push((n.clone(), catalog.attribute_call(reach, n).await));
    }
    c.resolve_attribute_calls(|n| {
        fields.iter().find(|(m, _)| m == n).map_or(proxy_node::policy::AttributeCall::MayWrite, |(_, a)| *a)
    });
    let read = c
        .accesses
        .iter()
        .filter(|a| a.operation == proto::policy::Operation::Select)
        .filter_map(|a| a.table.as_ref());
    if c.unknown.is_none()
        && !catalog.views_read_only(target, read, std::time::Duration::from_secs(10), 1 << 20).await
    {
        c.unknown = Some("a view it reads may call a function with side effects".into());
    }
    Ok(())
}

fn first_row(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_string()).collect())
            }
            _ => None,
        })
        .unwrap_or_default()
}

/// Contents of the seeded tables plus a measure of the catalog.
fn fingerprint_sql() -> String {
    let mut cols: Vec<String> = TABLES
        .iter()
        .map(|t| format!("(SELECT coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '-') FROM {t} t)"))
        .collect();
    cols.push("(SELECT count(*) FROM pg_catalog.pg_class)".into());
    cols.push("(SELECT count(*) FROM pg_catalog.pg_proc)".into());
    cols.push("(SELECT count(*) FROM pg_catalog.pg_largeobject_metadata)".into());
    cols.push("(SELECT count(*) FROM pg_catalog.pg_description)".into());
    cols.push("(SELECT count(*) FROM pg_catalog.pg_statistic)".into());
    cols.join(", ")
}

async fn sequence_state(c: &Client) -> anyhow::Result<Vec<String>> {
    Ok(first_row(&c.simple_query("SELECT last_value, is_called FROM public.order_seq").await?))
}

/// Run `sql` after `setup`, inside a transaction that is rolled back; report whether it wrote.
async fn run_on_server(
    pg: &Postgres,
    baseline: &[String],
    seq_baseline: &[String],
    setup: Option<&str>,
    sql: &str,
) -> anyhow::Result<(Outcome, Option<String>)> {
    let c = pg.connect("shop").await?;
    c.simple_query("SET statement_timeout = '5s'; SET lock_timeout = '2s'").await?;
    if let Some(s) = setup {
        c.simple_query(s).await?;
    }
    c.simple_query("BEGIN").await?;
    let upper = sql.to_uppercase();
    let ran = if upper.contains("FROM STDIN") {
        run_copy_in(&c, sql).await
    } else if upper.starts_with("COPY") && upper.contains("TO STDOUT") {
        run_copy_out(&c, sql).await
    } else {
        c.simple_query(sql).await.map(drop)
    };
    let mut outcome = Outcome::Clean;
    let mut error = None;
    match ran {
        Err(e) => {
            outcome = Outcome::Failed;
            error = Some(message(&e));
        }
        Ok(()) => {
            let xid = c.simple_query("SELECT pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL").await;
            let tables = c.simple_query(&format!("SELECT {}", fingerprint_sql())).await;
            match (xid, tables) {
                (Ok(x), _) if first_row(&x).first().map(String::as_str) == Some("t") => {
                    outcome = Outcome::Wrote("transaction id assigned");
                }
                (_, Ok(t)) if first_row(&t) != baseline => {
                    outcome = Outcome::Wrote("table or catalog changed")
                }
                // A seeded table is gone or renamed.
                (_, Err(e)) if e.as_db_error().is_some_and(|d| d.code().code() == "42P01") => {
                    outcome = Outcome::Wrote("table or catalog changed");
                }
                // Left the transaction (COMMIT inside): the checks below decide.
                (Err(e), _) | (_, Err(e)) => error = Some(message(&e)),
                _ => {}
            }
        }
    }
    let _ = c.simple_query("ROLLBACK").await;
    drop(c);
    // Effects that survive the rollback: committed changes, sequences.
    let fresh = pg.connect("shop").await?;
    // A committed rename or drop makes the query fail: that is a change too.
    let after = match fresh.simple_query(&format!("SELECT {}", fingerprint_sql())).await {
        Ok(m) => first_row(&m),
        Err(e) => vec![message(&e)],
    };
    let seq = sequence_state(&fresh).await?;
    if seq != seq_baseline {
        outcome = Outcome::Wrote("sequence moved");
        fresh.simple_query("SELECT setval('public.order_seq', 1, false)").await?;
    }
    drop(fresh);
    if after != baseline {
        outcome = Outcome::Wrote("committed change");
        reseed(pg).await?;
    }
    Ok((outcome, error))
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
}

async fn run_copy_in(c: &Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    use futures::SinkExt;
    let sink = c.copy_in::<_, bytes::Bytes>(sql).await?;
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"100\tcopied\n")).await?;
    sink.finish().await.map(drop)
}

async fn run_copy_out(c: &Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    use futures::TryStreamExt;
    let stream = c.copy_out(sql).await?;
    let _: Vec<bytes::Bytes> = stream.try_collect().await?;
    Ok(())
}

async fn reseed(pg: &Postgres) -> anyhow::Result<()> {
    let admin = pg.connect("postgres").await?;
    admin.simple_query("DROP DATABASE shop WITH (FORCE)").await?;
    admin.simple_query("CREATE DATABASE shop TEMPLATE shop_tpl").await?;
    Ok(())
}

/// A PostgreSQL cluster with `shop` seeded (and `shop_tpl` to remake it from), a CSV file the
/// server can read, and the fingerprints each statement must leave as they are.
struct Target {
    pg: Postgres,
    dir: tempfile::TempDir,
    /// The CSV file's path, for `{file}` in a statement.
    csv: String,
    baseline: Vec<String>,
    seq_baseline: Vec<String>,
}

impl Target {
    async fn start() -> anyhow::Result<Self> {
        let pg = Postgres::start()?;
        pg.psql("postgres", "CREATE DATABASE shop_tpl")?;
        pg.psql("shop_tpl", SEED)?;
        pg.psql("postgres", "CREATE DATABASE shop TEMPLATE shop_tpl")?;
        let dir = tempfile::tempdir()?;
        let csv = dir.path().join("orders.csv");
        std::fs::write(&csv, "78,from file\n")?;
        // The server process reads the file.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let catalog = pg.connect("shop").await?;
        let baseline = first_row(&catalog.simple_query(&format!("SELECT {}", fingerprint_sql())).await?);
        let seq_baseline = sequence_state(&catalog).await?;
        let csv = csv.to_str().expect("utf-8 path").to_string();
        Ok(Self { pg, dir, csv, baseline, seq_baseline })
    }

    /// Classify each case (after its setup statement, if any) as the gateway does, and run it on
    /// the server.
    async fn run(&self, cases: &[(Option<&str>, String)]) -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::with_capacity(cases.len());
        for (setup, sql) in cases {
            let sql = sql.replace("{file}", &self.csv);
            let mut c = classify(&sql);
            if let Some(s) = setup {
                let prepared = prepared_of(&classify(s));
                c.resolve_executes(|n| prepared.get(n).cloned());
            } else {
                c.resolve_executes(|_| None);
            }
            // Resolve against the pristine catalog (a statement may have committed DDL before).
            resolve(&self.pg, self.dir.path(), &mut c).await?;
            let verdict = judge(&c);
            let (outcome, error) =
                run_on_server(&self.pg, &self.baseline, &self.seq_baseline, *setup, &sql).await?;
            rows.push(Row { sql, verdict, outcome, error });
        }
        Ok(rows)
    }
}

/// A line per row (what the server did, the classifier's verdict, the statement) and how many
/// rows had each outcome.
fn report(rows: &[Row]) -> (String, BTreeMap<&'static str, usize>) {
    let mut report = String::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows {
        let (kind, why) = match r.outcome {
            Outcome::Wrote(w) => ("WROTE", w),
            Outcome::Clean => ("clean", ""),
            Outcome::Failed => ("failed", ""),
        };
        *counts.entry(kind).or_default() += 1;
        let verdict = match &r.verdict {
            Ok(()) => "READ-ONLY".to_string(),
            Err(e) => e.chars().take(70).collect(),
        };
        let _ = writeln!(
            report,
            "{kind:6} {why:24} | {verdict:70} | {:?}{}",
            r.sql,
            r.error.as_deref().map(|e| format!("  ({e})")).unwrap_or_default()
        );
    }
    (report, counts)
}

/// The rows the server wrote for while the classifier called them read-only.
fn bypasses(rows: &[Row]) -> Vec<&Row> {
    rows.iter().filter(|r| r.verdict.is_ok() && wrote(r)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_classifier_never_calls_a_server_write_read_only() -> anyhow::Result<()> {
    let target = Target::start().await?;
    let mut cases: Vec<(Option<&str>, String)> = CORPUS.iter().map(|s| (None, s.to_string())).collect();
    cases.extend(PREPARED.iter().map(|(setup, sql)| (Some(*setup), sql.to_string())));
    assert!(cases.len() >= 150, "corpus has {} statements", cases.len());
    let rows = target.run(&cases).await?;

    let (report, counts) = report(&rows);
    println!("{report}\n{counts:?}");

    let bypasses = bypasses(&rows);
    let new: Vec<String> = bypasses
        .iter()
        .filter(|r| !KNOWN_BYPASSES.contains(&r.sql.as_str()))
        .map(|r| format!("{:?} ({:?})", r.sql, r.outcome))
        .collect();
    assert!(new.is_empty(), "the server wrote but the classifier said read-only:\n{}", new.join("\n"));
    let fixed: Vec<&&str> =
        KNOWN_BYPASSES.iter().filter(|k| !bypasses.iter().any(|r| r.sql == **k)).collect();
    assert!(fixed.is_empty(), "no longer bypasses, remove from KNOWN_BYPASSES: {fixed:?}");

    // The corpus exercised both sides.
    assert!(counts.get("WROTE").copied().unwrap_or(0) >= 80, "{counts:?}");
    assert!(counts.get("clean").copied().unwrap_or(0) >= 30, "{counts:?}");
    for sql in MUST_BE_READ {
        let r = rows.iter().find(|r| r.sql == *sql).expect("MUST_BE_READ statements are in the corpus");
        assert_eq!(r.verdict, Ok(()), "{sql} should be read-only");
        assert_eq!(r.outcome, Outcome::Clean, "{sql} should not write: {:?}", r.error);
    }
    Ok(())
}

/// The harness itself notices writes: a writing CTE run on the server is seen as a write, so a
/// classifier calling it read-only would fail the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_detects_each_kind_of_write() -> anyhow::Result<()> {
    let Target { pg, baseline, seq_baseline: seq, .. } = Target::start().await?;
    for (sql, want) in [
        (
            "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
            Outcome::Wrote("transaction id assigned"),
        ),
        ("SELECT nextval('order_seq')", Outcome::Wrote("sequence moved")),
        ("COMMIT; DELETE FROM payments", Outcome::Wrote("committed change")),
        ("SELECT * FROM orders", Outcome::Clean),
        ("SELECT 1/0", Outcome::Failed),
    ] {
        let (got, _) = run_on_server(&pg, &baseline, &seq, None, sql).await?;
        assert_eq!(got, want, "{sql}");
    }
    // The committed change was undone by reseeding.
    let c = pg.connect("shop").await?;
    assert_eq!(first_row(&c.simple_query(&format!("SELECT {}", fingerprint_sql())).await?), baseline);
    // And the judge rejects a writing CTE, so calling it read-only is what the main test catches.
    assert!(judge(&classify("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d")).is_err());
    assert!(judge(&classify("SELECT * FROM orders")).is_ok());
    Ok(())
}

/// The corpus generated from pieces ([`generate`]): every payload in every context, then
/// random recombinations with lexical tricks. None may be called read-only and write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_corpus_holds_no_write_the_classifier_calls_read_only() -> anyhow::Result<()> {
    let var =
        |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let seed = var("DIFFERENTIAL_SEED", 0x5eed_a11c);
    let n = var("DIFFERENTIAL_RANDOM", 500) as usize;
    let mut sqls = generate::systematic();
    let systematic = sqls.len();
    sqls.extend(generate::random(&mut common::Rng::new(seed), n));
    let cases: Vec<(Option<&str>, String)> = sqls.into_iter().map(|s| (None, s)).collect();
    let target = Target::start().await?;
    let rows = target.run(&cases).await?;

    let (report, counts) = report(&rows);
    println!("{report}\n{counts:?}");
    let found: Vec<String> =
        bypasses(&rows).iter().map(|r| format!("{:?} ({:?})", r.sql, r.outcome)).collect();
    assert!(
        found.is_empty(),
        "seed {seed}: the server wrote but the classifier said read-only:\n{}",
        found.join("\n")
    );
    // The corpus exercised both sides: the server wrote for many statements, in the systematic
    // part and the random one, and many others it ran clean were called read-only.
    let wrote_in = |rows: &[Row]| rows.iter().filter(|r| wrote(r)).count();
    assert!(wrote_in(&rows[..systematic]) * 2 >= systematic, "{counts:?}");
    assert!(wrote_in(&rows[systematic..]) * 3 >= n, "{counts:?}");
    let read_only_clean = rows.iter().filter(|r| r.verdict.is_ok() && r.outcome == Outcome::Clean).count();
    assert!(read_only_clean >= 40, "{read_only_clean} read-only statements ran clean: {counts:?}");
    Ok(())
}

/// Writes to the seeded tables and DDL denied, and whatever has an unknown effect; other writes
/// allowed, so the proxy opens its target session read-write and only the gateway's reading of
/// each statement stands between it and the data.
const SEEDED_TABLES_READ_ONLY: &str = "  - name: seeded-tables-are-read-only
    match: { operations: [insert, update, delete, merge, truncate, create, drop, alter, grant, revoke, copy, call, do, lock, vacuum, analyze, comment, escalate], tables: [orders, payments, MixedCase, app.Audit, mv_orders] }
    action: deny
  - name: no-ddl
    match: { operations: [create, drop, alter, grant, revoke, escalate, call, do] }
    action: deny
defaults: { unknown_operation: deny }
";

const GATEWAY_KEY: &str = "ak_differential_agent_0123456789ab";

/// The seeded tables, the catalog's size and the sequence, read on the target directly.
async fn target_state(pg: &Postgres) -> anyhow::Result<Vec<String>> {
    let c = pg.connect("shop").await?;
    let mut state = first_row(&c.simple_query(&format!("SELECT {}", fingerprint_sql())).await?);
    state.extend(sequence_state(&c).await?);
    Ok(state)
}

/// The generated corpus again, end to end: each statement sent through the gateway (simple
/// protocol, and a single statement also extended, then a `COMMIT` so that nothing it began is rolled back unseen) to a real
/// PostgreSQL under a policy that denies writing the seeded tables; the target's data, catalog
/// and sequence, read directly after each, must not have changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_corpus_changes_nothing_through_the_gateway() -> anyhow::Result<()> {
    let seed = common::env_number("DIFFERENTIAL_SEED", 0x5eed_a11c);
    let mut sqls = generate::systematic();
    let n = common::env_number("DIFFERENTIAL_RANDOM", 500) as usize;
    sqls.extend(generate::random(&mut common::Rng::new(seed), n));
    let node = common::Node::start(
        SEED,
        proxy_node::ProxyConfig::default(),
        eventbus::EventBus::memory(),
        |pg, pw| common::agent_policy("127.0.0.1", pg.port, pw, SEEDED_TABLES_READ_ONLY, GATEWAY_KEY),
    )
    .await;
    node.pg.psql("postgres", "CREATE DATABASE shop_tpl TEMPLATE shop OWNER airlock_svc")?;
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("orders.csv");
    std::fs::write(&csv, "78,from file\n")?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let baseline = target_state(&node.pg).await?;
    let mut client = node.connect_as("agent", GATEWAY_KEY).await;
    // The target session is writable: the gateway alone keeps the writes out.
    let ro = client.simple_query("SHOW default_transaction_read_only").await?;
    assert_eq!(first_row(&ro), ["off"]);
    let (mut changed, mut served) = (Vec::new(), 0);
    for sql in &sqls {
        let sql = sql.replace("{file}", csv.to_str().expect("utf-8 path"));
        if client.is_closed() {
            client = node.connect_as("agent", GATEWAY_KEY).await;
        }
        let ran = tokio::time::timeout(Duration::from_secs(10), client.simple_query(&sql)).await;
        served += usize::from(matches!(ran, Ok(Ok(_))));
        // A single statement also through the extended protocol (Parse, Bind, Execute), which
        // the gateway decides on another path.
        if !sql.contains(';') && !client.is_closed() {
            let _ = tokio::time::timeout(Duration::from_secs(10), client.query(&sql, &[])).await;
        }
        // What the statement left open is committed, and names it made are freed for the next.
        for after in ["COMMIT", "DEALLOCATE ALL", "CLOSE ALL"] {
            let _ = tokio::time::timeout(Duration::from_secs(10), client.simple_query(after)).await;
        }
        if target_state(&node.pg).await? != baseline {
            changed.push(format!("{sql:?} ({ran:?})"));
            node.pg.psql("postgres", "DROP DATABASE shop WITH (FORCE)")?;
            node.pg.psql("postgres", "CREATE DATABASE shop TEMPLATE shop_tpl OWNER airlock_svc")?;
            client = node.connect_as("agent", GATEWAY_KEY).await;
        }
    }
    println!("{} statements: {served} served", sqls.len());
    assert!(changed.is_empty(), "seed {seed}: the target changed after:\n{}", changed.join("\n"));
    // Not vacuous: the gateway served many statements (the reads) and refused the rest.
    assert!(served >= 40, "only {served} of {} statements were served", sqls.len());
    Ok(())
}
