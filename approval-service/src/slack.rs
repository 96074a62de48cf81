//! The Slack bot: posts each hold as a Block Kit message with Approve and Deny buttons, opens a
//! modal asking for a reason on Deny, takes interactivity callbacks, and updates the message
//! with the outcome.
//!
//! Every callback is checked with the app's signing secret (HMAC `v0`, timestamp within 5
//! minutes, by slack-morphism's `SlackEventSignatureVerifier`) before anything else; a request
//! that fails gets 401 and changes nothing. The clicking Slack user is mapped to an approver
//! ([`crate::approver::Directory::by_slack`]: explicit `slack_user`, else the e-mail `users.info`
//! reports; the profile e-mail is looked up either way, as one of the person's identifiers) and
//! then checked like any approver: the rule's groups, `min` distinct people, and never the
//! requester itself.
//!
//! The message shows the statement and its bound parameters. When either is too long for a
//! Slack section, it shows their start and end and offers no Approve button, and an approval
//! from Slack is refused: nobody approves there what they could not read whole.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use proto::events::{HoldId, HoldOutcome, HoldRequest};
use serde::Deserialize;
use serde_json::json;
use slack_morphism::prelude::*;
use slack_morphism::signature_verifier::SlackEventSignatureVerifier;
use tracing::{debug, info, warn};

use crate::approver::Directory;
use crate::config::{ApproverEntry, SlackConfig, secret};
use crate::error::{ApprovalError, HoldError};
use crate::hold::{Decider, Holds};
use crate::routes::Routes;
use crate::store::{Change, HoldRecord, SlackMessage, Status};

/// The Approve button's action id.
pub const APPROVE_ACTION: &str = "airlock_approve";
/// The Deny button's action id.
pub const DENY_ACTION: &str = "airlock_deny";
/// The deny modal's callback id.
pub const DENY_CALLBACK: &str = "airlock_deny";
/// The deny modal's reason input (block id and action id).
pub const REASON_INPUT: &str = "reason";
/// A claim to post older than this (the claimer died) may be taken over.
const CLAIM_STALE_MICROS: i64 = 60_000_000;
/// Room for a code block's content: Slack takes 3000 characters of section text, and this leaves
/// room for the fences and a heading.
const CODE_ROOM: usize = 2900;
/// Of a block that does not fit, this much of the room goes to its start (the rest to its end).
const HEAD_SHARE: usize = 2;
const HEAD_OF: usize = 3;
/// How many look-alike characters a hold's message names (see [`lookalikes`]).
const LOOKALIKES_SHOWN: usize = 12;

pub mod fake;

type Client = SlackClient<SlackClientHyperHttpsConnector>;

