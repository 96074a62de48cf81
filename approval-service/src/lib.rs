//! The approval service: consumes hold requests from the event bus, keeps the undecided ones in
//! memory, and turns them into decisions ([`proto::events::Event::HoldDecided`]) when an approver
//! answers through the REST API or when a hold expires.
//!
//! Delivery contract: a hold's delivery is acked only once the hold is decided (by this process or
//! by anyone else, seen on [`proto::subjects::HOLD_DECIDED`]), so a restarted service gets its
//! undecided holds redelivered. Holds are deduplicated by `hold.id`. A decision is published
//! first; only then is the hold removed and acked.
//!
//! # Layout
//! - [`hold`]: the pending holds, who decides ([`hold::Decider`]) and how a decision is made.
//! - `intake`: the bus consumers: hold requests in, decisions made elsewhere.
//! - `expiry`: expires holds nobody answered in time.
//! - [`api`]: the REST API (axum) and its JSON types, shared with [`client`].
//! - [`client`]: the REST client used by `airlock approvals list|approve|deny`.
//! - [`error`]: the service's error types.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub mod api;
pub mod client;
pub mod error;
mod expiry;
pub mod hold;
mod intake;

pub use error::{ApprovalError, HoldError};

/// The approval service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// HTTP listen address. Default `127.0.0.1:17080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer token for the REST API. Default: none (then `admin_token_file` must be set).
    #[serde(default)]
    pub admin_token: Option<String>,
    /// A file holding the REST API's bearer token (surrounding whitespace is trimmed). Default: none.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 17080))
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self { listen: default_listen(), admin_token: None, admin_token_file: None }
    }
}

impl ApprovalsConfig {
    /// The REST API's bearer token, from `admin_token` or `admin_token_file` (exactly one is set).
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
}

impl proto::config::Validate for ApprovalsConfig {
    fn validate(&self) -> Result<(), String> {
        match (&self.admin_token, &self.admin_token_file) {
            (None, None) => Err(ApprovalError::NoToken.to_string()),
            (Some(_), Some(_)) => Err(ApprovalError::TokenConflict.to_string()),
            (Some(t), None) if t.trim().is_empty() => {
                Err(ApprovalError::EmptyToken { path: None }.to_string())
            }
            _ => Ok(()),
        }
    }
}

/// Run the approval service until `shutdown` completes: consume hold requests and decisions from
/// `bus`, expire holds, and serve the REST API on `listener`.
///
/// On shutdown, undecided holds are left unacked, so another replica (or this one, restarted)
/// gets them redelivered.
pub async fn run(
    cfg: ApprovalsConfig,
    bus: eventbus::EventBus,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApprovalError> {
    let token = cfg.token()?;
    // Subscribe to decisions before consuming requests, so no decision for a fetched hold is missed.
    let decisions = bus.subscribe(proto::subjects::HOLD_DECIDED).await?;
    let durable = bus.durable(proto::subjects::APPROVALS_DURABLE, proto::subjects::HOLD_REQUESTED).await?;
    let holds = Arc::new(hold::Holds::new(bus));
    let stop = CancellationToken::new();

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(intake::consume_requests(holds.clone(), durable, stop.clone()));
    tasks.spawn(intake::watch_decisions(holds.clone(), decisions, stop.clone()));
    tasks.spawn(intake::keep_alive(holds.clone(), stop.clone()));
    tasks.spawn(expiry::run(holds.clone(), stop.clone()));

    let addr = listener.local_addr().ok();
    info!(listen = ?addr, "approval service listening");
    let router = api::router(holds, Arc::from(token));
    let serve_stop = stop.clone();
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            tokio::select! {
                () = shutdown => {}
                () = serve_stop.cancelled() => {}
            }
        })
        .await;
    stop.cancel();
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            warn!(error = %e, "approval service task ended abnormally");
        }
    }
    info!("approval service stopped");
    served.map_err(ApprovalError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn token_is_required() {
        let cfg = ApprovalsConfig::default();
        assert!(matches!(cfg.token(), Err(ApprovalError::NoToken)));
        assert!(proto::config::Validate::validate(&cfg).is_err());
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        let cfg = ApprovalsConfig { admin_token_file: Some(path), ..Default::default() };
        assert_eq!(cfg.token().unwrap(), "s3cret");
        assert!(proto::config::Validate::validate(&cfg).is_ok());
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
        let env = [("AIRLOCK_APPROVALS_ADMIN_TOKEN".to_string(), "from-env".to_string())];
        let cfg: ApprovalsConfig =
            proto::config::load(Some("listen = \"127.0.0.1:1\""), env, "AIRLOCK_APPROVALS_").unwrap();
        assert_eq!(cfg.token().unwrap(), "from-env");
        assert_eq!(cfg.listen.port(), 1);
    }
}
