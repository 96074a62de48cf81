//! Errors of the approval service.

use std::path::PathBuf;

use proto::events::HoldId;

/// Starting or running the service.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("approvals: set admin_token or admin_token_file")]
    NoToken,
    #[error("approvals: set admin_token or admin_token_file, not both")]
    TokenConflict,
    #[error("approvals: reading admin_token_file {path}: {source}", path = path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("approvals: the admin token{} is empty", match path { Some(p) => format!(" in {}", p.display()), None => String::new() })]
    EmptyToken { path: Option<PathBuf> },
    #[error("approvals: set {0} or its _file variant, not both")]
    SecretConflict(&'static str),
    #[error("approvals: set the {0} (or its _file variant)")]
    MissingSecret(&'static str),
    #[error("approvals: the {what}{} is empty", match path { Some(p) => format!(" in {}", p.display()), None => String::new() })]
    EmptySecret { what: &'static str, path: Option<PathBuf> },
    #[error("approvals: reading the {what} from {path}: {source}", path = path.display())]
    SecretFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("approvals.{0}")]
    Oidc(String),
    #[error("approvals: following the policy store: {0}")]
    Follow(#[source] policy_store::ClientError),
    #[error("approvals: opening the hold store: {0}")]
    Store(#[from] StoreError),
    #[error("approvals: setting up the event bus: {0}")]
    Bus(#[from] eventbus::BusError),
    #[error("approvals: serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
}

/// Deciding a hold.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("hold {0} is not pending (unknown, or already decided)")]
    NotFound(HoldId),
    #[error("hold {0} has expired; its expiry is being published")]
    Expired(HoldId),
    #[error("hold {0} is being decided right now")]
    Busy(HoldId),
    #[error("{decider} may not decide hold {id}: {why}")]
    NotAllowed { id: HoldId, decider: String, why: String },
    #[error("{decider} has already approved hold {id}")]
    AlreadyApproved { id: HoldId, decider: String },
    #[error("hold store: {0}")]
    Store(#[from] StoreError),
    #[error("publishing the decision for hold {id}: {source}")]
    Publish {
        id: HoldId,
        #[source]
        source: eventbus::BusError,
    },
}

/// Reading or writing hold records.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key-value store: {0}")]
    Kv(String),
    #[error("hold record is not valid JSON: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("too many concurrent updates to one hold record")]
    Contention,
}
