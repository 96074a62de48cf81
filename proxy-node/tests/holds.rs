//! What a held statement is bound to, and what runs once it is approved: an agent that gets one
//! statement approved must not get anything else run, nor the approved one run differently from
//! what approvers were shown. The proxy runs in-process against a real PostgreSQL on the
//! in-memory event bus; holds are decided by publishing decisions as the approval service would.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Holds, Node, ORDERS_AND_PAYMENTS, sqlstate};
use eventbus::EventBus;
use proto::events::{Envelope, Event, GrantDecision, HoldDecision, HoldOutcome, HoldRequest, Timestamp};
use testkit::pgwire::{
    self, bind, close, contains, execute, parse, query, read_answers, read_until_ready, sync,
};
use tokio::io::AsyncWriteExt;
use tokio_postgres::NoTls;
use uuid::Uuid;

const KEY: &str = "ak_holds_tests_0123456789abcdef";

/// The ids in `orders`, in order.
const IDS: &str = "SELECT string_agg(id::text, ',' ORDER BY id) FROM orders";

/// The node, and the hold requests it publishes.
struct Harness {
    node: Node,
    holds: Holds,
}

common::deref_to_node!(Harness);

fn policy(pg_port: u16, pw_file: &str, rules: &str) -> String {
    common::agent_policy("127.0.0.1", pg_port, pw_file, rules, KEY)
}

async fn start(rules: &str) -> Harness {
    common::init_tracing("proxy_node=debug");
    let cfg = proxy_node::ProxyConfig {
        hold_grace: Duration::from_secs(1),
        auth_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let node =
        Node::start(ORDERS_AND_PAYMENTS, cfg, EventBus::memory(), |pg, pw| policy(pg.port, pw, rules)).await;
    let holds = Holds::subscribe(&node.bus).await;
    Harness { node, holds }
}

impl Harness {
    async fn connect(&self) -> tokio_postgres::Client {
        self.connect_as("agent", KEY).await
    }

    async fn raw(&self) -> tokio::net::TcpStream {
        self.raw_as("agent", KEY).await
    }

    fn ids(&self) -> String {
        self.sql(IDS)
    }

    /// Wait up to 10 s for the ids in `orders` to be `want`.
    async fn wait_ids(&self, want: &str, what: &str) {
        common::wait_for_target(&self.pg, IDS, want, Duration::from_secs(10), what).await;
    }

    /// Replace the proxy's policy with `rules`, as version `version`.
    fn apply(&self, version: u64, rules: &str) {
        self.apply_yaml(version, &policy(self.pg.port, &self.pw_file, rules));
    }
}

fn flush() -> Vec<u8> {
    pgwire::message(b'H', &[])
}

/// A Bind of `stmt` to `portal` whose parameters are each `(bytes, binary format)`.
fn bind_formats(portal: &str, stmt: &str, params: &[(&[u8], bool)]) -> Vec<u8> {
    let mut b = [portal.as_bytes(), b"\0", stmt.as_bytes(), b"\0"].concat();
    b.extend_from_slice(&u16::try_from(params.len()).unwrap().to_be_bytes());
    for (_, binary) in params {
        b.extend_from_slice(&u16::from(*binary).to_be_bytes());
    }
    b.extend_from_slice(&u16::try_from(params.len()).unwrap().to_be_bytes());
    for (v, _) in params {
        b.extend_from_slice(&i32::try_from(v.len()).unwrap().to_be_bytes());
        b.extend_from_slice(v);
    }
    b.extend_from_slice(&[0, 0]);
    pgwire::message(b'B', &b)
}

const RULES: &str = r#"  - name: order-deletes-held
    match: { operations: [delete], tables: [orders] }
    action: hold
    timeout: 30s
"#;

/// Regression test (existing defence): while an Execute waits for approval, the client replaces
/// its statement and portal under the same names, executes again, flushes, syncs and sends a
/// simple query. The approval runs the statement and parameters approvers saw, once; everything
/// sent meanwhile is judged on its own after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_client_sends_while_its_execute_is_held_runs_after_it_and_is_judged_on_its_own() {
    let mut h = start(RULES).await;
    let mut raw = h.raw().await;
    let first = [parse("s", "DELETE FROM orders WHERE id = $1"), bind("p", "s", &["1"]), execute("p")];
    raw.write_all(&first.concat()).await.unwrap();
    let (session, held) = h.holds.next().await;
    assert_eq!(held.statement, "DELETE FROM orders WHERE id = $1");
    assert_eq!(held.parameters, vec![Some("1".to_string())]);
    let meanwhile = [
        sync(),
        close(b'P', "p"),
        close(b'S', "s"),
        parse("s", "DELETE FROM orders"),
        bind("p", "s", &[]),
        execute("p"),
        execute("p"),
        flush(),
        sync(),
        query("DELETE FROM orders WHERE id = 3"),
    ];
    raw.write_all(&meanwhile.concat()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.ids(), "1,2,3", "nothing runs before the decision");
    h.holds.answer(session, &held, HoldOutcome::Approved).await;
    // The replaced statement is held on its own (the approval does not carry over).
    let (s2, second) = h.holds.next().await;
    assert_eq!((second.statement.as_str(), second.parameters.len()), ("DELETE FROM orders", 0));
    assert_ne!(second.hold_id, held.hold_id);
    h.wait_ids("2,3", "the approved statement ran, with its own parameter").await;
    // A replay of the first approval does not release the second.
    h.holds.answer(session, &held, HoldOutcome::Approved).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.ids(), "2,3");
    h.holds.answer(s2, &second, HoldOutcome::Denied).await;
    // The second Execute is skipped with the failed pipeline; the simple query is held.
    let (s3, third) = h.holds.next().await;
    assert_eq!(third.statement, "DELETE FROM orders WHERE id = 3");
    h.holds.answer(s3, &third, HoldOutcome::Denied).await;
    let seen = read_answers(&mut raw, 3).await;
    assert!(seen.contains("DELETE 1") && seen.contains("42501"), "{seen}");
    assert_eq!(seen.matches("DELETE 1").count(), 1, "{seen}");
    h.holds.none_within(Duration::from_millis(200)).await;
    assert_eq!(h.ids(), "2,3");
}

