//! What the proxy records, and when, against a real PostgreSQL and a real NATS JetStream: a
//! write is recorded before the target sees it, unless it runs inside a transaction block that
//! a failure to record rolls back; an allowed read may go to the target first. Either way,
//! nothing the target answers reaches the client before its request is recorded. With NATS
//! stopped, the client gets an error and not one byte of the rows, and no write is committed.

mod common;

use std::time::Duration;

use common::Node;
use eventbus::{EventBus, NatsConfig};
use proto::events::{Envelope, Event};
use testkit::Nats;
use testkit::pgwire::{self, contains, query, read_to_close, read_until_ready, tags};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const KEY: &str = "ak_recording_tests_0123456789";
/// A value only the target holds: it must never reach a client whose session cannot record.
const SECRET: &str = "s3cret-7f1c9e";

/// The node, on the bus of a NATS server of its own.
struct Harness {
    node: Node,
    nats: Nats,
}

common::deref_to_node!(Harness);

/// The harness for tests that keep NATS up: an ack timeout no record takes on a loaded machine.
async fn start() -> Harness {
    start_with(Duration::from_secs(5)).await
}

/// The harness for tests that stop NATS: a strict session there waits out the ack timeout
/// before it fails, so it is shorter, yet ample while NATS is up.
async fn start_for_outages() -> Harness {
    start_with(Duration::from_secs(2)).await
}

/// The harness, with the bus's ack timeout (how long a strict session waits for a record).
async fn start_with(ack_timeout: Duration) -> Harness {
    testkit::init_crypto();
    let nats = Nats::start().unwrap();
    let cfg = NatsConfig { url: nats.url.clone(), ack_timeout, ..Default::default() };
    let bus = EventBus::connect_nats(&cfg).await.unwrap();
    let seed = format!(
        "CREATE TABLE vault (id int primary key, v text); \
         INSERT INTO vault VALUES (1, '{SECRET}'), (2, repeat('x', 100000) || '{SECRET}');"
    );
    let cfg = proxy_node::ProxyConfig { auth_timeout: Duration::from_secs(10), ..Default::default() };
    let node = Node::start(&seed, cfg, bus, |pg, pw| {
        let shop = common::connection("shop", "127.0.0.1", pg.port, "tls: disable", pw);
        let lax = common::connection("shop_lax", "127.0.0.1", pg.port, "tls: disable", pw);
        common::policy_yaml(
            &format!("{shop}    require_recording: true\n{lax}    require_recording: false\n"),
            "rules:\n  - { name: everything, match: { operations: [select, insert, transaction] }, action: allow }\n",
            &common::service_account("agent", "agents", KEY),
        )
    })
    .await;
    Harness { node, nats }
}

async fn raw_session(port: u16) -> TcpStream {
    raw_session_to(port, "shop").await
}

