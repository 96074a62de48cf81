//! The message loop of an authenticated session: both query protocols, pipelined.
//!
//! Client messages are decided one by one, in order, as they arrive; the ones allowed are queued
//! to the target, and each one that produces a response pushes an [`Expect`] entry. Target
//! responses are matched against the head of that queue, so the proxy always knows which
//! statement a row, a completion or an error belongs to, and can answer a message itself (a
//! refusal) exactly where the target's answer would have been.
//!
//! A refusal is made real on the target too: the proxy sends an `Execute` of a portal that cannot
//! exist, so the target fails the pipeline (and a transaction block) exactly as PostgreSQL would
//! have for the refused statement, and swallows that error.
//!
//! Prepared statements and portals are tracked by name and committed only when the target
//! confirms them (ParseComplete, BindComplete, a `PREPARE` command tag), so the proxy's idea of
//! what a name runs can never differ from the target's.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use proto::events::{Decision, Event, HoldDecision, HoldOutcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info};
use uuid::Uuid;

use super::{Client, Response, Session, SessionError};
use crate::mask::{self, Field, Rules};
use crate::policy::{Classification, SessionEffect, Verdict};
use crate::tls::{ReadHalf, WriteHalf};
use crate::upstream::Upstream;
use crate::wire::postgres::messages::{self as msg, sqlstate};
use crate::wire::postgres::{Frame, decode_frame};
use masking::lineage::{ColumnRef, Lineage, Output};
use masking::strategy::Masker;

mod masked;

/// Buffers past this size stop reading from the side that fills them (backpressure).
const HIGH_WATER: usize = 256 * 1024;
/// A held statement's record may take at most this share of a bus event (see
/// [`Relay::decide`]).
const HOLD_SHARE: usize = 8;
/// The most response bytes withheld from the client while an allowed read's request is not yet
/// recorded; past this, the request is recorded first and the rest streams.
const DEFER_LIMIT: usize = 64 * 1024;
/// Names the proxy reserves for itself; clients may not use them.
const RESERVED_PREFIX: &str = "__airlock";

/// A statement the target has (or will have, once confirmed) under a name.
#[derive(Debug, Clone)]
struct Prepared {
    sql: Arc<str>,
    /// The text that made it, as approvers are shown it when a held statement runs it by name
    /// (`EXECUTE name`): the Parse's statement, or the message with the `PREPARE`. Empty when
    /// not known.
    made_by: Arc<str>,
    classification: Arc<Classification>,
    /// Its text runs SQL `EXECUTE name`: resolved again at each Execute, since the name may
    /// stand for another statement by then.
    runs_execute: bool,
}

/// A portal: a prepared statement bound to parameters.
#[derive(Debug, Clone)]
struct Portal {
    stmt: Option<Prepared>,
    params: Arc<[Option<String>]>,
}

/// What [`Relay::pending`] found.
enum Pending<'a> {
    Sure(&'a Expect),
    Uncertain,
    None,
}

/// What the target's next response belongs to.
enum Expect {
    Parse {
        name: String,
        stmt: Prepared,
    },
    Bind {
        portal: String,
        entry: Portal,
    },
    Close {
        kind: u8,
        name: String,
    },
    /// A client's Describe, with the text of what the name meant when the Describe was sent
    /// (a later Bind or Parse of the same name, pipelined behind it, does not change what the
    /// target describes).
    DescribeStatement {
        sql: Option<Arc<str>>,
    },
    DescribePortal {
        name: String,
        sql: Option<Arc<str>>,
    },
    /// The proxy's own Describe of a portal before an Execute, to learn how to mask its rows:
    /// not shown to the client.
    HiddenDescribe,
    Execute(Box<Response>),
    /// A simple-protocol query, with what each statement does to prepared statements.
    Query(Box<Response>, VecDeque<SessionEffect>),
    Sync,
    /// Frames the proxy answers itself, emitted when they reach the head.
    Local(Vec<Frame>),
    /// The target's error for the proxy's own poison Execute: not shown to the client.
    SwallowError,
}

impl Expect {
    fn name(&self) -> &'static str {
        match self {
            Expect::Parse { .. } => "Parse",
            Expect::Bind { .. } => "Bind",
            Expect::Close { .. } => "Close",
            Expect::DescribeStatement { .. } => "Describe statement",
            Expect::DescribePortal { .. } => "Describe portal",
            Expect::HiddenDescribe => "Describe",
            Expect::Execute(_) => "Execute",
            Expect::Query(..) => "Query",
            Expect::Sync => "Sync",
            Expect::Local(_) => "local answer",
            Expect::SwallowError => "refusal",
        }
    }

    /// Does an error from the target make it skip to the next Sync (the extended protocol)?
    fn extended(&self) -> bool {
        !matches!(self, Expect::Query(..) | Expect::Sync | Expect::Local(_))
    }
}

/// What the proxy does once a held message is decided.
enum AfterHold {
    Query { frame: Frame, sql: Arc<str>, effects: Vec<SessionEffect>, seq: u64 },
    Execute { frame: Frame, portal: String, sql: Option<Arc<str>>, seq: u64 },
}

struct Held {
    hold_id: Uuid,
    rule: String,
    rx: tokio::sync::oneshot::Receiver<HoldDecision>,
    deadline: tokio::time::Instant,
    then: AfterHold,
    extended: bool,
    /// What was held, and the policy it was held under: an approval that arrives under a newer
    /// policy is checked against that one too (see [`Relay::denied_since`]).
    sql: Arc<str>,
    params: Arc<[Option<String>]>,
    classification: Arc<Classification>,
    policy: Option<Arc<policy_store::client::ActivePolicy>>,
    /// The session's CancelRequests counted when it was held: one more cancels it.
    cancels_seen: u64,
}

/// A statement to hold: its text, parameters and classification.
struct ToHold<'a> {
    sql: &'a Arc<str>,
    params: &'a Arc<[Option<String>]>,
    classification: &'a Arc<Classification>,
}

/// What approvers of a hold are shown besides the statement and its parameters.
#[derive(Default)]
struct HoldContext {
    /// The prepared statements the held statement runs by name (`EXECUTE name`), with the text
    /// that made each: approving `EXECUTE p` blind to what `p` is approves nothing in particular.
    runs: Vec<(String, Arc<str>)>,
}

/// The most bytes of prepared statements' text a hold shows besides its own statement; a
/// statement that runs more is refused rather than held (approvers could not read it whole).
const HOLD_CONTEXT_BYTES: usize = 16 * 1024;

/// The reason of the proxy's own denial of a hold whose client cancelled it.
const CANCELLED_BY_CLIENT: &str = "cancelled by the client";

enum HeldEvent {
    Decided(HoldDecision),
    TimedOut,
    /// The client sent a CancelRequest for the session.
    Cancelled,
}

async fn wait_held(h: &mut Option<Held>, cancelled: &crate::cancel::CancelSignal) -> HeldEvent {
    match h {
        Some(h) => tokio::select! {
            d = &mut h.rx => match d {
                Ok(d) => HeldEvent::Decided(d),
                Err(_) => HeldEvent::TimedOut,
            },
            _ = tokio::time::sleep_until(h.deadline) => HeldEvent::TimedOut,
            () = cancelled.past(h.cancels_seen) => HeldEvent::Cancelled,
        },
        None => std::future::pending().await,
    }
}

struct Relay<'s> {
    s: &'s mut Session,
    cr: ReadHalf<'s>,
    cw: WriteHalf<'s>,
    cin: BytesMut,
    cout: BytesMut,
    ur: ReadHalf<'s>,
    uw: WriteHalf<'s>,
    uin: BytesMut,
    uout: BytesMut,
    max: usize,
    cap_rows: usize,
    expect: VecDeque<Expect>,
    /// A refusal in the extended protocol: drop client messages until Sync, like the server.
    skip_until_sync: bool,
    /// The target is in COPY FROM STDIN: client CopyData goes straight through.
    copy_in: bool,
    /// The request number of a `COPY … FROM STDIN` that went to the target, which has not yet
    /// said whether it takes the data (CopyInResponse) or not (an error). Until it does, the
    /// client's next messages are left unread: a client may send its CopyData right behind
    /// the statement, and whether the target reads them as data or ignores them is only known
    /// then.
    copy_pending: Option<u64>,
    statements: crate::Map<String, Prepared>,
    portals: crate::Map<String, Portal>,
    /// What [`Relay::lookup_portal`] gives for a name it cannot be sure of.
    uncertain_portal: Portal,
    /// Cursors the session declared (and was allowed to): the only portals an Execute may name
    /// that no Bind made.
    cursors: std::collections::HashSet<String>,
    held: Option<Held>,
    poison_portal: String,
    /// Where to send a CancelRequest for the target backend.
    cancel: Option<(crate::upstream::Endpoint, i32, i32)>,
    catalog: crate::catalog::Catalog,
    /// The masking rules of this session under policy version `rules_version`.
    rules: Option<Arc<Rules>>,
    rules_version: Option<u64>,
    /// How the server lexes statements now, from its ParameterStatus reports.
    lexing: Lexing,
    /// The last statement sent to the target that may change how it lexes (a `SET`, a
    /// function, ...: [`Classification::may_change_settings`]), by request number, and the last
    /// answered. While the first is ahead, `lexing` may be out of date for text that follows
    /// in the same pipeline.
    relexing_through: u64,
    answered_through: u64,
    /// The last request whose response completed; it counts as answered at the next
    /// ReadyForQuery, before which the server reports changed settings (PostgreSQL 14 and
    /// later hold ParameterStatus back until then).
    completed_through: u64,
    /// The session may have changed its `search_path` (so an unqualified table name may not
    /// resolve to the schema an allow rule names).
    search_path_touched: bool,
    /// DDL went to the target and its ReadyForQuery has not come back: the catalog was
    /// invalidated before it ran, and lookups made meanwhile (for the DDL statement itself, or
    /// for statements behind it) may describe the objects as they were.
    ddl_unanswered: bool,
    /// The last statement text classified, and its classification: clients repeat one
    /// statement (an extended-protocol Parse of the same text, every time), and comparing the
    /// text is cheaper than the node cache's folding, hashing and lock. The classification is a
    /// function of the text alone, so this is the node cache's answer.
    last_classified: Option<(Arc<str>, Arc<Classification>)>,
    /// See [`masked::PlanMemo`].
    plan_memo: Option<masked::PlanMemo>,
    /// The tables recent statements reached ([`Relay::resolve_reach`]): a transaction of a
    /// few statements, repeated, finds each of them here.
    reach_memo: VecDeque<ReachMemo>,
    /// Recent answers of [`Relay::check_stores`].
    stores_memo: VecDeque<StoresMemo>,
    /// The request and decision events of an allowed read that went to the target before they
    /// were recorded. They are recorded with its response, or with whatever is recorded first;
    /// until then nothing the target sends reaches the client: it waits in `deferred_out`.
    deferred: Vec<Event>,
    deferred_out: BytesMut,
    /// No parameters, shared by the events of statements that have none.
    no_params: Arc<[Option<String>]>,
    /// Tells the journal that `deferred` events are on their way.
    deferring: Option<crate::journal::Pending>,
    /// The target last reported a transaction block open (ReadyForQuery `T` or `E`).
    in_block: bool,
    /// Recent verdicts of this session, by statement classification (each entry holds its
    /// classification, so its address stays that statement's), under `verdicts_under`.
    verdicts: VecDeque<(Arc<Classification>, Arc<Decided>)>,
    /// The policy and session facts the cached verdicts were reached under; when either
    /// changes, they are forgotten. The entry holds the policy, so its address is unique.
    verdicts_under: Option<(Arc<policy_store::client::ActivePolicy>, crate::policy::SessionFacts)>,
    /// The policy version the session was last found to stand under ([`Relay::policy`]).
    standing_under: Option<Arc<policy_store::client::ActivePolicy>>,
    /// Recent classifications that call functions, resolved: the shared classification, what
    /// the catalog answered for each of its functions, and the result. A repeated statement
    /// then shares one resolved classification (and so its kept verdict) as long as the
    /// catalog answers the same; the catalog is still asked every time.
    resolved: VecDeque<(Arc<Classification>, Vec<bool>, Arc<Classification>)>,
}

