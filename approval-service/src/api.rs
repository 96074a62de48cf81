//! The REST API and its JSON types (shared with [`crate::client`]).
//!
//! - `GET /healthz` → `ok`
//! - `GET /v1/holds` → `[PendingHold]`, oldest first
//! - `GET /v1/holds/{id}` → `PendingHold`
//! - `POST /v1/holds/{id}/approve`, body optional `{"approver": "alice", "duration": "2h"}` →
//!   `DecisionView` (`outcome: null` while the rule's `min` approvals are not reached; `duration`
//!   is the grant's length for an access request, capped at the rule's `grant.max`)
//! - `POST /v1/holds/{id}/deny`, body `{"reason": "...", "approver": "alice"}` → `DecisionView`
//! - `GET /v1/grants` → `[GrantView]` (active just-in-time grants)
//! - `POST /v1/grants/{id}/revoke`, body optional `{"reason": "..."}` → `GrantView`
//!
//! Every `/v1` route requires `Authorization: Bearer <token>`: either a known approver's OIDC
//! token (a JWT from `approvals.oidc` whose holder some approver group or
//! `[[approvals.approvers]]` entry lists, see [`crate::approver`]; the caller acts as its `sub`,
//! with its groups, and must satisfy the rule's approver groups and `min`), or the break-glass
//! admin token (which decides at once and may name the approver it acts for). A valid token of
//! anyone else, such as an agent's, gets 403 on every route: it may not even list holds. Errors
//! are JSON `{"error": "..."}` with 400 (bad input), 401 (token), 403 (not allowed), 404 (not
//! pending), 409 (already approved by you, or expired) or 503 (the decision could not be
//! published or stored, or the policy that says who approves has not been read yet).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use proto::events::{HoldOutcome, Timestamp};
use proxy_node::identity::OidcVerifier;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tracing::{info, warn};
use uuid::Uuid;

use crate::HoldError;
use crate::approver::{Directory, NotApprover};
use crate::hold::{Decided, Decider, Hold, Holds};
use crate::store::{Change, Status};

/// Longest approver name accepted.
const MAX_APPROVER_LEN: usize = 200;
/// Longest reason accepted.
const MAX_REASON_LEN: usize = 4000;

/// Who is held, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrincipalView {
    pub subject: String,
    pub groups: Vec<String>,
}

/// A pending hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingHold {
    pub id: Uuid,
    pub session: Uuid,
    pub connection: String,
    pub principal: PrincipalView,
    pub statement: String,
    /// The statement's bound parameters (extended protocol), `$1` first, exactly as the proxy
    /// will bind them: text as is, `null` for SQL NULL, and binary or non-UTF-8 values as `\x`
    /// followed by hex. An approval is for the statement with exactly these values.
    #[serde(default)]
    pub parameters: Vec<Option<String>>,
    pub rule: String,
    pub reason: String,
    /// RFC 3339.
    #[serde(with = "rfc3339")]
    pub requested_at: Timestamp,
    /// RFC 3339.
    #[serde(with = "rfc3339")]
    pub expires_at: Timestamp,
    /// Who has approved so far.
    #[serde(default)]
    pub approvals: Vec<String>,
    /// Approvals needed.
    #[serde(default = "one")]
    pub min: u32,
    /// Groups whose members may approve (empty: any known approver).
    #[serde(default)]
    pub approver_groups: Vec<String>,
}

fn one() -> u32 {
    1
}

/// A character a reader would not see, or would take for another: what Rust's Debug escapes
/// (controls, format characters such as bidi overrides and zero-width spaces, unassigned code
/// points, combining marks), and the default-ignorable and blank letters it does not (Hangul
/// fillers, variation selectors, tags, the braille blank).
pub fn invisible(c: char) -> bool {
    (c.escape_debug().nth(1).is_some() && !matches!(c, '\\' | '\'' | '"'))
        || matches!(
            u32::from(c),
            0x034F
                | 0x115F
                | 0x1160
                | 0x17B4
                | 0x17B5
                | 0x180B..=0x180F
                | 0x2800
                | 0x3164
                | 0xFE00..=0xFE0F
                | 0xFFA0
                | 0xE0000..=0xE0FFF
        )
}

