//! Events: everything that happens in a session, as past-tense facts inside one [`Envelope`].
//!
//! Events are encoded with `rmp_serde::to_vec_named` (MessagePack with field names), so a field
//! added later with `#[serde(default)]` keeps old recordings readable. Recordings live forever:
//! never rename or remove a field, only add defaulted ones.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod msgpack;

/// The current envelope version.
pub const ENVELOPE_VERSION: u16 = 1;

/// A session id (UUIDv7, so ids sort by start time and carry their date).
pub type SessionId = Uuid;
/// A hold id.
pub type HoldId = Uuid;

/// Microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    pub fn as_micros(self) -> i64 {
        self.0
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_micros(self.0.unsigned_abs())
        }
    }

    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> Self {
        Self(self.0.saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)))
    }

    /// The calendar date (UTC) as `YYYY-MM-DD`.
    pub fn date(self) -> String {
        self.to_string()[..10].to_string()
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }
}

/// The latest instant RFC 3339 can write (9999-12-31T23:59:59.999999Z), in microseconds.
const MAX_RFC3339_MICROS: i64 = 253_402_300_799_999_999;

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // humantime cannot write instants before 1970 or after 9999: clamp rather than panic.
        let t = Timestamp(self.0.clamp(0, MAX_RFC3339_MICROS));
        write!(f, "{}", humantime::format_rfc3339_micros(t.to_system_time()))
    }
}

/// One event, with its identity and session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope format version ([`ENVELOPE_VERSION`]).
    pub v: u16,
    /// Unique event id; consumers deduplicate by it.
    pub id: Uuid,
    /// The session this event belongs to.
    pub session: SessionId,
    /// When it happened.
    pub at: Timestamp,
    pub event: Event,
}

impl Envelope {
    pub fn new(session: SessionId, event: Event) -> Self {
        Self { v: ENVELOPE_VERSION, id: Uuid::now_v7(), session, at: Timestamp::now(), event }
    }

    /// Envelopes for events that happen at once (a statement's request and decision): one
    /// reading of the clock for their times and ids, and one draw of random bits. The ids are
    /// UUIDv7: the millisecond and 74 random bits, whose low 62 the second and later ids count
    /// up from (RFC 9562's "monotonic random"), so they are distinct and sort in event order.
    pub fn stamp_all(session: SessionId, events: Vec<Event>) -> Vec<Self> {
        let now = SystemTime::now();
        let at = Timestamp::from(now);
        let millis = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        // A v4 UUID is 122 random bits: rand_b takes its low 62, rand_a 12 of the next 14 (the
        // two between are its variant).
        let random = Uuid::new_v4().as_u128();
        events
            .into_iter()
            .zip(0u128..)
            .map(|(event, i)| Self {
                v: ENVELOPE_VERSION,
                id: v7(millis, random >> 64, random.wrapping_add(i)),
                session,
                at,
                event,
            })
            .collect()
    }

    /// The NATS subject this envelope is published on.
    pub fn subject(&self) -> String {
        crate::subjects::session_subject(self.session, self.event.kind())
    }
}

/// A UUIDv7 (RFC 9562): the low 48 bits of `millis`, version 7, 12 bits of `rand_a`, the
/// variant, and the low 62 bits of `rand_b`.
fn v7(millis: u128, rand_a: u128, rand_b: u128) -> Uuid {
    Uuid::from_u128(
        ((millis & 0xffff_ffff_ffff) << 80)
            | (0x7 << 76)
            | ((rand_a & 0xfff) << 64)
            | (0b10 << 62)
            | (rand_b & ((1 << 62) - 1)),
    )
}

/// Who is connected: an OIDC subject or a service account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Principal {
    /// The token's `sub` (OIDC) or the service account's name.
    pub subject: String,
    /// Groups from the token's groups claim, or the service account's groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// `oidc` or `service_account`.
    #[serde(default)]
    pub kind: String,
}

impl Principal {
    pub fn in_any_group(&self, groups: &[String]) -> bool {
        groups.iter().any(|g| self.groups.iter().any(|mine| mine == g))
    }
}

