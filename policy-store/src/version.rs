//! One stored policy version and its digest.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A version as the state machine stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVersion {
    /// 1, 2, 3, ... in the order they were committed.
    pub version: u64,
    /// The policy document, as YAML, byte for byte as applied.
    pub document_yaml: String,
    /// Who applied it.
    pub author: String,
    /// When it was applied (Unix milliseconds).
    pub applied_at_unix_ms: i64,
    /// Hex SHA-256 of `document_yaml`.
    pub digest: String,
}

/// Hex SHA-256 of a document, as stored in [`StoredVersion::digest`].
pub fn digest(document_yaml: &str) -> String {
    hex::encode(Sha256::digest(document_yaml.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_hex_sha256_of_the_text() {
        assert_eq!(digest(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_ne!(digest("rules: []\n"), digest("rules: []"));
    }
}
