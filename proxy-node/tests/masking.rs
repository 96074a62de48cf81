//! Masking against a real PostgreSQL seeded with PII, through the proxy, with real clients.
//!
//! The leak corpus runs every query shape an agent could use to get a masked value out (aliases,
//! expressions, `SELECT *`, JSON, aggregates, subqueries, UNIONs, views, COPY, cursors, errors,
//! RETURNING, the extended protocol in text and binary) and checks that no raw value reaches
//! the client or the recording. The keep corpus checks that values which are not sensitive come
//! back byte for byte.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{DB_PASSWORD, Node};
use eventbus::EventBus;
use futures::TryStreamExt;
use proto::events::{Envelope, Event};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::{FromSql, Type};

const AGENT_KEY: &str = "ak_masking_agent_0123456789abcdef";
const DBA_KEY: &str = "ak_masking_dba_0123456789abcdef00";

/// Values that must never reach the agent or the recording, whole or in part.
const SECRETS: &[&str] = &[
    "alice.liddell@example.com",
    "liddell",
    "bob.builder@corp.io",
    "builder@",
    "14155552671",
    "415-555-2671",
    "4155552671",
    "442079460958",
    "4111 1111 1111 1111",
    "4111111111111111",
    "123-45-6789",
    "GB82 WEST 1234 5698 7654 32",
    "GB82WEST",
    "10.1.2.3",
    "555-0100",
];

const SEED: &str = "CREATE TABLE users (id int primary key, name text, email text, phone text, card text, \
      card_num bigint, notes text, ip inet, profile jsonb, amount numeric(10,2)); \
    INSERT INTO users VALUES \
      (1, 'Alice Smith', 'alice.liddell@example.com', '+1 415-555-0100', '4111 1111 1111 1111', 4111111111111111, \
       'call me at 415-555-2671', '10.1.2.3', '{\"email\": \"alice.liddell@example.com\", \"city\": \"Paris\"}', 12.50), \
      (2, 'Bob Jones', 'bob.builder@corp.io', '+442079460958', '5500 0000 0000 0004', 1234567890123456, \
       'order 1234567890123456 shipped', '192.168.0.1', '{\"city\": \"Rome\"}', 99.99); \
    CREATE TABLE customers (id int, ssn text, iban text); \
    INSERT INTO customers VALUES (1, '123-45-6789', 'GB82 WEST 1234 5698 7654 32'); \
    CREATE VIEW v_users AS SELECT id, email AS contact, name FROM users; \
    CREATE VIEW v_nested AS SELECT contact AS c2, name FROM v_users; \
    CREATE TABLE orders (id int, user_id int, total numeric); \
    INSERT INTO orders VALUES (1, 1, 10), (2, 2, 20);";

fn policy(pg_port: u16, pw_file: &str, extra: &str) -> String {
    let masking = format!(
        r#"masking:
  - connections: [shop]
    columns: [users.email, users.phone, customers.*]
    strategy: redact
    exempt: {{ groups: [dba] }}
  - columns: [users.card]
    strategy: partial
    exempt: {{ groups: [dba] }}
  - detectors: [email, credit_card, phone, iban, ssn, ipv4, jwt, api_key]
    exempt: {{ groups: [dba] }}
{extra}
"#
    );
    common::policy_yaml(
        &common::connection("shop", "127.0.0.1", pg_port, "tls: disable", pw_file),
        &masking,
        &(common::service_account("agent", "agents", AGENT_KEY)
            + &common::service_account("dba", "dba", DBA_KEY)),
    )
}

/// The node, and every session event it recorded.
struct Harness {
    node: Node,
    recorded: Arc<Mutex<Vec<Envelope>>>,
}

common::deref_to_node!(Harness);

const DEFAULTS: &str = "defaults: { unknown_operation: deny }";

/// [`DEFAULTS`], where masked columns may choose rows any way: for the corpora of query shapes
/// that check how values are masked (many sort, group, join or expand by a masked column, which
/// `masked_predicates: equality`, the default, refuses).
const ALLOW_PREDICATES: &str = "defaults: { unknown_operation: deny, masked_predicates: allow }";

async fn start(extra: &str) -> Harness {
    common::init_tracing("proxy_node=info");
    let bus = EventBus::memory();
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let mut sub = bus.subscribe(proto::subjects::ALL_SESSION_EVENTS).await.unwrap();
    let sink = recorded.clone();
    tokio::spawn(async move {
        while let Some(env) = sub.next().await {
            sink.lock().unwrap().push(env);
        }
    });
    let cfg = proxy_node::ProxyConfig { hold_grace: Duration::from_millis(200), ..Default::default() };
    let node = Node::start(SEED, cfg, bus, |pg, pw| policy(pg.port, pw, extra)).await;
    Harness { node, recorded }
}

impl Harness {
    async fn connect(&self, key: &str) -> tokio_postgres::Client {
        let user = if key == AGENT_KEY { "agent" } else { "dba" };
        self.connect_as(user, key).await
    }

    /// A raw wire-protocol session of the agent.
    async fn raw(&self) -> tokio::net::TcpStream {
        self.raw_as("agent", AGENT_KEY).await
    }

    /// Replace the proxy's policy with the test policy plus `extra`, as version `version`.
    fn apply(&self, version: u64, extra: &str) {
        self.apply_yaml(version, &policy(self.pg.port, &self.pw_file, extra));
    }

    /// Waits (10 s at most) until the recording holds the response to the statement `sql` (sent
    /// once in the test), and so everything the session recorded before it.
    async fn wait_for_response_to(&self, sql: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let recorded = {
                let rec = self.recorded.lock().unwrap();
                let seq = rec.iter().find_map(|e| match &e.event {
                    Event::RequestReceived { seq, statement, .. } if &**statement == sql => Some(*seq),
                    _ => None,
                });
                seq.is_some_and(|s| {
                    rec.iter().any(|e| matches!(&e.event, Event::ResponseSent { seq, .. } if *seq == s))
                })
            };
            if recorded {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "the response to {sql:?} was never recorded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the recording holds so far, as text.
    fn recording(&self) -> String {
        self.recorded.lock().unwrap().iter().map(|e| format!("{:?}\n", e.event)).collect()
    }
}

/// Any value, as the bytes the client received.
struct Raw(Vec<u8>, Type);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec(), ty.clone()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

impl Raw {
    /// The value as text: text-like types as is, int8 as its number, anything else lossy.
    fn show(&self) -> String {
        if self.1 == Type::INT8 && self.0.len() == 8 {
            return i64::from_be_bytes(self.0[..8].try_into().unwrap()).to_string();
        }
        if self.1 == Type::INT4 && self.0.len() == 4 {
            return i32::from_be_bytes(self.0[..4].try_into().unwrap()).to_string();
        }
        if self.1 == Type::INET && self.0.len() >= 8 {
            return self.0[4..].iter().map(u8::to_string).collect::<Vec<_>>().join(".");
        }
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

fn show_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "ERROR {} {} | detail {:?} | hint {:?} | where {:?}",
            d.code().code(),
            d.message(),
            d.detail(),
            d.hint(),
            d.where_()
        ),
        None => format!("ERROR {e}"),
    }
}

/// What the agent sees of `sql` through the simple protocol.
async fn simple(c: &tokio_postgres::Client, sql: &str) -> String {
    match c.simple_query(sql).await {
        Ok(msgs) => msgs
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("NULL").to_string())
                        .collect::<Vec<_>>()
                        .join("|"),
                ),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => show_error(&e),
    }
}

/// What the agent sees of `sql` through the extended protocol (tokio-postgres asks for binary).
async fn extended(c: &tokio_postgres::Client, sql: &str) -> String {
    match c.query(sql, &[]).await {
        Ok(rows) => rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        r.try_get::<_, Option<Raw>>(i)
                            .map_or_else(|e| format!("<{e}>"), |v| v.map_or("NULL".into(), |v| v.show()))
                    })
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => show_error(&e),
    }
}

async fn copy_out(c: &tokio_postgres::Client, sql: &str) -> String {
    match c.copy_out(sql).await {
        Ok(stream) => match stream.try_collect::<Vec<Bytes>>().await {
            Ok(chunks) => chunks.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect(),
            Err(e) => show_error(&e),
        },
        Err(e) => show_error(&e),
    }
}

fn leaked(seen: &str) -> Option<&'static str> {
    SECRETS.iter().copied().find(|s| seen.contains(s))
}