/// `text` with every [`invisible`] character but newlines and tabs shown as `\u{XXXX}`: a
/// statement as an approver must read it (a bidi override can make text read backwards).
pub fn visible(text: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write as _;
    let shown = |c: char| matches!(c, '\n' | '\t') || !invisible(c);
    if text.chars().all(shown) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if shown(c) {
            out.push(c);
        } else {
            let _ = write!(out, "\\u{{{:04X}}}", u32::from(c));
        }
    }
    out.into()
}

/// A bound parameter as an approver should read it, in SQL: `NULL` for SQL NULL (the text
/// `'NULL'` is quoted); text as a literal (`'it''s'`), or as an escape-string literal
/// (`E'a\nb\u202E'`) when it holds a character a reader would not see (control and format
/// characters, bidi overrides, zero-width and non-ASCII spaces); and `\x` hex, which is how the
/// proxy passes binary and non-UTF-8 values, marked as bytes. Text that begins with a backslash
/// the proxy passes with one more in front (so that the text `\x41` never reads as the byte
/// `A`): it is shown without it, marked as text.
pub fn parameter_literal(value: Option<&str>) -> String {
    use std::fmt::Write as _;
    let Some(v) = value else { return "NULL".to_string() };
    if let Some(text) = v.strip_prefix('\\').filter(|t| t.starts_with('\\')) {
        return format!("{} (text, not bytes)", text_literal(text));
    }
    let mut out = text_literal(v);
    let hex =
        v.strip_prefix("\\x").is_some_and(|h| h.len() % 2 == 0 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if hex {
        let _ = write!(out, " ({} bytes, hex: binary or not UTF-8)", (v.len() - 2) / 2);
    }
    out
}

/// Text as an SQL literal: `'it''s'`, or `E'a\nb'` when it holds a character a reader would not
/// see.
fn text_literal(v: &str) -> String {
    use std::fmt::Write as _;
    // `escape_debug` escapes what Rust's Debug considers unprintable (controls, format
    // characters, unassigned code points, combining marks); whitespace other than a space is
    // invisible too.
    let hidden = |c: char| c != ' ' && (c.is_whitespace() || invisible(c));
    let mut out = String::new();
    if v.chars().any(hidden) {
        out.push_str("E'");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\'' => out.push_str("\\'"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if hidden(c) && u32::from(c) <= 0xFFFF => {
                    let _ = write!(out, "\\u{:04X}", u32::from(c));
                }
                c if hidden(c) => {
                    let _ = write!(out, "\\U{:08X}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        out.push('\'');
    } else {
        out.push('\'');
        out.push_str(&v.replace('\'', "''"));
        out.push('\'');
    }
    out
}

impl From<Hold> for PendingHold {
    fn from(h: Hold) -> Self {
        let r = h.request;
        Self {
            id: r.hold_id,
            session: h.session,
            connection: r.connection,
            principal: PrincipalView { subject: r.principal.subject, groups: r.principal.groups },
            statement: r.statement,
            parameters: r.parameters,
            rule: r.rule,
            reason: r.reason,
            requested_at: r.requested_at,
            expires_at: r.expires_at,
            approvals: h.approvals,
            min: r.approvers.min.max(1),
            approver_groups: r.approvers.groups,
        }
    }
}

/// The result of a vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionView {
    pub hold_id: Uuid,
    pub session: Uuid,
    /// `None` while the hold needs more approvals.
    pub outcome: Option<HoldOutcome>,
    /// Who decided (empty while pending).
    pub decided_by: String,
    #[serde(default)]
    pub reason: Option<String>,
    /// Who has approved so far.
    #[serde(default)]
    pub approvals: Vec<String>,
    /// Approvals needed.
    #[serde(default = "one")]
    pub min: u32,
    /// When the hold was an access request: the grant's end (RFC 3339).
    #[serde(default)]
    pub grant_until: Option<String>,
}

impl DecisionView {
    fn new(hold_id: Uuid, d: Decided) -> Self {
        Self {
            hold_id,
            session: d.session,
            outcome: d.decision.as_ref().map(|x| x.outcome),
            decided_by: d.decision.as_ref().map(|x| x.decided_by.clone()).unwrap_or_default(),
            reason: d.decision.and_then(|x| x.reason),
            approvals: d.approvals,
            min: d.min,
            grant_until: d.grant.map(|g| g.until.to_string()),
        }
    }
}

/// The body of `approve` and `deny`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideBody {
    /// Who decides (admin token only; an OIDC caller is its token's `sub`); default `admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
    /// Why; required to deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// An access request's grant length (`2h`); default and cap: the rule's `grant.max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
}

/// A just-in-time grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    pub grant_id: Uuid,
    pub hold_id: Uuid,
    pub principal: String,
    pub connection: String,
    pub rule: String,
    pub granted_by: String,
    /// RFC 3339.
    pub until: String,
    #[serde(default)]
    pub revoked: Option<String>,
}

impl GrantView {
    fn of(rec: &crate::store::HoldRecord) -> Option<Self> {
        let d = crate::grant::decision(rec)?;
        Some(Self {
            grant_id: d.grant_id,
            hold_id: d.hold_id,
            principal: d.principal,
            connection: d.connection,
            rule: d.rule,
            granted_by: d.granted_by,
            until: d.until.to_string(),
            revoked: rec.grant.as_ref().and_then(|g| g.revoked.clone()),
        })
    }
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// RFC 3339 strings for [`Timestamp`]s.
mod rfc3339 {
    use proto::events::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    /// The range RFC 3339 formatting handles (1970 to 9999); `Timestamp`'s `Display` panics
    /// before 1970 and fails after 9999, so out-of-range values (bad input) are clamped.
    const MAX_MICROS: i64 = 253_402_300_799_999_999;

    pub(super) fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&Timestamp(t.as_micros().clamp(0, MAX_MICROS)))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s).map(Timestamp::from).map_err(serde::de::Error::custom)
    }
}