/// A policy decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Hold,
    Deny,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decision::Allow => "allow",
            Decision::Hold => "hold",
            Decision::Deny => "deny",
        })
    }
}

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldOutcome {
    Approved,
    Denied,
    /// Nobody decided before the rule's timeout: a denial.
    Expired,
}

impl std::fmt::Display for HoldOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HoldOutcome::Approved => "approved",
            HoldOutcome::Denied => "denied",
            HoldOutcome::Expired => "expired",
        })
    }
}

/// Who may approve a hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ApproverSpec {
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default = "one")]
    pub min: u32,
}

fn one() -> u32 {
    1
}

/// A statement waiting for a human.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldRequest {
    pub hold_id: HoldId,
    /// The request this hold is for (see [`Event::RequestReceived`]).
    pub seq: u64,
    pub connection: String,
    pub principal: Principal,
    /// The requester's e-mail, when its OIDC token carried one the issuer verified: the
    /// approval service knows approvers by e-mail too, and a requester never approves its own
    /// hold under another of its identifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester_email: Option<String>,
    /// The exact statement text the approval binds to.
    pub statement: String,
    /// The bound parameters (extended protocol), as text; binary values as `\x` hex.
    #[serde(default)]
    pub parameters: Vec<Option<String>>,
    /// Hex SHA-256 of the statement and its parameters: what an approval binds to.
    pub fingerprint: String,
    pub rule: String,
    pub reason: String,
    pub approvers: ApproverSpec,
    pub requested_at: Timestamp,
    pub expires_at: Timestamp,
}

/// The end of a hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldDecision {
    pub hold_id: HoldId,
    pub outcome: HoldOutcome,
    /// Who decided (an approver's identity, or the component that expired it).
    pub decided_by: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// A just-in-time access grant: approving an access request (a hold of a rule with `grant:`)
/// lets `principal` run statements under `rule` on `connection` until `until`, in any session.
/// Published on the access request's session as `grant_decided`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantDecision {
    pub grant_id: Uuid,
    /// The access request (hold) this grant answers.
    pub hold_id: HoldId,
    /// The principal's subject (OIDC `sub` or service-account name).
    pub principal: String,
    pub connection: String,
    pub rule: String,
    /// Who granted it (the approvers, comma-separated when `min` > 1).
    pub granted_by: String,
    pub from: Timestamp,
    pub until: Timestamp,
}

/// A grant taken back before its `until`. Published on the access request's session as
/// `grant_revoked`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRevocation {
    pub grant_id: Uuid,
    pub hold_id: HoldId,
    pub revoked_by: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// An error as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// SQLSTATE (or protocol-specific code).
    pub code: String,
    pub message: String,
}

/// The result rows as the client saw them (already masked), capped in size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ResultCapture {
    pub columns: Vec<String>,
    /// Text values; `None` is SQL NULL. Binary-format values are shown as `\x` hex.
    pub rows: Vec<Vec<Option<String>>>,
    /// True when rows were left out because the result exceeded the capture limit.
    #[serde(default)]
    pub truncated: bool,
}