const LEAK_QUERIES: &[&str] = &[
    // Under RECURSIVE a query of the list may read one defined after it: `users` is the CTE.
    "WITH RECURSIVE orders AS (SELECT * FROM users), users AS (SELECT id, email AS name FROM public.users) \
     SELECT id, translate(name, '@.', '#,') AS n FROM orders",
    "SELECT email, phone FROM users",
    "SELECT email AS e, phone AS not_a_phone FROM users",
    "SELECT * FROM users",
    "SELECT u.* FROM users u",
    "SELECT users.* FROM public.users",
    "SELECT \"EMAIL\" FROM (SELECT email AS \"EMAIL\" FROM users) x",
    "SELECT lower(email), upper(email), email || '' FROM users",
    "SELECT substring(email from 1 for 40), split_part(email, '@', 1), reverse(reverse(email)) FROM users",
    "SELECT replace(email, '@', ' at '), replace(replace(phone, '-', ''), ' ', '') FROM users",
    "SELECT translate(email, '@.', '##') FROM users",
    "SELECT format('%s', email), concat(name, email), md5(email) = md5(email) FROM users",
    "SELECT CASE WHEN id > 0 THEN email END, coalesce(NULL, phone) FROM users",
    "SELECT row_to_json(u) FROM users u",
    "SELECT to_jsonb(u), to_json(u.*) FROM users u",
    "SELECT json_agg(u) FROM users u",
    "SELECT array_agg(email)::text, string_agg(email, ',') FROM users",
    "SELECT array_agg(u)::text FROM users u",
    "SELECT u::text FROM users u",
    "SELECT ROW(u.*)::text FROM users u",
    "SELECT j->>'email', j FROM (SELECT to_jsonb(u) AS j FROM users u) s",
    "SELECT (SELECT email FROM users WHERE id = 1)",
    "SELECT (SELECT e FROM (SELECT email AS e FROM users) s LIMIT 1)",
    "SELECT e FROM (SELECT email AS e FROM users) s",
    "SELECT x FROM (SELECT email FROM users UNION SELECT 'a') t(x)",
    "WITH x AS (SELECT email, phone FROM users) SELECT * FROM x",
    "WITH x AS (SELECT email FROM users) SELECT upper(x.email) FROM x",
    "SELECT email FROM users UNION SELECT 'x'",
    "SELECT 'x' UNION ALL SELECT email FROM users",
    "SELECT 'x' UNION ALL SELECT lower(email) FROM users",
    "SELECT email FROM users INTERSECT SELECT email FROM users",
    "SELECT email FROM users EXCEPT SELECT 'nobody'",
    "SELECT l.e FROM users u, LATERAL (SELECT u.email AS e) l",
    "SELECT * FROM v_users",
    "SELECT contact, upper(contact) FROM v_users",
    "SELECT c2, lower(c2) FROM v_nested",
    "SELECT * FROM customers",
    "SELECT ssn || '', iban FROM customers",
    "SELECT notes FROM users",
    "SELECT card_num, card_num::text, card FROM users",
    "SELECT profile, profile->>'email', profile::text FROM users",
    "SELECT ip, host(ip) FROM users",
    "SELECT 'alice.liddell@example.com' AS literal",
    "SELECT max(email), min(phone) FROM users",
    "SELECT email FROM users GROUP BY email ORDER BY email",
    "SELECT u1.email FROM users u1 JOIN users u2 ON u1.id = u2.id",
    "SELECT o.id, u.email FROM orders o JOIN users u ON u.id = o.user_id",
    "SELECT email::int FROM users",
    "SELECT phone::int FROM users",
    "SELECT ssn::date FROM customers",
    "SELECT jsonb_build_object('e', email) FROM users",
    "SELECT unnest(ARRAY[email, phone]) FROM users",
    "SELECT ARRAY[email, name] FROM users",
    "SELECT ARRAY['alice.liddell@example.com', 'x'], ARRAY[4111111111111111]",
    "SELECT * FROM unnest((SELECT array_agg(email) FROM users))",
    "SELECT * FROM jsonb_each_text((SELECT to_jsonb(u) FROM users u LIMIT 1))",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_query_shape_leaks_a_masked_value() {
    let h = start(ALLOW_PREDICATES).await;
    let c = h.connect(AGENT_KEY).await;
    let mut failures = Vec::new();
    for q in LEAK_QUERIES {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            if std::env::var_os("SHOW_CORPUS").is_some() {
                println!("--- {mode} {q}\n{seen}");
            }
            if let Some(s) = leaked(&seen) {
                failures.push(format!("{mode} `{q}` leaked `{s}`:\n{seen}"));
            }
            assert!(!seen.contains("closed"), "{mode} `{q}` closed the session: {seen}");
            assert!(!seen.contains("ERROR 42501"), "{mode} `{q}` was denied: {seen}");
        }
    }
    // COPY TO STDOUT in text and CSV, of a table, a column list and a query.
    for q in [
        "COPY users TO STDOUT",
        "COPY users (id, email, notes) TO STDOUT",
        "COPY (SELECT email, upper(phone) FROM users) TO STDOUT",
        "COPY users TO STDOUT WITH (FORMAT csv)",
        "COPY customers TO STDOUT WITH (FORMAT csv, DELIMITER ';')",
        "COPY (SELECT * FROM v_users) TO STDOUT",
        "COPY (WITH RECURSIVE orders AS (SELECT * FROM users), users AS (SELECT id, email AS name FROM public.users) \
         SELECT id, name FROM orders) TO STDOUT",
    ] {
        let seen = copy_out(&c, q).await;
        if let Some(s) = leaked(&seen) {
            failures.push(format!("`{q}` leaked `{s}`:\n{seen}"));
        }
        assert!(!seen.starts_with("ERROR"), "`{q}`: {seen}");
    }
    // Binary COPY cannot be masked: refused before it runs.
    let seen = copy_out(&c, "COPY users TO STDOUT WITH (FORMAT binary)").await;
    assert!(seen.contains("42501") && seen.contains("binary"), "{seen}");
    // Cursors and FETCH.
    let seen = simple(
        &c,
        "BEGIN; DECLARE c1 CURSOR FOR SELECT email, upper(phone) FROM users; FETCH ALL FROM c1; \
         DECLARE c2 CURSOR FOR SELECT * FROM v_users; FETCH 1 FROM c2; FETCH NEXT FROM c2; COMMIT",
    )
    .await;
    if let Some(s) = leaked(&seen) {
        failures.push(format!("cursors leaked `{s}`:\n{seen}"));
    }
    assert!(seen.contains("Alice Smith"), "the cursor returned rows: {seen}");
    // RETURNING.
    for q in [
        "UPDATE users SET name = name WHERE id = 1 RETURNING email, lower(phone)",
        "UPDATE users SET name = name WHERE id = 2 RETURNING *",
        "WITH u AS (UPDATE users SET name = name RETURNING email) SELECT * FROM u",
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            if let Some(s) = leaked(&seen) {
                failures.push(format!("{mode} `{q}` leaked `{s}`:\n{seen}"));
            }
        }
    }
    // Prepared statements with parameters, binary results.
    let stmt = c.prepare("SELECT email, card_num, profile, ip FROM users WHERE id = $1").await.unwrap();
    for id in [1i32, 2] {
        let rows = c.query(&stmt, &[&id]).await.unwrap();
        let seen: String = rows
            .iter()
            .map(|r| (0..r.len()).map(|i| r.get::<_, Raw>(i).show()).collect::<Vec<_>>().join("|"))
            .collect();
        if let Some(s) = leaked(&seen) {
            failures.push(format!("prepared statement leaked `{s}`:\n{seen}"));
        }
    }
    assert!(failures.is_empty(), "{} leaks:\n{}", failures.len(), failures.join("\n\n"));
    // The session is still usable, and nothing raw was recorded.
    assert_eq!(simple(&c, "SELECT 1").await, "1");
    h.wait_for_response_to("SELECT 1").await;
    let rec = h.recording();
    assert!(rec.contains("ResponseSent"), "responses are recorded");
    if let Some(s) = leaked(&rec) {
        let at = rec.find(s).unwrap_or(0);
        panic!("the recording holds `{s}`: …{}…", &rec[at.saturating_sub(300)..(at + 100).min(rec.len())]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_are_not_sensitive_come_back_byte_for_byte() {
    let h = start(DEFAULTS).await;
    let c = h.connect(AGENT_KEY).await;
    let cases: &[(&str, &str)] = &[
        ("SELECT name, amount, id FROM users ORDER BY id", "Alice Smith|12.50|1\nBob Jones|99.99|2"),
        // 16 digits that fail the Luhn check are not a card.
        ("SELECT card_num FROM users WHERE id = 2", "1234567890123456"),
        ("SELECT notes FROM users WHERE id = 2", "order 1234567890123456 shipped"),
        (
            "SELECT '2024-01-15', '12:30:45', '1.2.3.4.5', 'v1.2.3', 'a@b'",
            "2024-01-15|12:30:45|1.2.3.4.5|v1.2.3|a@b",
        ),
        ("SELECT profile->>'city' FROM users ORDER BY id", "Paris\nRome"),
        ("SELECT count(*), sum(amount) FROM users", "2|112.49"),
        ("SELECT name FROM v_users ORDER BY id", "Alice Smith\nBob Jones"),
        ("SELECT o.total, o.user_id FROM orders o ORDER BY o.id", "10|1\n20|2"),
        ("SELECT count(*) FROM users WHERE email IS NOT NULL", "2"),
        ("SELECT 'Order #4111-2222', 'café ☕', E'tab\\there'", "Order #4111-2222|café ☕|tab\there"),
        // Settings drivers ask for at connect, whose values no session can make a masked one.
        ("SHOW TRANSACTION ISOLATION LEVEL", "read committed"),
        ("SHOW standard_conforming_strings", "on"),
        ("SHOW DateStyle", "ISO, MDY"),
    ];
    for (q, want) in cases {
        assert_eq!(simple(&c, q).await, *want, "simple `{q}`");
    }
    // Binary results through the extended protocol keep their types and values.
    let row =
        c.query_one("SELECT name, card_num, amount::float8, id FROM users WHERE id = 2", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "Bob Jones");
    assert_eq!(row.get::<_, i64>(1), 1_234_567_890_123_456);
    assert!((row.get::<_, f64>(2) - 99.99).abs() < 1e-9);
    assert_eq!(row.get::<_, i32>(3), 2);
    let copied = copy_out(&c, "COPY (SELECT id, name, amount FROM users ORDER BY id) TO STDOUT").await;
    assert_eq!(copied, "1\tAlice Smith\t12.50\n2\tBob Jones\t99.99\n");
    // A text setting a session can fill with a masked value stays masked, filled or not.
    for sql in [
        "SET application_name = 'harmless'",
        "SELECT set_config('application_name', email, false) FROM users WHERE id = 1",
    ] {
        let _ = simple(&c, sql).await;
        let shown = simple(&c, "SHOW application_name").await;
        assert!(!shown.contains("harmless") && leaked(&shown).is_none(), "after {sql}: {shown}");
    }
    // Masked columns keep their place: a masked email is replaced, not dropped.
    let masked = simple(&c, "SELECT id, email, name FROM users WHERE id = 1").await;
    assert!(masked.starts_with("1|") && masked.ends_with("|Alice Smith"), "{masked}");
    // Partial keeps the last four characters.
    let card = simple(&c, "SELECT card FROM users WHERE id = 2").await;
    assert!(card.ends_with("0004") && !card.contains("5500"), "{card}");
    // An exempt principal sees everything.
    let dba = h.connect(DBA_KEY).await;
    assert_eq!(simple(&dba, "SELECT email FROM users WHERE id = 1").await, "alice.liddell@example.com");
    assert_eq!(simple(&dba, "SELECT card_num FROM users WHERE id = 1").await, "4111111111111111");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_masked_is_refused_and_held_statements_are_shown_masked() {
    let h = start(
        "rules:\n  - { name: user-updates-held, match: { operations: [update], tables: [users] }, action: hold, timeout: 1s }\n\
         defaults: { unknown_operation: deny, unknown_lineage: deny, masked_predicates: allow }",
    )
    .await;
    let c = h.connect(AGENT_KEY).await;
    // With unknown_lineage: deny, a result whose origin the gateway cannot tell is refused.
    let seen = simple(&c, "SELECT * FROM jsonb_each_text((SELECT to_jsonb(u) FROM users u LIMIT 1))").await;
    assert!(seen.contains("42501") && seen.contains("unknown_lineage"), "{seen}");
    // What it can tell still runs, masked.
    assert_eq!(
        simple(&c, "SELECT upper(email), name FROM users WHERE id = 1").await,
        "[redacted]|Alice Smith"
    );
    // A held statement reaches approvers (and the recording) with its PII masked; the
    // fingerprint still binds the exact text.
    let seen = simple(&c, "UPDATE users SET notes = 'write to alice.liddell@example.com' WHERE id = 1").await;
    assert!(seen.contains("42501") && seen.contains("expired"), "{seen}");
    let rec = h.recording();
    let hold = rec.lines().find(|l| l.starts_with("HoldRequested")).expect("a hold was requested");
    assert!(hold.contains("[redacted:email]") && !hold.contains("liddell"), "{hold}");
    // A value of a type the gateway cannot mask in binary format (a record, with detectors on)
    // ends the session with an error; the value never reaches the client.
    let c2 = h.connect(AGENT_KEY).await;
    let e = c2.query("SELECT ROW('alice.liddell@example.com', 1)", &[]).await.expect_err("refused");
    let shown = show_error(&e);
    assert!(
        shown.contains("XX000") && shown.contains("could not be masked") && !shown.contains("liddell"),
        "{shown}"
    );
    assert!(c2.simple_query("SELECT 1").await.is_err(), "the session is closed");
    // Other sessions are unaffected.
    assert_eq!(simple(&c, "SELECT 1").await, "1");
    assert!(leaked(&h.recording()).is_none(), "nothing raw was recorded");
}

/// libpq's extended sequence (Parse, Bind, Describe portal, Execute, Sync, as psycopg and
/// pgbench send it): the client's own Describe of the portal plans the masking of the rows
/// that follow. A Describe of another portal never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_describe_of_the_portal_plans_its_masking_and_no_other_does() {
    use testkit::pgwire::{self, bind, describe, execute, parse, sync, tags};
    use tokio::io::AsyncWriteExt;
    let h = start(ALLOW_PREDICATES).await;
    let mut s = h.raw().await;
    let mut failures = Vec::new();
    for q in LEAK_QUERIES {
        let pipeline = [parse("", q), bind("", "", &[]), describe(b'P', ""), execute(""), sync()].concat();
        s.write_all(&pipeline).await.unwrap();
        let got = pgwire::read_until_ready(&mut s).await;
        let seen = String::from_utf8_lossy(&got);
        if let Some(secret) = leaked(&seen) {
            failures.push(format!("`{q}` leaked `{secret}`"));
        }
        // Rows, or the server's own error for the casts that fail (its text withheld). A
        // result that cannot be masked would have closed the session.
        if !tags(&got).contains(&b'D') && !seen.contains("error text is withheld") {
            failures.push(format!("`{q}` returned no rows: {seen}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Two portals: the Describe of `a` (one column) comes right before the Execute of `b`.
    let pipeline = [
        parse("sa", "SELECT id FROM users"),
        parse("sb", "SELECT email, phone, notes, card FROM users"),
        bind("a", "sa", &[]),
        bind("b", "sb", &[]),
        describe(b'P', "a"),
        execute("b"),
        sync(),
    ]
    .concat();
    s.write_all(&pipeline).await.unwrap();
    let got = pgwire::read_until_ready(&mut s).await;
    let seen = String::from_utf8_lossy(&got);
    assert_eq!(leaked(&seen), None, "{seen}");
    assert_eq!(tags(&got).iter().filter(|&&t| t == b'D').count(), 2, "{seen}");
    assert!(!tags(&got).contains(&b'E'), "{seen}");
}

/// `alice.liddell@example.com` as `encode(convert_to(email, 'UTF8'), 'hex')` shows it: no
/// detector sees an address in it, so only the column's lineage masks it.
fn alice_in_hex() -> String {
    hex::encode("alice.liddell@example.com")
}

const EMAIL_IN_HEX: &str = "SELECT encode(convert_to(email, 'UTF8'), 'hex') AS x FROM users";

/// A client's Describe of a portal is answered for what the portal held when the Describe was
/// sent: a Bind of the same name pipelined behind it (before any answer came) does not give the
/// rows of the first statement the second one's masking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_describe_is_planned_as_what_its_portal_held_when_it_was_sent() {
    use testkit::pgwire::{self, bind, describe, execute, message, parse, sync};
    use tokio::io::AsyncWriteExt;
    let h = start(DEFAULTS).await;
    let mut s = h.raw().await;
    let pipeline = [
        parse("s1", EMAIL_IN_HEX),
        bind("", "s1", &[]),
        describe(b'P', ""),
        execute(""),
        parse("s2", "SELECT 'x'::text AS x"),
        bind("", "s2", &[]),
        message(b'H', &[]),
    ]
    .concat();
    s.write_all(&pipeline).await.unwrap();
    let mut seen = pgwire::read_until(&mut s, b'C').await;
    s.write_all(&sync()).await.unwrap();
    seen.extend(pgwire::read_until_ready(&mut s).await);
    let seen = String::from_utf8_lossy(&seen);
    assert!(!seen.contains(&alice_in_hex()), "{seen}");
    assert!(seen.contains("SELECT 2"), "{seen}");
}

/// Messages a client sends after an extended-protocol error and before its Sync are skipped by
/// the target, and by the proxy: taken as answered by what follows, they would have a later
/// statement's rows masked as one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_skipped_after_a_pipeline_error_do_not_plan_the_masking_of_later_ones() {
    use testkit::pgwire::{self, message, parse, query, sync};
    use tokio::io::AsyncWriteExt;
    let h = start(DEFAULTS).await;
    let mut s = h.raw().await;
    s.write_all(&[parse("e", "SELECT nocol FROM users"), message(b'H', &[])].concat()).await.unwrap();
    pgwire::read_until(&mut s, b'E').await;
    s.write_all(&[query("SELECT 'a'::text AS x"), query("SELECT 'b'::text AS x"), sync()].concat())
        .await
        .unwrap();
    pgwire::read_until_ready(&mut s).await;
    s.write_all(&query(EMAIL_IN_HEX)).await.unwrap();
    let seen = pgwire::read_until_ready(&mut s).await;
    let seen = String::from_utf8_lossy(&seen);
    assert!(!seen.contains(&alice_in_hex()), "{seen}");
    assert!(seen.contains("SELECT 2"), "{seen}");
}

/// A session keeps the masking plan of the result it described last, for a statement it
/// repeats. The plan belongs to the rules it was made under: when the policy changes between
/// two runs of the same statement (the same RowDescription from the target), the second is
/// masked as the new rules say, in both directions. Each protocol runs back to back, so the
/// run after the change meets the plan its predecessor left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_result_is_masked_by_the_rules_in_force_when_it_runs() {
    let h = start(DEFAULTS).await;
    let c = h.connect(AGENT_KEY).await;
    let sql = "SELECT name, id FROM users WHERE id = 1";
    let prepared = c.prepare(sql).await.unwrap();
    let run_prepared = || async {
        let rows = c.query(&prepared, &[]).await.unwrap();
        format!("{}|{}", rows[0].get::<_, String>(0), rows[0].get::<_, i32>(1))
    };
    // One more masking item (the policy's masking list ends where `extra` starts): names.
    let names_masked = format!("  - columns: [users.name]\n    strategy: redact\n{DEFAULTS}");
    let mut version = 1;
    for (before, after) in [(DEFAULTS, names_masked.as_str()), (names_masked.as_str(), DEFAULTS)] {
        for protocol in ["simple", "prepared"] {
            let run = || async {
                match protocol {
                    "simple" => simple(&c, sql).await,
                    _ => run_prepared().await,
                }
            };
            version += 1;
            h.apply(version, before);
            let first = run().await;
            for _ in 0..2 {
                assert_eq!(run().await, first);
            }
            version += 1;
            h.apply(version, after);
            let then = run().await;
            assert_eq!(then.contains("Alice"), after == DEFAULTS, "{protocol}, after the change: {then}");
            assert_eq!(first.contains("Alice"), before == DEFAULTS, "{protocol}, before the change: {first}");
            assert!(then.ends_with("|1"), "{then}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planner_statistics_do_not_show_sample_values_of_masked_columns() {
    // Names: masked by their column, and no detector recognises them. The view calls functions
    // the gateway cannot vouch for; a policy that allows what it cannot judge lets it be read.
    let h = start("  - columns: [users.name]\n    strategy: redact\ndefaults: { unknown_operation: allow }")
        .await;
    h.pg.psql("shop", "ANALYZE users").unwrap();
    let c = h.connect(AGENT_KEY).await;
    let names = |seen: &str| ["Alice Smith", "Bob Jones"].into_iter().find(|n| seen.contains(n));
    // pg_stats keeps sampled values of every column (here both names, as histogram bounds).
    for q in [
        "SELECT attname, histogram_bounds::text, most_common_vals::text FROM pg_stats WHERE tablename = 'users'",
        "SELECT * FROM pg_catalog.pg_stats WHERE tablename = 'users' AND attname = 'name'",
        "SELECT s.histogram_bounds::text FROM pg_stats s WHERE s.attname = 'name'",
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            assert!(names(&seen).is_none(), "{mode} `{q}` showed a name: {seen}");
        }
    }
    // The rest of the view is still readable.
    let seen = simple(&c, "SELECT count(*) FROM pg_stats WHERE tablename = 'users'").await;
    assert_eq!(seen, "10", "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_values_cannot_be_stored_where_they_would_not_be_masked() {
    // Names: masked by their column, and no detector recognises them.
    let h = start(&format!("  - columns: [users.name]\n    strategy: redact\n{DEFAULTS}")).await;
    let c = h.connect(AGENT_KEY).await;
    let names = |seen: &str| {
        ["Alice Smith", "Bob Jones", "ALICE SMITH", "BOB JONES"].into_iter().find(|n| seen.contains(n))
    };
    for q in [
        "UPDATE users SET notes = name WHERE id = 1",
        "UPDATE users u SET notes = v.name FROM users v WHERE v.id = u.id",
        "INSERT INTO users (id, notes) SELECT 10, name FROM users WHERE id = 2",
        "INSERT INTO users (id, notes) SELECT 11, upper(name) FROM users WHERE id = 2 RETURNING notes",
        "INSERT INTO users (id, notes) VALUES (12, (SELECT name FROM users WHERE id = 1))",
        "WITH w AS (INSERT INTO users (id, notes) SELECT 13, name FROM users WHERE id = 1 RETURNING 1) SELECT * FROM w",
        "CREATE TABLE copied AS SELECT name FROM users",
        "SELECT name INTO copied2 FROM users",
        "UPDATE users SET notes = contact || name FROM v_users WHERE v_users.id = users.id",
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            assert!(
                seen.contains("42501") && seen.contains("masked"),
                "{mode} `{q}` was not refused: {seen}"
            );
        }
    }
    // Columns read only to choose rows are not stored; plain values are.
    for q in [
        "UPDATE users SET notes = 'called' WHERE name = 'Alice Smith'",
        "INSERT INTO users (id, notes) VALUES (20, 'plain')",
    ] {
        let seen = simple(&c, q).await;
        assert!(!seen.contains("ERROR"), "`{q}`: {seen}");
    }
    // Nothing of the names reached another column or table.
    let stored = h.pg.psql("shop", "SELECT string_agg(coalesce(notes, ''), '|') FROM users").unwrap();
    assert!(names(&stored).is_none(), "{stored}");
    let tables = h.pg.psql("shop", "SELECT count(*) FROM pg_class WHERE relname LIKE 'copied%'").unwrap();
    assert_eq!(tables.trim(), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masked_parents_columns_are_masked_in_its_partitions_and_children() {
    let h =
        start(&format!("  - columns: [people.name, staff.name, vip.name]\n    strategy: redact\n{DEFAULTS}"))
            .await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE TABLE people (id int, name text) PARTITION BY RANGE (id); \
         CREATE TABLE people_low PARTITION OF people FOR VALUES FROM (0) TO (100); \
         INSERT INTO people VALUES (1, 'Alice Smith'); \
         CREATE TABLE staff (id int, name text); CREATE TABLE contractors () INHERITS (staff); \
         INSERT INTO contractors VALUES (2, 'Bob Jones'); \
         CREATE TABLE folks (id int, name text); CREATE TABLE vip () INHERITS (folks); \
         INSERT INTO vip VALUES (3, 'Alice Smith');",
    )
    .unwrap();
    let c = h.connect(AGENT_KEY).await;
    for q in [
        "SELECT name FROM people_low",
        "SELECT * FROM people_low",
        "SELECT upper(name) FROM people_low",
        "SELECT name FROM people",
        "SELECT name FROM contractors",
        "SELECT name || '' FROM contractors",
        "SELECT name FROM staff",
        // A child's masked column, read through its parent.
        "SELECT name FROM folks",
        "SELECT * FROM folks",
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            assert!(!seen.contains("Alice Smith") && !seen.contains("Bob Jones"), "{mode} `{q}`: {seen}");
            assert!(!seen.contains("ERROR"), "{mode} `{q}`: {seen}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_function_returns_is_masked_when_it_reads_masked_columns() {
    // Functions of unknown effect run, so that a function calling another is served too.
    let h = start("  - columns: [users.name]\n    strategy: redact\ndefaults: { unknown_operation: allow }")
        .await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         CREATE FUNCTION user_name(int) RETURNS text STABLE LANGUAGE sql AS $f$ SELECT name FROM users WHERE id = $1 $f$; \
         CREATE FUNCTION through_view(int) RETURNS text STABLE LANGUAGE sql AS $f$ SELECT name FROM v_users WHERE id = $1 $f$; \
         CREATE FUNCTION plus_one(int) RETURNS int IMMUTABLE LANGUAGE sql AS $f$ SELECT $1 + 1 $f$; \
         CREATE FUNCTION nested(int) RETURNS text STABLE LANGUAGE sql AS $f$ SELECT 'x' || user_name($1) $f$; \
         CREATE VIEW v_called AS SELECT id, user_name(user_id) AS who FROM orders; \
         CREATE VIEW v_over_called AS SELECT who AS buyer FROM v_called; \
         CREATE FUNCTION shown(users) RETURNS text STABLE LANGUAGE sql AS $f$ SELECT $1.name $f$;",
    )
    .unwrap();
    let c = h.connect(AGENT_KEY).await;
    for q in [
        "SELECT user_name(1)",
        "SELECT upper(user_name(2)), 1",
        "SELECT through_view(1)",
        "SELECT public.user_name(id) FROM orders",
        // A function that calls one: what the inner one reads is not in the outer body.
        "SELECT nested(1)",
        // A view column computed by the function: its origin is the view's column.
        "SELECT who FROM v_called",
        "SELECT * FROM v_called",
        "SELECT buyer FROM v_over_called",
        // A function called as a field of the row: `u.shown` is `shown(u)`.
        "SELECT u.shown FROM users u",
        "SELECT (u).shown FROM users u",
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            assert!(!seen.contains("Alice") && !seen.contains("Bob"), "{mode} `{q}`: {seen}");
            assert!(!seen.contains("ERROR"), "{mode} `{q}`: {seen}");
        }
    }
    // Through COPY, an error's text, or stored in another column.
    let seen = copy_out(&c, "COPY (SELECT user_name(1), id FROM users) TO STDOUT").await;
    assert!(!seen.contains("Alice") && !seen.starts_with("ERROR"), "{seen}");
    let seen = simple(&c, "SELECT user_name(1)::int").await;
    assert!(seen.contains("ERROR") && !seen.contains("Alice"), "{seen}");
    for q in [
        "INSERT INTO users (id, notes) SELECT 30, user_name(1)",
        "INSERT INTO users (id, notes) VALUES (31, user_name(2))",
        "UPDATE users SET notes = user_name(1) WHERE id = 2",
    ] {
        let seen = simple(&c, q).await;
        assert!(seen.contains("42501"), "`{q}` was not refused: {seen}");
    }
    let stored = h.pg.psql("shop", "SELECT string_agg(coalesce(notes, ''), '|') FROM users").unwrap();
    assert!(!stored.contains("Alice") && !stored.contains("Bob"), "{stored}");
    // A function that reads nothing masked computes as usual.
    assert_eq!(simple(&c, "SELECT plus_one(1)").await, "2");
}

/// A value computed from a masked column is redacted, whatever the column's own strategy:
/// `partial` would keep the part the agent moved to the end, `hash` would hash a text the agent
/// chose (a lookup table for guessing, character by character).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_computed_from_masked_columns_are_redacted_whatever_the_strategy() {
    let h = start(&format!("  - columns: [users.name]\n    strategy: hash\n{DEFAULTS}")).await;
    let c = h.connect(AGENT_KEY).await;
    // The column itself keeps its strategy: partial shows the last four, hash a pseudonym.
    let card = simple(&c, "SELECT card FROM users WHERE id = 2").await;
    assert!(card.ends_with("0004") && !card.contains("5500"), "{card}");
    let name = simple(&c, "SELECT name FROM users WHERE id = 1").await;
    assert!(!name.contains("Alice") && !name.is_empty(), "{name}");
    assert_eq!(name, simple(&c, "SELECT name FROM users WHERE id = 1").await, "a stable pseudonym");
    for q in [
        "SELECT lpad(substr(card, 1, 4), 9, '0') FROM users WHERE id = 2",
        "SELECT substr(card, 1, 4) || '0000' FROM users WHERE id = 2",
        "SELECT x FROM (SELECT substr(card, 6, 4) || '----' AS x FROM users WHERE id = 2) s",
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            assert!(!seen.contains("5500") && !seen.contains("0000-"), "{mode} `{q}`: {seen}");
        }
    }
    let seen =
        copy_out(&c, "COPY (SELECT lpad(substr(card, 1, 4), 9, '0') FROM users WHERE id = 2) TO STDOUT")
            .await;
    assert!(!seen.contains("5500") && !seen.starts_with("ERROR"), "{seen}");
    // A generated column is reported as a column of its table, but holds what its expression
    // computes from the masked one.
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; ALTER TABLE users ADD COLUMN shout text GENERATED ALWAYS AS (upper(name)) STORED",
    )
    .unwrap();
    let c = h.connect(AGENT_KEY).await;
    for q in [
        "SELECT shout FROM users",
        "SELECT * FROM users",
        "SELECT u.shout AS x FROM users u",
        // Computed from it, or with no origin: the lineage path.
        "SELECT shout FROM users UNION ALL SELECT 'x'",
        "SELECT lower(shout) FROM users",
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            assert!(!seen.to_uppercase().contains("ALICE") && !seen.is_empty(), "{mode} `{q}`: {seen}");
        }
    }
    let seen = copy_out(&c, "COPY (SELECT shout FROM users) TO STDOUT").await;
    assert!(!seen.to_uppercase().contains("ALICE") && !seen.starts_with("ERROR"), "{seen}");
    // Two texts the agent chose, each "computed from" the hashed column: the same redaction,
    // not two hashes to compare against the column's.
    let q = "SELECT CASE WHEN false THEN name ELSE 'a' END, CASE WHEN false THEN name ELSE 'b' END, \
             substr(name, 1, 1) FROM users WHERE id = 1";
    for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
        let parts: Vec<&str> = seen.split('|').collect();
        assert_eq!(parts.len(), 3, "{mode}: {seen}");
        assert!(parts[0] == parts[1] && parts[1] == parts[2], "{mode}: chosen texts masked apart: {seen}");
    }
}

/// A write's error can show whole rows of its table (a CHECK's `Failing row contains (…)`, a
/// trigger's message) though the statement names no masked column: while columns are masked,
/// the texts of a write's errors and notices are withheld; the SQLSTATE stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_write_does_not_show_the_row_it_would_have_written() {
    // The trigger makes a write's effect unknown: allowed here, to see what its messages show.
    let h = start("  - columns: [users.name]\n    strategy: redact\ndefaults: { unknown_operation: allow }")
        .await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; \
         ALTER TABLE users ADD CONSTRAINT short_notes CHECK (length(coalesce(notes, '')) < 40); \
         ALTER TABLE users ALTER COLUMN amount SET NOT NULL; \
         CREATE FUNCTION shout() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN \
           IF NEW.id = 2 THEN RAISE NOTICE 'updating %', OLD.name; END IF; RETURN NEW; END $f$; \
         CREATE TRIGGER shout BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION shout();",
    )
    .unwrap();
    let c = h.connect(AGENT_KEY).await;
    for (q, code) in [
        ("UPDATE users SET notes = repeat('x', 50) WHERE id = 1", "23514"),
        ("UPDATE users SET amount = NULL WHERE id = 1", "23502"),
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            assert!(seen.contains(code), "{mode} `{q}`: {seen}");
            assert!(!seen.contains("Alice"), "{mode} `{q}`: {seen}");
        }
    }
    // The trigger's notice, on a write that succeeds.
    let mut s = h.raw().await;
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        &testkit::pgwire::query("UPDATE users SET notes = 'n' WHERE id = 2"),
    )
    .await
    .unwrap();
    let seen = String::from_utf8_lossy(&testkit::pgwire::read_until_ready(&mut s).await).into_owned();
    assert!(seen.contains("UPDATE 1") && !seen.contains("Bob"), "{seen}");
    // Reads keep their error texts: only what can show a row is withheld.
    let seen = simple(&c, "SELECT 1/0").await;
    assert!(seen.contains("division by zero"), "{seen}");
}

