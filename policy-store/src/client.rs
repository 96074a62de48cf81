//! Talking to the policy store: [`PolicyClient`] for policy commands, [`AdminClient`] for the
//! cluster, [`follow`] for proxies, [`diff`] to compare two versions' documents.

mod admin;
mod follow;

use proto::pb::policy_store_client::PolicyStoreClient;
use proto::pb::{ApplyRequest, ApplyResponse, GetRequest, HistoryRequest, PolicyVersion, WatchRequest};
use tonic::transport::{Channel, Endpoint};

pub use admin::AdminClient;
pub use follow::{ActivePolicy, Follower, StalePolicy, follow};

use crate::cluster::{CONSISTENCY_HEADER, LINEARIZABLE};
pub use crate::error::ClientError;

/// How long connecting to a store may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A gRPC client of one policy-store node.
#[derive(Debug, Clone)]
pub struct PolicyClient {
    inner: PolicyStoreClient<Channel>,
}

pub(crate) fn endpoint(endpoint: &str) -> Result<Endpoint, ClientError> {
    Endpoint::from_shared(endpoint.to_string())
        .map_err(|source| ClientError::InvalidEndpoint { endpoint: endpoint.to_string(), source })
        .map(|e| e.connect_timeout(CONNECT_TIMEOUT))
}

impl PolicyClient {
    /// Connect to a node, e.g. `"http://127.0.0.1:17070"`.
    pub async fn connect(endpoint: &str) -> Result<Self, ClientError> {
        let channel = self::endpoint(endpoint)?
            .connect()
            .await
            .map_err(|source| ClientError::Connect { endpoint: endpoint.to_string(), source })?;
        Ok(Self { inner: PolicyStoreClient::new(channel) })
    }

    /// Validate and store a YAML document. An invalid one fails with INVALID_ARGUMENT, whose
    /// message lists each error as "line N: path: message".
    pub async fn apply(&mut self, yaml: &str, author: &str) -> Result<ApplyResponse, ClientError> {
        let request = ApplyRequest { document_yaml: yaml.to_string(), author: author.to_string() };
        Ok(self.inner.apply(request).await?.into_inner())
    }

    /// One version with its document (0 = the latest). NOT_FOUND when there is no such version.
    pub async fn get(&mut self, version: u64) -> Result<PolicyVersion, ClientError> {
        Ok(self.inner.get(GetRequest { version }).await?.into_inner())
    }

    /// Like [`PolicyClient::get`], but linearizable: it reflects every write committed before
    /// the call, even when this node is a lagging follower (the read goes to the leader).
    pub async fn get_linearizable(&mut self, version: u64) -> Result<PolicyVersion, ClientError> {
        Ok(self.inner.get(linearizable(GetRequest { version })).await?.into_inner())
    }

    /// Every version, oldest first, without document bodies (`document_yaml` is empty).
    pub async fn history(&mut self) -> Result<Vec<PolicyVersion>, ClientError> {
        Ok(self.inner.history(HistoryRequest {}).await?.into_inner().versions)
    }

    /// Like [`PolicyClient::history`], but linearizable.
    pub async fn history_linearizable(&mut self) -> Result<Vec<PolicyVersion>, ClientError> {
        Ok(self.inner.history(linearizable(HistoryRequest {})).await?.into_inner().versions)
    }

    /// Apply version `version`'s document again, as a new version by `author`. The history keeps
    /// everything in between. Unchanged (`changed = false`) when it already is the latest.
    pub async fn rollback(&mut self, version: u64, author: &str) -> Result<ApplyResponse, ClientError> {
        if version == 0 {
            return Err(ClientError::Server(tonic::Status::invalid_argument("versions start at 1")));
        }
        let old = self.get_linearizable(version).await?;
        self.apply(&old.document_yaml, author).await
    }

    /// The versions after `from_version`, then each new one as it is committed.
    pub async fn watch(&mut self, from_version: u64) -> Result<tonic::Streaming<PolicyVersion>, ClientError> {
        Ok(self.inner.watch(WatchRequest { from_version }).await?.into_inner())
    }
}

fn linearizable<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(CONSISTENCY_HEADER, tonic::metadata::MetadataValue::from_static(LINEARIZABLE));
    request
}

/// A unified diff from `old` to `new` (labelled with their version numbers); empty when equal.
pub fn diff(old: &PolicyVersion, new: &PolicyVersion) -> String {
    if old.document_yaml == new.document_yaml {
        return String::new();
    }
    similar::TextDiff::from_lines(&old.document_yaml, &new.document_yaml)
        .unified_diff()
        .context_radius(3)
        .header(&format!("version {}", old.version), &format!("version {}", new.version))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: u64, yaml: &str) -> PolicyVersion {
        PolicyVersion { version: n, document_yaml: yaml.into(), ..PolicyVersion::default() }
    }

    #[test]
    fn diff_shows_removed_and_added_lines_between_versions() {
        let d = diff(&version(1, "a: 1\nb: 2\n"), &version(2, "a: 1\nb: 3\n"));
        assert!(d.starts_with("--- version 1\n+++ version 2\n"), "{d}");
        assert!(d.contains("\n-b: 2\n+b: 3\n"), "{d}");
        assert_eq!(diff(&version(1, "a: 1\n"), &version(3, "a: 1\n")), "");
    }
}
