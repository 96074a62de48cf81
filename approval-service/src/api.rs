//! The REST API and its JSON types (shared with [`crate::client`]).
//!
//! - `GET /healthz` → `ok`
//! - `GET /v1/holds` → `[PendingHold]`, oldest first
//! - `GET /v1/holds/{id}` → `PendingHold`
//! - `POST /v1/holds/{id}/approve`, body optional `{"approver": "alice"}` → `DecisionView`
//! - `POST /v1/holds/{id}/deny`, body `{"reason": "...", "approver": "alice"}` → `DecisionView`
//!
//! Every `/v1` route requires `Authorization: Bearer <admin token>`. Errors are JSON
//! `{"error": "..."}` with 400 (bad input), 401 (token), 403 (not allowed), 404 (not pending),
//! 409 (being decided, or expired) or 503 (the decision could not be published).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use proto::events::{HoldOutcome, Timestamp};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::HoldError;
use crate::hold::{Decided, Decider, Hold, Holds};

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
    pub rule: String,
    pub reason: String,
    /// RFC 3339.
    #[serde(with = "rfc3339")]
    pub requested_at: Timestamp,
    /// RFC 3339.
    #[serde(with = "rfc3339")]
    pub expires_at: Timestamp,
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
            rule: r.rule,
            reason: r.reason,
            requested_at: r.requested_at,
            expires_at: r.expires_at,
        }
    }
}

/// A published decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionView {
    pub hold_id: Uuid,
    pub session: Uuid,
    pub outcome: HoldOutcome,
    pub decided_by: String,
    #[serde(default)]
    pub reason: Option<String>,
}

impl From<Decided> for DecisionView {
    fn from(d: Decided) -> Self {
        Self {
            hold_id: d.decision.hold_id,
            session: d.session,
            outcome: d.decision.outcome,
            decided_by: d.decision.decided_by,
            reason: d.decision.reason,
        }
    }
}

/// The body of `approve` and `deny`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideBody {
    /// Who decides; default `admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
    /// Why; required to deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
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

#[derive(Clone)]
struct AppState {
    holds: Arc<Holds>,
    token: Arc<str>,
}

/// The service's HTTP routes.
pub fn router(holds: Arc<Holds>, token: Arc<str>) -> Router {
    let state = AppState { holds, token };
    let v1 = Router::new()
        .route("/holds", get(list))
        .route("/holds/{id}", get(show))
        .route("/holds/{id}/approve", post(approve))
        .route("/holds/{id}/deny", post(deny))
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
            HoldError::NotAllowed { .. } => StatusCode::FORBIDDEN,
            HoldError::Publish { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self(status, e.to_string())
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

async fn require_token(State(st): State<AppState>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match given {
        None => ApiError(StatusCode::UNAUTHORIZED, "missing bearer token".into()).into_response(),
        Some(t) if bool::from(t.as_bytes().ct_eq(st.token.as_bytes())) => next.run(req).await,
        Some(_) => ApiError(StatusCode::UNAUTHORIZED, "invalid bearer token".into()).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such route".into())
}

async fn list(State(st): State<AppState>) -> Json<Vec<PendingHold>> {
    Json(st.holds.pending().into_iter().map(PendingHold::from).collect())
}

async fn show(State(st): State<AppState>, Path(id): Path<String>) -> Result<Json<PendingHold>, ApiError> {
    let id = parse_id(&id)?;
    st.holds.get(id).map(|h| Json(h.into())).ok_or_else(|| HoldError::NotFound(id).into())
}

async fn approve(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DecisionView>, ApiError> {
    let id = parse_id(&id)?;
    let body = parse_body(&body)?;
    let decider = Decider::Admin { approver: approver(body.approver)? };
    let reason = optional_text("reason", body.reason, MAX_REASON_LEN)?;
    let decided = st.holds.decide(id, HoldOutcome::Approved, &decider, reason).await?;
    Ok(Json(decided.into()))
}

async fn deny(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DecisionView>, ApiError> {
    let id = parse_id(&id)?;
    let body = parse_body(&body)?;
    let decider = Decider::Admin { approver: approver(body.approver)? };
    let reason = optional_text("reason", body.reason, MAX_REASON_LEN)?
        .ok_or_else(|| bad_request("a denial needs a reason: {\"reason\": \"...\"}"))?;
    let decided = st.holds.decide(id, HoldOutcome::Denied, &decider, Some(reason)).await?;
    Ok(Json(decided.into()))
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
            rule: "r".into(),
            reason: "x".into(),
            requested_at: Timestamp(1_764_288_000_000_000),
            expires_at: Timestamp(1_764_288_300_123_456),
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
            rule: "r".into(),
            reason: "x".into(),
            requested_at: Timestamp(-5),
            expires_at: Timestamp(i64::MAX),
        };
        let json = serde_json::to_value(&h).unwrap();
        assert_eq!(json["requested_at"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(json["expires_at"], "9999-12-31T23:59:59.999999Z");
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