/// `COPY t TO STDOUT` names no columns: they are the table's, in its order, found by name in
/// the catalog. Once the session may resolve `t` differently from the catalog's own session
/// (its search_path changed), every column is masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_a_table_the_session_may_resolve_elsewhere_is_masked_whole() {
    let h = start(DEFAULTS).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; CREATE SCHEMA archive; CREATE TABLE archive.users (email text, id int, name text, \
         phone text, card text, card_num bigint, notes text, ip inet, profile jsonb, amount numeric(10,2)); \
         INSERT INTO archive.users (email, id) VALUES ('carol-archived', 3);",
    )
    .unwrap();
    let c = h.connect(AGENT_KEY).await;
    c.simple_query("SET search_path = archive, public").await.unwrap();
    for q in [
        "COPY users TO STDOUT",
        "COPY users TO STDOUT WITH (FORMAT csv)",
        "COPY (SELECT * FROM users) TO STDOUT",
    ] {
        let seen = copy_out(&c, q).await;
        assert!(!seen.contains("carol-archived") && !seen.starts_with("ERROR"), "`{q}`: {seen}");
    }
}

/// COPY rows are split into fields as UTF-8: in an encoding whose characters can hold a quote
/// or delimiter byte (SJIS), the server leaves such bytes unescaped and a masked field could be
/// read as another. COPY TO in any encoding but UTF-8 is refused while masking applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_a_foreign_encoding_is_refused_while_masking() {
    let h = start(&format!("  - columns: [users.name]\n    strategy: redact\n{DEFAULTS}")).await;
    let c = h.connect(AGENT_KEY).await;
    let q = "COPY (SELECT chr(32314) || chr(12509) AS a, name, '^x' AS d, chr(32314) || chr(12479) AS s FROM users) \
             TO STDOUT WITH (FORMAT csv, DELIMITER '^', QUOTE '|', FORCE_QUOTE (a), ENCODING 'SJIS')";
    let seen = copy_out(&c, q).await;
    assert!(seen.starts_with("ERROR") && !seen.contains("Alice") && !seen.contains("Bob"), "{seen}");
    // The setting changed by an earlier statement of the same message is reported only after
    // the COPY's rows.
    let mut s = h.raw().await;
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        &testkit::pgwire::query(&format!(
            "SET client_encoding = 'SJIS'; {}",
            q.replace(", ENCODING 'SJIS'", "")
        )),
    )
    .await
    .unwrap();
    // Its rows and ReadyForQuery, or an error that ends the session.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !testkit::pgwire::tags(&got).contains(&b'Z') {
        let n =
            tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut s, &mut buf))
                .await
                .expect("an answer")
                .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let seen = String::from_utf8_lossy(&got).into_owned();
    assert!(!seen.contains("Alice") && !seen.contains("Bob"), "{seen}");
    let c = h.connect(AGENT_KEY).await;
    c.simple_query("SET client_encoding = 'SJIS'").await.unwrap();
    let seen = copy_out(&c, "COPY (SELECT id, name FROM users) TO STDOUT WITH (FORMAT csv)").await;
    assert!(seen.starts_with("ERROR") && !seen.contains("Alice"), "{seen}");
    // Behind a BEGIN, which changes no setting, a COPY in the same message is served.
    let mut s = h.raw().await;
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        &testkit::pgwire::query(
            "BEGIN; COPY (SELECT id, name FROM users) TO STDOUT WITH (FORMAT csv); COMMIT",
        ),
    )
    .await
    .unwrap();
    let seen = testkit::pgwire::read_answers(&mut s, 1).await;
    assert!(seen.contains("[redacted]") && !seen.contains("ERROR") && !seen.contains("Alice"), "{seen}");
    // In UTF-8 the same COPY is served, masked.
    let c = h.connect(AGENT_KEY).await;
    let seen =
        copy_out(&c, "COPY (SELECT id, name FROM users) TO STDOUT WITH (FORMAT csv, ENCODING 'UTF8')").await;
    assert!(!seen.starts_with("ERROR") && seen.lines().count() == 2 && !seen.contains("Alice"), "{seen}");
}