/// A verdict on a classification, with the decision event's texts (the rule, the reason, and
/// the lists of what the statement does: its operations and tables), built the first time an
/// event needs them and shared by every event after: a kept verdict serves every statement of
/// that shape.
struct Decided {
    verdict: Verdict,
    texts: std::sync::OnceLock<DecisionTexts>,
}

/// What a `PolicyDecided` event says, shared between the events of one verdict.
struct DecisionTexts {
    rule: Arc<str>,
    reason: Arc<str>,
    operations: Arc<[String]>,
    tables: Arc<[String]>,
}

impl Decided {
    fn new(verdict: Verdict) -> Arc<Self> {
        Arc::new(Self { verdict, texts: Default::default() })
    }

    /// The event texts of this verdict on `c`, the classification it is on.
    fn texts(&self, c: &Classification) -> &DecisionTexts {
        self.texts.get_or_init(|| DecisionTexts {
            rule: self.verdict.rule.as_str().into(),
            reason: self.verdict.reason.as_str().into(),
            operations: c.operations().into(),
            tables: c.tables().into(),
        })
    }
}

impl std::ops::Deref for Decided {
    type Target = Verdict;
    fn deref(&self) -> &Verdict {
        &self.verdict
    }
}

/// Verdicts (and function resolutions) a session keeps: agents repeat a handful of statement
/// shapes.
const VERDICTS: usize = 32;

/// The record of statement `seq` answered by the proxy itself with an error.
fn error_response(seq: u64, code: &str, message: String) -> Event {
    Event::ResponseSent {
        seq,
        rows: 0,
        duration_us: 0,
        command_tag: None,
        error: Some(proto::events::ErrorInfo { code: code.into(), message }),
        result: None,
    }
}

/// Keep `item` among the last [`VERDICTS`] of `q`.
fn keep_recent<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() >= VERDICTS {
        q.pop_front();
    }
    q.push_back(item);
}

/// The server settings that change how statement text is read, as the server last reported
/// them. When they differ from how the gateway reads text, statements whose reading could
/// differ are refused.
#[derive(Default)]
struct Lexing {
    /// `standard_conforming_strings` is off: backslashes escape in ordinary string literals.
    backslash_escapes: bool,
    /// `client_encoding` is neither UTF8 nor SQL_ASCII: bytes of multi-byte characters may
    /// look like quotes or backslashes to the server.
    foreign_encoding: Option<String>,
}

impl Lexing {
    /// Note a ParameterStatus report.
    fn report(&mut self, body: &[u8]) {
        let mut parts = body.split(|&b| b == 0);
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else { return };
        let value = String::from_utf8_lossy(value);
        match name {
            b"standard_conforming_strings" => self.backslash_escapes = !value.eq_ignore_ascii_case("on"),
            b"client_encoding" => {
                self.foreign_encoding = (!crate::mask::utf8_like(&value)).then(|| value.into_owned());
            }
            _ => {}
        }
    }

    /// Why the server could read `sql` differently from the gateway, if it could.
    fn hazard(&self, sql: &str) -> Option<String> {
        if self.backslash_escapes && sql.contains('\\') {
            return Some(
                "standard_conforming_strings is off, so the server reads backslashes in string literals differently; \
                 the gateway refuses statements with backslashes until it is on again"
                    .into(),
            );
        }
        if let Some(enc) = &self.foreign_encoding
            && !sql.is_ascii()
        {
            return Some(format!(
                "client_encoding is {enc}: the gateway reads statements as UTF-8 and refuses non-ASCII text in other encodings"
            ));
        }
        None
    }
}

/// What [`Relay::resolve_reach`] found for a classification, and what it found it from.
struct ReachMemo {
    input: Arc<Classification>,
    derived: crate::catalog::Derived,
    reaches: std::collections::BTreeSet<crate::policy::Access>,
}

/// What [`Relay::check_stores`] found for a statement shape, and what it found it from.
struct StoresMemo {
    input: Arc<Classification>,
    rules: Arc<crate::mask::Rules>,
    derived: crate::catalog::Derived,
    refusal: Option<String>,
}

enum Flow {
    Continue,
    Stop,
}

/// Relay the session until the client leaves or something fails.
pub(crate) async fn run(s: &mut Session, client: &mut Client, up: &mut Upstream) -> Result<(), SessionError> {
    let max = s.shared.cfg.max_message_bytes;
    let cap_rows = s.shared.cfg.capture_rows;
    let cin = std::mem::take(&mut client.buf);
    let cout = std::mem::take(&mut client.out);
    let uin = std::mem::take(&mut up.buf);
    let cancel = up.backend_key.map(|(pid, key)| (up.addr.clone(), pid, key));
    // The settings the target reported at startup: the client's own `client_encoding`, or a
    // role's or database's `standard_conforming_strings`, apply from the first statement.
    let mut lexing = Lexing::default();
    for p in &up.parameters {
        lexing.report(&p.body);
    }
    let catalog = crate::catalog::Catalog::new(s.shared.catalogs.clone());
    let (cr, cw) = client.stream.split();
    let (ur, uw) = up.stream.split();
    let mut r = Relay {
        s,
        cr,
        cw,
        cin,
        cout,
        ur,
        uw,
        uin,
        uout: BytesMut::with_capacity(8192),
        max,
        cap_rows,
        expect: VecDeque::new(),
        skip_until_sync: false,
        copy_in: false,
        copy_pending: None,
        statements: crate::Map::default(),
        portals: crate::Map::default(),
        uncertain_portal: Portal { stmt: None, params: Arc::from([]) },
        cursors: Default::default(),
        held: None,
        poison_portal: format!("{RESERVED_PREFIX}_{}", Uuid::new_v4().simple()),
        cancel,
        catalog,
        rules: None,
        rules_version: None,
        lexing,
        relexing_through: 0,
        answered_through: 0,
        completed_through: 0,
        search_path_touched: false,
        ddl_unanswered: false,
        last_classified: None,
        plan_memo: None,
        reach_memo: VecDeque::new(),
        stores_memo: VecDeque::new(),
        deferred: Vec::new(),
        deferred_out: BytesMut::new(),
        no_params: Arc::new([]),
        deferring: None,
        in_block: false,
        verdicts: VecDeque::new(),
        verdicts_under: None,
        resolved: VecDeque::new(),
        standing_under: None,
    };
    let mut result = r.run().await;
    // However the session ended (the target gone, a policy that ends it, a failure to record),
    // a statement it held will not run.
    r.abandon_hold("the session ended while waiting").await;
    // A read that reached the target is recorded even though its answer never completed (the
    // session is over: what the target answered is not released).
    if !r.deferred.is_empty() {
        r.deferred_out.clear();
        if let Err(e) = r.record(Vec::new()).await {
            result = result.and(Err(e));
        }
    }
    if let Err(SessionError::Refused(m)) = &result {
        // Tell the client why, best effort.
        let mut out = BytesMut::new();
        msg::fatal(sqlstate::CANNOT_CONNECT_NOW, m).encode_into(&mut out);
        let _ = r.cw.write_all(&r.cout).await;
        let _ = r.cw.write_all(&out).await;
    } else {
        let _ = r.cw.write_all(&r.cout).await;
    }
    let _ = r.cw.shutdown().await;
    let mut bye = BytesMut::new();
    Frame { tag: b'X', body: bytes::Bytes::new() }.encode_into(&mut bye);
    let _ = r.uw.write_all(&bye).await;
    result
}

/// A bound parameter as events and approvers see it, so that two values that differ (in bytes
/// or in format) never look the same: bytes (binary format, or text that is not UTF-8 or holds
/// a NUL) as `\x` hex; text as it is, but with one more backslash in front when it begins with
/// one. Text `\x41` (four characters, which a text column stores as they are) is then `\\x41`,
/// never `\x41`, the byte `A` in binary format.
pub(crate) fn show_parameter(v: &[u8], binary: bool) -> String {
    match std::str::from_utf8(v) {
        Ok(s) if !binary && !s.contains('\0') => {
            if s.starts_with('\\') {
                format!("\\{s}")
            } else {
                s.to_string()
            }
        }
        _ => format!("\\x{}", hex::encode(v)),
    }
}

/// A value as the record shows it: text as is, anything else as `\x` hex.
pub(crate) fn show_value(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if !s.contains('\0') => s.to_string(),
        _ => format!("\\x{}", hex::encode(b)),
    }
}

