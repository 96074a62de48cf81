//! A client for the approvals REST API, used by `airlock approvals list|show|approve|deny`.

use std::time::{Duration, SystemTime};

use proto::events::Timestamp;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::api::{DecideBody, ErrorBody};
pub use crate::api::{DecisionView, GrantView, PendingHold};

/// How long one API call may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Statements longer than this are cut in [`render_holds`].
const STATEMENT_WIDTH: usize = 60;

/// Calling the approvals API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("calling the approvals API at {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the approvals API answered {status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("reading the approvals API's answer from {url}: {source}")]
    Decode {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// The HTTP status the API answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The approvals REST API.
#[derive(Debug, Clone)]
pub struct ApprovalsClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl ApprovalsClient {
    /// A client for the API at `base_url` (like `http://127.0.0.1:17080`), sending `token`.
    pub fn new(base_url: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .expect("a reqwest client without custom TLS settings always builds");
        Self { http, base: base_url.trim_end_matches('/').to_string(), token: token.to_string() }
    }

    /// The pending holds, oldest first.
    pub async fn list(&self) -> Result<Vec<PendingHold>, ClientError> {
        self.call(self.request(Method::GET, "/v1/holds")).await
    }

    /// One pending hold.
    pub async fn get(&self, id: Uuid) -> Result<PendingHold, ClientError> {
        self.call(self.request(Method::GET, &format!("/v1/holds/{id}"))).await
    }

    /// Approve a hold, as `approver` (admin token only; default `admin`).
    pub async fn approve(&self, id: Uuid, approver: Option<&str>) -> Result<DecisionView, ClientError> {
        self.approve_for(id, approver, None).await
    }

    /// Approve an access request, granting it for `duration` (`2h`; default the rule's max).
    pub async fn approve_for(
        &self,
        id: Uuid,
        approver: Option<&str>,
        duration: Option<&str>,
    ) -> Result<DecisionView, ClientError> {
        let body = DecideBody {
            approver: approver.map(str::to_string),
            reason: None,
            duration: duration.map(str::to_string),
        };
        self.call(self.request(Method::POST, &format!("/v1/holds/{id}/approve")).json(&body)).await
    }

    /// The active just-in-time grants.
    pub async fn grants(&self) -> Result<Vec<GrantView>, ClientError> {
        self.call(self.request(Method::GET, "/v1/grants")).await
    }

    /// Revoke a grant.
    pub async fn revoke(&self, grant: Uuid, reason: Option<&str>) -> Result<GrantView, ClientError> {
        let body = DecideBody { approver: None, reason: reason.map(str::to_string), duration: None };
        self.call(self.request(Method::POST, &format!("/v1/grants/{grant}/revoke")).json(&body)).await
    }

    /// Deny a hold with a reason, as `approver` (default `admin`).
    pub async fn deny(
        &self,
        id: Uuid,
        reason: &str,
        approver: Option<&str>,
    ) -> Result<DecisionView, ClientError> {
        let body = DecideBody {
            approver: approver.map(str::to_string),
            reason: Some(reason.to_string()),
            duration: None,
        };
        self.call(self.request(Method::POST, &format!("/v1/holds/{id}/deny")).json(&body)).await
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token)
    }

    async fn call<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T, ClientError> {
        let url = self.base.clone();
        let resp = req.send().await.map_err(|source| ClientError::Request { url: url.clone(), source })?;
        let status = resp.status();
        if status.is_success() {
            return resp.json().await.map_err(|source| ClientError::Decode { url, source });
        }
        let text = resp.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => e.error,
            Err(_) if text.trim().is_empty() => status.canonical_reason().unwrap_or("no message").to_string(),
            Err(_) => text.trim().to_string(),
        };
        Err(ClientError::Api { status, message })
    }
}

/// A table of pending holds for the CLI: id, age, expires in, principal, connection, rule and the
/// statement (on one line, cut to 60 characters).
pub fn render_holds(holds: &[PendingHold]) -> String {
    render_holds_at(holds, Timestamp::from(SystemTime::now()))
}