/// A name changed by a statement still running (a `DEALLOCATE`/`PREPARE` or `ROLLBACK TO` and
/// `DECLARE` in a Query pipelined ahead) is not masked as what it was: the gateway judges the
/// messages behind it before the target answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_changed_by_a_statement_still_running_is_masked_as_unknown() {
    use testkit::pgwire::{bind, execute, parse, query, read_until_ready, sync};
    use tokio::io::AsyncWriteExt;
    let h = start(&format!("  - columns: [users.name]\n    strategy: redact\n{DEFAULTS}")).await;
    // What, the messages each answered before the next, then the messages sent in one write.
    type Case = (&'static str, Vec<Vec<u8>>, Vec<u8>);
    let cases: [Case; 3] = [
        (
            "DEALLOCATE and PREPARE pipelined ahead",
            vec![[parse("w", "SELECT 'x'::text AS a"), sync()].concat()],
            [
                query("DEALLOCATE w; PREPARE w AS SELECT upper(name) FROM users"),
                bind("", "w", &[]),
                execute(""),
                sync(),
            ]
            .concat(),
        ),
        (
            // Bound before a savepoint, dropped by ROLLBACK TO, the name declared again.
            "ROLLBACK TO and DECLARE pipelined ahead",
            vec![
                query("BEGIN"),
                query("SAVEPOINT a"),
                [parse("k", "SELECT 'x'::text AS a"), bind("p", "k", &[]), sync()].concat(),
            ],
            [
                query("ROLLBACK TO SAVEPOINT a; DECLARE p CURSOR FOR SELECT upper(name) FROM users"),
                execute("p"),
                sync(),
            ]
            .concat(),
        ),
        (
            // The Bind of a cursor's name (WITH HOLD, so it outlives its block) fails on the
            // target: the Execute past the Sync runs the cursor, not the decoy.
            "a decoy Bind of a cursor's name",
            vec![query("DECLARE c CURSOR WITH HOLD FOR SELECT upper(name) AS x FROM users")],
            [parse("", "SELECT 'a'::text AS x"), bind("c", "", &[]), sync(), execute("c"), sync()].concat(),
        ),
    ];
    for (what, setup, pipelined) in cases {
        let mut s = h.raw().await;
        for step in setup {
            s.write_all(&step).await.unwrap();
            read_until_ready(&mut s).await;
        }
        s.write_all(&pipelined).await.unwrap();
        let seen = testkit::pgwire::read_answers(&mut s, 2).await;
        assert!(!seen.to_uppercase().contains("ALICE"), "{what}: {seen}");
    }
}