/// Regression test (existing defence): a decision is for one hold. Replayed for a later hold of
/// the same statement and parameters, for a hold nobody has, or published for a hold of
/// another session with the same text, it releases nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_releases_its_own_hold_only_once() {
    let mut h = start(RULES).await;
    let a = Arc::new(h.connect().await);
    let b = Arc::new(h.connect().await);
    let del = |c: &Arc<tokio_postgres::Client>| {
        let c = c.clone();
        tokio::spawn(async move { c.execute("DELETE FROM orders WHERE id = $1", &[&1i32]).await })
    };
    let first = del(&a);
    let (sa, ha) = h.holds.next().await;
    h.holds.answer(sa, &ha, HoldOutcome::Approved).await;
    assert_eq!(first.await.unwrap().unwrap(), 1);
    h.sql("INSERT INTO orders VALUES (1, 'apple')");
    // The same statement with the same parameters, again on a and on b.
    let again = del(&a);
    let (sa2, ha2) = h.holds.next().await;
    let other = del(&b);
    let (sb, hb) = h.holds.next().await;
    assert_ne!(sa, sb);
    assert_eq!(
        (ha2.fingerprint.as_str(), hb.fingerprint.as_str()),
        (ha.fingerprint.as_str(), ha.fingerprint.as_str())
    );
    h.holds.answer(sa, &ha, HoldOutcome::Approved).await;
    h.holds.answer(sb, &ha, HoldOutcome::Approved).await;
    let stray = HoldDecision {
        hold_id: Uuid::now_v7(),
        outcome: HoldOutcome::Approved,
        decided_by: "x".into(),
        reason: None,
    };
    h.bus.publish(&Envelope::new(sa2, Event::HoldDecided(stray))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!again.is_finished() && !other.is_finished());
    assert_eq!(h.ids(), "1,2,3");
    // b's approval runs b's statement only.
    h.holds.answer(sb, &hb, HoldOutcome::Approved).await;
    assert_eq!(other.await.unwrap().unwrap(), 1);
    assert!(!again.is_finished());
    h.sql("INSERT INTO orders VALUES (1, 'apple')");
    h.holds.answer(sa2, &ha2, HoldOutcome::Denied).await;
    assert_eq!(sqlstate(&again.await.unwrap().unwrap_err()), "42501");
    assert_eq!(h.ids(), "1,2,3");
}