/// Calling Slack.
#[derive(Debug, thiserror::Error)]
pub enum SlackError {
    #[error("Slack API {method}: {message}")]
    Api { method: &'static str, message: String },
    #[error("building a Slack message: {0}")]
    Build(#[from] serde_json::Error),
}

/// The bot: a Web API client, the signature verifier and the approver directory.
pub struct Slack {
    client: Client,
    token: SlackApiToken,
    verifier: SlackEventSignatureVerifier,
    directory: Directory,
    /// The only workspace whose members may decide (`slack.team_id`).
    team_id: Option<String>,
}

impl Slack {
    /// The bot from its config; secrets are read from their values or files.
    pub fn from_config(cfg: &SlackConfig, approvers: &[ApproverEntry]) -> Result<Self, ApprovalError> {
        if cfg.team_id.is_none() {
            warn!(
                "slack.team_id is not set: members of any workspace that sees the bot's messages (a Slack Connect \
                 channel's other side) may click approve; set it to your workspace's id (T…)"
            );
        }
        let bot = secret("Slack bot token", cfg.bot_token.as_ref(), cfg.bot_token_file.as_ref())?
            .ok_or(ApprovalError::MissingSecret("Slack bot token"))?;
        let signing =
            secret("Slack signing secret", cfg.signing_secret.as_ref(), cfg.signing_secret_file.as_ref())?
                .ok_or(ApprovalError::MissingSecret("Slack signing secret"))?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match builder.with_native_roots() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "no system root certificates; only plain-HTTP Slack URLs will work");
                let roots = rustls::RootCertStore::empty();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                    rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth(),
                )
            }
        };
        let https = builder.https_or_http().enable_http1().build();
        // slack-morphism joins the base and the method with a `/`.
        let api_url = cfg.api_url.trim_end_matches('/');
        let connector = SlackClientHyperConnector::with_connector(https).with_slack_api_url(api_url);
        Ok(Self {
            client: SlackClient::new(connector),
            token: SlackApiToken::new(SlackApiTokenValue::new(bot)),
            verifier: SlackEventSignatureVerifier::new(&SlackSigningSecret::new(signing)),
            directory: Directory::new(approvers),
            team_id: cfg.team_id.clone(),
        })
    }

    /// Check a callback's signature and timestamp.
    pub fn verify(&self, headers: &HeaderMap, body: &str) -> Result<(), String> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let sig = header(SlackEventSignatureVerifier::SLACK_SIGNED_HASH_HEADER).ok_or("missing signature")?;
        let ts = header(SlackEventSignatureVerifier::SLACK_SIGNED_TIMESTAMP).ok_or("missing timestamp")?;
        // The verifier subtracts the timestamp from now unchecked: one near i64::MIN overflows
        // (a panic where overflow is checked). Only a timestamp within its window goes on.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let recent = ts.parse::<i64>().ok().and_then(|t| now.checked_sub(t)).is_some_and(|age| {
            age.checked_abs().is_some_and(|a| a <= SlackEventSignatureVerifier::MAX_TIMESTAMP_AGE_SECONDS)
        });
        if !recent {
            return Err(format!("timestamp {ts:?} is not within 5 minutes of now"));
        }
        self.verifier.verify(sig, body, ts).map_err(|e| e.to_string())
    }

    /// Post `rec` to `channel`.
    pub async fn post(&self, channel: &str, rec: &HoldRecord) -> Result<SlackMessage, SlackError> {
        let content = message(rec)?;
        let req = SlackApiChatPostMessageRequest::new(channel.to_string().into(), content);
        let resp = self
            .client
            .open_session(&self.token)
            .chat_post_message(&req)
            .await
            .map_err(|e| SlackError::Api { method: "chat.postMessage", message: e.to_string() })?;
        Ok(SlackMessage { channel: resp.channel.to_string(), ts: resp.ts.to_string() })
    }

    /// Show `rec`'s current state in its message.
    pub async fn update(&self, msg: &SlackMessage, rec: &HoldRecord) -> Result<(), SlackError> {
        let content = message(rec)?;
        let req = SlackApiChatUpdateRequest::new(msg.channel.clone().into(), content, msg.ts.clone().into());
        self.client
            .open_session(&self.token)
            .chat_update(&req)
            .await
            .map_err(|e| SlackError::Api { method: "chat.update", message: e.to_string() })?;
        Ok(())
    }

    /// Open the modal asking why `hold` is denied.
    async fn open_deny_modal(&self, trigger_id: &str, hold: HoldId) -> Result<(), SlackError> {
        let view: SlackView = serde_json::from_value(json!({
            "type": "modal",
            "callback_id": DENY_CALLBACK,
            "private_metadata": hold.to_string(),
            "title": { "type": "plain_text", "text": "Deny hold" },
            "submit": { "type": "plain_text", "text": "Deny" },
            "close": { "type": "plain_text", "text": "Cancel" },
            "blocks": [{
                "type": "input",
                "block_id": REASON_INPUT,
                "label": { "type": "plain_text", "text": "Why? The agent sees this." },
                "element": { "type": "plain_text_input", "action_id": REASON_INPUT, "multiline": true }
            }]
        }))?;
        let req = SlackApiViewsOpenRequest::new(trigger_id.to_string().into(), view);
        self.client
            .open_session(&self.token)
            .views_open(&req)
            .await
            .map_err(|e| SlackError::Api { method: "views.open", message: e.to_string() })?;
        Ok(())
    }

    /// Tell one user something only they see.
    async fn ephemeral(&self, channel: &str, user: &str, text: &str) {
        let content = SlackMessageContent::new().with_text(text.to_string());
        let req = SlackApiChatPostEphemeralRequest::new(
            channel.to_string().into(),
            user.to_string().into(),
            content,
        );
        if let Err(e) = self.client.open_session(&self.token).chat_post_ephemeral(&req).await {
            debug!(error = %e, "posting an ephemeral Slack message failed");
        }
    }

    /// The approver a Slack user is (see [`Directory::by_slack`]): an explicit `slack_user`
    /// entry, else the entry whose e-mail matches the user's profile, else a person the policy's
    /// `approver_groups` list by Slack user id or profile e-mail. `Ok(None)`: not a known approver.
    ///
    /// The profile e-mail is asked for even when an entry names the user by Slack id: it is one
    /// of the person's identifiers, compared with the requester's verified e-mail and with other
    /// votes' (one person, one approval). A user Slack cannot say that of is not identified.
    pub async fn identify(&self, user: &str, routes: &Routes) -> Result<Option<Decider>, SlackError> {
        let req = SlackApiUsersInfoRequest::new(user.to_string().into());
        let info = self
            .client
            .open_session(&self.token)
            .users_info(&req)
            .await
            .map_err(|e| SlackError::Api { method: "users.info", message: e.to_string() })?;
        let email = info.user.profile.and_then(|p| p.email).map(|e| e.to_string()).filter(|e| !e.is_empty());
        Ok(self.directory.by_slack(user, email.as_deref(), routes))
    }
}

