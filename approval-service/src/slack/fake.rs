//! A fake Slack for tests and the bench: a Web API server on loopback that records every call
//! (`chat.postMessage`, `chat.update`, `chat.postEphemeral`, `views.open`, `users.info`) and
//! answers like Slack, plus helpers that build signed interactivity callbacks as Slack sends them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::Notify;
use uuid::Uuid;

/// One recorded Web API call.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// The JSON body (POST) or the query parameters as a JSON object (GET).
    pub body: Value,
    pub at: std::time::Instant,
}

#[derive(Default)]
struct Inner {
    calls: Mutex<Vec<Call>>,
    users: Mutex<HashMap<String, String>>,
    seq: Mutex<u64>,
    changed: Notify,
}

/// The fake Slack Web API.
pub struct FakeSlack {
    /// The API base URL to configure as `slack.api_url`.
    pub api_url: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeSlack {
    /// Serve on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .route("/api/{method}", axum::routing::post(post).get(get))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let api_url = format!("http://{}/api", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { api_url, inner, task })
    }

    /// Make `users.info` know `user` with `email`.
    pub fn add_user(&self, user: &str, email: &str) {
        self.inner.users.lock().unwrap_or_else(PoisonError::into_inner).insert(user.into(), email.into());
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The bodies of the calls to `method` so far.
    pub fn bodies(&self, method: &str) -> Vec<Value> {
        self.calls().into_iter().filter(|c| c.method == method).map(|c| c.body).collect()
    }

    /// Wait until a call to `method` satisfies `pred`; returns it.
    pub async fn wait_for(
        &self,
        method: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Call> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.changed.notified();
            if let Some(c) = self.calls().into_iter().find(|c| c.method == method && pred(&c.body)) {
                return Some(c);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

fn record(inner: &Inner, method: &str, body: Value) {
    inner.calls.lock().unwrap_or_else(PoisonError::into_inner).push(Call {
        method: method.into(),
        body,
        at: std::time::Instant::now(),
    });
    inner.changed.notify_waiters();
}

async fn post(State(inner): State<Arc<Inner>>, Path(method): Path<String>, body: Bytes) -> Json<Value> {
    let body: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
        json!(form)
    });
    record(&inner, &method, body.clone());
    let ts = {
        let mut seq = inner.seq.lock().unwrap_or_else(PoisonError::into_inner);
        *seq += 1;
        format!("1700000000.{:06}", *seq)
    };
    let channel = body.get("channel").cloned().unwrap_or(Value::Null);
    Json(match method.as_str() {
        "chat.postMessage" => json!({
            "ok": true, "channel": channel, "ts": ts,
            "message": { "ts": ts, "text": body.get("text").cloned().unwrap_or(Value::Null) }
        }),
        "chat.update" => json!({
            "ok": true, "channel": channel, "ts": body.get("ts").cloned().unwrap_or(Value::Null),
            "message": { "text": body.get("text").cloned().unwrap_or(Value::Null) }
        }),
        "chat.postEphemeral" => json!({ "ok": true, "message_ts": ts }),
        "views.open" => {
            let mut view = body.get("view").cloned().unwrap_or_else(|| json!({}));
            if let Some(v) = view.as_object_mut() {
                v.insert("id".into(), json!("V0001"));
                v.insert("team_id".into(), json!("T0001"));
                v.insert("hash".into(), json!("h"));
            }
            json!({ "ok": true, "view": view })
        }
        _ => json!({ "ok": false, "error": "unknown_method" }),
    })
}

async fn get(
    State(inner): State<Arc<Inner>>,
    Path(method): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    record(&inner, &method, json!(q));
    if method != "users.info" {
        return Json(json!({ "ok": false, "error": "unknown_method" }));
    }
    let user = q.get("user").cloned().unwrap_or_default();
    let email = inner.users.lock().unwrap_or_else(PoisonError::into_inner).get(&user).cloned();
    Json(match email {
        Some(e) => json!({ "ok": true, "user": { "id": user, "name": user, "profile": { "email": e } } }),
        None => json!({ "ok": false, "error": "user_not_found" }),
    })
}

/// Slack's `v0` signature of `body` at `timestamp`.
pub fn sign(secret: &str, timestamp: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body.as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

/// Now, in Unix seconds, as Slack writes it.
pub fn now_ts() -> String {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0).to_string()
}

fn form(payload: &Value) -> String {
    serde_urlencoded::to_string([("payload", payload.to_string())]).expect("a string pair always encodes")
}

/// The form body of a button click (`block_actions`) by `user` on `hold`'s message.
pub fn click(user: &str, action_id: &str, hold: Uuid, channel: &str) -> String {
    form(&json!({
        "type": "block_actions",
        "user": { "id": user, "username": user, "team_id": "T0001" },
        "team": { "id": "T0001", "domain": "example" },
        "api_app_id": "A0001",
        "trigger_id": format!("trigger-{user}-{hold}"),
        "container": { "type": "message", "message_ts": "1700000000.000001", "channel_id": channel },
        "channel": { "id": channel, "name": "approvals" },
        "actions": [{ "type": "button", "action_id": action_id, "block_id": "airlock_hold", "value": hold.to_string(),
                      "action_ts": "1700000001.000001" }]
    }))
}

/// The form body of the deny modal's submission by `user` with `reason`.
pub fn deny_submission(user: &str, hold: Uuid, reason: &str) -> String {
    form(&json!({
        "type": "view_submission",
        "user": { "id": user, "username": user, "team_id": "T0001" },
        "team": { "id": "T0001", "domain": "example" },
        "api_app_id": "A0001",
        "trigger_id": format!("trigger-{user}-{hold}-submit"),
        "view": {
            "id": "V0001", "team_id": "T0001", "type": "modal", "hash": "h",
            "callback_id": crate::slack::DENY_CALLBACK,
            "private_metadata": hold.to_string(),
            "state": { "values": { "reason": { "reason": { "type": "plain_text_input", "value": reason } } } }
        }
    }))
}

/// POST `body` to the service at `base_url` (`http://127.0.0.1:17080`) as Slack would, signed
/// with `secret` now; returns the HTTP status.
pub async fn send(base_url: &str, secret: &str, body: &str) -> Result<u16, reqwest::Error> {
    let ts = now_ts();
    let resp = reqwest::Client::new()
        .post(format!("{}/slack/interactions", base_url.trim_end_matches('/')))
        .header("x-slack-request-timestamp", &ts)
        .header("x-slack-signature", sign(secret, &ts, body))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_string())
        .send()
        .await?;
    Ok(resp.status().as_u16())
}