/// Regression test (existing defence): the end of a transaction block queued behind a held
/// statement runs after it: a ROLLBACK undoes an approved statement, and a COMMIT after a denied
/// one commits nothing of the block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_ended_while_its_statement_is_held_ends_after_the_decision() {
    let mut h = start(RULES).await;
    for (outcome, end) in [(HoldOutcome::Approved, "ROLLBACK"), (HoldOutcome::Denied, "COMMIT")] {
        let mut raw = h.raw().await;
        let msgs = [
            query("BEGIN"),
            query("INSERT INTO orders VALUES (10, 'fig')"),
            query("DELETE FROM orders WHERE id = 1"),
            query(end),
        ];
        raw.write_all(&msgs.concat()).await.unwrap();
        let (s, held) = h.holds.next().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        h.holds.answer(s, &held, outcome).await;
        let seen = read_answers(&mut raw, 4).await;
        assert!(seen.contains("ROLLBACK"), "{end}: {seen}");
        assert_eq!(h.ids(), "1,2,3", "{end}");
    }
}

/// A client that leaves while its statement is held gets the hold denied (and recorded as such),
/// whether it closes its connection or resets it (here: a reset, which the proxy took for an
/// i/o error and left the hold pending for approvers); an approval that comes later runs
/// nothing, and a new session is a new hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_after_the_client_left_runs_nothing() {
    let mut h = start(RULES).await;
    let mut decided = h.bus.subscribe(proto::subjects::HOLD_DECIDED).await.unwrap();
    let mut raw = h.raw().await;
    raw.write_all(&query("DELETE FROM orders WHERE id = 1")).await.unwrap();
    let (s, held) = h.holds.next().await;
    raw.set_zero_linger().unwrap();
    drop(raw);
    let d = decision_of(&mut decided, held.hold_id).await.expect("the proxy denies the abandoned hold");
    assert_eq!(d.outcome, HoldOutcome::Denied);
    h.holds.answer(s, &held, HoldOutcome::Approved).await;
    let mut raw = h.raw().await;
    raw.write_all(&query("DELETE FROM orders WHERE id = 1")).await.unwrap();
    let (s2, again) = h.holds.next().await;
    assert_ne!((s2, again.hold_id), (s, held.hold_id));
    // The old session's approval again, now on the new session.
    h.holds.answer(s2, &held, HoldOutcome::Approved).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.ids(), "1,2,3");
    h.holds.answer(s2, &again, HoldOutcome::Denied).await;
    assert!(contains(&read_until_ready(&mut raw).await, "42501"));
    assert_eq!(h.ids(), "1,2,3");
}

/// The decision of hold `hold_id` among the `HOLD_DECIDED` events of `decided`, within 10 s.
async fn decision_of(decided: &mut eventbus::Subscription, hold_id: Uuid) -> Option<HoldDecision> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(Envelope { event: Event::HoldDecided(d), .. }) = decided.next().await
                && d.hold_id == hold_id
            {
                return d;
            }
        }
    })
    .await
    .ok()
}

/// A CancelRequest while a statement is held cancels it (57014, as the target answers a cancelled
/// statement) and denies its hold: the target is idle meanwhile, so forwarding the cancel alone
/// would leave the hold open and an approval would run what the client cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_held_statement_is_denied_and_never_runs() {
    let mut h = start(RULES).await;
    let mut decided = h.bus.subscribe(proto::subjects::HOLD_DECIDED).await.unwrap();
    let c = Arc::new(h.connect().await);
    let c2 = c.clone();
    let del = tokio::spawn(async move { c2.execute("DELETE FROM orders WHERE id = $1", &[&1i32]).await });
    let (s, held) = h.holds.next().await;
    c.cancel_token().cancel_query(NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), del).await.expect("answered").unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "57014", "{e:?}");
    let d = decision_of(&mut decided, held.hold_id).await.expect("the proxy denies the cancelled hold");
    assert_eq!(d.outcome, HoldOutcome::Denied);
    // An approval that comes anyway runs nothing, and the session goes on.
    h.holds.answer(s, &held, HoldOutcome::Approved).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.ids(), "1,2,3");
    assert_eq!(c.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0), 3);
}