/// Post a hold's message once across replicas: claim the post with a compare-and-set on the
/// record, post, record the message, and show the outcome if it was decided meanwhile, or the
/// approvals so far if some came in (a vote that lands while the post is in flight finds no
/// message to update).
pub async fn post_hold(holds: &Holds, slack: &Slack, id: HoldId, channel: &str) {
    let now = proto::events::Timestamp::now();
    let claimed = holds
        .modify(id, |r| {
            let fresh =
                r.slack_claimed_at.is_some_and(|t| now.as_micros() - t.as_micros() < CLAIM_STALE_MICROS);
            if r.slack.is_some() || fresh || !r.is_pending() {
                return Ok(Change::Keep(false));
            }
            r.slack_claimed_at = Some(now);
            Ok(Change::Write(true))
        })
        .await;
    let rec = match claimed {
        Ok(Some((true, rec))) => rec,
        Ok(_) => return,
        Err(e) => {
            warn!(hold.id = %id, error = %e, "claiming the Slack post failed");
            return;
        }
    };
    let msg = match slack.post(channel, &rec).await {
        Ok(m) => m,
        Err(e) => {
            warn!(hold.id = %id, error = %e, "posting the hold to Slack failed");
            return;
        }
    };
    info!(hold.id = %id, slack.channel = %msg.channel, "hold posted to Slack");
    let stored = holds
        .modify(id, |r| {
            r.slack = Some(msg.clone());
            Ok(Change::Write(()))
        })
        .await;
    match stored {
        Ok(Some(((), rec))) if !rec.is_pending() => show_outcome(holds, slack, id).await,
        Ok(Some(((), rec))) if !rec.approvals.is_empty() => show_progress(holds, slack, id, &msg, &rec).await,
        Ok(_) => {}
        Err(e) => warn!(hold.id = %id, error = %e, "recording the Slack message failed"),
    }
}

/// Show the approvals of pending `rec` so far in its message `msg`. Should the hold be decided
/// and its outcome shown meanwhile, the outcome is shown again, so that this older state does not
/// stay over it.
async fn show_progress(holds: &Holds, slack: &Slack, id: HoldId, msg: &SlackMessage, rec: &HoldRecord) {
    if let Err(e) = slack.update(msg, rec).await {
        warn!(hold.id = %id, error = %e, "updating the Slack message failed");
        return;
    }
    if let Ok(Some(now)) = holds.record(id).await
        && now.slack_final
        && let Err(e) = slack.update(msg, &now).await
    {
        warn!(hold.id = %id, error = %e, "updating the Slack message failed");
    }
}

/// Update a decided hold's message with its outcome, once.
pub async fn show_outcome(holds: &Holds, slack: &Slack, id: HoldId) {
    let claimed = holds
        .modify(id, |r| {
            if r.slack.is_none() || r.slack_final || r.is_pending() {
                return Ok(Change::Keep(false));
            }
            r.slack_final = true;
            Ok(Change::Write(true))
        })
        .await;
    let rec = match claimed {
        Ok(Some((true, rec))) => rec,
        Ok(_) => return,
        Err(e) => {
            warn!(hold.id = %id, error = %e, "claiming the Slack update failed");
            return;
        }
    };
    let Some(msg) = rec.slack.clone() else { return };
    if let Err(e) = slack.update(&msg, &rec).await {
        warn!(hold.id = %id, error = %e, "updating the Slack message failed");
    }
}

/// Escape text for mrkdwn (`&`, `<`, `>`), so a statement cannot mention or link.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// `text` in a code block, escaped, with no way to close the fence early, and whether all of it
/// is there. Text that does not fit [`CODE_ROOM`] (counted after escaping) shows its start and
/// its end around a line saying how much is left out: what a padded statement hides is
/// usually at its end (`... /* 2800 characters */ OR true`).
fn code(text: &str) -> (String, bool) {
    // No two backticks side by side, so nothing in the text can close the block (```` is
    // ``` and one more); and what a reader would not see is shown as `\u{XXXX}`.
    let safe: Vec<char> = crate::api::visible(text).replace('`', "`\u{200b}").chars().collect();
    // What a character takes once escaped by `escape`.
    let width = |c: &char| match c {
        '&' => 5,
        '<' | '>' => 4,
        _ => 1,
    };
    let text = |cs: &[char]| escape(&cs.iter().collect::<String>());
    if safe.iter().map(width).sum::<usize>() <= CODE_ROOM {
        return (format!("```{}```", text(&safe)), true);
    }
    // Leave room for the line that says what is missing.
    let room = CODE_ROOM - 80;
    let fit = |it: &mut dyn Iterator<Item = &char>, room: usize| {
        let mut used = 0;
        it.take_while(|c| {
            used += width(c);
            used <= room
        })
        .count()
    };
    let head = fit(&mut safe.iter(), room * HEAD_SHARE / HEAD_OF);
    let tail = fit(&mut safe.iter().rev(), room - room * HEAD_SHARE / HEAD_OF);
    let left_out = safe.len() - head - tail;
    let body = format!(
        "{}\n… {left_out} characters not shown …\n{}",
        text(&safe[..head]),
        text(&safe[safe.len() - tail..])
    );
    (format!("```{body}```"), false)
}