/// How long an approver's call waits for the first policy version (for its `approver_groups`).
const POLICY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Clone)]
struct AppState {
    holds: Arc<Holds>,
    token: Option<Arc<str>>,
    oidc: Option<Arc<OidcVerifier>>,
    directory: Arc<Directory>,
}

/// Who is calling, from the bearer token.
#[derive(Debug, Clone)]
enum Caller {
    Admin,
    /// A known approver: always a [`Decider::Approver`].
    Approver(Decider),
}

/// The service's REST routes: `token` is the break-glass admin token, `oidc` checks approvers'
/// tokens, and `directory` says which token holders are approvers.
pub fn router(
    holds: Arc<Holds>,
    token: Option<Arc<str>>,
    oidc: Option<Arc<OidcVerifier>>,
    directory: Arc<Directory>,
) -> Router {
    let state = AppState { holds, token, oidc, directory };
    let v1 = Router::new()
        .route("/holds", get(list))
        .route("/holds/{id}", get(show))
        .route("/holds/{id}/approve", post(approve))
        .route("/holds/{id}/deny", post(deny))
        .route("/grants", get(grants))
        .route("/grants/{id}/revoke", post(revoke))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .fallback(not_found);
    Router::new().route("/healthz", get(healthz)).nest("/v1", v1).fallback(not_found).with_state(state)
}