/// A statement approved after a new policy version came to deny it does not run: deny wins over
/// an approval given under the older rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_does_not_run_what_the_policy_now_denies() {
    let mut h = start(RULES).await;
    let c = Arc::new(h.connect().await);
    let c2 = c.clone();
    let del = tokio::spawn(async move { c2.execute("DELETE FROM orders WHERE id = $1", &[&1i32]).await });
    let (s, held) = h.holds.next().await;
    h.apply(2, "  - name: order-deletes-denied\n    match: { operations: [delete], tables: [orders] }\n    action: deny\n");
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.holds.answer(s, &held, HoldOutcome::Approved).await;
    let e = del.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    assert!(e.as_db_error().unwrap().message().contains("order-deletes-denied"), "{e:?}");
    assert_eq!(h.ids(), "1,2,3");
    // The session goes on.
    assert_eq!(c.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get::<_, i64>(0), 3);
}

/// A statement approved after the policy took away the session's standing (its key revoked)
/// does not run: the session ends, as it would at its next statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_does_not_run_a_statement_of_a_revoked_session() {
    let mut h = start(RULES).await;
    let mut raw = h.raw().await;
    raw.write_all(&query("DELETE FROM orders WHERE id = 1")).await.unwrap();
    let (s, held) = h.holds.next().await;
    let revoked = policy(h.pg.port, &h.pw_file, RULES).replace("name: agent,", "name: agent-2,");
    h.apply_yaml(2, &revoked);
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.holds.answer(s, &held, HoldOutcome::Approved).await;
    let seen = pgwire::read_to_close(&mut raw).await;
    assert!(contains(&seen, "57P03"), "{}", String::from_utf8_lossy(&seen));
    assert_eq!(h.ids(), "1,2,3");
}

/// Send `msgs`, and answer a hold they cause as a careless approver would (approving what it
/// shows); what the client got up to its next ReadyForQuery, and the hold if there was one.
async fn approve_blindly(
    h: &mut Harness,
    raw: &mut tokio::net::TcpStream,
    msgs: &[Vec<u8>],
    answers: usize,
) -> (String, Option<HoldRequest>) {
    raw.write_all(&msgs.concat()).await.unwrap();
    let mut got = None;
    let seen = tokio::select! {
        seen = read_answers(raw, answers) => seen,
        (s, req) = h.holds.recv() => {
            h.holds.answer(s, &req, HoldOutcome::Approved).await;
            got = Some(req);
            read_answers(raw, answers).await
        }
    };
    (seen, got)
}

/// A statement whose text the gateway does not know (a protocol Bind of a statement made by SQL
/// `PREPARE`, a portal whose Bind is not yet confirmed past a Sync) cannot be shown to
/// approvers: it is refused, never held with an empty statement for them to approve blind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_approvers_cannot_be_shown_is_refused_not_held() {
    let rules = format!("{RULES}defaults: {{ unknown_operation: hold }}\n");
    let mut h = start(&rules).await;
    let mut raw = h.raw().await;
    raw.write_all(&query("PREPARE d(int) AS DELETE FROM orders WHERE id = $1")).await.unwrap();
    let (s, held) = h.holds.next().await;
    h.holds.answer(s, &held, HoldOutcome::Approved).await;
    read_until_ready(&mut raw).await;
    let (seen, hold) =
        approve_blindly(&mut h, &mut raw, &[bind("p", "d", &["2"]), execute("p"), sync()], 1).await;
    assert!(hold.is_none(), "held with statement {:?}", hold.map(|h| h.statement));
    assert!(seen.contains("42501"), "{seen}");
    assert_eq!(h.ids(), "1,2,3");
    // In a block a portal outlives a Sync: an Execute pipelined behind the Sync cannot be sure
    // the Bind before it made the portal.
    raw.write_all(&query("BEGIN")).await.unwrap();
    read_until_ready(&mut raw).await;
    let msgs = [
        parse("s", "DELETE FROM orders WHERE id = $1"),
        bind("q", "s", &["3"]),
        sync(),
        execute("q"),
        sync(),
    ];
    let (seen, hold) = approve_blindly(&mut h, &mut raw, &msgs, 2).await;
    assert!(hold.is_none(), "held with statement {:?}", hold.map(|h| h.statement));
    assert!(seen.contains("42501"), "{seen}");
    raw.write_all(&query("COMMIT")).await.unwrap();
    read_until_ready(&mut raw).await;
    assert_eq!(h.ids(), "1,2,3");
}