/// The characters of `texts` that pass for Latin letters or digits (Greek, Cyrillic, Armenian,
/// Cherokee, fullwidth, mathematical and letter-like forms, IPA, small capitals, other digits),
/// each once, as `` `о` U+043E ``; at most [`LOOKALIKES_SHOWN`] of them, then how many more.
/// `DELETE FROM оrders` with a Cyrillic `о`, or `'аdmin'`, reads as what it is not.
fn lookalikes<'a>(texts: impl Iterator<Item = &'a str>) -> String {
    let alike = |c: char| {
        matches!(u32::from(c),
            0x0250..=0x02AF | 0x0370..=0x058F | 0x13A0..=0x13FF | 0x1D00..=0x1DBF | 0x2100..=0x218F
            | 0xFF01..=0xFF5E | 0x1D400..=0x1D7FF)
            || c == '\u{0131}'
            || (c.is_numeric() && !c.is_ascii_digit())
    };
    let mut found = std::collections::BTreeSet::new();
    for t in texts {
        found.extend(t.chars().filter(|&c| alike(c)));
    }
    let mut shown: Vec<String> =
        found.iter().take(LOOKALIKES_SHOWN).map(|&c| format!("`{c}` U+{:04X}", u32::from(c))).collect();
    if found.len() > LOOKALIKES_SHOWN {
        shown.push(format!("and {} more", found.len() - LOOKALIKES_SHOWN));
    }
    shown.join(", ")
}

/// The parameters as `$1 = 'value'` lines (see [`crate::api::parameter_literal`]).
fn parameter_lines(parameters: &[Option<String>]) -> String {
    let lines: Vec<String> = parameters
        .iter()
        .enumerate()
        .map(|(i, p)| format!("${} = {}", i + 1, crate::api::parameter_literal(p.as_deref())))
        .collect();
    lines.join("\n")
}

/// Can the hold's message show its statement and parameters whole? When it cannot, Slack does
/// not offer (and does not take) an approval: the approver would approve what they could not see.
pub fn shown_in_full(r: &HoldRequest) -> bool {
    code(&r.reason).1
        && code(&r.statement).1
        && (r.parameters.is_empty() || code(&parameter_lines(&r.parameters)).1)
}