fn render_holds_at(holds: &[PendingHold], now: Timestamp) -> String {
    if holds.is_empty() {
        return "no pending holds\n".to_string();
    }
    let header =
        ["ID", "AGE", "EXPIRES IN", "PRINCIPAL", "CONNECTION", "RULE", "STATEMENT"].map(String::from);
    let rows: Vec<[String; 7]> = holds
        .iter()
        .map(|h| {
            let age = now.as_micros().saturating_sub(h.requested_at.as_micros());
            let left = h.expires_at.as_micros().saturating_sub(now.as_micros());
            [
                h.id.to_string(),
                short_duration(age),
                if left > 0 { short_duration(left) } else { "expired".to_string() },
                one_line(&crate::api::visible(&h.principal.subject), usize::MAX),
                one_line(&crate::api::visible(&h.connection), usize::MAX),
                one_line(&crate::api::visible(&h.rule), usize::MAX),
                one_line(&crate::api::visible(&h.statement), STATEMENT_WIDTH),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|c| c.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row.iter().zip(widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One hold in full, a field per line, then its parameters one per line as SQL literals (see
/// [`crate::api::parameter_literal`]: NULLs, bytes and invisible characters marked), so the
/// approver sees every value the statement runs with. What a reader would not see, or would take
/// for something else (controls, bidi overrides, zero-width characters), is shown as `\u{XXXX}`
/// ([`crate::api::visible`]), as in Slack: the statement keeps its line breaks and tabs, the
/// one-line fields show theirs too, so that no value can pass for another field's line.
pub fn render_hold(h: &PendingHold) -> String {
    let clean = |s: &str| {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(s.len());
        for c in crate::api::visible(s).chars() {
            match c {
                '\n' | '\t' => {
                    let _ = write!(out, "\\u{{{:04X}}}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        out
    };
    let groups =
        if h.approver_groups.is_empty() { "any".to_string() } else { clean(&h.approver_groups.join(", ")) };
    let approvals = if h.approvals.is_empty() { "none".to_string() } else { clean(&h.approvals.join(", ")) };
    let mut parameters = String::new();
    if !h.parameters.is_empty() {
        parameters.push_str("parameters:\n");
        for (i, p) in h.parameters.iter().enumerate() {
            parameters.push_str(&format!("  ${} = {}\n", i + 1, crate::api::parameter_literal(p.as_deref())));
        }
    }
    format!(
        "id:          {}\nsession:     {}\nprincipal:   {} (groups: {})\nconnection:  {}\nrule:        {}\n\
         reason:      {}\nrequested:   {}\nexpires:     {}\napprovers:   {groups}, {} needed\napprovals:   {approvals}\n\
         statement:\n{}\n{parameters}",
        h.id,
        h.session,
        clean(&h.principal.subject),
        clean(&h.principal.groups.join(", ")),
        clean(&h.connection),
        clean(&h.rule),
        clean(&h.reason),
        h.requested_at,
        h.expires_at,
        h.min,
        crate::api::visible(&h.statement),
    )
}

/// `42s`, `3m12s`, `2h05m`, `3d04h` from microseconds.
fn short_duration(micros: i64) -> String {
    let s = micros.max(0) / 1_000_000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Collapse whitespace (including newlines) and cut to `max` characters with an ellipsis; control
/// characters become spaces so a statement cannot garble the terminal.
fn one_line(s: &str, max: usize) -> String {
    let flat = s.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty());
    let flat = flat.collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PrincipalView;

    fn hold(statement: &str, requested_at: Timestamp, expires_at: Timestamp) -> PendingHold {
        PendingHold {
            id: Uuid::nil(),
            session: Uuid::nil(),
            connection: "shop".into(),
            principal: PrincipalView { subject: "agent-1".into(), groups: vec!["agents".into()] },
            statement: statement.into(),
            parameters: vec![],
            rule: "writes-need-approval".into(),
            reason: "matched".into(),
            requested_at,
            expires_at,
            approvals: vec![],
            min: 1,
            approver_groups: vec![],
        }
    }

    #[test]
    fn table_shows_age_expiry_and_a_cut_statement() {
        let now = Timestamp(1_000_000_000_000);
        let long = format!("delete from orders\n  where id in ({})", "1, ".repeat(40));
        let holds = [
            hold(&long, Timestamp(now.0 - 42_000_000), Timestamp(now.0 + 258_000_000)),
            hold("update users set x = 1", Timestamp(now.0 - 7_300_000_000), Timestamp(now.0 - 1)),
        ];
        let table = render_holds_at(&holds, now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("ID "), "{table}");
        assert!(lines[0].contains("EXPIRES IN"));
        assert!(lines[1].contains("42s") && lines[1].contains("4m18s"), "{table}");
        assert!(lines[1].contains("delete from orders where id in (1, 1,"), "{table}");
        assert!(lines[1].ends_with('…'), "{table}");
        assert!(lines[2].contains("2h01m") && lines[2].contains("expired"), "{table}");
        assert!(lines[2].contains("agent-1") && lines[2].contains("shop"));
        // Columns line up: every row has STATEMENT at the same character offset.
        let col = lines[0].find("STATEMENT").unwrap();
        assert!(lines[2][col..].starts_with("update users"), "{table}");
    }

    #[test]
    fn a_hold_in_full_shows_its_parameters() {
        let mut h = hold("update users set role = $1 where id = $2", Timestamp(0), Timestamp(1));
        assert!(!render_hold(&h).contains("parameters:"), "none to show");
        h.parameters = vec![Some("admin".into()), None, Some("\u{1b}[2J".into())];
        let shown = render_hold(&h);
        assert!(
            shown.ends_with("parameters:\n  $1 = 'admin'\n  $2 = NULL\n  $3 = E'\\u001B[2J'\n"),
            "{shown}"
        );
    }

    #[test]
    fn empty_list_says_so() {
        assert_eq!(render_holds(&[]), "no pending holds\n");
    }

    #[test]
    fn statements_lose_control_characters() {
        assert_eq!(one_line("a\u{1b}[2Jb\tc", 60), "a [2Jb c");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(-5), "0s");
        assert_eq!(short_duration(3_600_000_000 * 50), "2d02h");
    }
}