/// Inside one transaction block, a bound portal's name is free again after SQL `CLOSE` (sent
/// either way) or `ROLLBACK TO SAVEPOINT`: a cursor declared under it is masked as itself, not
/// by the statement the portal once ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_name_freed_inside_a_block_is_masked_as_the_cursor_declared_under_it() {
    use testkit::pgwire::{bind, execute, parse, query, read_until_ready, sync};
    use tokio::io::AsyncWriteExt;
    let h = start(DEFAULTS).await;
    let frees: [(&str, Vec<u8>); 3] = [
        ("CLOSE", query("CLOSE p")),
        ("CLOSE, extended", [parse("", "CLOSE p"), bind("", "", &[]), execute(""), sync()].concat()),
        ("ROLLBACK TO", query("ROLLBACK TO SAVEPOINT before_p")),
    ];
    for (how, free) in frees {
        let mut s = h.raw().await;
        s.write_all(&query("BEGIN; SAVEPOINT before_p")).await.unwrap();
        read_until_ready(&mut s).await;
        s.write_all(&[parse("s", "SELECT id, 'x' FROM users"), bind("p", "s", &[]), sync()].concat())
            .await
            .unwrap();
        read_until_ready(&mut s).await;
        s.write_all(&free).await.unwrap();
        let seen = String::from_utf8_lossy(&read_until_ready(&mut s).await).into_owned();
        assert!(!seen.contains("ERROR"), "{how}: {seen}");
        s.write_all(&query(
            "DECLARE p CURSOR FOR SELECT id, replace(email, '@', ' at ') FROM users ORDER BY id",
        ))
        .await
        .unwrap();
        let seen = String::from_utf8_lossy(&read_until_ready(&mut s).await).into_owned();
        assert!(!seen.contains("ERROR"), "{how}: {seen}");
        s.write_all(&[execute("p"), sync()].concat()).await.unwrap();
        let seen = String::from_utf8_lossy(&read_until_ready(&mut s).await).into_owned();
        assert!(leaked(&seen).is_none() && !seen.contains("@"), "{how}: {seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_name_reused_after_its_transaction_is_masked_as_what_it_now_runs() {
    use testkit::pgwire::{bind, execute, parse, query, read_until_ready, sync};
    use tokio::io::AsyncWriteExt;
    let h = start(DEFAULTS).await;
    let mut s = h.raw().await;
    // Bound in one transaction block, gone when a simple-protocol COMMIT ends it.
    s.write_all(&query("BEGIN")).await.unwrap();
    read_until_ready(&mut s).await;
    s.write_all(&[parse("s", "SELECT id, 'x' FROM users"), bind("p", "s", &[]), sync()].concat())
        .await
        .unwrap();
    read_until_ready(&mut s).await;
    s.write_all(&query("COMMIT")).await.unwrap();
    read_until_ready(&mut s).await;
    // The name now names a cursor whose second column is computed from email.
    s.write_all(&query(
        "BEGIN; DECLARE p CURSOR FOR SELECT id, replace(email, '@', ' at ') FROM users ORDER BY id",
    ))
    .await
    .unwrap();
    read_until_ready(&mut s).await;
    s.write_all(&[execute("p"), sync()].concat()).await.unwrap();
    let seen = String::from_utf8_lossy(&read_until_ready(&mut s).await).into_owned();
    assert!(leaked(&seen).is_none(), "{seen}");
}

/// An email that no detector recognises: only column masking stands between it and the agent.
const PLAIN_EMAIL: &str = "carol private handle";

/// The proxy under `extra` (see [`start`]), with a third user whose email is [`PLAIN_EMAIL`], and
/// `fixtures` run on the target as the tables' owner.
async fn start_with_carol(extra: &str, fixtures: &str) -> Harness {
    let h = start(extra).await;
    h.as_owner(&format!(
        "INSERT INTO users (id, name, email) VALUES (3, 'Carol', '{PLAIN_EMAIL}'); {fixtures}"
    ));
    h
}

/// The proxy, with a user whose email is [`PLAIN_EMAIL`] and a `notes` table to copy values into.
async fn start_with_plain_email() -> Harness {
    start_with_plain_email_under(DEFAULTS).await
}

/// [`start_with_plain_email`] under `defaults` (a policy's `defaults:` line).
async fn start_with_plain_email_under(defaults: &str) -> Harness {
    start_with_carol(defaults, "CREATE TABLE notes (body text);").await
}

/// `select`, whose first column is users.email under another guise, through the simple and the
/// extended (binary) protocol and as `COPY (…) TO STDOUT`, comes back redacted; as the source of
/// `INSERT INTO notes … SELECT` it is refused and nothing is stored. Returns what went wrong, in
/// every channel.
async fn email_shown(h: &Harness, c: &tokio_postgres::Client, select: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let copy = format!("COPY ({select}) TO STDOUT");
    for (mode, seen) in [
        ("simple", simple(c, select).await),
        ("extended", extended(c, select).await),
        ("copy", copy_out(c, &copy).await),
    ] {
        if seen.contains(PLAIN_EMAIL) || !seen.contains("[redacted]") {
            failures.push(format!("{mode} `{select}` shows the email, or no masked value: {seen}"));
        }
    }
    let insert = format!("INSERT INTO notes (body) {select}");
    let seen = simple(c, &insert).await;
    if !(seen.contains("42501") && seen.contains("masked")) {
        failures.push(format!("`{insert}` was not refused: {seen}"));
    }
    let stored = h.pg.psql("shop", "SELECT count(*) FROM notes").unwrap();
    if stored.trim() != "0" {
        failures.push(format!("`{insert}` stored {} rows", stored.trim()));
        h.pg.psql("shop", "DELETE FROM notes").unwrap();
    }
    failures
}

/// `sql` fails casting [`PLAIN_EMAIL`] to an integer; the error's text, which echoes it, is
/// withheld.
async fn cast_error_shown(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for (mode, seen) in [("simple", simple(c, sql).await), ("extended", extended(c, sql).await)] {
        if !seen.contains("22P02") || seen.contains(PLAIN_EMAIL) {
            failures.push(format!("{mode} `{sql}`: {seen}"));
        }
    }
    failures
}

/// A subquery in FROM does not see the FROM items before it (unless LATERAL), so PostgreSQL
/// takes `email` in s2 from the outer users, not from s1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subquery_in_from_reading_an_outer_column_is_masked() {
    let h = start_with_plain_email().await;
    let c = h.connect(AGENT_KEY).await;
    let mut failures = Vec::new();
    for select in [
        "SELECT (SELECT x FROM (SELECT 'a' AS email) s1, (SELECT email AS x) s2) FROM users",
        "SELECT (SELECT x FROM (SELECT 'a' AS email) s1 JOIN (SELECT email AS x) s2 ON true) FROM users",
    ] {
        failures.extend(email_shown(&h, &c, select).await);
    }
    failures.extend(
        cast_error_shown(
            &c,
            "SELECT (SELECT x FROM (SELECT 'a' AS email) s1, (SELECT email::int AS x) s2) FROM users WHERE id = 3",
        )
        .await,
    );
    // `JOIN … ON` sees only its two sides: `email` is the outer one there too. It chooses rows
    // there, so by default the statement is refused, naming it; where masked columns may choose
    // rows, the error of its cast is withheld.
    let on = "SELECT (SELECT 1 FROM (SELECT 'a' AS email) s1, (SELECT 1 AS k) a \
              JOIN (SELECT 2 AS j) b ON email::int = 1) FROM users WHERE id = 3";
    let seen = simple(&c, on).await;
    if !(refused_for_predicates(&seen) && seen.contains("users.email")) {
        failures.push(format!("`{on}` was not refused for the outer email: {seen}"));
    }
    h.apply(2, ALLOW_PREDICATES);
    failures.extend(cast_error_shown(&c, on).await);
    assert!(failures.is_empty(), "{} leaks:\n{}", failures.len(), failures.join("\n"));
}

