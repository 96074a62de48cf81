//! Outgoing webhooks: a rule's `webhook: NAME` is told when its holds are created and decided.
//!
//! Each delivery is a JSON POST ([`Payload`]) with these headers:
//! - `X-Airlock-Event`: `hold.created` or `hold.decided`;
//! - `X-Airlock-Delivery`: the delivery id (the same on every retry; receivers deduplicate by it);
//! - `X-Airlock-Timestamp`: Unix seconds when the attempt was signed;
//! - `X-Airlock-Signature`: `sha256=` + hex HMAC-SHA256, keyed with the webhook's secret, of
//!   `{timestamp}.{body}`. Receivers recompute it and reject old timestamps.
//!
//! A delivery runs in its own task, off the decision path: anything but a 2xx answer is retried
//! with doubling backoff up to `max_attempts`, and a failure never blocks or changes a decision.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::api::PendingHold;
use crate::config::{WebhookConfig, secret};
use crate::error::ApprovalError;
use crate::hold::Hold;
use crate::store::HoldRecord;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-airlock-signature";
/// The timestamp header.
pub const TIMESTAMP_HEADER: &str = "x-airlock-timestamp";
/// The delivery id header.
pub const DELIVERY_HEADER: &str = "x-airlock-delivery";
/// The event header.
pub const EVENT_HEADER: &str = "x-airlock-event";
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A webhook body.
#[derive(Debug, Clone, Serialize)]
pub struct Payload {
    /// `hold.created` or `hold.decided`.
    pub event: &'static str,
    pub delivery_id: Uuid,
    pub hold: PendingHold,
    /// `pending`, `approved`, `denied` or `expired`.
    pub status: crate::store::Status,
    /// Set once decided.
    pub decided_by: Option<String>,
    pub reason: Option<String>,
    pub approvals: Vec<String>,
}

struct Hook {
    url: String,
    secret: String,
    max_attempts: u32,
    backoff: Duration,
    timeout: Duration,
}

/// The configured webhooks.
#[derive(Clone, Default)]
pub struct Webhooks {
    hooks: Arc<HashMap<String, Hook>>,
    http: reqwest::Client,
}

impl Webhooks {
    /// Read the webhooks and their secrets.
    pub fn from_config(
        cfg: &std::collections::BTreeMap<String, WebhookConfig>,
    ) -> Result<Self, ApprovalError> {
        let mut hooks = HashMap::new();
        for (name, w) in cfg {
            let secret = secret("webhook secret", w.secret.as_ref(), w.secret_file.as_ref())?
                .ok_or(ApprovalError::MissingSecret("webhook secret"))?;
            hooks.insert(
                name.clone(),
                Hook {
                    url: w.url.clone(),
                    secret,
                    max_attempts: w.max_attempts.max(1),
                    backoff: w.backoff,
                    timeout: w.timeout,
                },
            );
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a reqwest client without custom TLS settings always builds");
        Ok(Self { hooks: Arc::new(hooks), http })
    }

    /// Deliver `event` about `rec` to the webhook `name`, in the background.
    pub fn fire(&self, name: &str, event: &'static str, rec: &HoldRecord) {
        if !self.hooks.contains_key(name) {
            warn!(hold.id = %rec.id(), webhook = %name, "the rule names a webhook that is not configured");
            return;
        }
        let payload = Payload {
            event,
            delivery_id: crate::hold::derived_id(event, rec.id()),
            hold: PendingHold::from(Hold::from(rec)),
            status: rec.status,
            decided_by: rec.decision.as_ref().map(|d| d.decided_by.clone()),
            reason: rec.decision.as_ref().and_then(|d| d.reason.clone()),
            approvals: rec.approvals.iter().map(|a| a.by.clone()).collect(),
        };
        let this = self.clone();
        let name = name.to_string();
        tokio::spawn(async move { this.deliver(&name, &payload).await });
    }

    async fn deliver(&self, name: &str, payload: &Payload) {
        let Some(hook) = self.hooks.get(name) else { return };
        let body = match serde_json::to_vec(payload) {
            Ok(b) => b,
            Err(e) => {
                warn!(webhook = %name, error = %e, "encoding a webhook payload failed");
                return;
            }
        };
        let id = payload.hold.id;
        let mut wait = hook.backoff;
        for attempt in 1..=hook.max_attempts {
            let ts =
                SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0).to_string();
            let sig = sign(&hook.secret, &ts, &body);
            let sent = self
                .http
                .post(&hook.url)
                .timeout(hook.timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(EVENT_HEADER, payload.event)
                .header(DELIVERY_HEADER, payload.delivery_id.to_string())
                .header(TIMESTAMP_HEADER, &ts)
                .header(SIGNATURE_HEADER, sig)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    info!(hold.id = %id, webhook = %name, event = payload.event, attempt, "webhook delivered");
                    return;
                }
                Ok(r) => {
                    debug!(hold.id = %id, webhook = %name, status = %r.status(), attempt, "webhook refused")
                }
                Err(e) => debug!(hold.id = %id, webhook = %name, error = %e, attempt, "webhook unreachable"),
            }
            if attempt < hook.max_attempts {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
        }
        warn!(hold.id = %id, webhook = %name, event = payload.event, attempts = hook.max_attempts, "webhook delivery gave up");
    }
}

/// `sha256=` + hex HMAC-SHA256 of `{timestamp}.{body}`.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_covers_timestamp_and_body() {
        let a = sign("k", "1700000000", b"{}");
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64, "{a}");
        assert_eq!(a, sign("k", "1700000000", b"{}"));
        assert_ne!(a, sign("k", "1700000001", b"{}"));
        assert_ne!(a, sign("k", "1700000000", b"{ }"));
        assert_ne!(a, sign("other", "1700000000", b"{}"));
    }
}
