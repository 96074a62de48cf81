//! [`StoredVersion`] as its protobuf message.

use crate::version::StoredVersion;

impl From<&StoredVersion> for proto::pb::PolicyVersion {
    fn from(v: &StoredVersion) -> Self {
        proto::pb::PolicyVersion {
            version: v.version,
            document_yaml: v.document_yaml.clone(),
            author: v.author.clone(),
            applied_at_unix_ms: v.applied_at_unix_ms,
            digest: v.digest.clone(),
        }
    }
}