/// An API error: a status and a message.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(ErrorBody { error: self.1 })).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<HoldError> for ApiError {
    fn from(e: HoldError) -> Self {
        let status = match e {
            HoldError::NotFound(_) => StatusCode::NOT_FOUND,
            HoldError::Busy(_) | HoldError::Expired(_) => StatusCode::CONFLICT,
            HoldError::AlreadyApproved { .. } => StatusCode::CONFLICT,
            HoldError::NotAllowed { .. } => StatusCode::FORBIDDEN,
            HoldError::Publish { .. } | HoldError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self(status, e.to_string())
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

async fn require_token(
    State(st): State<AppState>,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(given) = given.filter(|t| !t.is_empty()) else {
        return ApiError(StatusCode::UNAUTHORIZED, "missing bearer token".into()).into_response();
    };
    let caller = if st.token.as_ref().is_some_and(|t| bool::from(given.as_bytes().ct_eq(t.as_bytes()))) {
        Caller::Admin
    } else if let Some(v) = &st.oidc
        && given.matches('.').count() == 2
    {
        match v.verify_with_email(given).await {
            Ok((p, email)) => {
                // Group membership may come from the policy: let a starting service get it first.
                st.holds.routes().ready(POLICY_WAIT).await;
                match st.directory.by_token(&p, email.as_deref(), st.holds.routes()) {
                    Ok(d) => Caller::Approver(d),
                    Err(NotApprover::Unknown) => {
                        warn!(subject = %p.subject, "a valid token of someone who is not an approver was refused");
                        return ApiError(
                            StatusCode::FORBIDDEN,
                            format!("{} is not a known approver", p.subject),
                        )
                        .into_response();
                    }
                    Err(NotApprover::PolicyNotLoaded) => {
                        return ApiError(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the policy (approver groups) has not been read yet; try again".into(),
                        )
                        .into_response();
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "rejected an approver token");
                return ApiError(StatusCode::UNAUTHORIZED, "invalid bearer token".into()).into_response();
            }
        }
    } else {
        return ApiError(StatusCode::UNAUTHORIZED, "invalid bearer token".into()).into_response();
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

fn decider(caller: Caller, named: Option<String>) -> Result<Decider, ApiError> {
    match caller {
        Caller::Admin => Ok(Decider::Admin { approver: named }),
        Caller::Approver(d) => match named {
            Some(n) if n != d.identity() => Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "you are {}; an approver's identity comes from its token, not the body",
                    d.identity()
                ),
            )),
            _ => Ok(d),
        },
    }
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("reading holds: {e}"))
}

async fn healthz() -> &'static str {
    "ok"
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such route".into())
}

async fn list(State(st): State<AppState>) -> Result<Json<Vec<PendingHold>>, ApiError> {
    let holds = st.holds.pending().await.map_err(unavailable)?;
    Ok(Json(holds.into_iter().map(PendingHold::from).collect()))
}

async fn show(State(st): State<AppState>, Path(id): Path<String>) -> Result<Json<PendingHold>, ApiError> {
    let id = parse_id(&id)?;
    match st.holds.get(id).await.map_err(unavailable)? {
        Some(h) => Ok(Json(h.into())),
        None => Err(HoldError::NotFound(id).into()),
    }
}

