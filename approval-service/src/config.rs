//! The service's configuration (`[approvals]` in `airlock.toml`). Secrets (the admin token, the
//! Slack bot token and signing secret, webhook secrets) live here, in the service's config, its
//! environment (`AIRLOCK_APPROVALS__SLACK__SIGNING_SECRET=...`) or files, never in the policy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proxy_node::identity::OidcConfig;
use serde::Deserialize;

use crate::error::ApprovalError;

/// The approval service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// HTTP listen address (REST API, Slack interactivity). Default `127.0.0.1:17080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Break-glass bearer token for the REST API: it may decide any hold, whatever the rule's
    /// approver groups and `min`, except that a named requester never approves itself.
    /// Default: none (then `oidc` or `admin_token_file` must be set).
    #[serde(default)]
    pub admin_token: Option<String>,
    /// A file holding the admin token (surrounding whitespace is trimmed). Default: none.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Approvers' OIDC issuer: a REST caller whose bearer token is a JWT from this issuer acts as
    /// its `sub`, with its groups. Default: none (`airlock` fills it from `[proxy.oidc]`).
    #[serde(default)]
    pub oidc: Option<OidcConfig>,
    /// Policy stores to follow, to read each rule's `slack`, `webhook` and `grant` settings.
    /// Default: none (`airlock` fills it from `[proxy] policy_store`).
    #[serde(default)]
    pub policy_store: Vec<String>,
    /// The bearer token to follow `policy_store` with: the store's read token (or its admin
    /// token). Required when `policy_store` is set. Default: none (`airlock` fills it from
    /// `[proxy] policy_store_token(_file)`).
    #[serde(default)]
    pub policy_store_token: Option<String>,
    /// A file holding `policy_store_token` (trimmed). Default: none.
    #[serde(default)]
    pub policy_store_token_file: Option<PathBuf>,
    /// The CA (PEM) that `https://` policy-store endpoints' certificates are checked against.
    /// Default: the system's trusted roots (`airlock` fills it from `[proxy]
    /// policy_store_ca_file`).
    #[serde(default)]
    pub policy_store_ca_file: Option<PathBuf>,
    /// Known approvers: how Slack users map to identities and groups. Default: none.
    #[serde(default)]
    pub approvers: Vec<ApproverEntry>,
    /// The Slack bot. Default: none (no Slack).
    #[serde(default)]
    pub slack: Option<SlackConfig>,
    /// Outgoing webhooks by name, referred to by a rule's `webhook`. Default: none.
    #[serde(default)]
    pub webhooks: BTreeMap<String, WebhookConfig>,
}

/// One approver: an identity, its groups, and how it is recognised in Slack.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverEntry {
    /// The identity recorded as `decided_by` (use the approver's OIDC `sub`).
    pub name: String,
    /// Matched against the Slack profile's e-mail (from `users.info`), case-insensitively.
    /// Default: none.
    #[serde(default)]
    pub email: Option<String>,
    /// An explicit Slack user id (`U0123ABC`); checked before the e-mail. Default: none.
    #[serde(default)]
    pub slack_user: Option<String>,
    /// The approver's groups, matched against a rule's `approvers.groups`. Default: none.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The Slack bot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// The bot token (`xoxb-...`). Set this or `bot_token_file`.
    #[serde(default)]
    pub bot_token: Option<String>,
    /// A file holding the bot token. Default: none.
    #[serde(default)]
    pub bot_token_file: Option<PathBuf>,
    /// The app's signing secret, for interactivity requests. Set this or `signing_secret_file`.
    #[serde(default)]
    pub signing_secret: Option<String>,
    /// A file holding the signing secret. Default: none.
    #[serde(default)]
    pub signing_secret_file: Option<PathBuf>,
    /// The Web API base URL. Default `https://slack.com/api` (tests point it at a fake Slack).
    #[serde(default = "default_slack_api")]
    pub api_url: String,
    /// The channel for holds whose rule names none. Default: none (such holds are not posted).
    #[serde(default)]
    pub default_channel: Option<String>,
    /// The workspace (`T…`) whose members may decide holds from Slack. Default: none (any
    /// workspace the bot's messages reach, such as the other side of a Slack Connect channel:
    /// a warning at start says so).
    #[serde(default)]
    pub team_id: Option<String>,
}

