//! What the policy store proposes to raft, and what applying it yields.

use serde::{Deserialize, Serialize};

/// A command in the raft log. The document was validated before it was proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Store `document_yaml` as the next version, unless it equals the latest one.
    Apply {
        /// The policy document, as YAML.
        document_yaml: String,
        /// Who applied it.
        author: String,
        /// When the node that accepted the request received it (Unix milliseconds).
        applied_at_unix_ms: i64,
    },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Apply { document_yaml, author, .. } => {
                write!(f, "apply({} bytes by {author})", document_yaml.len())
            }
        }
    }
}

/// The result of applying one log entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyOutcome {
    /// The latest version after the entry was applied (0 when there is none).
    pub version: u64,
    /// Whether the entry created a new version.
    pub changed: bool,
}