/// The message for a hold in its current state.
pub fn message(rec: &HoldRecord) -> Result<SlackMessageContent, serde_json::Error> {
    let r = &rec.request;
    let groups =
        if r.principal.groups.is_empty() { "none".to_string() } else { r.principal.groups.join(", ") };
    let expires_unix = r.expires_at.as_micros() / 1_000_000;
    let approvers = if r.approvers.groups.is_empty() {
        "any approver".to_string()
    } else {
        r.approvers.groups.join(", ")
    };
    let min = r.approvers.min.max(1);
    let mut blocks = vec![
        json!({ "type": "header", "text": { "type": "plain_text", "text": format!("Approval needed: {}", r.rule) } }),
        json!({ "type": "section", "fields": [
            { "type": "mrkdwn", "text": format!("*Agent*\n`{}` (groups: {})", escape(&r.principal.subject), escape(&groups)) },
            { "type": "mrkdwn", "text": format!("*Connection*\n{}", escape(&r.connection)) },
            { "type": "mrkdwn", "text": format!("*Rule*\n{}", escape(&r.rule)) },
            { "type": "mrkdwn", "text": format!("*Expires*\n<!date^{expires_unix}^{{date_short_pretty}} {{time_secs}}|{}>", r.expires_at) },
        ]}),
    ];
    // The reason names what the statement touches (table names are the agent's to choose, and
    // may hold line breaks, backticks or mrkdwn) and what a held `EXECUTE` runs: a code block,
    // like the statement, so none of it can pass for another part of the message.
    let (reason, mut whole) = code(&r.reason);
    blocks.push(
        json!({ "type": "section", "text": { "type": "mrkdwn", "text": format!("*Why held*\n{reason}") } }),
    );
    let (statement, all) = code(&r.statement);
    whole &= all;
    let parameters = (!r.parameters.is_empty()).then(|| {
        let (p, all) = code(&parameter_lines(&r.parameters));
        whole &= all;
        p
    });
    if !whole {
        blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn", "text": format!(
            ":warning: *Not shown in full.* This statement or its parameters are too long for Slack: \
             below are only their start and end. Review the whole hold with `airlock approvals show {}` \
             and approve it there; it cannot be approved from Slack.",
            r.hold_id
        ) } }));
    }
    let alike = lookalikes(
        std::iter::once(r.statement.as_str()).chain(r.parameters.iter().flatten().map(String::as_str)),
    );
    if !alike.is_empty() {
        blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn", "text": format!(
            ":warning: *Look-alike characters.* The statement or its parameters hold characters that look like \
             Latin letters or digits but are not ({alike}): a name or value may not be the one it looks like."
        ) } }));
    }
    blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn", "text": statement } }));
    if let Some(p) = parameters {
        blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn", "text": format!(
            "*Parameters* ({}; NULL is SQL NULL, E'…' escapes characters that would not show)\n{p}",
            r.parameters.len()
        ) } }));
    }
    blocks.extend([
        json!({ "type": "context", "elements": [{ "type": "mrkdwn", "text": format!(
            "hold `{}` · approvers: {} · approvals {}/{}{}",
            r.hold_id, escape(&approvers), rec.approvals.len(), min,
            if rec.approvals.is_empty() { String::new() } else {
                format!(" ({})", escape(&rec.approvals.iter().map(|a| a.by.as_str()).collect::<Vec<_>>().join(", ")))
            }
        ) }] }),
    ]);
    let (summary, outcome) = match (&rec.status, &rec.decision) {
        (Status::Pending, _) => (format!("Approval needed: {} on {}", r.rule, r.connection), None),
        (Status::Approved, Some(d)) => {
            let mut t = format!(":white_check_mark: *Approved* by {}", escape(&d.decided_by));
            if let Some(g) = &rec.grant {
                t.push_str(&format!(" · access granted until {}", g.until));
            }
            ("Hold approved".to_string(), Some(t))
        }
        (Status::Denied, Some(d)) => (
            "Hold denied".to_string(),
            Some(format!(
                ":no_entry: *Denied* by {}: {}",
                escape(&d.decided_by),
                escape(d.reason.as_deref().unwrap_or("no reason given"))
            )),
        ),
        (Status::Expired, d) => (
            "Hold expired".to_string(),
            Some(format!(
                ":hourglass: *Expired*: {}",
                escape(d.as_ref().and_then(|d| d.reason.as_deref()).unwrap_or("nobody decided in time"))
            )),
        ),
        (_, None) => ("Hold decided".to_string(), Some("*Decided*".to_string())),
    };
    let approve = json!({ "type": "button", "action_id": APPROVE_ACTION, "style": "primary",
        "value": r.hold_id.to_string(), "text": { "type": "plain_text", "text": "Approve" } });
    let deny = json!({ "type": "button", "action_id": DENY_ACTION, "style": "danger",
        "value": r.hold_id.to_string(), "text": { "type": "plain_text", "text": "Deny" } });
    match outcome {
        None => blocks.push(json!({ "type": "actions", "block_id": "airlock_hold",
            "elements": if whole { vec![approve, deny] } else { vec![deny] } })),
        Some(t) => blocks.push(json!({ "type": "section", "text": { "type": "mrkdwn", "text": t } })),
    }
    let blocks: Vec<SlackBlock> = serde_json::from_value(serde_json::Value::Array(blocks))?;
    Ok(SlackMessageContent::new().with_text(summary).with_blocks(blocks))
}

/// What the interactivity endpoint reads from a callback's `payload`.
#[derive(Debug, Deserialize)]
struct Interaction {
    #[serde(rename = "type")]
    kind: String,
    user: SlackUser,
    /// The workspace the interaction happened in.
    #[serde(default)]
    team: Option<IdOnly>,
    #[serde(default)]
    trigger_id: Option<String>,
    #[serde(default)]
    channel: Option<IdOnly>,
    #[serde(default)]
    actions: Vec<Action>,
    #[serde(default)]
    view: Option<View>,
}

#[derive(Debug, Deserialize)]
struct IdOnly {
    id: String,
}

/// Who clicked: their id and home workspace.
#[derive(Debug, Deserialize)]
struct SlackUser {
    id: String,
    #[serde(default)]
    team_id: Option<String>,
}