async fn approve(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DecisionView>, ApiError> {
    let id = parse_id(&id)?;
    let body = parse_body(&body)?;
    let decider = decider(caller, approver(body.approver)?)?;
    let reason = optional_text("reason", body.reason, MAX_REASON_LEN)?;
    let duration = match optional_text("duration", body.duration, 64)? {
        Some(d) => Some(
            humantime::parse_duration(&d).map_err(|e| bad_request(format!("duration {d:?}: {e}"))).and_then(
                |d| if d.is_zero() { Err(bad_request("duration must be positive")) } else { Ok(d) },
            )?,
        ),
        None => None,
    };
    let decided = st.holds.decide_for(id, HoldOutcome::Approved, &decider, reason, duration).await?;
    Ok(Json(DecisionView::new(id, decided)))
}

async fn deny(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DecisionView>, ApiError> {
    let id = parse_id(&id)?;
    let body = parse_body(&body)?;
    let decider = decider(caller, approver(body.approver)?)?;
    let reason = optional_text("reason", body.reason, MAX_REASON_LEN)?
        .ok_or_else(|| bad_request("a denial needs a reason: {\"reason\": \"...\"}"))?;
    let decided = st.holds.decide(id, HoldOutcome::Denied, &decider, Some(reason)).await?;
    Ok(Json(DecisionView::new(id, decided)))
}

async fn grants(State(st): State<AppState>) -> Result<Json<Vec<GrantView>>, ApiError> {
    let now = Timestamp::now();
    let mut out: Vec<GrantView> = st
        .holds
        .records()
        .await
        .map_err(unavailable)?
        .iter()
        .filter(|r| r.status == Status::Approved)
        .filter(|r| r.grant.as_ref().is_some_and(|g| g.revoked.is_none() && g.until > now))
        .filter_map(GrantView::of)
        .collect();
    out.sort_by(|a, b| a.until.cmp(&b.until));
    Ok(Json(out))
}

async fn revoke(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<GrantView>, ApiError> {
    let grant_id = parse_id(&id)?;
    let body = parse_body(&body)?;
    let reason = optional_text("reason", body.reason, MAX_REASON_LEN)?;
    let who = match &caller {
        Caller::Admin => approver(body.approver)?.unwrap_or_else(|| "admin".into()),
        Caller::Approver(d) => d.identity(),
    };
    let records = st.holds.records().await.map_err(unavailable)?;
    let rec = records
        .into_iter()
        .find(|r| r.grant.as_ref().is_some_and(|g| g.grant_id == grant_id))
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no grant {grant_id}")))?;
    if let Caller::Approver(d) = &caller {
        d.check(&rec.request, HoldOutcome::Denied).map_err(|why| {
            ApiError(StatusCode::FORBIDDEN, format!("{} may not revoke this grant: {why}", d.identity()))
        })?;
    }
    let hold = rec.id();
    let changed = st
        .holds
        .modify(hold, |r| match r.grant.as_mut() {
            Some(g) if g.revoked.is_none() => {
                g.revoked = Some(who.clone());
                Ok(Change::Write(true))
            }
            _ => Ok(Change::Keep(false)),
        })
        .await
        .map_err(unavailable)?;
    let Some((changed, rec)) = changed else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no grant {grant_id}")));
    };
    if changed {
        info!(
            hold.id = %hold, grant.id = %grant_id, revoked_by = %who,
            reason = reason.as_deref().unwrap_or(""), "grant revoked"
        );
    }
    // Tell the proxies (idempotent: the event id is derived from the hold).
    if let Some(env) = crate::grant::revocation(&rec, reason) {
        st.holds.publish_event(&env).await.map_err(unavailable)?;
    }
    GrantView::of(&rec)
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no grant {grant_id}")))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| bad_request(format!("not a hold id: {id:?}")))
}

/// An empty body is an empty [`DecideBody`].
fn parse_body(body: &[u8]) -> Result<DecideBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DecideBody::default());
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

fn approver(name: Option<String>) -> Result<Option<String>, ApiError> {
    optional_text("approver", name, MAX_APPROVER_LEN)
}

/// A trimmed, non-empty, bounded text field; blank counts as absent.
fn optional_text(field: &str, v: Option<String>, max: usize) -> Result<Option<String>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if v.len() > max {
        return Err(bad_request(format!("{field} is longer than {max} bytes")));
    }
    if v.chars().any(char::is_control) {
        return Err(bad_request(format!("{field} contains control characters")));
    }
    Ok(Some(v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_hold_timestamps_are_rfc3339_and_round_trip() {
        let h = PendingHold {
            id: Uuid::nil(),
            session: Uuid::nil(),
            connection: "shop".into(),
            principal: PrincipalView { subject: "a".into(), groups: vec![] },
            statement: "delete from t".into(),
            parameters: vec![],
            rule: "r".into(),
            reason: "x".into(),
            requested_at: Timestamp(1_764_288_000_000_000),
            expires_at: Timestamp(1_764_288_300_123_456),
            approvals: vec![],
            min: 1,
            approver_groups: vec![],
        };
        let json = serde_json::to_value(&h).unwrap();
        assert_eq!(json["requested_at"], "2025-11-28T00:00:00.000000Z");
        assert_eq!(json["expires_at"], "2025-11-28T00:05:00.123456Z");
        assert_eq!(serde_json::from_value::<PendingHold>(json).unwrap(), h);
    }

    #[test]
    fn out_of_range_timestamps_are_clamped_not_a_panic() {
        let h = PendingHold {
            id: Uuid::nil(),
            session: Uuid::nil(),
            connection: "shop".into(),
            principal: PrincipalView { subject: "a".into(), groups: vec![] },
            statement: String::new(),
            parameters: vec![],
            rule: "r".into(),
            reason: "x".into(),
            requested_at: Timestamp(-5),
            expires_at: Timestamp(i64::MAX),
            approvals: vec![],
            min: 1,
            approver_groups: vec![],
        };
        let json = serde_json::to_value(&h).unwrap();
        assert_eq!(json["requested_at"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(json["expires_at"], "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn parameters_read_as_sql_with_nulls_bytes_and_hidden_characters_marked() {
        assert_eq!(parameter_literal(None), "NULL");
        assert_eq!(parameter_literal(Some("NULL")), "'NULL'");
        assert_eq!(parameter_literal(Some("admin")), "'admin'");
        assert_eq!(parameter_literal(Some("it's \\d")), "'it''s \\d'");
        assert_eq!(parameter_literal(Some("")), "''");
        assert_eq!(parameter_literal(Some("ad\u{200b}min")), "E'ad\\u200Bmin'");
        assert_eq!(parameter_literal(Some("a\nb'\\\u{202e}\u{a0}")), "E'a\\nb\\'\\\\\\u202E\\u00A0'");
        assert_eq!(parameter_literal(Some("x\u{e0001}")), "E'x\\U000E0001'");
        assert_eq!(
            parameter_literal(Some("\\xdeadbeef")),
            "'\\xdeadbeef' (4 bytes, hex: binary or not UTF-8)"
        );
        assert_eq!(parameter_literal(Some("\\xdea")), "'\\xdea'", "not whole bytes: text");
        // Text that begins with a backslash comes with one more in front: never read as bytes.
        assert_eq!(parameter_literal(Some("\\\\x41")), "'\\x41' (text, not bytes)");
        assert_eq!(parameter_literal(Some("\\x41")), "'\\x41' (1 bytes, hex: binary or not UTF-8)");
        assert_eq!(parameter_literal(Some("\\\\\\x41")), "'\\\\x41' (text, not bytes)");
        assert_eq!(parameter_literal(Some("\\\\a\n")), "E'\\\\a\\n' (text, not bytes)");
        assert_eq!(parameter_literal(Some("héllo 😀")), "'héllo 😀'", "printable text stays as is");
        // Blank letters and default-ignorable code points that Debug prints as they are.
        for c in ['\u{115f}', '\u{1160}', '\u{3164}', '\u{ffa0}', '\u{2800}', '\u{fe0f}', '\u{34f}'] {
            let shown = parameter_literal(Some(&format!("admin{c}")));
            assert_eq!(shown, format!("E'admin\\u{:04X}'", u32::from(c)), "{c:?}");
        }
    }

    #[test]
    fn statements_show_what_a_reader_would_not_see() {
        assert_eq!(visible("SELECT 1\n\tFROM t"), "SELECT 1\n\tFROM t");
        assert_eq!(visible("DELETE FROM t /* \u{202e}x */"), "DELETE FROM t /* \\u{202E}x */");
        assert_eq!(visible("a\u{3164}b\rc"), "a\\u{3164}b\\u{000D}c");
    }

    #[test]
    fn decide_bodies_are_checked() {
        assert_eq!(parse_body(b"").unwrap(), DecideBody::default());
        assert_eq!(parse_body(b" \n").unwrap(), DecideBody::default());
        assert_eq!(parse_body(br#"{"approver":"alice"}"#).unwrap().approver.as_deref(), Some("alice"));
        assert_eq!(parse_body(b"{not json").unwrap_err().0, StatusCode::BAD_REQUEST);
        assert_eq!(parse_body(br#"{"approvr":"x"}"#).unwrap_err().0, StatusCode::BAD_REQUEST);
        assert_eq!(approver(Some("  ".into())).unwrap(), None);
        assert!(approver(Some("a\nb".into())).is_err());
        assert!(approver(Some("x".repeat(MAX_APPROVER_LEN + 1))).is_err());
    }
}