impl Relay<'_> {
    async fn run(&mut self) -> Result<(), SessionError> {
        loop {
            // Decide what the client sent, unless a hold pauses it or the target is not reading.
            while self.held.is_none() && self.copy_pending.is_none() && self.uout.len() < HIGH_WATER {
                let f = match decode_frame(&mut self.cin, self.max) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        return Err(self.refuse_fatal(sqlstate::PROTOCOL_VIOLATION, format!("airlock: {e}")));
                    }
                };
                if let Flow::Stop = self.on_client(f).await? {
                    return Ok(());
                }
            }
            // Relay what the target sent.
            let copy_was_pending = self.copy_pending.is_some();
            while self.cout.len() < HIGH_WATER {
                let f = match decode_frame(&mut self.uin, self.max) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        return Err(self.refuse_fatal(
                            sqlstate::CONNECTION_FAILURE,
                            format!("airlock: protocol error from the target: {e}"),
                        ));
                    }
                };
                self.on_upstream(f).await?;
                if self.deferred_out.len() > DEFER_LIMIT {
                    // Too much to withhold: record the request now and let the rest stream.
                    self.record(Vec::new()).await?;
                }
            }
            self.emit_locals();
            // The target answered a COPY: the client's messages behind it, already read, are
            // decided now (nothing else would wake the loop for them).
            if copy_was_pending && self.copy_pending.is_none() {
                continue;
            }

            let client_room = self.cin.len() < self.max.max(HIGH_WATER) + 5;
            let up_room = self.cout.len() < HIGH_WATER;
            // In this order, no random pick: what is queued goes out first (the target starts
            // on a statement, the client gets its answer, without another turn of the loop),
            // then a hold's decision, then reads. Writes only drain buffers and reads stop at
            // the high-water marks, so no branch starves another.
            tokio::select! {
                biased;
                r = self.cw.write(&self.cout), if !self.cout.is_empty() => {
                    match r {
                        Ok(n) => self.cout.advance(n),
                        Err(e) => {
                            self.client_gone().await;
                            return Err(e.into());
                        }
                    }
                }
                r = self.uw.write(&self.uout), if !self.uout.is_empty() => {
                    match r {
                        Ok(n) => self.uout.advance(n),
                        Err(e) => return Err(self.refuse_fatal(sqlstate::CONNECTION_FAILURE, format!("airlock: target connection lost: {e}"))),
                    }
                }
                ev = wait_held(&mut self.held, &self.s.cancelled) => {
                    self.on_held(ev).await?;
                }
                r = self.cr.read_buf(&mut self.cin), if client_room => {
                    // Closed or broken (a reset: the client left with our answers unread),
                    // the client is gone either way.
                    match r {
                        Ok(0) => {
                            self.client_gone().await;
                            return Err(SessionError::Closed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            self.client_gone().await;
                            return Err(e.into());
                        }
                    }
                }
                r = self.ur.read_buf(&mut self.uin), if up_room => {
                    match r {
                        Ok(0) | Err(_) => {
                            return Err(self.refuse_fatal(sqlstate::CONNECTION_FAILURE, "airlock: the target closed the connection".into()));
                        }
                        Ok(_) => {}
                    }
                }
            }
        }
    }

    /// The client left (or its connection broke): stop what the target still runs for it, and
    /// deny and record a hold it was waiting for.
    async fn client_gone(&mut self) {
        self.cancel_running();
        self.abandon_hold("the client disconnected while waiting").await;
    }

    /// The session ends with a statement still held: deny the hold (approvers are told, and an
    /// approval can no longer come for a statement that will never run) and record that.
    async fn abandon_hold(&mut self, why: &str) {
        if let Some(h) = self.held.take() {
            self.s.shared.holds.forget(h.hold_id);
            let d = self.s.local_decision(h.hold_id, HoldOutcome::Denied, why);
            let _ = self.record(vec![Event::HoldDecided(d)]).await;
        }
    }

    /// The client left: stop whatever the target is still running for it.
    fn cancel_running(&self) {
        let running = self.expect.iter().any(|e| matches!(e, Expect::Execute(_) | Expect::Query(..)));
        if let (true, Some((addr, pid, key))) = (running, self.cancel.clone()) {
            debug!("client left mid-query; cancelling it on the target");
            tokio::spawn(async move {
                if let Err(e) = crate::upstream::cancel(addr, pid, key).await {
                    tracing::warn!(error = %e, "cancelling an abandoned query failed");
                }
            });
        }
    }

    /// Queue a FATAL for the client and end the session.
    fn refuse_fatal(&mut self, code: &str, message: String) -> SessionError {
        msg::fatal(code, &message).encode_into(&mut self.cout);
        SessionError::Refused(message)
    }

    fn send_upstream(&mut self, f: &Frame) {
        f.encode_into(&mut self.uout);
    }

    fn send_client(&mut self, f: &Frame) {
        if self.deferred.is_empty() {
            f.encode_into(&mut self.cout);
        } else {
            f.encode_into(&mut self.deferred_out);
        }
    }

    /// Emit local answers that have reached the head of the queue.
    fn emit_locals(&mut self) {
        while let Some(Expect::Local(_)) = self.expect.front() {
            if let Some(Expect::Local(frames)) = self.expect.pop_front() {
                for f in &frames {
                    f.encode_into(&mut self.cout);
                }
            }
        }
    }

    /// Record events, after any deferred ones; then what was withheld from the client goes out.
    async fn record(&mut self, mut events: Vec<Event>) -> Result<(), SessionError> {
        if !self.deferred.is_empty() {
            let mut all = std::mem::take(&mut self.deferred);
            all.append(&mut events);
            events = all;
        }
        self.record_all(events).await
    }

    /// [`Relay::record`] of a statement's response: with its request when that was deferred
    /// (a read recorded with its answer), in the same vector.
    async fn record_response(&mut self, r: Box<Response>) -> Result<(), SessionError> {
        self.completed_through = self.completed_through.max(r.seq);
        let mut events = std::mem::take(&mut self.deferred);
        events.push(r.into_event());
        self.record_all(events).await
    }

    async fn record_all(&mut self, events: Vec<Event>) -> Result<(), SessionError> {
        self.deferring = None;
        match self.s.record(events).await {
            Ok(()) => {
                if !self.deferred_out.is_empty() {
                    // Copied, not taken: the buffer keeps its room for the next answer withheld
                    // (unless a huge answer grew it).
                    self.cout.extend_from_slice(&self.deferred_out);
                    if self.deferred_out.capacity() > 2 * DEFER_LIMIT {
                        self.deferred_out = BytesMut::new();
                    } else {
                        self.deferred_out.clear();
                    }
                }
                Ok(())
            }
            Err(m) => Err(SessionError::Refused(m)),
        }
    }

    /// Statement and portal names a client may use: not the proxy's own, and no longer than
    /// the server keeps (it compares names on their first 63 bytes, so two longer names that
    /// start alike are one to it and two to a map here).
    fn check_names(&mut self, what: &str, names: &[&str]) -> Result<(), SessionError> {
        if names.iter().any(|n| reserved(n)) {
            return Err(self.protocol_error(what));
        }
        if names.iter().any(|n| n.len() > proto::policy::MAX_IDENTIFIER_BYTES) {
            return Err(self.refuse_fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!(
                    "airlock: {what}: statement and portal names longer than {} bytes are refused (the server would cut them)",
                    proto::policy::MAX_IDENTIFIER_BYTES
                ),
            ));
        }
        Ok(())
    }

    fn protocol_error(&mut self, what: &str) -> SessionError {
        self.refuse_fatal(sqlstate::PROTOCOL_VIOLATION, format!("airlock: malformed {what} message"))
    }

    async fn on_client(&mut self, f: Frame) -> Result<Flow, SessionError> {
        if self.copy_in && matches!(f.tag, b'd' | b'c' | b'f') {
            if f.tag != b'd' {
                self.copy_in = false;
            }
            self.send_upstream(&f);
            return Ok(Flow::Continue);
        }
        // The target ignores Sync and Flush during COPY FROM STDIN: nothing answers them.
        if self.copy_in && matches!(f.tag, b'S' | b'H') {
            self.send_upstream(&f);
            return Ok(Flow::Continue);
        }
        if f.tag == b'X' {
            return Ok(Flow::Stop);
        }
        if self.skip_until_sync && f.tag != b'S' {
            return Ok(Flow::Continue);
        }
        match f.tag {
            b'Q' => {
                let Some(sql) = msg::read_cstr_body(&f.body).map(|q| self.shared_text(q)) else {
                    return Err(self.protocol_error("Query"));
                };
                self.simple_query(f, sql).await?;
            }
            b'P' => {
                let Some((name, sql, user_type)) = msg::read_parse(&f.body).map(|(n, q, types)| {
                    (n.to_string(), self.shared_text(q), msg::declared_user_type(types))
                }) else {
                    return Err(self.protocol_error("Parse"));
                };
                self.parse(f, name, sql, user_type).await?;
            }
            b'B' => {
                let Some(b) = msg::read_bind(&f.body) else {
                    return Err(self.protocol_error("Bind"));
                };
                self.check_names("Bind", &[b.portal, b.statement])?;
                let entry = Portal {
                    stmt: self.lookup_statement(b.statement),
                    params: b
                        .params
                        .iter()
                        .map(|(v, binary)| v.map(|v| show_parameter(v, *binary)))
                        .collect(),
                };
                let portal = b.portal.to_string();
                self.send_upstream(&f);
                self.expect.push_back(Expect::Bind { portal, entry });
            }
            b'D' => {
                let Some((kind, name)) = msg::read_target(&f.body) else {
                    return Err(self.protocol_error("Describe"));
                };
                self.check_names("Describe", &[name])?;
                self.send_upstream(&f);
                let name = name.to_string();
                self.expect.push_back(if kind == b'S' {
                    Expect::DescribeStatement { sql: self.statement_sql(&name) }
                } else {
                    Expect::DescribePortal { sql: self.portal_sql(&name), name }
                });
            }
            b'E' => {
                let Some(portal) = msg::read_execute(&f.body).map(str::to_string) else {
                    return Err(self.protocol_error("Execute"));
                };
                self.check_names("Execute", &[&portal])?;
                self.execute(f, portal).await?;
            }
            b'C' => {
                let Some((kind, name)) = msg::read_target(&f.body).map(|(k, n)| (k, n.to_string())) else {
                    return Err(self.protocol_error("Close"));
                };
                self.check_names("Close", &[&name])?;
                self.send_upstream(&f);
                self.expect.push_back(Expect::Close { kind, name });
            }
            b'S' => {
                self.skip_until_sync = false;
                self.send_upstream(&f);
                self.expect.push_back(Expect::Sync);
            }
            b'H' => self.send_upstream(&f),
            // CopyData, CopyDone or CopyFail outside COPY: ignored, as PostgreSQL does.
            b'd' | b'c' | b'f' => {}
            other => {
                return Err(self.refuse_fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("airlock: unexpected message type {:?}", other as char),
                ));
            }
        }
        Ok(Flow::Continue)
    }

    /// What the entries still awaiting their answers say a name is. The newest one that could
    /// change it decides: a Parse or Bind of it (`defines`) is trusted when no Sync lies between
    /// it and now. A Parse or Bind that fails, or is skipped after an earlier error, makes the
    /// target skip what follows up to the next Sync, so a message in the same stretch never runs
    /// against a name it did not make; past a Sync the target may still hold an older statement
    /// or portal of that name. `free_before` says when it cannot: nothing held the name, and no
    /// older entry (`creates`) may have made it. Any other entry that may change the name (a
    /// Close, a `DEALLOCATE`, `CLOSE`, `DECLARE`, `ROLLBACK TO` not yet answered) leaves it
    /// uncertain until the answers come.
    fn pending(
        &self,
        defines: impl Fn(&Expect) -> bool,
        touches: impl Fn(&Expect) -> bool,
        free_before: impl Fn(usize) -> bool,
    ) -> Pending<'_> {
        let mut crossed = false;
        for (i, e) in self.expect.iter().enumerate().rev() {
            if defines(e) {
                return if crossed && !free_before(i) { Pending::Uncertain } else { Pending::Sure(e) };
            }
            if touches(e) {
                return Pending::Uncertain;
            }
            crossed |= matches!(e, Expect::Sync);
        }
        Pending::None
    }

    /// Could entry `e` change what prepared statement `name` is, other than by a Parse of it?
    fn touches_statement(e: &Expect, name: &str) -> bool {
        match e {
            Expect::Close { kind: b'S', name: n } => n == name,
            Expect::Query(_, effects) => effects.iter().any(|x| x.touches_statement(name)),
            Expect::Execute(r) => r.effect.as_ref().is_some_and(|x| x.touches_statement(name)),
            _ => false,
        }
    }

    /// Could entry `e` change what portal `name` is, other than by a Bind of it?
    fn touches_portal(e: &Expect, name: &str) -> bool {
        match e {
            Expect::Close { kind: b'P', name: n } => n == name,
            Expect::Query(_, effects) => effects.iter().any(|x| x.touches_portal(name)),
            Expect::Execute(r) => r.effect.as_ref().is_some_and(|x| x.touches_portal(name)),
            _ => false,
        }
    }

    /// The statement a name stands for: the latest Parse still awaiting confirmation (see
    /// [`Relay::pending`]; `None` when it is uncertain), else the confirmed one.
    fn lookup_statement(&self, name: &str) -> Option<Prepared> {
        let defines = |e: &Expect| matches!(e, Expect::Parse { name: n, .. } if n == name);
        // Only a Parse or a `PREPARE` makes a statement (the gateway's own map is only ever
        // changed by answers). The unnamed statement is dropped when a Parse of it starts, so
        // whether one was there is forgotten: never free.
        let creates = |e: &Expect| {
            defines(e)
                || match e {
                    Expect::Query(_, effects) => {
                        effects.iter().any(|x| matches!(x, SessionEffect::Prepare(n, _) if n == name))
                    }
                    Expect::Execute(r) => {
                        matches!(&r.effect, Some(SessionEffect::Prepare(n, _)) if n == name)
                    }
                    _ => false,
                }
        };
        let free_before = |i: usize| {
            !name.is_empty()
                && !self.statements.contains_key(name)
                && !self.expect.iter().take(i).any(creates)
        };
        match self.pending(defines, |e| Self::touches_statement(e, name), free_before) {
            Pending::Sure(Expect::Parse { stmt, .. }) => Some(stmt.clone()),
            Pending::Uncertain => None,
            _ => self.statements.get(name).cloned(),
        }
    }

    /// The portal a name stands for, as [`Relay::lookup_statement`] finds statements; an
    /// uncertain one is bound to a statement the gateway does not know.
    fn lookup_portal(&self, name: &str) -> Option<&Portal> {
        // Cursors (`WITH HOLD` ones outlive their block) are not all known by name: a portal
        // name is never taken as free.
        match self.pending(
            |e| matches!(e, Expect::Bind { portal, .. } if portal == name),
            |e| Self::touches_portal(e, name),
            |_| false,
        ) {
            Pending::Sure(Expect::Bind { entry, .. }) => Some(entry),
            Pending::Uncertain => Some(&self.uncertain_portal),
            _ => self.portals.get(name),
        }
    }

    /// What a prepared statement name runs, for resolving SQL-level EXECUTE (looked up only
    /// for the names a message executes).
    fn prepared(&self, name: &str) -> Option<Classification> {
        self.lookup_statement(name).map(|p| (*p.classification).clone())
    }

    /// The policy in force, once the session is known to stand under it
    /// ([`Session::lost_standing`]; checked once per version).
    fn policy(&mut self) -> Result<Arc<policy_store::client::ActivePolicy>, SessionError> {
        let policy = self.s.shared.policy_now().map_err(SessionError::Refused)?;
        if let Some(at) = self.s.expires
            && std::time::SystemTime::now() > at
        {
            info!("ending the session: its token expired");
            return Err(SessionError::Refused(format!(
                "airlock: the token this session logged in with expired at {}: reconnect with a new one",
                humantime::format_rfc3339_seconds(at)
            )));
        }
        if !self.standing_under.as_ref().is_some_and(|p| Arc::ptr_eq(p, &policy)) {
            if let Some(why) = self.s.lost_standing(&policy.document) {
                info!(policy.version = policy.version, why = %why, "ending the session: the policy changed");
                let m = format!("airlock: {why} in policy version {}: reconnect", policy.version);
                return Err(SessionError::Refused(m));
            }
            self.standing_under = Some(policy.clone());
        }
        Ok(policy)
    }

    /// The policy's verdict on a statement in this session. A verdict reached without asking
    /// for a just-in-time grant (which come and go) is kept for the next statement with the
    /// same classification, as long as the policy and the session facts are the same.
    fn verdict(
        &mut self,
        policy: &Arc<policy_store::client::ActivePolicy>,
        c: &Arc<Classification>,
    ) -> Arc<Decided> {
        if self.s.read_only && c.accesses.iter().any(|a| a.operation == proto::policy::Operation::Escalate) {
            let v = Verdict {
                decision: Decision::Deny,
                rule: "builtin.read-only-session".into(),
                reason: "this principal may not write here, so the session cannot be made writable".into(),
                hold: None,
            };
            return Decided::new(v);
        }
        let facts = crate::policy::SessionFacts { search_path_touched: self.search_path_touched };
        if !matches!(&self.verdicts_under, Some((p, f)) if Arc::ptr_eq(p, policy) && *f == facts) {
            self.verdicts.clear();
            self.verdicts_under = Some((policy.clone(), facts));
        }
        if let Some((_, d)) = self.verdicts.iter().find(|(k, _)| Arc::ptr_eq(k, c)) {
            return d.clone();
        }
        let grants = &self.s.shared.grants;
        let (who, conn) = (&self.s.principal.subject, &self.s.conn.name);
        let asked_for_grant = std::cell::Cell::new(false);
        let v = crate::policy::evaluate_with_grants(
            &policy.document,
            conn,
            &self.s.principal,
            c,
            facts,
            &|rule| {
                asked_for_grant.set(true);
                grants.covering(who, conn, rule)
            },
        );
        let d = Decided::new(v);
        // A classification nobody else holds (made for this one statement) will not recur.
        if !asked_for_grant.get() && Arc::strong_count(c) > 1 {
            keep_recent(&mut self.verdicts, (c.clone(), d.clone()));
        }
        d
    }

    /// The verdict on a statement: refused for `stores` (see [`Relay::check_stores`]), when
    /// its results could not be masked, or when what its events record (`recorded`: the
    /// statement and parameters as the detectors leave them, which can be longer) would not
    /// fit on the bus, else the policy's. A hold's request must also fit where approvers read
    /// it: the approval service keeps it as JSON, where a control character takes six bytes.
    fn decide(
        &mut self,
        policy: &Arc<policy_store::client::ActivePolicy>,
        sql: &str,
        recorded: (&str, &[Option<String>]),
        c: &Arc<Classification>,
        stores: Option<String>,
    ) -> Arc<Decided> {
        let deny = |rule: &str, reason| {
            Decided::new(Verdict { decision: Decision::Deny, rule: rule.into(), reason, hold: None })
        };
        let p = &self.s.principal;
        let max = self
            .s
            .shared
            .journal
            .max_event_bytes()
            .saturating_sub(p.subject.len() + p.groups.iter().map(|g| g.len() + 2).sum::<usize>());
        if let Some(reason) = super::unrecordable(recorded.0, recorded.1, max) {
            return deny("builtin.recording", reason);
        }
        let verdict = match stores.or_else(|| self.mask_precheck(sql, c)) {
            Some(reason) => return deny("builtin.masking", reason),
            None => self.verdict(policy, c),
        };
        if verdict.decision == Decision::Hold
            && let Some(reason) = super::unrecordable(recorded.0, recorded.1, max / HOLD_SHARE)
        {
            return deny("builtin.recording", format!("held for approval, but {reason}"));
        }
        verdict
    }

    /// Why the statement may not run whatever the rules say, if it would store masked values
    /// elsewhere (under the rules of the current policy: [`Relay::storing_masked`]), for
    /// [`Relay::decide`].
    async fn check_stores(
        &mut self,
        sql: &str,
        c: &Arc<Classification>,
    ) -> Result<Option<String>, SessionError> {
        let f = &c.mask_facts;
        if c.unparsed.is_none()
            && f.written.is_empty()
            && f.unclear_writes.is_none()
            && !c.calls_functions
            && !f.chooses_rows()
        {
            // Stores nothing computed and chooses rows by no column: a plain read of whole
            // tables, or a write of constants and parameters. (A column that chooses rows may
            // be a masked one behind a view, a parent or a generated column: the catalog says.)
            return Ok(None);
        }
        let policy = self.policy()?;
        self.refresh_rules(&policy);
        let Some(rules) = self.rules.clone() else { return Ok(None) };
        // The same statement shape under the same rules and catalog answers: the same answer.
        if let Some(m) = self.stores_memo.iter().find(|m| {
            Arc::ptr_eq(&m.input, c) && Arc::ptr_eq(&m.rules, &rules) && m.derived.holds(&self.catalog)
        }) {
            return Ok(m.refusal.clone());
        }
        let since = self.catalog.start_deriving();
        let refusal = self.storing_masked(sql, c).await;
        if let (None, Some(derived)) = (&c.unparsed, self.catalog.derived(since)) {
            self.stores_memo.retain(|m| !Arc::ptr_eq(&m.input, c));
            keep_recent(
                &mut self.stores_memo,
                StoresMemo { input: c.clone(), rules, derived, refusal: refusal.clone() },
            );
        }
        Ok(refusal)
    }

    /// Decide a request: its number, the verdict, and the request and decision events to record.
    /// `unshowable`: why approvers could not be shown what the statement runs, if they could
    /// not; a statement the policy holds is then refused (approving it would approve unseen).
    fn judge(
        &mut self,
        sql: &Arc<str>,
        params: &Arc<[Option<String>]>,
        c: &Arc<Classification>,
        stores: Option<String>,
        unshowable: Option<String>,
    ) -> Result<(u64, Arc<Decided>, Vec<Event>), SessionError> {
        let policy = self.policy()?;
        self.refresh_rules(&policy);
        let shown = self.shown(sql, params);
        let mut verdict = self.decide(&policy, sql, (&shown.0, &shown.1), c, stores);
        if verdict.decision == Decision::Hold
            && let Some(why) = unshowable
        {
            verdict = Decided::new(Verdict {
                decision: Decision::Deny,
                rule: "builtin.unshowable-hold".into(),
                reason: format!(
                    "held for approval by rule \"{}\", but {why}: approvers cannot be shown what it runs",
                    verdict.rule
                ),
                hold: None,
            });
        }
        let (seq, events) = self.request_events(&policy, shown, c, &verdict);
        if verdict.decision != Decision::Deny {
            if c.may_change_settings() {
                self.relexing_through = seq;
            }
            self.cursors.extend(c.declares.iter().cloned());
        }
        Ok((seq, verdict, events))
    }

    /// Number a request and make its request and decision events, for `verdict` on `c`.
    /// `shown`: the statement and parameters as recorded ([`Relay::shown`]).
    fn request_events(
        &mut self,
        policy: &policy_store::client::ActivePolicy,
        shown: (Arc<str>, Arc<[Option<String>]>),
        c: &Classification,
        verdict: &Decided,
    ) -> (u64, Vec<Event>) {
        let (shown_sql, shown_params) = shown;
        let (shown_sql, shown_params) =
            super::fit_for_record(shown_sql, shown_params, self.s.shared.journal.max_event_bytes());
        self.s.seq += 1;
        let seq = self.s.seq;
        debug!(seq, decision = %verdict.decision, rule = %verdict.rule, "policy decision");
        let texts = verdict.texts(c);
        // Room for the response too: an allowed read's pair waits for it and goes with it.
        let mut events = Vec::with_capacity(3);
        events.push(Event::RequestReceived { seq, statement: shown_sql, parameters: shown_params });
        events.push(Event::PolicyDecided {
            seq,
            decision: verdict.decision,
            rule: Some(texts.rule.clone()),
            operations: texts.operations.clone(),
            tables: texts.tables.clone(),
            reason: texts.reason.clone(),
            policy_version: policy.version,
        });
        (seq, events)
    }

    /// Send an allowed statement's request and decision events on their way: a statement that
    /// may run before it is recorded ([`Relay::deferrable`]) goes to the target at once and is
    /// recorded with its response (its answer is withheld from the client until then);
    /// anything else is recorded before it goes to the target.
    async fn record_allowed(&mut self, c: &Classification, events: Vec<Event>) -> Result<(), SessionError> {
        if self.deferrable(c) {
            self.deferred = events;
            if self.deferring.is_none() {
                self.deferring = Some(self.s.shared.journal.pending());
            }
            Ok(())
        } else {
            self.record(events).await
        }
    }

    /// May this allowed statement reach the target before its request is recorded? Only when
    /// nothing it does can outlast a failure to record it (that failure ends the session, and
    /// with it the target's connection):
    /// - a plain read: it only selects or shows;
    /// - `BEGIN`, a savepoint, or `ROLLBACK TO` one, which change no data (`COMMIT`, `END` and
    ///   `ROLLBACK` end the block, and are recorded before they run);
    /// - inside a transaction block, reads and plain writes (INSERT, UPDATE, DELETE, MERGE),
    ///   without transaction statements: if recording fails, the target rolls the block back
    ///   when the connection closes, so nothing they did is committed unrecorded.
    ///
    /// In each case: no function of unknown effect, no session effect, and nothing else
    /// outstanding; for a write, not even a Sync, so the block the target last reported is
    /// the one the statement runs in.
    fn deferrable(&self, c: &Classification) -> bool {
        use proto::policy::Operation as O;
        let known = c.unknown_effect().is_none()
            && c.unparsed.is_none()
            && c.denied_function.is_none()
            && !c.ends_block
            && c.effects.iter().all(|e| matches!(e, SessionEffect::None));
        if !known || !self.deferred.is_empty() || self.copy_in {
            return false;
        }
        let running = |e: &Expect| matches!(e, Expect::Execute(_) | Expect::Query(..));
        let ops = |allowed: &dyn Fn(O) -> bool| c.accesses.iter().all(|a| allowed(a.operation));
        if ops(&|o| matches!(o, O::Select | O::Show | O::Transaction)) {
            return !self.expect.iter().any(running);
        }
        self.in_block
            && ops(&|o| matches!(o, O::Select | O::Show | O::Insert | O::Update | O::Delete | O::Merge))
            && !self.expect.iter().any(|e| running(e) || matches!(e, Expect::Sync | Expect::SwallowError))
    }

    /// Refuse a message: the client gets `code`/`message` where the target's answer would have
    /// been, and the target fails its pipeline or transaction as if the statement had failed.
    async fn refuse(
        &mut self,
        seq: u64,
        code: &str,
        message: String,
        extended: bool,
        mut events: Vec<Event>,
    ) -> Result<(), SessionError> {
        events.push(error_response(seq, code, message.clone()));
        self.record(events).await?;
        self.expect.push_back(Expect::Local(vec![msg::error(code, &message)]));
        let poison = msg::execute(&self.poison_portal);
        self.send_upstream(&poison);
        self.expect.push_back(Expect::SwallowError);
        if extended {
            self.skip_until_sync = true;
        } else {
            let sync = msg::sync();
            self.send_upstream(&sync);
            self.expect.push_back(Expect::Sync);
        }
        Ok(())
    }

    /// Resolve what a statement does from what the session and the catalog know: the portals
    /// its FETCHes name, the volatility of the functions it calls (DDL invalidates the cache),
    /// the tables it reaches, and the views it reads.
    async fn resolve_functions(&mut self, c: &mut Arc<Classification>) {
        // FETCH runs whatever the named portal holds: only a cursor the session declared (whose
        // query was decided then) is known.
        if c.unknown.is_none()
            && let Some(n) = c.fetches.iter().find(|n| {
                self.lookup_portal(n).is_some() || !(self.cursors.contains(*n) || c.declares.contains(*n))
            })
        {
            let why = format!("FETCH from \"{n}\", which is not a cursor this session declared");
            Arc::make_mut(c).unknown = Some(why);
        }
        use proto::policy::Operation as O;
        if c.accesses.iter().any(|a| matches!(a.operation, O::Create | O::Alter | O::Drop)) {
            self.catalog.invalidate();
            self.ddl_unanswered = true;
        }
        let cfg = &self.s.shared.cfg;
        let (timeout, max) = (cfg.connect_timeout, cfg.max_message_bytes);
        if !(c.functions.is_empty() && c.builtins.is_empty()) {
            let mut answers = Vec::with_capacity(c.functions.len() + c.builtins.len());
            for f in c.functions.iter().chain(&c.builtins) {
                answers.push(self.catalog.read_only(&self.s.conn, f, timeout, max).await);
            }
            if let Some((_, _, r)) = self.resolved.iter().find(|(k, a, _)| Arc::ptr_eq(k, c) && *a == answers)
            {
                *c = r.clone();
            } else {
                let read_only: std::collections::HashSet<crate::policy::FunctionRef> = c
                    .functions
                    .iter()
                    .chain(&c.builtins)
                    .zip(&answers)
                    .filter(|(_, ro)| **ro)
                    .map(|(f, _)| f.clone())
                    .collect();
                // Only a classification the cache shares recurs.
                let original = (Arc::strong_count(c) > 1).then(|| c.clone());
                Arc::make_mut(c).resolve_functions(|f| read_only.contains(f));
                if let Some(original) = original {
                    keep_recent(&mut self.resolved, (original, answers, c.clone()));
                }
            }
        }
        if !c.attribute_calls.is_empty() {
            let reach = crate::catalog::Reach { target: &self.s.conn, timeout, max };
            let mut answers = Vec::with_capacity(c.attribute_calls.len());
            for n in &c.attribute_calls {
                answers.push(self.catalog.attribute_call(reach, n).await);
            }
            let names: Vec<String> = c.attribute_calls.iter().cloned().collect();
            Arc::make_mut(c).resolve_attribute_calls(|n| {
                names
                    .iter()
                    .position(|m| m == n)
                    .map_or(crate::policy::AttributeCall::MayWrite, |i| answers[i])
            });
        }
        self.resolve_reach(c).await;
        // Reading a view runs its definition: a view that calls a writing function writes.
        if c.unknown.is_none() {
            // What the statement creates, drops or alters it does not read (and the catalog
            // does not know a name it is about to create).
            let ddl_target = |t: &crate::policy::TableName| {
                c.accesses.iter().any(|a| {
                    matches!(a.operation, O::Create | O::Drop | O::Alter) && a.table.as_ref() == Some(t)
                })
            };
            let read = c
                .accesses
                .iter()
                .filter(|a| a.operation == O::Select)
                .filter_map(|a| a.table.as_ref())
                .filter(|t| !ddl_target(t));
            if !self.catalog.views_read_only(&self.s.conn, read, timeout, max).await {
                Arc::make_mut(c).unknown =
                    Some("a view it reads may call a function with side effects".into());
            }
        }
    }

    /// Why `sql` cannot be read yet, if a statement that may change how the server lexes is
    /// still running ahead of it: the server reads the next text in the pipeline with the
    /// settings that statement leaves, which the gateway learns only from its answer.
    fn relexing_hazard(&self, sql: &str) -> Option<String> {
        (self.relexing_through > self.answered_through && (sql.contains('\\') || !sql.is_ascii())).then(
            || {
                "an earlier statement that may change how the server reads backslashes or non-ASCII text \
             (standard_conforming_strings, client_encoding) has not been answered yet; \
             send this once it has"
                    .into()
            },
        )
    }

    /// Note what the statement does to the tables it reaches through those it names (a
    /// partition's parents, a view's base tables: [`crate::catalog::Catalog::reached`]; what
    /// its writes write through foreign keys: [`crate::catalog::Catalog::writes_reached`]), for
    /// deny and hold rules on those. A failed lookup, or a written table with a trigger or rule,
    /// leaves the effect unknown.
    async fn resolve_reach(&mut self, c: &mut Arc<Classification>) {
        if c.accesses.iter().all(|a| a.table.is_none()) {
            return;
        }
        let cfg = &self.s.shared.cfg;
        let reach = crate::catalog::Reach {
            target: &self.s.conn,
            timeout: cfg.connect_timeout,
            max: cfg.max_message_bytes,
        };
        // The same statement again (clients repeat a few), with nothing it was derived from
        // changed: the catalog not invalidated, its answers no older than it trusts them.
        if let Some(m) = self.reach_memo.iter().find(|m| Arc::ptr_eq(&m.input, c))
            && m.derived.holds(&self.catalog)
        {
            if m.reaches != c.reaches {
                let reaches = m.reaches.clone();
                Arc::make_mut(c).reaches = reaches;
            }
            return;
        }
        use proto::policy::Operation as O;
        let input = c.clone();
        let since = self.catalog.start_deriving();
        let mut reaches = std::collections::BTreeSet::new();
        for a in &c.accesses {
            let Some(t) = &a.table else { continue };
            match self.catalog.reached(reach, t).await {
                Ok(ts) => reaches.extend(
                    ts.iter()
                        .map(|t| crate::policy::Access { operation: a.operation, table: Some(t.clone()) })
                        .filter(|r| !c.accesses.contains(r)),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, table = %t, "catalog lookup of a table's parents and bases failed");
                    Arc::make_mut(c).unknown = Some(format!("cannot look up which tables {t} reaches"));
                    return;
                }
            }
        }
        // What the writes set off: foreign keys' actions, triggers and rules.
        let writes: Vec<(O, crate::policy::TableName)> = c
            .accesses
            .iter()
            .filter(|a| crate::catalog::writes_rows(a.operation))
            .filter_map(|a| Some((a.operation, a.table.clone()?)))
            .collect();
        let mut unknown = None;
        if !writes.is_empty() {
            match self.catalog.writes_reached(reach, &writes).await {
                Ok(w) => {
                    reaches.extend(
                        w.tables
                            .into_iter()
                            .map(|(operation, t)| crate::policy::Access { operation, table: Some(t) })
                            .filter(|r| !c.accesses.contains(r)),
                    );
                    unknown = w.unknown;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "catalog lookup of what a write sets off failed");
                    unknown = Some(
                        "cannot look up the foreign keys, triggers and rules of the tables it writes".into(),
                    );
                }
            }
        }
        self.reach_memo.retain(|m| !Arc::ptr_eq(&m.input, &input));
        // Only a known effect is remembered (the memo keeps the reached tables alone); an unknown
        // one is worked out again from the cached answers.
        if unknown.is_none()
            && let Some(derived) = self.catalog.derived(since)
        {
            keep_recent(&mut self.reach_memo, ReachMemo { input, derived, reaches: reaches.clone() });
        }
        if reaches != c.reaches {
            Arc::make_mut(c).reaches = reaches;
        }
        if let Some(why) = unknown
            && c.unknown.is_none()
        {
            Arc::make_mut(c).unknown = Some(why);
        }
    }

    /// `sql` as shared text: the last classified statement's own when it is the same (a client
    /// repeating a statement), so it is not copied, and [`Relay::classify_as_server`] knows it
    /// by its pointer.
    fn shared_text(&self, sql: &str) -> Arc<str> {
        match &self.last_classified {
            Some((text, _)) if **text == *sql => text.clone(),
            _ => Arc::from(sql),
        }
    }

    /// Classify a statement as the server will read it: refused as unparsed when the server's
    /// lexing settings could make it read the text differently.
    fn classify_as_server(&mut self, sql: &Arc<str>) -> Arc<Classification> {
        if let Some(why) = self.lexing.hazard(sql).or_else(|| self.relexing_hazard(sql)) {
            return Arc::new(Classification { unparsed: Some(why), statements: 1, ..Default::default() });
        }
        // The same text as last time ([`Relay::shared_text`] hands it out again): nothing
        // below would find anything new (the search_path mark is never taken back; a change
        // that resets it must forget this memo too).
        if let Some((text, c)) = &self.last_classified
            && Arc::ptr_eq(text, sql)
        {
            return c.clone();
        }
        if !self.search_path_touched && mentions_search_path(sql) {
            self.search_path_touched = true;
        }
        let c = self.s.shared.classifier.classify(sql);
        // A change of role changes what `"$user"` in search_path names; a procedure, a `DO`
        // block or a function may call `SET` or `set_config` where the text does not show it.
        if !self.search_path_touched && c.may_change_search_path() {
            self.search_path_touched = true;
        }
        self.last_classified = Some((sql.clone(), c.clone()));
        c
    }

    /// A simple-protocol Query: `f` is the client's frame, its body exactly `sql` and a NUL
    /// ([`msg::read_cstr_body`]), so what goes to the target is what was decided.
    async fn simple_query(&mut self, f: Frame, sql: Arc<str>) -> Result<(), SessionError> {
        let mut c = self.classify_as_server(&sql);
        let context = self.hold_context(&c);
        if !c.executes.is_empty() {
            Arc::make_mut(&mut c).resolve_executes(|n| self.prepared(n));
        }
        self.resolve_functions(&mut c).await;
        let stores = self.check_stores(&sql, &c).await?;
        let no_params = self.no_params.clone();
        let unshowable = context.as_ref().err().cloned();
        let (seq, verdict, events) = self.judge(&sql, &no_params, &c, stores, unshowable)?;
        let effects: Vec<SessionEffect> = c.effects.clone();
        match verdict.decision {
            Decision::Allow => {
                self.record_allowed(&c, events).await?;
                self.forward_query(&f, sql, effects, seq, c.copies_in);
                Ok(())
            }
            Decision::Deny => {
                let m = format!("airlock: denied by rule \"{}\": {}", verdict.rule, verdict.reason);
                self.refuse(seq, sqlstate::INSUFFICIENT_PRIVILEGE, m, false, events).await
            }
            Decision::Hold => {
                self.record(events).await?;
                let then = AfterHold::Query { frame: f, sql: sql.clone(), effects, seq };
                let held = ToHold { sql: &sql, params: &no_params, classification: &c };
                self.hold(seq, held, &verdict, context.unwrap_or_default(), then, false).await
            }
        }
    }

    /// Send the client's Query frame (whose text is `sql`) to the target.
    fn forward_query(
        &mut self,
        frame: &Frame,
        sql: Arc<str>,
        effects: Vec<SessionEffect>,
        seq: u64,
        copies_in: bool,
    ) {
        self.send_upstream(frame);
        let r = Response::new(seq).with_sql(Some(sql));
        if copies_in {
            self.copy_pending = Some(seq);
        }
        self.expect.push_back(Expect::Query(Box::new(r), effects.into()));
    }

    /// Send an Execute to the target; with masking, preceded by the proxy's own Describe of the
    /// portal, so the rows' columns are known even when the client did not ask. When the
    /// client's own Describe of the same portal is what the target answers just before (as
    /// libpq sends them), its row description gives the plan instead.
    fn forward_execute(
        &mut self,
        frame: &Frame,
        portal: &str,
        sql: Option<Arc<str>>,
        seq: u64,
        copies_in: bool,
    ) {
        let mut r = Response::new(seq).with_sql(sql);
        if copies_in {
            self.copy_pending = Some(seq);
        }
        r.effect = self
            .lookup_portal(portal)
            .and_then(|p| p.stmt.as_ref())
            .and_then(|p| p.classification.effects.first())
            .filter(|e| !matches!(e, SessionEffect::None))
            .cloned();
        if self.rules.is_some() {
            if matches!(self.expect.back(), Some(Expect::DescribePortal { name, sql: described })
                if name == portal && *described == r.sql)
            {
                r.planned_by_client_describe = true;
            } else {
                let d = msg::describe(b'P', portal);
                self.send_upstream(&d);
                self.expect.push_back(Expect::HiddenDescribe);
            }
        }
        self.send_upstream(frame);
        if copies_in {
            // Should it fail instead, its error must not wait in the target's output for the
            // client's Sync, which the relay holds back until the target answers (see
            // `copy_pending`): PostgreSQL 15 sends it at once, a Flush makes sure of it. The
            // target ignores a Flush once it reads data.
            self.send_upstream(&msg::flush());
        }
        self.expect.push_back(Expect::Execute(Box::new(r)));
    }

    /// A Parse of `sql` as statement `name`; `user_type`: a parameter type it declares that is
    /// not built in.
    async fn parse(
        &mut self,
        f: Frame,
        name: String,
        sql: Arc<str>,
        user_type: Option<u32>,
    ) -> Result<(), SessionError> {
        self.check_names("Parse", &[&name])?;
        let mut c = self.classify_as_server(&sql);
        if let Some(oid) = user_type
            && c.unknown.is_none()
        {
            // Binding a value runs the type's input function, or a domain's CHECK: functions
            // the text does not name.
            Arc::make_mut(&mut c).unknown =
                Some(format!("a parameter is declared of type {oid}, which is not built in"));
        }
        let runs_execute = !c.executes.is_empty();
        if runs_execute {
            Arc::make_mut(&mut c).resolve_executes(|n| self.prepared(n));
        }
        self.resolve_functions(&mut c).await;
        let stores = self.check_stores(&sql, &c).await?;
        // Evaluated now, and again at Execute with the parameters and the policy of that moment.
        let policy = self.policy()?;
        self.refresh_rules(&policy);
        // The text as it came (its record, scrubbed, is checked again at Execute).
        let verdict = self.decide(&policy, &sql, (&sql, &[]), &c, stores);
        if verdict.decision == Decision::Deny {
            let no_params = self.no_params.clone();
            let shown = self.shown(&sql, &no_params);
            let (seq, events) = self.request_events(&policy, shown, &c, &verdict);
            let m = format!("airlock: denied by rule \"{}\": {}", verdict.rule, verdict.reason);
            return self.refuse(seq, sqlstate::INSUFFICIENT_PRIVILEGE, m, true, events).await;
        }
        if name.is_empty() {
            // The target drops the unnamed statement when a new Parse starts.
            self.statements.remove("");
        }
        self.send_upstream(&f);
        self.expect.push_back(Expect::Parse {
            name,
            stmt: Prepared { made_by: sql.clone(), sql, classification: c, runs_execute },
        });
        Ok(())
    }

    async fn execute(&mut self, f: Frame, portal: String) -> Result<(), SessionError> {
        let entry = self.lookup_portal(&portal).cloned();
        let stmt_sql =
            entry.as_ref().and_then(|e| e.stmt.as_ref()).map(|p| p.sql.clone()).filter(|s| !s.is_empty());
        let runs_execute = matches!(&entry, Some(Portal { stmt: Some(p), .. }) if p.runs_execute);
        let (sql, params, c): (Arc<str>, _, _) = match entry {
            Some(Portal { stmt: Some(p), params }) => (p.sql, params, p.classification),
            Some(Portal { stmt: None, params }) => {
                // Bound to a statement the proxy never saw confirmed: its effect is unknown.
                let c = Classification {
                    unknown: Some("a statement not known to the gateway".into()),
                    statements: 1,
                    ..Default::default()
                };
                ("".into(), params, Arc::new(c))
            }
            None if !self.cursors.contains(&portal) => {
                let c = Classification {
                    unknown: Some(format!(
                        "portal \"{portal}\" was neither bound nor declared in this session"
                    )),
                    statements: 1,
                    ..Default::default()
                };
                (format!("-- fetch from portal \"{portal}\"").into(), Arc::from([]), Arc::new(c))
            }
            None => {
                // Not a protocol portal: a cursor made by DECLARE, whose query was decided then.
                let c = Classification {
                    accesses: [crate::policy::Access {
                        operation: proto::policy::Operation::Cursor,
                        table: None,
                    }]
                    .into(),
                    statements: 1,
                    ..Default::default()
                };
                (format!("-- fetch from portal \"{portal}\"").into(), Arc::from([]), Arc::new(c))
            }
        };
        // A statement that runs `EXECUTE name` runs what the name is now, not what it was when
        // the statement was parsed.
        let mut c = c;
        let mut context = Ok(HoldContext::default());
        if runs_execute {
            let mut fresh = self.s.shared.classifier.classify(&sql);
            context = self.hold_context(&fresh);
            Arc::make_mut(&mut fresh).resolve_executes(|n| self.prepared(n));
            if let Some(u) = &c.unknown {
                Arc::make_mut(&mut fresh).unknown.get_or_insert_with(|| u.clone());
            }
            self.resolve_functions(&mut fresh).await;
            c = fresh;
        }
        let stores = self.check_stores(&sql, &c).await?;
        // Approvers are shown the text of what the portal runs: without it (a statement the
        // gateway never saw parsed, a portal it cannot be sure of, a cursor) they would approve
        // blind whatever the name stands for at the target.
        let unshowable = match (&stmt_sql, &context) {
            (None, _) => Some("the gateway does not know the text of the statement this portal runs".into()),
            (Some(_), Err(why)) => Some(why.clone()),
            (Some(_), Ok(_)) => None,
        };
        let (seq, verdict, events) = self.judge(&sql, &params, &c, stores, unshowable)?;
        match verdict.decision {
            Decision::Allow => {
                self.record_allowed(&c, events).await?;
                self.forward_execute(&f, &portal, stmt_sql, seq, c.copies_in);
                Ok(())
            }
            Decision::Deny => {
                let m = format!("airlock: denied by rule \"{}\": {}", verdict.rule, verdict.reason);
                self.refuse(seq, sqlstate::INSUFFICIENT_PRIVILEGE, m, true, events).await
            }
            Decision::Hold => {
                self.record(events).await?;
                let then = AfterHold::Execute { frame: f, portal, sql: stmt_sql, seq };
                let context = context.unwrap_or_default();
                let held = ToHold { sql: &sql, params: &params, classification: &c };
                self.hold(seq, held, &verdict, context, then, true).await
            }
        }
    }

    /// The prepared statements `c` (before [`Classification::resolve_executes`]) runs by name
    /// from the session, with the text that made each, to show approvers; `Err`: why they
    /// cannot be shown. A name prepared earlier in the same message is shown by the message.
    fn hold_context(&self, c: &Classification) -> Result<HoldContext, String> {
        let mut ctx = HoldContext::default();
        let mut bytes = 0;
        for (j, n) in c.executes.iter().enumerate() {
            let before = c.executes_at.get(j).map_or(c.effects.len(), |&at| at.min(c.effects.len()));
            if c.effects[..before].iter().any(|e| e.touches_statement(n))
                || ctx.runs.iter().any(|(m, _)| m == n)
            {
                continue;
            }
            match self.lookup_statement(n) {
                Some(p) if !p.made_by.is_empty() => {
                    bytes += p.made_by.len();
                    ctx.runs.push((n.clone(), p.made_by));
                }
                _ => return Err(format!("the gateway does not know the text of prepared statement \"{n}\"")),
            }
        }
        if bytes > HOLD_CONTEXT_BYTES {
            return Err(format!(
                "the prepared statements it runs are longer than the {HOLD_CONTEXT_BYTES} bytes a hold shows"
            ));
        }
        Ok(ctx)
    }

    /// Hold a statement (`held`: its text, parameters and classification) for approval.
    async fn hold(
        &mut self,
        seq: u64,
        held: ToHold<'_>,
        verdict: &Verdict,
        context: HoldContext,
        then: AfterHold,
        extended: bool,
    ) -> Result<(), SessionError> {
        let ToHold { sql, params, classification } = held;
        let (mut req, timeout) = self.s.hold_request(seq, sql, params, verdict);
        // Approvers see the statement as recorded: masked. The fingerprint binds the original.
        let (statement, parameters) = self.shown(sql, params);
        (req.statement, req.parameters) = (statement.to_string(), parameters.to_vec());
        // What the statement's text alone does not tell them.
        for (name, text) in &context.runs {
            let (text, _) = self.shown(text, &self.no_params);
            req.reason.push_str(&format!("\n\nEXECUTE {name} runs the statement prepared by:\n{text}"));
        }
        if self.search_path_touched {
            req.reason.push_str(
                "\n\nNote: this session may have changed search_path (or its role), so unqualified names in the \
                 statement may not name the objects they usually do.",
            );
        }
        let hold_id = req.hold_id;
        let rx = self.s.shared.holds.register(hold_id);
        // Cancels from here on are for this statement (its client sees it held from now).
        let cancels_seen = self.s.cancelled.count();
        if let Err(e) = self.record(vec![Event::HoldRequested(Box::new(req.clone()))]).await {
            self.s.shared.holds.forget(hold_id);
            return Err(e);
        }
        info!(hold.id = %hold_id, rule = %verdict.rule, "statement held for approval");
        let notice = msg::notice(&format!(
            "airlock: waiting for approval of hold {hold_id} (rule \"{}\": {}); it expires at {}",
            verdict.rule, verdict.reason, req.expires_at
        ));
        self.send_client(&notice);
        self.held = Some(Held {
            hold_id,
            rule: verdict.rule.clone(),
            rx,
            deadline: tokio::time::Instant::now() + timeout + self.s.shared.cfg.hold_grace,
            then,
            extended,
            sql: sql.clone(),
            params: params.clone(),
            classification: classification.clone(),
            policy: self.standing_under.clone(),
            cancels_seen,
        });
        Ok(())
    }

    /// Why an approved statement may not run after all: the policy in force now, a newer
    /// version than the one it was held under, denies it (deny wins over an approval given
    /// under older rules). A session that no longer stands under the policy (its key revoked,
    /// its connection changed) ends here, as it would at its next statement.
    async fn denied_since(&mut self, h: &Held, seq: u64) -> Result<Option<String>, SessionError> {
        let policy = match self.policy() {
            Ok(p) => p,
            Err(e) => {
                let m = e.to_string();
                self.record(vec![error_response(seq, sqlstate::CANNOT_CONNECT_NOW, m)]).await?;
                return Err(e);
            }
        };
        if h.policy.as_ref().is_some_and(|p| Arc::ptr_eq(p, &policy)) {
            return Ok(None);
        }
        self.refresh_rules(&policy);
        let stores = self.check_stores(&h.sql, &h.classification).await?;
        let shown = self.shown(&h.sql, &h.params);
        let v = self.decide(&policy, &h.sql, (&shown.0, &shown.1), &h.classification, stores);
        Ok((v.decision == Decision::Deny).then(|| {
            format!(
                "airlock: hold {} was approved, but policy version {} denies the statement now: rule \"{}\": {}",
                h.hold_id, policy.version, v.rule, v.reason
            )
        }))
    }

    async fn on_held(&mut self, ev: HeldEvent) -> Result<(), SessionError> {
        let Some(h) = self.held.take() else { return Ok(()) };
        self.s.shared.holds.forget(h.hold_id);
        let (d, cancelled) = match ev {
            HeldEvent::Decided(d) => {
                info!(hold.id = %h.hold_id, outcome = %d.outcome, by = %d.decided_by, "hold decided");
                (d, false)
            }
            HeldEvent::TimedOut => {
                let d = self.s.local_decision(
                    h.hold_id,
                    HoldOutcome::Expired,
                    "no decision arrived before the timeout",
                );
                self.record(vec![Event::HoldDecided(d.clone())]).await?;
                (d, false)
            }
            // The client cancelled it: deny the hold, so that approvers see it is gone and no
            // approval can run it (answered below with 57014, as the target would).
            HeldEvent::Cancelled => {
                info!(hold.id = %h.hold_id, "held statement cancelled by the client");
                let d = self.s.local_decision(h.hold_id, HoldOutcome::Denied, CANCELLED_BY_CLIENT);
                self.record(vec![Event::HoldDecided(d.clone())]).await?;
                (d, true)
            }
        };
        if self.skip_until_sync {
            // An earlier message of the pipeline failed meanwhile: the target skips this one,
            // and so does the proxy, answering nothing, as the target would.
            let seq = match &h.then {
                AfterHold::Query { seq, .. } | AfterHold::Execute { seq, .. } => *seq,
            };
            let skipped = format!(
                "not run: an earlier message of its pipeline failed while it was held (hold {})",
                d.outcome
            );
            return self.record(vec![error_response(seq, sqlstate::IN_FAILED_TRANSACTION, skipped)]).await;
        }
        if d.outcome == HoldOutcome::Approved {
            let seq = match &h.then {
                AfterHold::Query { seq, .. } | AfterHold::Execute { seq, .. } => *seq,
            };
            if let Some(m) = self.denied_since(&h, seq).await? {
                info!(hold.id = %h.hold_id, "approved statement not run: the policy denies it now");
                return self.refuse(seq, sqlstate::INSUFFICIENT_PRIVILEGE, m, h.extended, Vec::new()).await;
            }
            let copies_in = h.classification.copies_in;
            match h.then {
                AfterHold::Query { frame, sql, effects, seq } => {
                    self.forward_query(&frame, sql, effects, seq, copies_in)
                }
                AfterHold::Execute { frame, portal, sql, seq } => {
                    self.forward_execute(&frame, &portal, sql, seq, copies_in)
                }
            }
            return Ok(());
        }
        let seq = match &h.then {
            AfterHold::Query { seq, .. } | AfterHold::Execute { seq, .. } => *seq,
        };
        let why = d.reason.map(|r| format!(": {r}")).unwrap_or_default();
        let m = format!(
            "airlock: hold {} was {} by {}{why} (rule \"{}\")",
            d.hold_id, d.outcome, d.decided_by, h.rule
        );
        let code = if cancelled { sqlstate::QUERY_CANCELED } else { sqlstate::INSUFFICIENT_PRIVILEGE };
        self.refuse(seq, code, m, h.extended, Vec::new()).await
    }

    /// One frame from the target.
    async fn on_upstream(&mut self, f: Frame) -> Result<(), SessionError> {
        let f = match self.rules.clone() {
            Some(rules) => match self.mask_upstream(&rules, f).await? {
                Some(f) => f,
                None => return Ok(()),
            },
            None => f,
        };
        if f.tag == b'S' {
            self.lexing.report(&f.body);
        }
        // Asynchronous messages may come at any time.
        if matches!(f.tag, b'N' | b'S' | b'A') {
            self.send_client(&f);
            return Ok(());
        }
        self.emit_locals();
        // The poison was skipped by a target already skipping to Sync: nothing to swallow.
        while f.tag != b'E' && matches!(self.expect.front(), Some(Expect::SwallowError)) {
            self.expect.pop_front();
            self.emit_locals();
        }
        let cap_rows = self.cap_rows;
        let Some(head) = self.expect.front_mut() else {
            return Err(self.refuse_fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("airlock: unexpected message {:?} from the target", f.tag as char),
            ));
        };
        // The target's first word on a `COPY … FROM STDIN`: CopyInResponse, or an error (in a
        // simple query, which may run statements before it, the end of it).
        if let Some(pending) = self.copy_pending {
            let answered = match head {
                Expect::Query(r, _) if r.seq == pending => matches!(f.tag, b'G' | b'E' | b'Z'),
                Expect::Execute(r) => r.seq == pending,
                _ => false,
            };
            if answered {
                self.copy_pending = None;
            }
        }
        if f.tag == b'E' {
            if matches!(head, Expect::SwallowError) {
                self.expect.pop_front();
                return self.skip_failed_pipeline().await;
            }
            let extended = head.extended();
            match head {
                Expect::Query(r, _) | Expect::Execute(r) => {
                    // An error ends a COPY FROM STDIN (the target reads no more of its data).
                    self.copy_in = false;
                    r.error(&f.body)
                }
                _ => {}
            }
            if let Expect::Query(..) | Expect::Sync = head {
                // In a simple query an error ends the statement list; at a Sync, committing the
                // implicit transaction failed (a deferred constraint): ReadyForQuery follows
                // either way, and answers the same entry.
                self.send_client(&f);
                return Ok(());
            }
            let popped = self.expect.pop_front();
            if let Some(Expect::Execute(r)) = popped {
                self.record_response(r).await?;
            }
            self.send_client(&f);
            if extended {
                self.skip_failed_pipeline().await?;
            }
            return Ok(());
        }
        // Each statement completed while DDL is under way may be that DDL: forget what was
        // looked up before it took effect (a name looked up while `CREATE VIEW` waited to run is
        // cached as naming nothing, or as the table it replaces).
        if self.ddl_unanswered && matches!(f.tag, b'C' | b'Z') {
            self.catalog.invalidate();
            self.ddl_unanswered = f.tag != b'Z';
        }
        let mut done = false;
        match (head, f.tag) {
            (Expect::Parse { .. }, b'1') | (Expect::Bind { .. }, b'2') | (Expect::Close { .. }, b'3') => {
                done = true
            }
            (Expect::DescribeStatement { .. }, b't') => {}
            (Expect::DescribeStatement { .. } | Expect::DescribePortal { .. }, b'T' | b'n') => done = true,
            (Expect::Execute(r) | Expect::Query(r, _), b'T') => r.columns(&f.body),
            (Expect::Execute(r) | Expect::Query(r, _), b'D') => r.row(&f.body, cap_rows),
            // COPY TO STDOUT: the row count comes with CommandComplete.
            (Expect::Execute(_) | Expect::Query(..), b'H' | b'd' | b'c') => {}
            (Expect::Execute(_) | Expect::Query(..), b'G') => {
                self.copy_in = true;
                // The target ignores Sync while in COPY FROM STDIN, and any Sync already queued
                // behind this COPY reached it before the client could send CopyDone.
                let head = self.expect.pop_front();
                self.expect.retain(|e| !matches!(e, Expect::Sync));
                if let Some(h) = head {
                    self.expect.push_front(h);
                }
            }
            (Expect::Execute(r), b'C') => {
                r.complete(&f.body);
                let effect = r.effect.take();
                let text = r.sql.clone();
                self.apply_effect(effect, text);
                done = true;
            }
            (Expect::Execute(_), b'I' | b's') => done = true,
            (Expect::Query(r, effects), b'C') => {
                r.complete(&f.body);
                r.next_statement();
                let effect = effects.pop_front();
                let text = r.sql.clone();
                self.apply_effect(effect, text);
            }
            (Expect::Query(..), b'I') => {}
            (Expect::Query(..) | Expect::Sync, b'Z') => {
                self.in_block = f.body.first().is_some_and(|&s| s != b'I');
                done = true
            }
            (Expect::Execute(_) | Expect::Query(..), b'W') => {
                return Err(self.refuse_fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "airlock: COPY BOTH is not supported".into(),
                ));
            }
            (head, tag) => {
                let m = format!(
                    "airlock: unexpected message {:?} from the target (expected a reply to {})",
                    tag as char,
                    head.name()
                );
                return Err(self.refuse_fatal(sqlstate::CONNECTION_FAILURE, m));
            }
        }
        if !done {
            self.send_client(&f);
            return Ok(());
        }
        let Some(entry) = self.expect.pop_front() else { return Ok(()) };
        match entry {
            Expect::Parse { name, stmt } => {
                self.statements.insert(name, stmt);
            }
            Expect::Bind { portal, entry } => {
                // A portal of this name is no longer a cursor the session declared (a Bind of a
                // cursor's name fails, and leaves the cursor, until it is closed).
                self.cursors.remove(&portal);
                self.portals.insert(portal, entry);
            }
            Expect::Close { kind, name } => {
                if kind == b'S' {
                    self.statements.remove(&name);
                } else {
                    self.portals.remove(&name);
                }
            }
            Expect::Execute(r) | Expect::Query(r, _) => {
                // The response is recorded before its last bytes reach the client.
                self.copy_in = false;
                self.record_response(r).await?;
            }
            _ => {}
        }
        if f.tag == b'Z' {
            self.answered_through = self.completed_through;
            // Outside a transaction block the target has dropped every portal, whether a Sync
            // or a Query (a COMMIT, say) ended the block: a name bound before now means nothing,
            // or a cursor declared since.
            if f.body.first() == Some(&b'I') {
                self.portals.clear();
            }
        }
        self.send_client(&f);
        Ok(())
    }

    /// After an extended-protocol error the target skips to the next Sync: so do the answers
    /// the proxy expected, including its own refusals queued meanwhile, and a simple Query
    /// pipelined before that Sync, which the target skips too (never run, so never answered).
    /// When the client has not sent that Sync yet, what it sends until then is skipped by the
    /// target as well, so the proxy drops it unread: forwarded and expected, it would take the
    /// answers of what comes after, and the proxy would mistake one statement for another.
    ///
    /// A read allowed to run before it was recorded (see [`Relay::deferrable`]) may be among
    /// what is skipped, and then nothing would record it, nor let out the answers withheld
    /// from the client until it is: its request is recorded here. (A later statement's early
    /// record is what an undeferred one gets anyway.)
    async fn skip_failed_pipeline(&mut self) -> Result<(), SessionError> {
        loop {
            match self.expect.front() {
                Some(Expect::Sync) => break,
                Some(_) => drop(self.expect.pop_front()),
                None => {
                    self.skip_until_sync = true;
                    break;
                }
            }
        }
        if self.deferred.is_empty() {
            return Ok(());
        }
        self.record(Vec::new()).await
    }

    /// Apply what a statement did to the session's names; `text`: the message it came in.
    fn apply_effect(&mut self, effect: Option<SessionEffect>, text: Option<Arc<str>>) {
        match effect {
            Some(SessionEffect::Prepare(name, c)) => {
                let made_by = text.unwrap_or_else(|| "".into());
                self.statements.insert(
                    name,
                    Prepared { sql: "".into(), made_by, classification: Arc::new(*c), runs_execute: false },
                );
            }
            Some(SessionEffect::Deallocate(Some(name))) => {
                self.statements.remove(&name);
            }
            Some(SessionEffect::Deallocate(None)) => self.statements.clear(),
            Some(SessionEffect::DiscardAll) => {
                self.statements.clear();
                self.portals.clear();
            }
            Some(SessionEffect::Declare(names)) => {
                for n in names {
                    self.portals.remove(&n);
                }
            }
            Some(SessionEffect::Close(Some(name))) => {
                self.portals.remove(&name);
                self.cursors.remove(&name);
            }
            Some(SessionEffect::Close(None)) => {
                self.portals.clear();
                self.cursors.clear();
            }
            // Which portals a ROLLBACK TO dropped is not told: forget them all (an Execute of
            // one made before the savepoint is then of unknown effect, never of the wrong one).
            Some(SessionEffect::EndsPortals) => self.portals.clear(),
            Some(SessionEffect::None) | None => {}
        }
    }
}