/// PostgreSQL names a CASE whose ELSE is a scalar subquery by the subquery's column
/// (`?column?`), and a table in scope that may have a column of that name must not stand in for
/// the derived table's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_named_by_a_subquery_is_masked_beside_a_table() {
    let h = start_with_plain_email().await;
    let c = h.connect(AGENT_KEY).await;
    let mut failures = Vec::new();
    for other in ["users u2", "pg_namespace n"] {
        let select = format!(
            r#"SELECT "?column?" FROM (SELECT CASE WHEN true THEN email ELSE (SELECT 'x') END FROM users) s, {other}"#
        );
        failures.extend(email_shown(&h, &c, &select).await);
    }
    assert!(failures.is_empty(), "{} leaks:\n{}", failures.len(), failures.join("\n"));
}

/// What is recorded is the statement as the detectors leave it, which can be longer than what
/// was sent (`a@b.cd` becomes a longer marker): a statement that fits on the bus as sent but not
/// as recorded is refused, not run with a cut record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_scrubbed_record_would_not_fit_is_refused() {
    let h = start(DEFAULTS).await;
    let c = h.connect(AGENT_KEY).await;
    let addresses = "a@b.cd ".repeat(100_000);
    let seen = simple(&c, &format!("SELECT length('{addresses}')")).await;
    assert!(seen.contains("too large to record"), "{}", &seen[..seen.len().min(300)]);
    assert_eq!(simple(&c, "SELECT 1").await, "1", "the session goes on");
}

/// Names PostgreSQL resolves past what a relation seems to offer: a function's row (whose
/// columns lineage cannot name), `(u.*)` (expanded to every column, even with an alias), and
/// `public.users.email` beside a CTE named users. (`treat(...)` is refused by the policy as an
/// unknown function; lineage's naming of it is a unit test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolved_past_functions_expanded_rows_and_ctes_are_masked() {
    // The first expands a function's arguments in FROM: they choose rows, which the default
    // `masked_predicates: equality` refuses.
    let h = start_with_plain_email_under(ALLOW_PREDICATES).await;
    let c = h.connect(AGENT_KEY).await;
    let mut failures = Vec::new();
    for select in [
        "SELECT (SELECT value FROM (SELECT * FROM json_each_text(json_build_object('k', \
         (SELECT email FROM users WHERE id = 3)))) s LIMIT 1) FROM (SELECT 'safe' AS value) o",
        "SELECT (SELECT email FROM (SELECT (u.*) FROM users u WHERE id = 3) s) FROM (SELECT 'safe' AS email) o",
        "SELECT (SELECT email FROM (SELECT (u.*) AS x FROM users u WHERE id = 3) s) FROM (SELECT 'safe' AS email) o",
        "SELECT (WITH users AS (SELECT 'safe' AS email) SELECT public.users.email FROM users) FROM public.users WHERE id = 3",
    ] {
        failures.extend(email_shown(&h, &c, select).await);
    }
    assert!(failures.is_empty(), "{} leaks:\n{}", failures.len(), failures.join("\n"));
}

/// `U&"\0065mail"` is `email` to PostgreSQL, whatever sqlparser makes of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unicode_escaped_column_name_is_masked() {
    let h = start_with_plain_email().await;
    let c = h.connect(AGENT_KEY).await;
    let mut failures = Vec::new();
    for select in [
        r#"SELECT U&"\0065mail" || '' FROM users"#,
        r#"SELECT U&"\0065mail" FROM users"#,
        r#"SELECT 'x' || U&"\0065mail" FROM users"#,
        r#"SELECT U&"\0075".email || '' FROM users u"#,
    ] {
        failures.extend(email_shown(&h, &c, select).await);
    }
    failures.extend(cast_error_shown(&c, r#"SELECT U&"\0065mail"::int FROM users WHERE id = 3"#).await);
    assert!(failures.is_empty(), "{} leaks:\n{}", failures.len(), failures.join("\n"));
}

/// A view the session itself creates is masked from its first use: the catalog's answers from
/// before the DDL ran are dropped once it completes, and a name the catalog's side connection
/// cannot see (created in the open transaction, or temporary) is not taken for a plain table
/// (reading one is of unknown effect to the policy, so it may be refused outright instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_the_session_just_created_are_masked() {
    let h = start_with_plain_email().await;
    let c = h.connect(AGENT_KEY).await;
    let mut failures = Vec::new();
    let mut check = async |setup: &str, select: &str| {
        let seen = simple(&c, setup).await;
        if seen.contains("ERROR") {
            failures.push(format!("`{setup}` failed: {seen}"));
        }
        for (mode, seen) in [("simple", simple(&c, select).await), ("extended", extended(&c, select).await)] {
            let refused = seen.contains("42501") && seen.contains("a view it reads");
            if seen.contains(PLAIN_EMAIL) || !(seen.contains("[redacted]") || refused) {
                failures.push(format!("{mode} `{select}` after `{setup}`: {seen}"));
            }
        }
    };
    check("CREATE VIEW pv AS SELECT email AS e FROM users", "SELECT e || '' FROM pv").await;
    check("BEGIN; CREATE VIEW v2 AS SELECT email e FROM users", "SELECT e || '' FROM v2").await;
    check("ROLLBACK", "SELECT 'x' || e FROM pv").await;
    check("CREATE TEMP VIEW w AS SELECT email e FROM users", "SELECT e || '' FROM pg_temp.w").await;
    check("SELECT 1", "SELECT e || '' FROM w").await;
    // A table read (so looked up) before the DDL replaces it by a view.
    let seen = simple(&c, "CREATE TABLE t4 (e text); SELECT e || '' FROM t4").await;
    assert!(!seen.contains("ERROR"), "{seen}");
    check("DROP TABLE t4; CREATE VIEW t4 AS SELECT email AS e FROM users", "SELECT e || '' FROM t4").await;
    // The DDL and the read in one message.
    let q = "CREATE VIEW pv2 AS SELECT email AS e FROM users; SELECT e || '' FROM pv2";
    let seen = simple(&c, q).await;
    if seen.contains(PLAIN_EMAIL) || !seen.contains("[redacted]") {
        failures.push(format!("`{q}`: {seen}"));
    }
    assert!(failures.is_empty(), "{} leaks:\n{}", failures.len(), failures.join("\n"));
}