impl Interaction {
    /// Why the clicking user may not decide here: they are not of the configured workspace
    /// (their home workspace, or where they clicked, when Slack does not say).
    fn foreign(&self, team_id: Option<&str>) -> Option<String> {
        let want = team_id?;
        let theirs = self.user.team_id.as_deref().or(self.team.as_ref().map(|t| t.id.as_str()));
        (theirs != Some(want)).then(|| "Only members of this workspace may decide Airlock holds.".to_string())
    }
}

#[derive(Debug, Deserialize)]
struct Action {
    action_id: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
struct View {
    #[serde(default)]
    callback_id: Option<String>,
    #[serde(default)]
    private_metadata: Option<String>,
    #[serde(default)]
    state: Option<ViewState>,
}

#[derive(Debug, Deserialize)]
struct ViewState {
    #[serde(default)]
    values: HashMap<String, HashMap<String, InputValue>>,
}

#[derive(Debug, Deserialize)]
struct InputValue {
    #[serde(default)]
    value: Option<String>,
}

#[derive(Clone)]
struct AppState {
    holds: Arc<Holds>,
    slack: Arc<Slack>,
}

/// The interactivity route, `POST /slack/interactions`.
pub fn router(holds: Arc<Holds>, slack: Arc<Slack>) -> Router {
    Router::new()
        .route("/slack/interactions", axum::routing::post(interactions))
        .with_state(AppState { holds, slack })
}

fn reject(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

async fn interactions(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(text) = std::str::from_utf8(&body) else {
        return reject(StatusCode::UNAUTHORIZED, "invalid Slack signature");
    };
    if let Err(why) = st.slack.verify(&headers, text) {
        warn!(error = %why, "rejected a Slack callback");
        return reject(StatusCode::UNAUTHORIZED, "invalid Slack signature");
    }
    let form: HashMap<String, String> = match serde_urlencoded::from_str(text) {
        Ok(f) => f,
        Err(_) => return reject(StatusCode::BAD_REQUEST, "not a form"),
    };
    let Some(payload) = form.get("payload") else { return reject(StatusCode::BAD_REQUEST, "no payload") };
    let ia: Interaction = match serde_json::from_str(payload) {
        Ok(i) => i,
        Err(e) => {
            debug!(error = %e, "unreadable Slack payload");
            return reject(StatusCode::BAD_REQUEST, "unreadable payload");
        }
    };
    match ia.kind.as_str() {
        "block_actions" => block_actions(&st, &ia).await,
        "view_submission" => view_submission(&st, &ia).await,
        other => {
            debug!(kind = %other, "ignoring a Slack interaction");
            StatusCode::OK.into_response()
        }
    }
}

async fn block_actions(st: &AppState, ia: &Interaction) -> Response {
    let channel = ia.channel.as_ref().map(|c| c.id.as_str());
    for action in &ia.actions {
        let Some(id) = action.value.as_deref().and_then(|v| uuid::Uuid::parse_str(v).ok()) else { continue };
        match action.action_id.as_str() {
            APPROVE_ACTION => {
                if let Err(why) = vote(st, ia, id, HoldOutcome::Approved, None).await
                    && let Some(c) = channel
                {
                    st.slack.ephemeral(c, &ia.user.id, &why).await;
                }
            }
            DENY_ACTION => {
                let Some(trigger) = ia.trigger_id.as_deref() else { continue };
                if let Err(e) = st.slack.open_deny_modal(trigger, id).await {
                    warn!(hold.id = %id, error = %e, "opening the deny modal failed");
                }
            }
            other => debug!(action = %other, "ignoring a Slack action"),
        }
    }
    StatusCode::OK.into_response()
}

async fn view_submission(st: &AppState, ia: &Interaction) -> Response {
    let Some(view) = &ia.view else { return StatusCode::OK.into_response() };
    if view.callback_id.as_deref() != Some(DENY_CALLBACK) {
        return StatusCode::OK.into_response();
    }
    let Some(id) = view.private_metadata.as_deref().and_then(|v| uuid::Uuid::parse_str(v).ok()) else {
        return StatusCode::OK.into_response();
    };
    let reason = view
        .state
        .as_ref()
        .and_then(|s| s.values.get(REASON_INPUT))
        .and_then(|b| b.get(REASON_INPUT))
        .and_then(|v| v.value.as_deref())
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_string);
    let Some(reason) = reason else { return modal_error("A denial needs a reason.") };
    match vote(st, ia, id, HoldOutcome::Denied, Some(reason)).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(why) => modal_error(&why),
    }
}

fn modal_error(msg: &str) -> Response {
    Json(json!({ "response_action": "errors", "errors": { REASON_INPUT: msg } })).into_response()
}