/// Everything that happens in a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    SessionStarted {
        principal: Principal,
        connection: String,
        /// `postgres`, `mysql` or `http`.
        protocol: String,
        client_addr: String,
        /// The proxy node that served it.
        node: String,
        #[serde(default)]
        policy_version: u64,
    },
    SessionEnded {
        /// `client closed`, or what ended it.
        reason: String,
    },
    // The text fields of the two events every statement makes are shared (`Arc`), not owned: a
    // proxy builds them from the statement and the verdict it keeps, without copying either.
    // They encode exactly as strings and arrays do.
    RequestReceived {
        /// The request's number within the session, from 1.
        seq: u64,
        statement: Arc<str>,
        /// Bound parameters (extended protocol), as text; binary values as `\x` hex.
        #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
        parameters: Arc<[Option<String>]>,
    },
    PolicyDecided {
        seq: u64,
        decision: Decision,
        /// The deciding rule, or a default (`defaults.unparsed`, ...).
        rule: Option<Arc<str>>,
        operations: Arc<[String]>,
        tables: Arc<[String]>,
        reason: Arc<str>,
        policy_version: u64,
    },
    /// Boxed: a hold request is several times the size of the events every statement makes,
    /// which are moved from the session to the journal.
    HoldRequested(Box<HoldRequest>),
    HoldDecided(HoldDecision),
    ResponseSent {
        seq: u64,
        /// Rows returned or affected.
        rows: u64,
        duration_us: u64,
        #[serde(default)]
        command_tag: Option<String>,
        #[serde(default)]
        error: Option<ErrorInfo>,
        #[serde(default)]
        result: Option<ResultCapture>,
    },
    /// A just-in-time access grant (an approved access request).
    GrantDecided(GrantDecision),
    /// A grant taken back before it ended.
    GrantRevoked(GrantRevocation),
    /// A policy version was committed in the policy store. Published on its own session (one
    /// per version), so the archive shows who changed what.
    PolicyApplied {
        version: u64,
        author: String,
        /// Hex SHA-256 of the document.
        digest: String,
    },
}

impl Event {
    /// Whether the event may travel inside a batch on [`crate::subjects::BATCH`]. Events that
    /// other components select by subject (holds and grants) never do.
    pub fn batchable(&self) -> bool {
        matches!(
            self,
            Event::SessionStarted { .. }
                | Event::SessionEnded { .. }
                | Event::RequestReceived { .. }
                | Event::PolicyDecided { .. }
                | Event::ResponseSent { .. }
        )
    }

    /// The last token of the event's subject.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::SessionStarted { .. } => "session_started",
            Event::SessionEnded { .. } => "session_ended",
            Event::RequestReceived { .. } => "request",
            Event::PolicyDecided { .. } => "policy_decision",
            Event::HoldRequested(_) => "hold_requested",
            Event::HoldDecided(_) => "hold_decided",
            Event::ResponseSent { .. } => "response",
            Event::GrantDecided(_) => "grant_decided",
            Event::GrantRevoked(_) => "grant_revoked",
            Event::PolicyApplied { .. } => "policy_applied",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encoding event: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding event: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// Encode an envelope as MessagePack with field names.
pub fn encode(e: &Envelope) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::new();
    encode_into(&mut buf, e)?;
    Ok(buf)
}

/// Append `e`, encoded as by [`encode`], to `buf` (as it was on error).
fn encode_into(buf: &mut Vec<u8>, e: &Envelope) -> Result<(), CodecError> {
    if msgpack::encode_into(buf, e) {
        return Ok(());
    }
    let mark = buf.len();
    rmp_serde::encode::write_named(buf, e).map_err(|err| {
        buf.truncate(mark);
        err.into()
    })
}

/// Decode an envelope.
pub fn decode(bytes: &[u8]) -> Result<Envelope, CodecError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

/// Room kept in front of a batch for its MessagePack array header (at most 5 bytes).
const BATCH_HEADER: usize = 5;

/// A batch: several envelopes in one bus message (the proxy's group commit). The payload is a
/// MessagePack array of envelopes, each encoded as by [`encode`]. They are encoded straight
/// into one buffer, behind room for the array header, so a batch costs one allocation and no
/// copy of its envelopes.
pub struct Batch {
    buf: Vec<u8>,
    count: usize,
}