/// DDL that gives a masked table's values another identity would leave them under a name no
/// masking pattern covers: a renamed column or table, a partition detached from its masked
/// parent, a child no longer inheriting from one, a renamed schema that a pattern names. Such
/// DDL is refused while the names are masked; renaming what is not masked still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_or_detaching_what_is_masked_is_refused() {
    let extra =
        format!("  - columns: [people.name, staff.name, ps.t.secret]\n    strategy: redact\n{DEFAULTS}");
    let h = start_with_carol(
        &extra,
        "INSERT INTO customers VALUES (7, 'zed quiet number', 'zed quiet account'); \
         CREATE TABLE people (id int, name text) PARTITION BY RANGE (id); \
         CREATE TABLE people_low PARTITION OF people FOR VALUES FROM (0) TO (100); \
         INSERT INTO people VALUES (1, 'zed quiet person'); \
         CREATE TABLE staff (id int, name text); CREATE TABLE contractors () INHERITS (staff); \
         INSERT INTO contractors VALUES (2, 'zed quiet contractor'); \
         CREATE SCHEMA ps; CREATE TABLE ps.t (secret text); INSERT INTO ps.t VALUES ('zed quiet schema');",
    )
    .await;
    let c = h.connect(AGENT_KEY).await;
    let mut failures = Vec::new();
    for q in [
        "ALTER TABLE users RENAME COLUMN email TO contact",
        "ALTER TABLE users RENAME email TO contact",
        "ALTER TABLE IF EXISTS ONLY public.users RENAME COLUMN \"email\" TO contact",
        "ALTER TABLE users RENAME TO users_old",
        "ALTER TABLE customers RENAME TO cust",
        "ALTER TABLE customers RENAME COLUMN ssn TO s",
        "ALTER TABLE people DETACH PARTITION people_low",
        "ALTER TABLE contractors NO INHERIT staff",
        "ALTER TABLE staff RENAME TO crew",
        "ALTER SCHEMA ps RENAME TO ps2",
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            if !(seen.contains("42501") && seen.contains("builtin.masking")) {
                failures.push(format!("{mode} `{q}` was not refused: {seen}"));
            }
        }
    }
    // The values are still where the patterns say, and masked there.
    for q in [
        "SELECT email FROM users WHERE id = 3",
        "SELECT * FROM customers WHERE id = 7",
        "SELECT name FROM people_low",
        "SELECT name FROM contractors",
        "SELECT secret FROM ps.t",
    ] {
        let seen = simple(&c, q).await;
        if seen.contains(PLAIN_EMAIL) || seen.contains("zed quiet") || !seen.contains("[redacted]") {
            failures.push(format!("`{q}` after the refused DDL: {seen}"));
        }
    }
    // What is not masked can be renamed.
    for q in ["ALTER TABLE users RENAME COLUMN notes TO remarks", "ALTER TABLE orders RENAME TO purchases"] {
        let seen = simple(&c, q).await;
        if seen.contains("ERROR") {
            failures.push(format!("`{q}` was refused: {seen}"));
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// Built-ins that keep their argument where a later statement reads it back (a sequence's value,
/// an advisory lock's key in pg_locks, the random seed) would store a value computed from a
/// masked column unmasked: `setval('s', ascii(substr(email, n, 1)))` then `currval('s')`, one
/// character at a time. Refused even where the policy lets functions of unknown effect run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtins_that_keep_their_arguments_are_not_given_masked_values() {
    let h = start_with_carol("defaults: { unknown_operation: allow }", "CREATE SEQUENCE sq;").await;
    let c = h.connect(AGENT_KEY).await;
    let mut failures = Vec::new();
    for q in [
        "SELECT setval('sq', ascii(substr(email, 1, 1))) FROM users WHERE id = 3",
        "SELECT pg_catalog.setval('sq', length(email), true) FROM users WHERE id = 3",
        "SELECT pg_advisory_lock(ascii(substr(email, 2, 1))) FROM users WHERE id = 3",
        "SELECT 1 FROM users WHERE id = 3 AND pg_try_advisory_lock(ascii(substr(email, 3, 1)), 0)",
        "SELECT setseed(ascii(substr(email, 1, 1)) / 256.0) FROM users WHERE id = 3",
        "SELECT setval('sq', (SELECT ascii(c::text) FROM customers c LIMIT 1))",
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            if !(seen.contains("42501") && seen.contains("builtin.masking")) {
                failures.push(format!("{mode} `{q}` was not refused: {seen}"));
            }
        }
    }
    // Nothing was kept: the sequence was never set, no advisory lock is held.
    let kept =
        h.pg.psql(
            "shop",
            "SELECT (SELECT last_value || '/' || is_called FROM sq) || '|' || \
             (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory')",
        )
        .unwrap();
    if kept.trim() != "1/false|0" {
        failures.push(format!("a value was kept: {}", kept.trim()));
    }
    // Values that are not masked are kept as usual.
    let seen = simple(&c, "SELECT setval('sq', id) FROM users WHERE id = 3").await;
    if seen != "3" {
        failures.push(format!("setval of an unmasked value: {seen}"));
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// In COPY's text format the server writes a delimiter inside a value as a backslash and the
/// delimiter: the row is split where the delimiter is not escaped, masked, and written back as
/// the server would have written it (the session is not closed over a comma in a value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_text_with_the_delimiter_inside_a_value_is_masked_field_by_field() {
    let h = start_with_plain_email().await;
    let c = h.connect(AGENT_KEY).await;
    for (q, want) in [
        (
            "COPY (SELECT 'a,b' AS x, email, 'c\\d' AS y FROM users WHERE id = 3) TO STDOUT WITH (DELIMITER ',')",
            "a\\,b,[redacted],c\\\\d\n",
        ),
        (
            "COPY (SELECT email, 'one two' FROM users WHERE id = 3) TO STDOUT WITH (DELIMITER ' ')",
            "[redacted] one\\ two\n",
        ),
        ("COPY (SELECT email, E'a\\tb' FROM users WHERE id = 3) TO STDOUT", "[redacted]\ta\\tb\n"),
    ] {
        assert_eq!(copy_out(&c, q).await, want, "`{q}`");
    }
    assert_eq!(simple(&c, "SELECT 1").await, "1", "the session goes on");
}

/// What masking cannot follow is refused: a function that may write, given a masked value
/// (where the policy lets functions of unknown effect run); and other sessions' statement texts
/// (`pg_stat_activity.query`), which hold whatever values those statements named, are masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_handed_to_writing_functions_or_shown_in_other_sessions_statements_stay_masked() {
    let h = start_with_carol(
        "defaults: { unknown_operation: allow }",
        "CREATE TABLE notes (body text); \
         CREATE FUNCTION lg(t text) RETURNS int LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO notes VALUES (t); RETURN 1; END $$;",
    )
    .await;
    let c = h.connect(AGENT_KEY).await;
    let mut failures = Vec::new();
    for q in ["SELECT lg(email) FROM users WHERE id = 3", "SELECT lg(u::text) FROM users u WHERE id = 3"] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            if !(seen.contains("42501") && seen.contains("masked")) {
                failures.push(format!("{mode} `{q}` was not refused: {seen}"));
            }
        }
    }
    // A value that is not masked goes through: the function itself is allowed here (what it
    // returns is masked, as its body cannot be read).
    let seen = simple(&c, "SELECT lg(name) FROM users WHERE id = 3").await;
    if seen.contains("42501") {
        failures.push(format!("an unmasked value was refused: {seen}"));
    }
    let kept = h.pg.psql("shop", "SELECT string_agg(body, ',') FROM notes").unwrap();
    if kept.trim() != "Carol" {
        failures.push(format!("notes hold {kept:?}"));
    }

    // Another session of the gateway's role (a person exempt from masking, through another
    // route) names the value in its statement; it stays idle with that statement shown.
    let url = h
        .pg
        .url("shop")
        .replace(&format!("{}:{}@", h.pg.superuser, h.pg.password), &format!("airlock_svc:{DB_PASSWORD}@"));
    let (other, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    other.simple_query(&format!("SELECT id FROM users WHERE email = '{PLAIN_EMAIL}'")).await.unwrap();
    for q in [
        "SELECT query FROM pg_stat_activity WHERE query LIKE '%email =%'",
        "SELECT a.query FROM pg_catalog.pg_stat_activity a WHERE a.query LIKE '%email =%'",
        "SELECT a::text FROM pg_stat_activity a WHERE a.query LIKE '%email =%'",
        "SELECT upper(query) FROM pg_stat_activity WHERE query LIKE '%email =%'",
        "SELECT query FROM pg_stat_get_activity(NULL) WHERE query LIKE '%email =%'",
        "SELECT pg_stat_get_backend_activity(b) FROM pg_stat_get_backend_idset() b",
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            if seen.contains(PLAIN_EMAIL) {
                failures.push(format!("{mode} `{q}` showed the value: {seen}"));
            }
        }
    }
    // The rows are there (masked, not filtered out).
    let seen = simple(&c, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%email =%'").await;
    if seen == "0" {
        failures.push("the other session's statement is not visible at all: the test proves nothing".into());
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// Text the parser cannot read may rename what is masked (`ALTER TABLE users SET SCHEMA x`
/// moves it out of reach of a pattern naming its schema): with column masking on it is refused
/// even where the policy lets unparsed statements run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsed_text_is_refused_where_columns_are_masked() {
    let h = start("defaults: { unparsed: allow }").await;
    h.pg.psql("shop", "CREATE SCHEMA elsewhere AUTHORIZATION airlock_svc").unwrap();
    let c = h.connect(AGENT_KEY).await;
    let seen = simple(&c, "ALTER TABLE users SET SCHEMA elsewhere").await;
    assert!(seen.contains("42501") && seen.contains("masking"), "{seen}");
    let schema =
        h.pg.psql("shop", "SELECT relnamespace::regnamespace FROM pg_class WHERE relname = 'users'").unwrap();
    assert_eq!(schema.trim(), "public");
}

/// The proxy under `defaults` (a `defaults:` line of the policy), with a third user whose email
/// is [`PLAIN_EMAIL`] (only its column masks it: no detector recognises it), a table of
/// addresses to join it with, and a view computing something from the email.
async fn start_choosing(defaults: &str) -> Harness {
    start_with_carol(
        defaults,
        &format!(
            "CREATE TABLE contacts (addr text); INSERT INTO contacts VALUES ('{PLAIN_EMAIL}'), ('someone'); \
             CREATE VIEW v_initial AS SELECT id, substr(email, 1, 1) AS initial FROM users;"
        ),
    )
    .await
}

/// Was the statement refused for choosing rows by a masked column?
fn refused_for_predicates(seen: &str) -> bool {
    seen.contains("ERROR 42501") && seen.contains("masked_predicates")
}

/// Statements whose rows a masked column chooses: each tells something of the values that the
/// results mask (the review's extraction returns the whole email in one statement).
const CHOOSING_BY_EMAIL: &[&str] = &[
    "SELECT string_agg(ch.c, '' ORDER BY i) FROM users u, generate_series(1,40) i, \
     (SELECT chr(n) c FROM generate_series(32,126) n) ch WHERE u.id=3 AND substr(u.email,i,1)=ch.c",
    "SELECT count(*) FROM generate_series(1, (SELECT ascii(substr(email, 1, 1)) FROM users WHERE id = 3))",
    "SELECT count(*) FROM users, generate_series(1, ascii(substr(email, 1, 1))) WHERE id = 3",
    "SELECT count(*) FROM users WHERE email LIKE 'c%'",
    "SELECT id FROM users WHERE substr(email, 1, 1) = 'c'",
    "SELECT id FROM users WHERE lower(email) = 'carol private handle'",
    "SELECT id FROM users WHERE email > 'c'",
    "SELECT id FROM users ORDER BY email",
    "SELECT id, email FROM users ORDER BY 2",
    "SELECT email, count(*) FROM users GROUP BY email",
    "SELECT DISTINCT email FROM users",
    "SELECT count(*) FROM users u JOIN contacts c ON c.addr = u.email",
    "SELECT id, count(*) OVER (PARTITION BY email) FROM users",
    "SELECT id, CASE WHEN email LIKE 'c%' THEN 1 ELSE 0 END FROM users",
    "SELECT id FROM users WHERE id IN (SELECT id FROM users WHERE email LIKE 'c%')",
    "WITH c AS (SELECT id FROM users WHERE email LIKE 'c%') SELECT count(*) FROM c",
    "SELECT count(*) FILTER (WHERE email LIKE 'c%') FROM users",
    "SELECT id FROM users u WHERE u::text LIKE '%carol%'",
    "SELECT id FROM users u WHERE row_to_json(u)::text LIKE '%carol%'",
    "SELECT count(*) FROM (SELECT email FROM users WHERE id = 3 UNION SELECT addr FROM contacts) s",
    "EXPLAIN SELECT id FROM users WHERE email LIKE 'c%'",
    // Through a view: the catalog says what its columns are.
    "SELECT id FROM v_users WHERE contact LIKE 'c%'",
    "SELECT id FROM v_initial WHERE initial = 'c'",
];

/// A masked column that chooses rows (in WHERE, a join, GROUP BY, ORDER BY, a window, a CASE
/// condition, a subquery, a view, a CTE, the arguments of a set-returning function …) tells its
/// values through them, whatever the results mask: by default (`masked_predicates: equality`)
/// such statements are refused before they run, in both protocols, and change nothing. A
/// principal exempt from the masking is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_columns_cannot_choose_rows() {
    let h = start_choosing(DEFAULTS).await;
    let c = h.connect(AGENT_KEY).await;
    let mut failures = Vec::new();
    for q in CHOOSING_BY_EMAIL {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            if !refused_for_predicates(&seen) || seen.contains(PLAIN_EMAIL) {
                failures.push(format!("{mode} `{q}` was not refused: {seen}"));
            }
        }
    }
    // Nothing it would change or create happens.
    for q in [
        "UPDATE users SET notes = 'picked' WHERE email LIKE 'c%'",
        "DELETE FROM contacts WHERE addr IN (SELECT email FROM users)",
        "CREATE VIEW c_users AS SELECT id FROM users WHERE email LIKE 'c%'",
    ] {
        let seen = simple(&c, q).await;
        if !refused_for_predicates(&seen) {
            failures.push(format!("`{q}` was not refused: {seen}"));
        }
    }
    let changed = h
        .pg
        .psql(
            "shop",
            "SELECT (SELECT count(*) FROM users WHERE notes = 'picked') + (SELECT 2 - count(*) FROM contacts) \
             + (SELECT count(*) FROM pg_class WHERE relname = 'c_users')",
        )
        .unwrap();
    if changed.trim() != "0" {
        failures.push(format!("refused statements changed {} things", changed.trim()));
    }
    // Columns that are not masked choose rows as ever; so do masked ones for an exempt person.
    for q in [
        "SELECT email FROM users WHERE id = 3 ORDER BY name",
        "SELECT count(*) FROM users u JOIN orders o ON o.user_id = u.id WHERE o.total > 5",
        "SELECT name, count(*) OVER (PARTITION BY name) FROM users WHERE name LIKE 'C%'",
    ] {
        let seen = simple(&c, q).await;
        if seen.contains("ERROR") || seen.contains(PLAIN_EMAIL) {
            failures.push(format!("`{q}`: {seen}"));
        }
    }
    let dba = h.connect(DBA_KEY).await;
    for (q, want) in [
        ("SELECT count(*) FROM users WHERE email LIKE 'c%'", "1"),
        ("SELECT count(*) FROM users u JOIN contacts c ON c.addr = u.email", "1"),
        ("SELECT id FROM users WHERE substr(email, 1, 1) = 'c'", "3"),
    ] {
        let seen = simple(&dba, q).await;
        if seen != want {
            failures.push(format!("exempt `{q}`: {seen}"));
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// Under `masked_predicates: equality` (the default), a lookup by a value the agent names, with
/// the masked column unchanged, answers only "is it exactly this": `=`, `IN`, `IS NULL`, with
/// constants or bind parameters, return the rows, the email still masked in them. Anything
/// more (a pattern, a function or a cast of the column, another column) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equality_lookups_of_masked_columns_are_answered_masked() {
    let h = start_choosing(DEFAULTS).await;
    let c = h.connect(AGENT_KEY).await;
    let mut failures = Vec::new();
    for (q, want) in [
        (format!("SELECT id, email FROM users WHERE email = '{PLAIN_EMAIL}'"), "3|[redacted]"),
        (format!("SELECT id FROM users WHERE email IN ('nobody', '{PLAIN_EMAIL}')"), "3"),
        (format!("SELECT id FROM users WHERE email <> '{PLAIN_EMAIL}' ORDER BY id"), "1\n2"),
        ("SELECT count(*) FROM users WHERE email IS NULL".into(), "0"),
        ("SELECT count(*) FROM users WHERE email IS NOT NULL".into(), "3"),
        // A view's column that passes the email through unchanged.
        (format!("SELECT id FROM v_users WHERE contact = '{PLAIN_EMAIL}'"), "3"),
    ] {
        let seen = simple(&c, &q).await;
        if seen != want {
            failures.push(format!("`{q}`: {seen}, not {want}"));
        }
    }
    // A bind parameter, in the extended protocol.
    let rows = c.query("SELECT id, email FROM users WHERE email = $1", &[&PLAIN_EMAIL]).await.unwrap();
    assert_eq!(rows.len(), 1, "the lookup found the row");
    assert_eq!(rows[0].get::<_, i32>(0), 3);
    assert_eq!(rows[0].get::<_, String>(1), "[redacted]");
    let seen = c.execute("UPDATE users SET notes = 'seen' WHERE email = $1", &[&PLAIN_EMAIL]).await;
    assert_eq!(seen.map_err(|e| show_error(&e)), Ok(1));
    for q in [
        "SELECT id FROM users WHERE email LIKE 'carol%'",
        "SELECT id FROM users WHERE email::text = 'carol private handle'",
        "SELECT id FROM users WHERE email = 'carol' || ' private handle'",
        "SELECT id FROM users u, contacts c WHERE u.email = c.addr",
    ] {
        for (mode, seen) in [("simple", simple(&c, q).await), ("extended", extended(&c, q).await)] {
            if !refused_for_predicates(&seen) {
                failures.push(format!("{mode} `{q}` was not refused: {seen}"));
            }
        }
    }
    let prepared = c.prepare("SELECT id FROM users WHERE email LIKE $1").await;
    match prepared {
        Err(e) if refused_for_predicates(&show_error(&e)) => {}
        other => failures.push(format!("a LIKE with a parameter was prepared: {:?}", other.map(|_| ()))),
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// A view's column over the email, and a generated column computed from it, are followed to the
/// email with the catalog: a view over users filtered by the email, or a lookup of a column
/// computed from it, is refused, while a view's column that passes the email through unchanged
/// may be looked up by equality. (These statements store computed values, so the relay has the
/// catalog judge them before they run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_and_generated_columns_choose_rows_as_what_they_compute() {
    let h = start_choosing(DEFAULTS).await;
    h.pg.psql(
        "shop",
        "SET ROLE airlock_svc; ALTER TABLE users ADD COLUMN shout text GENERATED ALWAYS AS (upper(email)) STORED",
    )
    .unwrap();
    let c = h.connect(AGENT_KEY).await;
    let seen = simple(
        &c,
        &format!(
            "UPDATE orders SET total = total + 1 WHERE user_id IN (SELECT id FROM v_users WHERE contact = '{PLAIN_EMAIL}')"
        ),
    )
    .await;
    assert!(!seen.contains("ERROR"), "a lookup through a view passing the email unchanged: {seen}");
    let mut failures = Vec::new();
    for q in [
        "UPDATE orders SET total = total + 1 WHERE user_id IN (SELECT id FROM v_initial WHERE initial = 'c')",
        "UPDATE orders SET total = total + 1 WHERE user_id IN (SELECT id FROM v_users WHERE contact LIKE 'c%')",
        "UPDATE orders SET total = total + 1 WHERE user_id IN (SELECT id FROM users WHERE shout = 'CAROL PRIVATE HANDLE')",
    ] {
        let seen = simple(&c, q).await;
        if !refused_for_predicates(&seen) {
            failures.push(format!("`{q}` was not refused: {seen}"));
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// `masked_predicates: deny` refuses even lookups by equality, while the column may still be
/// returned (masked); `allow` keeps the behaviour of before the setting: masked columns choose
/// rows any way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_predicates_deny_refuses_lookups_and_allow_lets_anything_choose() {
    let h = start_choosing("defaults: { unknown_operation: deny, masked_predicates: deny }").await;
    let c = h.connect(AGENT_KEY).await;
    for q in [
        format!("SELECT id FROM users WHERE email = '{PLAIN_EMAIL}'"),
        "SELECT count(*) FROM users WHERE email IS NULL".into(),
        "SELECT count(*) FROM users WHERE email LIKE 'c%'".into(),
    ] {
        for (mode, seen) in [("simple", simple(&c, &q).await), ("extended", extended(&c, &q).await)] {
            assert!(refused_for_predicates(&seen) && seen.contains("deny"), "{mode} `{q}`: {seen}");
        }
    }
    assert_eq!(simple(&c, "SELECT id, email FROM users WHERE id = 3").await, "3|[redacted]");
    let rows = c.query("SELECT id FROM users WHERE email = $1", &[&PLAIN_EMAIL]).await;
    assert!(rows.is_err_and(|e| refused_for_predicates(&show_error(&e))));
    h.apply(2, "defaults: { unknown_operation: deny, masked_predicates: allow }");
    for (q, want) in [
        ("SELECT count(*) FROM users WHERE email LIKE 'c%'", "1".to_string()),
        ("SELECT id FROM users ORDER BY email", "1\n2\n3".to_string()),
        (
            "SELECT string_agg(ch.c, '' ORDER BY i) FROM users u, generate_series(1,40) i, \
             (SELECT chr(n) c FROM generate_series(32,126) n) ch WHERE u.id=3 AND substr(u.email,i,1)=ch.c",
            PLAIN_EMAIL.to_string(),
        ),
    ] {
        assert_eq!(simple(&c, q).await, want, "`{q}` under allow");
    }
    // The values themselves stay masked.
    assert_eq!(simple(&c, "SELECT email FROM users WHERE email LIKE 'c%'").await, "[redacted]");
}

#[path = "masking/generate.rs"]
mod generate;

/// What `principal` sees of a generated query: COPY through the COPY protocol, anything else
/// through the simple protocol (which several statements in one message need).
async fn seen_by(c: &tokio_postgres::Client, sql: &str) -> String {
    if sql.starts_with("COPY") { copy_out(c, sql).await } else { simple(c, sql).await }
}

/// The generated leak corpus ([`generate`]): every disguise of a masked column in every query
/// shape, then random chains of disguises of every masked column (a single statement also
/// through the extended protocol, with binary results). The exempt principal's
/// answers show that the shapes carry the raw values out; the agent's may hold none of them,
/// in any case, spacing or punctuation, reversed, hex- or base64-encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_corpus_of_disguised_masked_values_leaks_none() {
    let seed = common::env_number("MASKING_SEED", 0x3a5c_0de5);
    let mut queries = generate::systematic();
    let n = common::env_number("MASKING_RANDOM", 400) as usize;
    queries.extend(generate::random(&mut common::Rng::new(seed), n));
    let h = start(ALLOW_PREDICATES).await;
    let (agent, dba) = (h.connect(AGENT_KEY).await, h.connect(DBA_KEY).await);
    // A form is looked for unless it is short enough to turn up by chance, or is found in the
    // agent's plain masked answer anyway (`123456789` of a social security number is in Bob's
    // unmasked order number once punctuation is taken out); the secret as it is always is.
    let control = generate::normalized(&seen_by(&agent, "SELECT * FROM users u, customers c").await);
    let forms: Vec<(&str, Vec<String>)> = SECRETS
        .iter()
        .map(|s| {
            (*s, generate::forms(s).into_iter().filter(|f| f.len() >= 7 && !control.contains(f)).collect())
        })
        .collect();
    let found = |seen: &str| {
        let text = generate::normalized(seen);
        let decoded = generate::normalized(&generate::decoded_words(seen).join(" "));
        let lower = seen.to_lowercase();
        forms
            .iter()
            .find(|(s, fs)| {
                lower.contains(&s.to_lowercase())
                    || fs.iter().any(|f| text.contains(f) || decoded.contains(f))
            })
            .map(|(s, _)| *s)
    };
    let (mut leaks, mut carried, mut served) = (Vec::new(), 0, 0);
    for q in &queries {
        let seen = seen_by(&agent, q).await;
        if let Some(s) = found(&seen) {
            leaks.push(format!("`{q}` leaked `{s}`:\n{seen}"));
        }
        assert!(!seen.contains("closed"), "`{q}` closed the agent's session: {seen}");
        served += usize::from(!seen.starts_with("ERROR"));
        carried += usize::from(found(&seen_by(&dba, q).await).is_some());
        // A single statement through the extended protocol too, with results in binary.
        if !q.contains(';') && !q.starts_with("COPY") {
            let seen = extended(&agent, q).await;
            if let Some(s) = found(&seen) {
                leaks.push(format!("extended `{q}` leaked `{s}`:\n{seen}"));
            }
        }
    }
    println!(
        "{} queries: {served} served to the agent, {carried} showed the exempt principal a raw value",
        queries.len()
    );
    assert!(
        leaks.is_empty(),
        "seed {seed}: {} of {} queries leaked:\n{}",
        leaks.len(),
        queries.len(),
        leaks.join("\n\n")
    );
    // Not vacuous: most shapes carry a raw value out when it is not masked, and the agent is
    // served (masked), not refused, for many of them.
    assert!(
        carried * 2 >= queries.len(),
        "only {carried} of {} queries showed the exempt principal a raw value",
        queries.len()
    );
    assert!(
        served * 3 >= queries.len(),
        "only {served} of {} queries were served to the agent",
        queries.len()
    );
}