/// One Slack user's vote; `Err` is what to tell them.
async fn vote(
    st: &AppState,
    ia: &Interaction,
    id: HoldId,
    outcome: HoldOutcome,
    reason: Option<String>,
) -> Result<(), String> {
    let user = ia.user.id.as_str();
    if let Some(why) = ia.foreign(st.slack.team_id.as_deref()) {
        warn!(hold.id = %id, slack.user = %user, slack.team = ?ia.user.team_id, "a Slack user of another workspace tried to decide");
        return Err(why);
    }
    let decider = match st.slack.identify(user, st.holds.routes()).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            warn!(hold.id = %id, slack.user = %user, "a Slack user who is not a known approver tried to decide");
            return Err("You are not a known Airlock approver.".into());
        }
        Err(e) => {
            warn!(hold.id = %id, error = %e, "identifying a Slack user failed");
            return Err("Could not check who you are; try again.".into());
        }
    };
    if outcome == HoldOutcome::Approved {
        // Unless the hold is known to show whole here, Slack does not approve it.
        let whole = match st.holds.record(id).await {
            Ok(Some(rec)) => shown_in_full(&rec.request),
            Ok(None) => true,
            Err(e) => {
                warn!(hold.id = %id, error = %e, "reading a hold to approve it from Slack failed");
                return Err("Could not read this hold; try again.".into());
            }
        };
        if !whole {
            return Err(format!(
                "This hold is too long to show in Slack in full: review it with `airlock approvals show {id}` and \
                 approve it there."
            ));
        }
    }
    match st.holds.decide(id, outcome, &decider, reason).await {
        Ok(d) => {
            if d.decision.is_none() {
                // More approvals needed: show the progress (`post_hold` does, when the message is
                // not recorded yet).
                if let Ok(Some(rec)) = st.holds.record(id).await
                    && let Some(msg) = &rec.slack
                {
                    show_progress(&st.holds, &st.slack, id, msg, &rec).await;
                }
            }
            Ok(())
        }
        Err(e @ HoldError::NotAllowed { .. }) => {
            warn!(hold.id = %id, slack.user = %user, error = %e, "Slack vote refused");
            Err(e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::events::{ApproverSpec, HoldDecision, HoldRequest, Principal, Timestamp};

    fn record() -> HoldRecord {
        let now = Timestamp(1_764_288_000_000_000);
        HoldRecord::new(
            uuid::Uuid::nil(),
            HoldRequest {
                requester_email: None,
                hold_id: uuid::Uuid::nil(),
                seq: 1,
                connection: "shop".into(),
                principal: Principal {
                    subject: "agent-7".into(),
                    groups: vec!["agents".into()],
                    kind: "oidc".into(),
                },
                statement: "DELETE FROM orders WHERE note = '<@U1> ```'".into(),
                parameters: vec![],
                fingerprint: "f".into(),
                rule: "writes".into(),
                reason: "delete on orders".into(),
                approvers: ApproverSpec { groups: vec!["dba".into()], min: 2 },
                requested_at: now,
                expires_at: now.plus(std::time::Duration::from_secs(300)),
            },
        )
    }

    #[test]
    fn pending_message_shows_everything_and_has_both_buttons() {
        let rec = record();
        let json = serde_json::to_string(&message(&rec).unwrap()).unwrap();
        for needle in [
            "agent-7",
            "agents",
            "shop",
            "writes",
            "delete on orders",
            "approvals 0/2",
            APPROVE_ACTION,
            DENY_ACTION,
            "2025-11-28T00:05:00",
        ] {
            assert!(json.contains(needle), "{needle} missing: {json}");
        }
        // The statement cannot mention anyone or break out of its code block.
        assert!(json.contains("&lt;@U1&gt;"), "{json}");
        assert!(!json.contains("<@U1>"), "{json}");
    }

    /// Backticks in any number cannot close the code block the statement is shown in, and
    /// what a reader would not see is shown.
    #[test]
    fn statements_cannot_close_their_code_block_or_hide_characters() {
        for text in ["````*bold*````", "```x```", "a`b``c```d````e", "x\u{202e}y"] {
            let (shown, whole) = code(text);
            assert!(whole);
            let inner = &shown[3..shown.len() - 3];
            assert!(!inner.contains("``"), "{text:?} -> {shown:?}");
            assert!(!inner.contains('\u{202e}'), "{text:?} -> {shown:?}");
        }
    }

    #[test]
    fn text_too_long_once_escaped_is_cut_to_fit_and_cannot_be_approved_from_slack() {
        let sections = |rec: &HoldRecord| {
            let v = serde_json::to_value(message(rec).unwrap()).unwrap();
            let texts: Vec<String> = v["blocks"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|b| b["text"]["text"].as_str().map(str::to_string))
                .collect();
            (texts, v.to_string())
        };
        let mut rec = record();
        // 1000 characters, 4000 once escaped for mrkdwn: more than a section takes.
        rec.request.statement = "<".repeat(999) + ">";
        let (texts, json) = sections(&rec);
        assert!(texts.iter().all(|t| t.chars().count() <= 3000), "{texts:?}");
        assert!(texts.iter().any(|t| t.contains("&gt;```")), "the end is shown");
        assert!(!json.contains(APPROVE_ACTION) && json.contains(DENY_ACTION), "{json}");
        assert!(!shown_in_full(&rec.request));
        // Likewise a parameter too long to show.
        rec.request.statement = "update users set note = $1".into();
        rec.request.parameters = vec![Some("y".repeat(5000))];
        let (texts, json) = sections(&rec);
        assert!(texts.iter().all(|t| t.chars().count() <= 3000), "{texts:?}");
        assert!(!json.contains(APPROVE_ACTION), "{json}");
        rec.request.parameters = vec![Some("y".repeat(50))];
        assert!(shown_in_full(&rec.request) && sections(&rec).1.contains(APPROVE_ACTION));
    }

    /// The text of the message's section whose text starts with `heading`.
    fn section(rec: &HoldRecord, heading: &str) -> String {
        let v = serde_json::to_value(message(rec).unwrap()).unwrap();
        v["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["text"]["text"].as_str())
            .find(|t| t.starts_with(heading))
            .unwrap_or_else(|| panic!("no {heading:?} section: {v}"))
            .to_string()
    }

    /// The reason names the tables the statement touches, which an agent names as it likes
    /// (a quoted identifier may hold line breaks, backticks, mrkdwn): it cannot open a code block
    /// of its own that passes for the statement, nor format, mention or link; and a reason too
    /// long to show whole (a held `EXECUTE` shows what it runs there) cannot be approved here.
    #[test]
    fn the_reason_cannot_pass_for_the_statement_or_format_the_message() {
        let mut rec = record();
        rec.request.reason =
            "delete on x\n```\n*DELETE FROM orders WHERE id = 1*\n```\n<!channel> matched rule `r`".into();
        let why = section(&rec, "*Why held*");
        let inner = why.strip_prefix("*Why held*\n```").and_then(|t| t.strip_suffix("```")).expect(&why);
        assert!(!inner.contains("``") && !inner.contains('<'), "{why}");
        assert!(inner.contains("*DELETE FROM orders WHERE id = 1*"), "{why}");
        rec.request.reason = format!("delete on orders\n\nEXECUTE w runs:\n{}", "x".repeat(4000));
        assert!(!shown_in_full(&rec.request));
        assert!(!serde_json::to_string(&message(&rec).unwrap()).unwrap().contains(APPROVE_ACTION));
    }

    /// Letters and digits of other scripts that look like Latin ones are named, with their code
    /// points, in a warning; accented Latin letters and ordinary text raise none.
    #[test]
    fn look_alike_characters_are_pointed_out() {
        let mut rec = record();
        rec.request.statement = "DELETE FROM \u{43e}rders WHERE name = $1".into();
        rec.request.parameters = vec![Some("\u{430}dmin".into()), None, Some("１".into())];
        let warning = section(&rec, ":warning: *Look-alike");
        for needle in ["U+043E", "U+0430", "U+FF11"] {
            assert!(warning.contains(needle), "{needle}: {warning}");
        }
        rec.request.statement = "UPDATE users SET name = 'José Müller' WHERE id = $1".into();
        rec.request.parameters = vec![Some("Zoë".into())];
        let json = serde_json::to_string(&message(&rec).unwrap()).unwrap();
        assert!(!json.contains("Look-alike"), "{json}");
    }

    #[test]
    fn decided_messages_say_who_and_why_and_lose_the_buttons() {
        let mut rec = record();
        rec.status = Status::Denied;
        rec.decision = Some(HoldDecision {
            hold_id: rec.id(),
            outcome: HoldOutcome::Denied,
            decided_by: "dana".into(),
            reason: Some("not on a Friday".into()),
        });
        let json = serde_json::to_string(&message(&rec).unwrap()).unwrap();
        assert!(json.contains("Denied* by dana: not on a Friday"), "{json}");
        assert!(!json.contains(APPROVE_ACTION), "{json}");
        rec.status = Status::Expired;
        rec.decision.as_mut().unwrap().reason = Some("no decision within 5m".into());
        let json = serde_json::to_string(&message(&rec).unwrap()).unwrap();
        assert!(json.contains("Expired*: no decision within 5m"), "{json}");
    }
}