/// An outgoing webhook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST (JSON).
    pub url: String,
    /// HMAC-SHA256 key for the `X-Airlock-Signature` header. Set this or `secret_file`.
    #[serde(default)]
    pub secret: Option<String>,
    /// A file holding the secret. Default: none.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Attempts per delivery before giving up. Default 6.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// The first retry's delay; it doubles each time (capped at 30s). Default 500ms.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// Time allowed per attempt. Default 5s.
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 17080))
}
fn default_slack_api() -> String {
    "https://slack.com/api".into()
}
fn default_attempts() -> u32 {
    6
}
fn default_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_webhook_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_token: None,
            admin_token_file: None,
            oidc: None,
            policy_store: Vec::new(),
            policy_store_token: None,
            policy_store_token_file: None,
            policy_store_ca_file: None,
            approvers: Vec::new(),
            slack: None,
            webhooks: BTreeMap::new(),
        }
    }
}

/// A secret from its value or its file (trimmed; empty is an error).
pub(crate) fn secret(
    what: &'static str,
    value: Option<&String>,
    file: Option<&PathBuf>,
) -> Result<Option<String>, ApprovalError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(ApprovalError::SecretConflict(what)),
        (None, None) => Ok(None),
        (Some(v), None) => {
            let v = v.trim();
            if v.is_empty() {
                Err(ApprovalError::EmptySecret { what, path: None })
            } else {
                Ok(Some(v.into()))
            }
        }
        (None, Some(path)) => read_secret(what, path).map(Some),
    }
}