/// Could the statement change `search_path` (`SET`, `set_config`, `RESET ALL`, `DISCARD ALL`)?
fn mentions_search_path(sql: &str) -> bool {
    let b = sql.as_bytes();
    let at = |i: usize, word: &[u8]| b.get(i..i + word.len()).is_some_and(|w| w.eq_ignore_ascii_case(word));
    let ident = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'$');
    // `SET SCHEMA 'x'` is PostgreSQL's other spelling of `SET search_path`: the word `schema`
    // on its own (not `information_schema` or `current_schema`) counts too.
    let word = |i: usize, w: &[u8]| {
        at(i, w) && !ident(i.checked_sub(1).and_then(|p| b.get(p))) && !ident(b.get(i + w.len()))
    };
    // One pass: a word is compared only where its first letter is.
    (0..b.len()).any(|i| match b[i].to_ascii_lowercase() {
        b's' => at(i, b"search_path") || word(i, b"schema"),
        b'r' => at(i, b"reset"),
        b'd' => at(i, b"discard"),
        _ => false,
    })
}

fn reserved(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::mentions_search_path;

    #[test]
    fn search_path_is_found_in_any_ascii_case_and_nowhere_else() {
        for sql in [
            "SET Search_Path TO evil, public",
            "select set_config('SEARCH_PATH', 'evil', false)",
            "RESET all",
            "reset SEARCH_path",
            "DiScArD ALL",
            "/* é */ set search_path = x",
            "SET SCHEMA 'evil'",
            "set/**/schema 'evil'",
            "SET\tSchema\n'evil'",
        ] {
            assert!(mentions_search_path(sql), "{sql}");
        }
        for sql in [
            "select 1",
            "select * from orders where id = $1",
            "",
            "sé",
            "search path",
            "rese",
            "select table_name from information_schema.tables",
            "select current_schema()",
            "select schemas from t",
        ] {
            assert!(!mentions_search_path(sql), "{sql}");
        }
    }
}
