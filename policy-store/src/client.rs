//! Talking to the policy store: [`PolicyClient`] for admin commands, [`follow`] for proxies.

mod follow;

use proto::pb::policy_store_client::PolicyStoreClient;
use proto::pb::{ApplyRequest, ApplyResponse, GetRequest, HistoryRequest, PolicyVersion, WatchRequest};
use tonic::transport::{Channel, Endpoint};

pub use follow::{ActivePolicy, Follower, follow};

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

    /// Every version, oldest first, without document bodies (`document_yaml` is empty).
    pub async fn history(&mut self) -> Result<Vec<PolicyVersion>, ClientError> {
        Ok(self.inner.history(HistoryRequest {}).await?.into_inner().versions)
    }

    /// The versions after `from_version`, then each new one as it is committed.
    pub async fn watch(&mut self, from_version: u64) -> Result<tonic::Streaming<PolicyVersion>, ClientError> {
        Ok(self.inner.watch(WatchRequest { from_version }).await?.into_inner())
    }
}