impl Batch {
    /// An empty batch with room for about `bytes` of envelopes.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(BATCH_HEADER + bytes);
        buf.resize(BATCH_HEADER, 0);
        Self { buf, count: 0 }
    }

    /// How many envelopes it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `e` unless that would take the envelopes past `limit` bytes: `Ok(false)` then, and
    /// the batch is as it was. The first envelope is always taken, whatever its size.
    pub fn push_within(&mut self, e: &Envelope, limit: usize) -> Result<bool, CodecError> {
        let mark = self.buf.len();
        encode_into(&mut self.buf, e)?;
        if self.count > 0 && self.buf.len() - BATCH_HEADER > limit {
            self.buf.truncate(mark);
            return Ok(false);
        }
        self.count += 1;
        Ok(true)
    }

    /// The payload: the array header, then the envelopes.
    pub fn finish(self) -> bytes::Bytes {
        let len = self.count;
        let mut header = [0u8; BATCH_HEADER];
        let n = match (u8::try_from(len), u16::try_from(len)) {
            (Ok(n), _) if n < 16 => {
                header[0] = 0x90 | n;
                1
            }
            (_, Ok(n)) => {
                header[0] = 0xdc;
                header[1..3].copy_from_slice(&n.to_be_bytes());
                3
            }
            _ => {
                header[0] = 0xdd;
                header[1..5].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
                5
            }
        };
        let mut buf = self.buf;
        let at = BATCH_HEADER - n;
        buf[at..BATCH_HEADER].copy_from_slice(&header[..n]);
        bytes::Bytes::from(buf).slice(at..)
    }
}

/// Decode a bus message: a single envelope (a MessagePack map) or a batch (an array of them).
pub fn decode_many(bytes: &[u8]) -> Result<Vec<Envelope>, CodecError> {
    decode_each(bytes)?.into_iter().collect()
}

/// [`decode_many`], envelope by envelope: one that does not decode (an event a newer node
/// wrote, say) costs only itself, not the batch it came in. `Err` when the message is not a
/// MessagePack array of whole values at all.
pub fn decode_each(bytes: &[u8]) -> Result<Vec<Result<Envelope, CodecError>>, CodecError> {
    let malformed = || CodecError::Decode(rmp_serde::decode::Error::Syntax("malformed batch".into()));
    let (count, mut at) = match bytes {
        [b @ 0x90..=0x9f, ..] => (usize::from(b & 0x0f), 1),
        [0xdc, a, b, ..] => (usize::from(u16::from_be_bytes([*a, *b])), 3),
        [0xdd, a, b, c, d, ..] => (u32::from_be_bytes([*a, *b, *c, *d]) as usize, 5),
        _ => return Ok(vec![decode(bytes)]),
    };
    let mut out = Vec::with_capacity(count.min(bytes.len()));
    for _ in 0..count {
        let len = msgpack_len(&bytes[at..], 0).ok_or_else(malformed)?;
        out.push(decode(&bytes[at..at + len]));
        at += len;
    }
    if at != bytes.len() {
        return Err(malformed());
    }
    Ok(out)
}

