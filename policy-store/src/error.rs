//! Errors of the policy store: [`StoreError`] on the server (mapped once to `tonic::Status`),
//! [`DbError`] for the redb storage underneath, and [`ClientError`] for callers.

use std::path::PathBuf;

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{AnyError, BasicNode, ErrorSubject, ErrorVerb, StorageIOError};

use crate::NodeId;

/// Something went wrong in the store's redb file.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("opening the storage file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("creating the data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting a storage transaction")]
    Transaction(#[from] redb::TransactionError),
    #[error("opening a storage table")]
    Table(#[from] redb::TableError),
    #[error("reading or writing storage")]
    Storage(#[from] redb::StorageError),
    #[error("committing to storage")]
    Commit(#[from] redb::CommitError),
    #[error("stored {what} is not valid")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding {what} for storage")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("storage task failed")]
    Task(#[from] tokio::task::JoinError),
}

impl DbError {
    /// As openraft's storage error, saying what was being done to what.
    pub(crate) fn into_raft(
        self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
    ) -> openraft::StorageError<NodeId> {
        StorageIOError::new(subject, verb, AnyError::new(&self)).into()
    }
}

/// A policy-store server error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("policy-store storage")]
    Db(#[from] DbError),
    #[error("reading the listener's address")]
    Listener(#[source] std::io::Error),
    #[error("invalid raft config")]
    RaftConfig(#[source] Box<openraft::ConfigError>),
    #[error("raft stopped")]
    RaftFatal(#[source] Box<openraft::error::Fatal<NodeId>>),
    #[error("initializing the raft cluster")]
    Initialize(#[source] Box<RaftError<NodeId, InitializeError<NodeId, BasicNode>>>),
    #[error("writing to raft")]
    Write(#[source] Box<RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>),
    #[error("serving gRPC")]
    Serve(#[source] tonic::transport::Error),
    /// The document failed validation; the message lists each error as "line N: path: message".
    #[error("{0}")]
    InvalidDocument(proto::policy::ValidationErrors),
    #[error("no policy version has been applied yet")]
    NoVersions,
    #[error("policy version {0} does not exist")]
    VersionNotFound(u64),
    #[error("confirming leadership for a linearizable read")]
    CheckLeader(#[source] Box<RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>>),
    #[error("no raft leader elected yet; retry")]
    NoLeader,
    /// This node has not confirmed with the raft leader and a quorum that it is current (a
    /// partition, or no leader): it serves no Watch stream, so followers move to another node.
    #[error(
        "this policy-store node cannot reach a raft quorum: not confirmed current for over {}s; \
         try another node",
        crate::confirm::UNCONFIRMED_LIMIT.as_secs()
    )]
    NoQuorum,
    #[error("invalid node address {addr:?}")]
    PeerAddress {
        addr: String,
        #[source]
        source: Box<ClientError>,
    },
    /// No token, or one that matches neither the admin token nor the read token.
    #[error("missing or wrong bearer token (authorization: Bearer <token>)")]
    Unauthenticated,
    /// The read token was presented for something only the admin token may do.
    #[error("this call needs the admin token; the read token only reads")]
    AdminOnly,
    #[error(
        "policy_store.admin_token or policy_store.admin_token_file must be set: the policy store \
         refuses to start without an admin token (it guards policy writes, the admin API and raft RPCs)"
    )]
    NoAdminToken,
    #[error("policy_store.{setting}: {problem}")]
    BadToken { setting: &'static str, problem: &'static str },
    #[error("reading policy_store.{setting} {path}")]
    TokenFile {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the policy document is {bytes} bytes; the policy store accepts at most {limit} bytes \
         (policy_store::MAX_DOCUMENT_BYTES)"
    )]
    DocumentTooLarge { bytes: usize, limit: usize },
    #[error(
        "the stored version would be {bytes} bytes; followers accept at most {limit} bytes \
         (policy_store::MAX_VERSION_BYTES)"
    )]
    VersionTooLarge { bytes: usize, limit: usize },
    #[error("author: {0}")]
    InvalidAuthor(&'static str),
    #[error("raft RPC payload is not valid")]
    Payload(#[source] serde_json::Error),
    #[error("node {0} is not a member of the cluster")]
    NotAMember(NodeId),
    #[error("policy_store.{setting} {path}: {problem}")]
    Tls { setting: &'static str, path: PathBuf, problem: String },
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        use openraft::error::ClientWriteError as W;
        match e {
            StoreError::InvalidDocument(errors) => tonic::Status::invalid_argument(errors.to_string()),
            StoreError::NoVersions | StoreError::VersionNotFound(_) => {
                tonic::Status::not_found(e.to_string())
            }
            StoreError::Write(ref write) => match write.as_ref() {
                RaftError::APIError(W::ForwardToLeader(f)) => {
                    let message = match (f.leader_id, &f.leader_node) {
                        (Some(id), Some(node)) => {
                            format!("not the leader; the leader is node {id} at {}", node.addr)
                        }
                        (Some(id), None) => format!("not the leader; the leader is node {id}"),
                        _ => "no raft leader elected yet; retry".to_string(),
                    };
                    tonic::Status::unavailable(message)
                }
                RaftError::Fatal(_) => tonic::Status::unavailable(error_chain(&e)),
                RaftError::APIError(W::ChangeMembershipError(_)) => {
                    tonic::Status::failed_precondition(error_chain(&e))
                }
            },
            StoreError::CheckLeader(_) | StoreError::NoLeader | StoreError::NoQuorum => {
                tonic::Status::unavailable(error_chain(&e))
            }
            StoreError::Unauthenticated => tonic::Status::unauthenticated(e.to_string()),
            StoreError::AdminOnly => tonic::Status::permission_denied(e.to_string()),
            StoreError::DocumentTooLarge { .. }
            | StoreError::VersionTooLarge { .. }
            | StoreError::InvalidAuthor(_) => tonic::Status::invalid_argument(e.to_string()),
            StoreError::Payload(_) => tonic::Status::invalid_argument(error_chain(&e)),
            StoreError::NotAMember(_) => tonic::Status::not_found(e.to_string()),
            StoreError::RaftFatal(_) => tonic::Status::unavailable(error_chain(&e)),
            other => tonic::Status::internal(error_chain(&other)),
        }
    }
}

/// "outer: inner: innermost", so a Status carries the cause and not only the context.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A policy-store client error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the policy-store CA file {path}: {problem}")]
    Tls { path: PathBuf, problem: String },
    #[error("policy-store endpoint {0:?}: must start with https:// (or http:// on a trusted network)")]
    Scheme(String),
    #[error("invalid policy-store endpoint {endpoint:?}")]
    InvalidEndpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connecting to the policy store at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the token is not a valid header value (printable ASCII without spaces)")]
    InvalidToken,
    /// The server's answer; displays the server's message verbatim.
    #[error("{}", .0.message())]
    Server(tonic::Status),
}

impl ClientError {
    /// The gRPC code of a server answer (`None` when the request never got one).
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Server(status) => Some(status.code()),
            _ => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Server(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_document_becomes_invalid_argument_with_the_validation_message() {
        let errors = proto::policy::parse("rules: [{ name: x, action: dney }]\n").expect_err("invalid");
        let status = tonic::Status::from(StoreError::InvalidDocument(errors.clone()));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), errors.to_string());
    }

    #[test]
    fn missing_versions_become_not_found() {
        assert_eq!(tonic::Status::from(StoreError::NoVersions).code(), tonic::Code::NotFound);
        let status = tonic::Status::from(StoreError::VersionNotFound(9));
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "policy version 9 does not exist");
    }

    #[test]
    fn no_leader_becomes_unavailable() {
        let forward = openraft::error::ForwardToLeader::<NodeId, BasicNode>::empty();
        let write = RaftError::APIError(ClientWriteError::ForwardToLeader(forward));
        let status = tonic::Status::from(StoreError::Write(Box::new(write)));
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn client_error_shows_the_server_message_verbatim() {
        let e =
            ClientError::from(tonic::Status::invalid_argument("line 4: rules[0].action: unknown variant"));
        assert_eq!(e.to_string(), "line 4: rules[0].action: unknown variant");
        assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    }
}