fn read_secret(what: &'static str, path: &Path) -> Result<String, ApprovalError> {
    let text = std::fs::read_to_string(path).map_err(|source| ApprovalError::SecretFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let t = text.trim();
    if t.is_empty() {
        Err(ApprovalError::EmptySecret { what, path: Some(path.to_path_buf()) })
    } else {
        Ok(t.to_string())
    }
}

impl ApprovalsConfig {
    /// The admin token, from `admin_token` or `admin_token_file` (exactly one is set).
    pub fn token(&self) -> Result<String, ApprovalError> {
        match (&self.admin_token, &self.admin_token_file) {
            (Some(_), Some(_)) => Err(ApprovalError::TokenConflict),
            (None, None) => Err(ApprovalError::NoToken),
            (Some(t), None) => {
                let t = t.trim();
                if t.is_empty() { Err(ApprovalError::EmptyToken { path: None }) } else { Ok(t.to_string()) }
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ApprovalError::TokenFile { path: path.clone(), source })?;
                let t = text.trim();
                if t.is_empty() {
                    Err(ApprovalError::EmptyToken { path: Some(path.clone()) })
                } else {
                    Ok(t.to_string())
                }
            }
        }
    }

    /// The token to follow the policy store with, from `policy_store_token` or its file; an
    /// error when `policy_store` is set without one.
    pub fn policy_store_token(&self) -> Result<Option<String>, ApprovalError> {
        let token = secret(
            "policy_store_token",
            self.policy_store_token.as_ref(),
            self.policy_store_token_file.as_ref(),
        )?;
        if token.is_none() && !self.policy_store.is_empty() {
            return Err(ApprovalError::MissingSecret("policy_store_token"));
        }
        Ok(token)
    }

    /// The admin token if one is configured; `Ok(None)` is allowed when OIDC is.
    pub(crate) fn admin_token(&self) -> Result<Option<String>, ApprovalError> {
        match self.token() {
            Ok(t) => Ok(Some(t)),
            Err(ApprovalError::NoToken) if self.oidc.is_some() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl proto::config::Validate for ApprovalsConfig {
    fn validate(&self) -> Result<(), String> {
        match (&self.admin_token, &self.admin_token_file) {
            (None, None) if self.oidc.is_none() => return Err(ApprovalError::NoToken.to_string()),
            (Some(_), Some(_)) => return Err(ApprovalError::TokenConflict.to_string()),
            (Some(t), None) if t.trim().is_empty() => {
                return Err(ApprovalError::EmptyToken { path: None }.to_string());
            }
            _ => {}
        }
        // The same checks as `[proxy.oidc]`: pinned public-key algorithms, an http(s) issuer. An
        // approver's token decides holds, so it must be no easier to forge than an agent's.
        if let Some(o) = &self.oidc {
            o.validate().map_err(|e| format!("approvals.{e}"))?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, a) in self.approvers.iter().enumerate() {
            if a.name.trim().is_empty() {
                return Err(format!("approvals.approvers[{i}].name must not be empty"));
            }
            if !names.insert(a.name.as_str()) {
                return Err(format!("approvals.approvers[{i}].name: `{}` is listed twice", a.name));
            }
        }
        if let Some(s) = &self.slack {
            if s.bot_token.is_none() && s.bot_token_file.is_none() {
                return Err("approvals.slack: set bot_token or bot_token_file".into());
            }
            if s.signing_secret.is_none() && s.signing_secret_file.is_none() {
                return Err("approvals.slack: set signing_secret or signing_secret_file".into());
            }
            if !(s.api_url.starts_with("https://") || s.api_url.starts_with("http://")) {
                return Err("approvals.slack.api_url must be an http(s) URL".into());
            }
        }
        for (name, w) in &self.webhooks {
            if !(w.url.starts_with("https://") || w.url.starts_with("http://")) {
                return Err(format!("approvals.webhooks.{name}.url must be an http(s) URL"));
            }
            if w.secret.is_none() && w.secret_file.is_none() {
                return Err(format!("approvals.webhooks.{name}: set secret or secret_file"));
            }
            if w.max_attempts == 0 {
                return Err(format!("approvals.webhooks.{name}.max_attempts must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::config::Validate;

    #[test]
    fn listen_defaults_to_17080_on_loopback() {
        let cfg: ApprovalsConfig = serde_json::from_str(r#"{"admin_token":"t"}"#).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:17080".parse().unwrap());
        assert_eq!(cfg.token().unwrap(), "t");
    }

    #[test]
    fn unknown_config_fields_are_rejected() {
        let err = serde_json::from_str::<ApprovalsConfig>(r#"{"admin_tokn":"t"}"#).unwrap_err();
        assert!(err.to_string().contains("admin_tokn"), "{err}");
    }

    #[test]
    fn token_is_required_without_oidc() {
        let cfg = ApprovalsConfig::default();
        assert!(matches!(cfg.token(), Err(ApprovalError::NoToken)));
        assert!(cfg.validate().is_err());
        let cfg = ApprovalsConfig {
            oidc: Some(OidcConfig::for_issuer("http://127.0.0.1:1")),
            ..Default::default()
        };
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.admin_token().unwrap(), None);
    }

    #[test]
    fn approvers_oidc_is_checked_like_the_proxys() {
        for (toml, why) in [
            (
                "[oidc]\nissuer = \"http://127.0.0.1:1\"\nalgorithms = [\"HS256\"]\n",
                "shared-secret algorithm",
            ),
            ("[oidc]\nissuer = \"http://127.0.0.1:1\"\nalgorithms = []\n", "must not be empty"),
            ("[oidc]\nissuer = \"ftp://idp.example.com\"\n", "http(s) URL"),
        ] {
            let e = proto::config::load::<ApprovalsConfig>(Some(toml), vec![], "X_").unwrap_err().to_string();
            assert!(e.contains("approvals.oidc") && e.contains(why), "{toml}: {e}");
        }
        let ok = "[oidc]\nissuer = \"https://idp.example.com\"\nalgorithms = [\"ES256\"]\n";
        assert!(proto::config::load::<ApprovalsConfig>(Some(ok), vec![], "X_").is_ok());
    }

    #[test]
    fn following_a_policy_store_needs_its_token() {
        let cfg = ApprovalsConfig { policy_store: vec!["http://127.0.0.1:1".into()], ..Default::default() };
        let e = cfg.policy_store_token().expect_err("no token");
        assert!(e.to_string().contains("policy_store_token"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("read-token");
        std::fs::write(&path, "rd\n").unwrap();
        let cfg = ApprovalsConfig { policy_store_token_file: Some(path), ..cfg };
        assert_eq!(cfg.policy_store_token().unwrap().as_deref(), Some("rd"));
        assert_eq!(ApprovalsConfig::default().policy_store_token().unwrap(), None);
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        let cfg = ApprovalsConfig { admin_token_file: Some(path), ..Default::default() };
        assert_eq!(cfg.token().unwrap(), "s3cret");
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn empty_or_missing_token_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "\n  \n").unwrap();
        let cfg = ApprovalsConfig { admin_token_file: Some(path.clone()), ..Default::default() };
        assert!(matches!(cfg.token(), Err(ApprovalError::EmptyToken { .. })));
        let cfg = ApprovalsConfig { admin_token_file: Some(dir.path().join("absent")), ..Default::default() };
        let err = cfg.token().unwrap_err();
        assert!(matches!(err, ApprovalError::TokenFile { .. }));
        assert!(err.to_string().contains("absent"), "{err}");
    }

    #[test]
    fn setting_both_token_sources_is_an_error() {
        let cfg = ApprovalsConfig {
            admin_token: Some("a".into()),
            admin_token_file: Some("/x".into()),
            ..Default::default()
        };
        assert!(matches!(cfg.token(), Err(ApprovalError::TokenConflict)));
    }

    #[test]
    fn config_loads_through_the_shared_loader_with_env_overrides() {
        let env = [
            ("AIRLOCK_APPROVALS_ADMIN_TOKEN".to_string(), "from-env".to_string()),
            ("AIRLOCK_APPROVALS_SLACK__SIGNING_SECRET".to_string(), "shh".to_string()),
        ];
        let toml = "listen = \"127.0.0.1:1\"\n[slack]\nbot_token = \"xoxb-1\"\ndefault_channel = \"C1\"\n\
                    [webhooks.pager]\nurl = \"http://127.0.0.1:9/hook\"\nsecret = \"k\"\n\
                    [[approvers]]\nname = \"dana\"\nemail = \"dana@example.com\"\ngroups = [\"dba\"]\n";
        let cfg: ApprovalsConfig = proto::config::load(Some(toml), env, "AIRLOCK_APPROVALS_").unwrap();
        assert_eq!(cfg.token().unwrap(), "from-env");
        assert_eq!(cfg.listen.port(), 1);
        let slack = cfg.slack.unwrap();
        assert_eq!(slack.signing_secret.as_deref(), Some("shh"));
        assert_eq!(slack.api_url, "https://slack.com/api");
        assert_eq!(cfg.webhooks["pager"].max_attempts, 6);
        assert_eq!(cfg.approvers[0].groups, vec!["dba".to_string()]);
    }

    #[test]
    fn slack_and_webhooks_need_their_secrets() {
        let toml = "admin_token = \"t\"\n[slack]\nbot_token = \"xoxb-1\"\n";
        let e = proto::config::load::<ApprovalsConfig>(Some(toml), vec![], "X_").unwrap_err();
        assert!(e.to_string().contains("signing_secret"), "{e}");
        let toml = "admin_token = \"t\"\n[webhooks.pager]\nurl = \"http://x\"\n";
        let e = proto::config::load::<ApprovalsConfig>(Some(toml), vec![], "X_").unwrap_err();
        assert!(e.to_string().contains("webhooks.pager"), "{e}");
    }
}