/// A held `EXECUTE name` shows approvers what `name` runs: the text that prepared it, through
/// the protocol or with SQL `PREPARE`. Approving `EXECUTE w` alone would approve whatever `w`
/// had been made to be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvers_see_what_an_execute_of_a_prepared_statement_runs() {
    let mut h = start(RULES).await;
    let mut raw = h.raw().await;
    raw.write_all(&[parse("w", "DELETE FROM orders WHERE id > 0"), sync()].concat()).await.unwrap();
    read_until_ready(&mut raw).await;
    raw.write_all(&query("EXECUTE w")).await.unwrap();
    let (s, held) = h.holds.next().await;
    assert_eq!(held.statement, "EXECUTE w");
    assert!(held.reason.contains("DELETE FROM orders WHERE id > 0"), "{}", held.reason);
    h.holds.answer(s, &held, HoldOutcome::Denied).await;
    read_until_ready(&mut raw).await;
    // Prepared with SQL PREPARE (approved), then executed through the protocol.
    raw.write_all(&query("PREPARE d(int) AS DELETE FROM orders WHERE id = $1")).await.unwrap();
    let (s, held) = h.holds.next().await;
    h.holds.answer(s, &held, HoldOutcome::Approved).await;
    read_until_ready(&mut raw).await;
    raw.write_all(&[parse("", "EXECUTE d(2)"), bind("", "", &[]), execute(""), sync()].concat())
        .await
        .unwrap();
    let (s, held) = h.holds.next().await;
    assert_eq!(held.statement, "EXECUTE d(2)");
    assert!(held.reason.contains("PREPARE d(int) AS DELETE FROM orders WHERE id = $1"), "{}", held.reason);
    h.holds.answer(s, &held, HoldOutcome::Approved).await;
    assert!(read_until_ready(&mut raw).await.windows(8).any(|w| w == b"DELETE 1"));
    // Prepared in the same message: the statement shows it already.
    raw.write_all(&query("PREPARE e AS DELETE FROM orders WHERE id = 3; EXECUTE e")).await.unwrap();
    let (s, held) = h.holds.next().await;
    assert!(!held.reason.contains("EXECUTE e runs"), "{}", held.reason);
    h.holds.answer(s, &held, HoldOutcome::Denied).await;
    read_until_ready(&mut raw).await;
    assert_eq!(h.ids(), "1,3");
}

/// A held statement of a session that may have changed `search_path` (or its role) tells
/// approvers that its unqualified names may not mean what they usually do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvers_are_told_when_unqualified_names_may_resolve_elsewhere() {
    let mut h = start(RULES).await;
    let c = Arc::new(h.connect().await);
    let c2 = c.clone();
    let del = tokio::spawn(async move { c2.simple_query("DELETE FROM orders WHERE id = 1").await });
    let (s, held) = h.holds.next().await;
    assert!(!held.reason.contains("search_path"), "{}", held.reason);
    h.holds.answer(s, &held, HoldOutcome::Denied).await;
    assert!(del.await.unwrap().is_err());
    c.simple_query("SET search_path TO public").await.unwrap();
    let c2 = c.clone();
    let del = tokio::spawn(async move { c2.simple_query("DELETE FROM orders WHERE id = 1").await });
    let (s, held) = h.holds.next().await;
    assert!(held.reason.contains("search_path"), "{}", held.reason);
    h.holds.answer(s, &held, HoldOutcome::Denied).await;
    assert!(del.await.unwrap().is_err());
}

const GRANT_RULES: &str = r#"  - name: order-deletes
    match: { operations: [delete], tables: [orders] }
    action: hold
    timeout: 30s
    grant: { max: 8h }
  - name: payment-deletes
    match: { operations: [delete], tables: [payments] }
    action: hold
    timeout: 30s
    grant: { max: 8h }
"#;