/// How many bytes the MessagePack value at the start of `b` takes, if it is whole (and nested
/// no deeper than 64).
fn msgpack_len(b: &[u8], depth: u8) -> Option<usize> {
    let be = |n: usize| -> Option<usize> {
        let bytes = b.get(1..1 + n)?;
        Some(bytes.iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x)))
    };
    // (header bytes, payload bytes, nested values)
    let (head, body, items): (usize, usize, usize) = match *b.first()? {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (1, 0, 0),
        m @ 0x80..=0x8f => (1, 0, 2 * usize::from(m & 0x0f)),
        a @ 0x90..=0x9f => (1, 0, usize::from(a & 0x0f)),
        s @ 0xa0..=0xbf => (1, usize::from(s & 0x1f), 0),
        0xc4 | 0xd9 => (2, be(1)?, 0),
        0xc5 | 0xda => (3, be(2)?, 0),
        0xc6 | 0xdb => (5, be(4)?, 0),
        0xc7 => (3, be(1)?, 0),
        0xc8 => (4, be(2)?, 0),
        0xc9 => (6, be(4)?, 0),
        0xca => (1, 4, 0),
        0xcb => (1, 8, 0),
        0xcc | 0xd0 => (1, 1, 0),
        0xcd | 0xd1 => (1, 2, 0),
        0xce | 0xd2 => (1, 4, 0),
        0xcf | 0xd3 => (1, 8, 0),
        0xd4 => (2, 1, 0),
        0xd5 => (2, 2, 0),
        0xd6 => (2, 4, 0),
        0xd7 => (2, 8, 0),
        0xd8 => (2, 16, 0),
        0xdc => (3, 0, be(2)?),
        0xdd => (5, 0, be(4)?),
        0xde => (3, 0, 2 * be(2)?),
        0xdf => (5, 0, 2 * be(4)?),
        0xc1 => return None,
    };
    let mut at = head.checked_add(body)?;
    if at > b.len() {
        return None;
    }
    if items > 0 {
        if depth >= 64 {
            return None;
        }
        for _ in 0..items {
            at += msgpack_len(b.get(at..)?, depth + 1)?;
        }
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One envelope that does not decode costs only itself; a message that is not whole
    /// MessagePack is refused, without a panic.
    #[test]
    fn a_batch_is_decoded_envelope_by_envelope() {
        let envs: Vec<Envelope> =
            samples().into_iter().map(|e| Envelope::new(uuid::Uuid::now_v7(), e)).collect();
        let mut batch = Batch::with_capacity(0);
        for e in &envs {
            assert!(batch.push_within(e, usize::MAX).unwrap());
        }
        let whole = batch.finish();
        let got = decode_each(&whole).unwrap();
        assert_eq!(got.len(), envs.len());
        assert!(got.iter().zip(&envs).all(|(g, e)| g.as_ref().ok() == Some(e)));
        // A foreign value between two envelopes (a map of an unknown shape).
        let one = encode(&envs[0]).unwrap();
        let foreign: &[u8] = &[0x81, 0xa1, b'x', 0xcd, 0x01, 0x00];
        let mixed = [&[0x93][..], &one, foreign, &one].concat();
        let got = decode_each(&mixed).unwrap();
        assert_eq!(got.len(), 3);
        assert!(got[0].is_ok() && got[1].is_err() && got[2].is_ok());
        assert!(decode_many(&mixed).is_err(), "all or nothing for decode_many");
        // Truncated anywhere, trailing bytes, absurd counts and nesting: errors, never panics.
        for cut in 1..whole.len() {
            assert!(decode_each(&whole[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_each(&[&whole[..], &[0xc0]].concat()).is_err());
        assert!(decode_each(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0]).is_err());
        let deep = [vec![0x91; 10_000], vec![0xc0]].concat();
        assert!(decode_each(&[&[0x91][..], &deep].concat()).is_err());
    }

    fn samples() -> Vec<Event> {
        let p = Principal { subject: "agent-1".into(), groups: vec!["agents".into()], kind: "oidc".into() };
        vec![
            Event::SessionStarted {
                principal: p.clone(),
                connection: "shop".into(),
                protocol: "postgres".into(),
                client_addr: "127.0.0.1:5555".into(),
                node: "n1".into(),
                policy_version: 3,
            },
            Event::RequestReceived { seq: 1, statement: "select 1".into(), parameters: Arc::new([]) },
            Event::RequestReceived {
                seq: 2,
                statement: "select $1".into(),
                parameters: Arc::new([Some("7".into()), None]),
            },
            Event::PolicyDecided {
                seq: 1,
                decision: Decision::Hold,
                rule: Some("r".into()),
                operations: Arc::new(["delete".into()]),
                tables: Arc::new(["orders".into()]),
                reason: "matched".into(),
                policy_version: 3,
            },
            Event::HoldRequested(Box::new(HoldRequest {
                hold_id: Uuid::nil(),
                seq: 1,
                connection: "shop".into(),
                principal: p,
                requester_email: None,
                statement: "delete from orders".into(),
                parameters: vec![],
                fingerprint: "ab".into(),
                rule: "r".into(),
                reason: "x".into(),
                approvers: ApproverSpec { groups: vec!["dba".into()], min: 1 },
                requested_at: Timestamp(1),
                expires_at: Timestamp(2),
            })),
            Event::HoldDecided(HoldDecision {
                hold_id: Uuid::nil(),
                outcome: HoldOutcome::Expired,
                decided_by: "approval-service".into(),
                reason: None,
            }),
            Event::ResponseSent {
                seq: 1,
                rows: 2,
                duration_us: 10,
                command_tag: Some("SELECT 2".into()),
                error: None,
                result: Some(ResultCapture {
                    columns: vec!["a".into()],
                    rows: vec![vec![Some("1".into())], vec![None]],
                    truncated: false,
                }),
            },
            Event::SessionEnded { reason: "client closed".into() },
        ]
    }

    #[test]
    fn every_event_round_trips_with_field_names() {
        for ev in samples() {
            let env = Envelope::new(Uuid::now_v7(), ev);
            let bytes = encode(&env).expect("encode");
            assert_eq!(decode(&bytes).expect("decode"), env);
            // Field names are on the wire, not positions.
            let as_value: rmpv_like::Value = rmp_serde::from_slice(&bytes).expect("generic");
            assert!(as_value.0.contains_key("session"));
        }
    }

    #[test]
    fn unknown_fields_from_newer_versions_are_ignored() {
        #[derive(Serialize)]
        struct Newer {
            v: u16,
            id: Uuid,
            session: Uuid,
            at: i64,
            event: Event,
            added_later: String,
        }
        let n = Newer {
            v: 2,
            id: Uuid::nil(),
            session: Uuid::nil(),
            at: 5,
            event: Event::SessionEnded { reason: "x".into() },
            added_later: "y".into(),
        };
        let bytes = rmp_serde::to_vec_named(&n).expect("encode");
        let env = decode(&bytes).expect("decode newer envelope");
        assert_eq!(env.at, Timestamp(5));
    }

    /// The shared (`Arc`) text fields of the per-statement events encode byte for byte as the
    /// owned strings and vectors they were before, so archives written by either read the same.
    #[test]
    fn shared_text_fields_encode_as_owned_ones_did() {
        #[derive(Serialize)]
        #[serde(rename_all = "snake_case")]
        enum Owned {
            RequestReceived {
                seq: u64,
                statement: String,
                #[serde(skip_serializing_if = "Vec::is_empty")]
                parameters: Vec<Option<String>>,
            },
            PolicyDecided {
                seq: u64,
                decision: Decision,
                rule: Option<String>,
                operations: Vec<String>,
                tables: Vec<String>,
                reason: String,
                policy_version: u64,
            },
        }
        let pairs = [
            (
                Owned::RequestReceived {
                    seq: 3,
                    statement: "select $1".into(),
                    parameters: vec![Some("7".into()), None],
                },
                Event::RequestReceived {
                    seq: 3,
                    statement: "select $1".into(),
                    parameters: Arc::new([Some("7".into()), None]),
                },
            ),
            (
                Owned::RequestReceived { seq: 4, statement: "select 1".into(), parameters: vec![] },
                Event::RequestReceived { seq: 4, statement: "select 1".into(), parameters: Arc::new([]) },
            ),
            (
                Owned::PolicyDecided {
                    seq: 3,
                    decision: Decision::Deny,
                    rule: Some("no-ddl".into()),
                    operations: vec!["drop".into()],
                    tables: vec!["public.orders".into(), "users".into()],
                    reason: "matched".into(),
                    policy_version: 9,
                },
                Event::PolicyDecided {
                    seq: 3,
                    decision: Decision::Deny,
                    rule: Some("no-ddl".into()),
                    operations: Arc::new(["drop".into()]),
                    tables: Arc::new(["public.orders".into(), "users".into()]),
                    reason: "matched".into(),
                    policy_version: 9,
                },
            ),
        ];
        for (owned, shared) in pairs {
            let old = rmp_serde::to_vec_named(&owned).expect("encode owned");
            assert_eq!(rmp_serde::to_vec_named(&shared).expect("encode shared"), old);
            let back: Event = rmp_serde::from_slice(&old).expect("decode an owned encoding");
            assert_eq!(back, shared);
        }
    }

    #[test]
    fn batches_of_every_size_class_round_trip_and_singles_still_decode() {
        // fixarray (< 16), array16 and array32 headers.
        for n in [0usize, 1, 15, 16, 300, 70_000] {
            let envs: Vec<Envelope> = (0..n)
                .map(|i| Envelope::new(Uuid::now_v7(), Event::SessionEnded { reason: format!("r{i}") }))
                .collect();
            let mut batch = Batch::with_capacity(0);
            for e in &envs {
                assert!(batch.push_within(e, usize::MAX).expect("encode"));
            }
            assert_eq!(batch.len(), n);
            assert_eq!(decode_many(&batch.finish()).expect("decode batch"), envs, "batch of {n}");
        }
        // Past the limit an envelope is refused and the batch stays as it was; the first one
        // is taken whatever its size.
        let big = Envelope::new(Uuid::now_v7(), Event::SessionEnded { reason: "x".repeat(100) });
        let small = Envelope::new(Uuid::now_v7(), Event::SessionEnded { reason: "y".into() });
        let mut batch = Batch::with_capacity(16);
        assert!(batch.push_within(&big, 10).expect("encode"));
        assert!(!batch.push_within(&small, 10).expect("encode"));
        assert_eq!(decode_many(&batch.finish()).expect("decode"), vec![big.clone()]);
        let mut batch = Batch::with_capacity(16);
        let one = encode(&small).expect("encode").len();
        assert!(batch.push_within(&small, 2 * one).expect("encode"));
        assert!(batch.push_within(&small, 2 * one).expect("encode"));
        assert!(!batch.push_within(&small, 2 * one).expect("encode"));
        assert_eq!(batch.len(), 2);
        let one = Envelope::new(Uuid::now_v7(), Event::SessionEnded { reason: "x".into() });
        assert_eq!(decode_many(&encode(&one).expect("encode")).expect("single"), vec![one]);
        // A batch header that promises more than it holds is an error.
        assert!(decode_many(b"\x93\x80").is_err());
        assert!(decode_many(b"").is_err());
    }

    #[test]
    fn events_stamped_together_share_their_time_and_get_distinct_v7_ids() {
        let session = Uuid::now_v7();
        let events = (0..1000).map(|i| Event::SessionEnded { reason: format!("r{i}") }).collect();
        let before = Timestamp::now();
        let envs = Envelope::stamp_all(session, events);
        let after = Timestamp::now();
        assert_eq!(envs.len(), 1000);
        let ids: std::collections::HashSet<Uuid> = envs.iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), 1000, "ids are unique");
        assert!(envs.windows(2).all(|w| w[0].id < w[1].id), "ids sort in event order");
        // Each call draws its own random bits.
        let again = Envelope::stamp_all(session, vec![Event::SessionEnded { reason: "x".into() }]);
        assert!(!ids.contains(&again[0].id));
        for e in &envs {
            assert_eq!(e.session, session);
            assert_eq!(e.at, envs[0].at);
            assert!(before <= e.at && e.at <= after);
            assert_eq!(e.id.get_version_num(), 7);
            assert_eq!(e.id.get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = e.id.get_timestamp().expect("v7 carries its time").to_unix();
            let id_ms = secs as i64 * 1000 + i64::from(nanos) / 1_000_000;
            assert_eq!(id_ms, e.at.as_micros() / 1000, "the id's time is the event's");
        }
        assert!(Envelope::stamp_all(session, vec![]).is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(b"\xff\x00garbage").is_err());
        assert!(decode(b"").is_err());
    }

    #[test]
    fn out_of_range_timestamps_format_without_panicking() {
        assert!(Timestamp(i64::MIN).to_string().starts_with("1970-01-01"));
        assert!(Timestamp(i64::MAX).to_string().starts_with("9999-12-31"));
        assert_eq!(Timestamp(-5).date(), "1970-01-01");
    }

    #[test]
    fn timestamps_format_and_date() {
        let t = Timestamp(1_764_288_000_000_000); // 2025-11-28T00:00:00Z
        assert_eq!(t.date(), "2025-11-28");
        assert!(t.to_string().starts_with("2025-11-28T00:00:00"));
    }

    /// Decode any MessagePack map's keys, to check field names are written.
    mod rmpv_like {
        use std::collections::BTreeMap;

        #[derive(serde::Deserialize)]
        pub(super) struct Value(pub(super) BTreeMap<String, serde::de::IgnoredAny>);
    }
}