async fn raw_session_to(port: u16, database: &str) -> TcpStream {
    pgwire::connect(port, "agent", database, KEY).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_recorded_with_its_answer_in_order() {
    let h = start().await;
    let mut sub = h.bus.subscribe(proto::subjects::ALL_SESSION_EVENTS).await.unwrap();
    let mut s = raw_session(h.port).await;
    s.write_all(&query("SELECT v FROM vault WHERE id = 1")).await.unwrap();
    let got = read_until_ready(&mut s).await;
    assert!(contains(&got, SECRET), "the allowed read returns its row");
    let mut kinds = Vec::new();
    while !kinds.contains(&"response") {
        let env = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
        kinds.push(env.event.kind());
        if let Event::ResponseSent { rows, .. } = env.event {
            assert_eq!(rows, 1);
        }
    }
    assert_eq!(kinds, ["session_started", "request", "policy_decision", "response"]);
}

/// The stream positions of the request, decision and response events of each statement.
async fn positions(durable: &mut eventbus::Durable, statements: usize) -> Vec<[u64; 3]> {
    let mut by_seq: std::collections::BTreeMap<u64, [u64; 3]> = Default::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while by_seq.values().filter(|p| p.iter().all(|&x| x > 0)).count() < statements {
        assert!(std::time::Instant::now() < deadline, "events missing: {by_seq:?}");
        for d in durable.next_batch(100, Duration::from_millis(200)).await.unwrap() {
            d.ack().await.unwrap();
            let (seq, slot) = match d.envelope.event {
                Event::RequestReceived { seq, .. } => (seq, 0),
                Event::PolicyDecided { seq, .. } => (seq, 1),
                Event::ResponseSent { seq, .. } => (seq, 2),
                _ => continue,
            };
            by_seq.entry(seq).or_default()[slot] = d.stream_seq;
        }
    }
    by_seq.into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_recorded_in_one_message_with_its_answer_and_a_write_before_it_runs() {
    let h = start().await;
    let mut durable = h.bus.durable("positions", proto::subjects::ALL_SESSION_EVENTS).await.unwrap();
    let mut s = raw_session(h.port).await;
    for sql in ["SELECT v FROM vault WHERE id = 1", "INSERT INTO vault VALUES (4, 'w')"] {
        s.write_all(&query(sql)).await.unwrap();
        read_until_ready(&mut s).await;
    }
    let p = positions(&mut durable, 2).await;
    // The read: request, decision and response in one bus message.
    assert!(p[0][0] == p[0][1] && p[0][1] == p[0][2], "read recorded in pieces: {:?}", p[0]);
    // The write: request and decision acknowledged before it ran, so the response came later.
    assert!(p[1][0] == p[1][1] && p[1][2] > p[1][1], "write not recorded ahead: {:?}", p[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_recording_not_one_byte_of_a_read_reaches_the_client() {
    let mut h = start_for_outages().await;
    // A small answer (withheld whole) and one larger than what the proxy withholds (recorded
    // before it streams): neither may leak while NATS is down.
    for id in [1, 2] {
        let mut s = raw_session(h.port).await;
        h.nats.stop();
        s.write_all(&query(&format!("SELECT v FROM vault WHERE id = {id}"))).await.unwrap();
        let got = read_to_close(&mut s).await;
        let text = String::from_utf8_lossy(&got);
        assert!(!contains(&got, SECRET), "row {id} leaked without a record: {} bytes", got.len());
        assert!(!tags(&got).contains(&b'D'), "a DataRow reached the client: {text}");
        assert!(text.contains("cannot record"), "{text}");
        restart_nats(&mut h).await;
    }
}

/// Start NATS again and wait until the bus publishes (the proxy shares its connection).
async fn restart_nats(h: &mut Harness) {
    h.nats.start_again().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let probe = Envelope::new(uuid::Uuid::now_v7(), Event::SessionEnded { reason: "probe".into() });
    while h.bus.publish_batch(std::slice::from_ref(&probe)).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "NATS did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_recording_a_write_never_reaches_the_target() {
    let mut h = start_for_outages().await;
    let mut s = raw_session(h.port).await;
    h.nats.stop();
    s.write_all(&query("INSERT INTO vault VALUES (3, 'unrecorded')")).await.unwrap();
    let got = read_to_close(&mut s).await;
    assert!(String::from_utf8_lossy(&got).contains("cannot record"));
    assert_eq!(h.pg.psql("shop", "SELECT count(*) FROM vault WHERE id = 3").unwrap().trim(), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_a_block_a_write_is_recorded_with_its_answer_and_commit_before_it_runs() {
    let h = start().await;
    let mut durable = h.bus.durable("positions", proto::subjects::ALL_SESSION_EVENTS).await.unwrap();
    let mut s = raw_session(h.port).await;
    for sql in ["BEGIN", "INSERT INTO vault VALUES (7, 'in a block')", "COMMIT"] {
        s.write_all(&query(sql)).await.unwrap();
        read_until_ready(&mut s).await;
    }
    let p = positions(&mut durable, 3).await;
    for (what, p) in [("BEGIN", p[0]), ("the INSERT in the block", p[1])] {
        assert!(p[0] == p[1] && p[1] == p[2], "{what} recorded in pieces: {p:?}");
    }
    // COMMIT makes the block durable: recorded before it ran.
    assert!(p[2][0] == p[2][1] && p[2][2] > p[2][1], "COMMIT not recorded ahead: {:?}", p[2]);
    assert_eq!(h.pg.psql("shop", "SELECT v FROM vault WHERE id = 7").unwrap().trim(), "in a block");
}

/// Inside a block, a write may run before it is recorded: a failure to record must roll it
/// back, and a message that ends the block must not let a write after it commit unrecorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_recording_no_write_of_a_block_is_committed() {
    let mut h = start_for_outages().await;
    let attempts = [
        ("INSERT INTO vault VALUES (10, 'rolled back')", 10),
        ("COMMIT; INSERT INTO vault VALUES (11, 'after commit')", 11),
        ("ROLLBACK; INSERT INTO vault VALUES (12, 'after rollback')", 12),
        ("END; INSERT INTO vault VALUES (13, 'after end')", 13),
        ("SAVEPOINT a; ABORT; INSERT INTO vault VALUES (14, 'after abort')", 14),
    ];
    for (sql, id) in attempts {
        let mut s = raw_session(h.port).await;
        s.write_all(&query("BEGIN")).await.unwrap();
        read_until_ready(&mut s).await;
        h.nats.stop();
        s.write_all(&query(sql)).await.unwrap();
        let got = read_to_close(&mut s).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("cannot record"), "{sql}: {text}");
        assert!(!tags(&got).contains(&b'C'), "{sql}: the client saw a result: {text}");
        // The target's backend ends with the connection, and its block with it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // (The node's idle catalog connections stay: they belong to no session.)
        let open = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'shop' AND backend_type = 'client backend' \
             AND usename = 'airlock_svc' AND application_name <> '{}'",
            proxy_node::catalog::APPLICATION_NAME
        );
        while h.pg.psql("shop", &open).unwrap().trim() != "0" {
            assert!(std::time::Instant::now() < deadline, "{sql}: the target's session stayed open");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let q = format!("SELECT count(*) FROM vault WHERE id = {id}");
        assert_eq!(h.pg.psql("shop", &q).unwrap().trim(), "0", "{sql}: committed without a record");
        restart_nats(&mut h).await;
    }
}

/// A connection with `require_recording: false` does not wait for the bus: with NATS frozen
/// (a strict session would wait out the 30 s ack timeout), its statements are answered, and
/// their events are published once NATS goes on, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_require_recording_does_not_wait_for_the_bus() {
    let h = start_with(Duration::from_secs(30)).await;
    let mut durable = h.bus.durable("lax", proto::subjects::ALL_SESSION_EVENTS).await.unwrap();
    let mut s = raw_session_to(h.port, "shop_lax").await;
    h.nats.pause();
    for sql in ["SELECT v FROM vault WHERE id = 1", "INSERT INTO vault VALUES (20, 'best effort')"] {
        s.write_all(&query(sql)).await.unwrap();
        let got = read_until_ready(&mut s).await;
        assert!(tags(&got).contains(&b'C'), "{sql}: {}", String::from_utf8_lossy(&got));
    }
    h.nats.resume();
    let p = positions(&mut durable, 2).await;
    assert!(p[0][2] <= p[1][0], "the read's events come before the write's: {p:?}");
    assert_eq!(h.pg.psql("shop", "SELECT v FROM vault WHERE id = 20").unwrap().trim(), "best effort");
}

/// An event too large for the bus (NATS's 1 MiB `max_payload`) is its own statement's problem:
/// a statement whose record would not fit is refused, on a strict connection and on a
/// best-effort one alike (it would otherwise fail every session whose events share its batch,
/// or run unrecorded), and its record keeps a cut of it; a result larger than that is served
/// whole and recorded cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_for_the_bus_fails_only_its_own_statement() {
    let h = start().await;
    let mut durable = h.bus.durable("big", proto::subjects::ALL_SESSION_EVENTS).await.unwrap();
    let padding = "x".repeat(2 * 1024 * 1024);
    for (db, id) in [("shop", 40), ("shop_lax", 41)] {
        let mut s = raw_session_to(h.port, db).await;
        s.write_all(&query(&format!("INSERT INTO vault VALUES ({id}, 'big') /* {padding} */")))
            .await
            .unwrap();
        let got = read_until_ready(&mut s).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("too large to record"), "{db}: {}", &text[..text.len().min(300)]);
        s.write_all(&query("SELECT v FROM vault WHERE id = 1")).await.unwrap();
        let got = read_until_ready(&mut s).await;
        assert!(contains(&got, SECRET), "{db}: the session did not go on");
        let q = format!("SELECT count(*) FROM vault WHERE id = {id}");
        assert_eq!(h.pg.psql("shop", &q).unwrap().trim(), "0", "{db}: the statement ran");
    }
    let mut s = raw_session(h.port).await;
    s.write_all(&query("SELECT repeat('y', 3000000) AS big")).await.unwrap();
    let got = read_until_ready(&mut s).await;
    assert!(got.iter().filter(|&&b| b == b'y').count() >= 3_000_000, "the result was not served whole");
    // An error that quotes a 3 MB value, and rows of 1,600 NULLs: answered, and recorded cut.
    s.write_all(&query("SELECT repeat('z', 3000000)::int")).await.unwrap();
    let got = read_until_ready(&mut s).await;
    assert!(String::from_utf8_lossy(&got).contains("22P02"), "no error came back");
    let nulls = vec!["NULL"; 1600].join(", ");
    s.write_all(&query(&format!("SELECT {nulls} FROM generate_series(1, 1000)"))).await.unwrap();
    let got = read_until_ready(&mut s).await;
    assert!(String::from_utf8_lossy(&got).contains("SELECT 1000"), "the rows did not come back");
    // The records: both refusals with a cut statement, the big result cut and marked so.
    let (mut cut_requests, mut cut_result) = (0, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cut_requests < 2 || !cut_result {
        assert!(
            std::time::Instant::now() < deadline,
            "records missing: {cut_requests} cut requests, cut result {cut_result}"
        );
        for d in durable.next_batch(100, Duration::from_millis(200)).await.unwrap() {
            d.ack().await.unwrap();
            match d.envelope.event {
                Event::RequestReceived { statement, .. } if statement.contains("cut for the record") => {
                    assert!(
                        statement.len() < 10_000
                            && statement.contains(&format!("{} bytes in all", padding.len() + 43))
                    );
                    cut_requests += 1;
                }
                Event::ResponseSent { result: Some(r), .. } if r.truncated => {
                    if let Some(cell) = r.rows[0][0].as_deref().filter(|c| c.starts_with("yyyy")) {
                        assert!(cell.len() < 20_000, "{}", cell.len());
                        cut_result = true;
                    }
                }
                _ => {}
            }
        }
    }
}