/// A grant lets through statements under its rule only: not those another rule holds (alone or
/// in the same statement), for this principal and connection; and only as long as the policy in
/// force lets it: a version that shortens the rule's `grant.max` ends a grant already older,
/// one that takes `grant` away ends them all. The first part is a regression test of an
/// existing defence; the shortened `grant.max` is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_covers_only_its_rule_and_only_as_long_as_the_policy_now_allows() {
    let mut h = start(GRANT_RULES).await;
    let c = h.connect().await;
    let orders = "DELETE FROM orders WHERE false";
    let payments = "DELETE FROM payments WHERE false";
    let grant = |principal: &str, connection: &str, minutes_ago: i64| GrantDecision {
        grant_id: Uuid::now_v7(),
        hold_id: Uuid::now_v7(),
        principal: principal.into(),
        connection: connection.into(),
        rule: "order-deletes".into(),
        granted_by: "dana".into(),
        from: Timestamp(Timestamp::now().0 - minutes_ago * 60_000_000),
        until: Timestamp::now().plus(Duration::from_secs(3600)),
    };
    for g in [grant("someone-else", "shop", 10), grant("agent", "crm", 10), grant("agent", "shop", 10)] {
        h.bus.publish(&Envelope::new(Uuid::now_v7(), Event::GrantDecided(g))).await.unwrap();
    }
    h.holds.wait_until_held(&c, orders, false).await;
    h.holds.wait_until_held(&c, payments, true).await;
    // Both tables in one statement: the payments rule still holds it.
    let both = "WITH p AS (DELETE FROM payments WHERE false RETURNING id) DELETE FROM orders WHERE id IN (SELECT id FROM p)";
    h.holds.wait_until_held(&c, both, true).await;
    // The rule's longest grant shortened below the grant's age: over.
    h.apply(2, &GRANT_RULES.replacen("max: 8h", "max: 5m", 1));
    h.holds.wait_until_held(&c, orders, true).await;
    h.apply(3, GRANT_RULES);
    h.holds.wait_until_held(&c, orders, false).await;
    // The rule no longer grants access: over.
    h.apply(4, &GRANT_RULES.replacen("    grant: { max: 8h }\n", "", 1));
    h.holds.wait_until_held(&c, orders, true).await;
}

/// Parameters that differ in bytes or format never look the same to approvers: the text `\x41`
/// (four characters, stored as such in a text column) is not shown as the byte `A` sent in
/// binary format, which is shown `\x41`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_binary_parameters_never_look_the_same_to_approvers() {
    let mut h = start(RULES).await;
    let mut raw = h.raw().await;
    let mut shown = Vec::new();
    for (value, binary) in
        [(&b"A"[..], true), (&b"\\x41"[..], false), (&b"\\\\x41"[..], false), (&b"A"[..], false)]
    {
        let msgs = [
            parse("", "DELETE FROM orders WHERE item = $1::text"),
            bind_formats("", "", &[(value, binary)]),
            execute(""),
            sync(),
        ];
        raw.write_all(&msgs.concat()).await.unwrap();
        let (s, held) = h.holds.next().await;
        h.holds.answer(s, &held, HoldOutcome::Denied).await;
        read_until_ready(&mut raw).await;
        shown.push((held.parameters[0].clone().unwrap(), held.fingerprint));
    }
    let values: Vec<&str> = shown.iter().map(|(v, _)| v.as_str()).collect();
    assert_eq!(values, ["\\x41", "\\\\x41", "\\\\\\x41", "A"]);
    for (i, a) in shown.iter().enumerate() {
        for b in &shown[i + 1..] {
            assert_ne!(a.1, b.1, "one fingerprint for {} and {}", a.0, b.0);
        }
    }
}

/// Regression test (existing defence): a `SET search_path` or `SET ROLE` pipelined behind a
/// held statement runs after it, so the approved text runs with the meaning it had when it was
/// held, not the one the queued setting would give it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_queued_behind_a_held_statement_does_not_change_what_it_runs() {
    let mut h = start(RULES).await;
    h.sql(
        "SET ROLE airlock_svc; CREATE SCHEMA evil; CREATE TABLE evil.orders (id int primary key, item text); \
         INSERT INTO evil.orders VALUES (1, 'decoy');",
    );
    let mut raw = h.raw().await;
    let msgs = [
        query("DELETE FROM orders WHERE id = 1"),
        query("SET search_path TO evil"),
        query("SET ROLE NONE"),
        query("DELETE FROM orders WHERE id = 1"),
    ];
    raw.write_all(&msgs.concat()).await.unwrap();
    let (s, held) = h.holds.next().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.holds.answer(s, &held, HoldOutcome::Approved).await;
    let (s, second) = h.holds.next().await;
    assert!(second.reason.contains("search_path"), "{}", second.reason);
    h.wait_ids("2,3", "the approved DELETE ran on public.orders").await;
    assert_eq!(h.sql("SELECT count(*) FROM evil.orders"), "1");
    h.holds.answer(s, &second, HoldOutcome::Denied).await;
    let seen = read_answers(&mut raw, 4).await;
    assert!(seen.contains("DELETE 1") && seen.contains("42501"), "{seen}");
    assert_eq!(h.sql("SELECT count(*) FROM evil.orders"), "1");
}
