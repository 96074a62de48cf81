//! [`AdminClient`]: the admin API (membership changes and status), with the admin token.

use proto::pb::policy_store_admin_client::PolicyStoreAdminClient;
use proto::pb::{AddLearnerRequest, MembershipResponse, NodeIds, StatusRequest, StatusResponse};
use tonic::transport::Channel;

use super::ClientError;
use crate::NodeId;

/// A client of one node's admin API. Any node answers; changes are forwarded to the leader.
#[derive(Clone)]
pub struct AdminClient {
    inner: PolicyStoreAdminClient<Channel>,
    authorization: super::Bearer,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient").finish_non_exhaustive()
    }
}

impl AdminClient {
    /// Connect to a node, e.g. `"http://127.0.0.1:17070"`, with the admin token.
    pub async fn connect(endpoint: &str, token: &str) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, token, &crate::ClientTls::default()).await
    }

    /// [`AdminClient::connect`], checking an `https://` node's certificate as `tls` says.
    pub async fn connect_with(
        endpoint: &str,
        token: &str,
        tls: &crate::ClientTls,
    ) -> Result<Self, ClientError> {
        let (channel, authorization) = super::connect(endpoint, token, tls).await?;
        Ok(Self { inner: PolicyStoreAdminClient::new(channel), authorization })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        super::authorized(message, &self.authorization)
    }

    /// Add `node_id` at `addr` (`host:port`) as a learner; returns once it has caught up.
    pub async fn add_learner(
        &mut self,
        node_id: NodeId,
        addr: &str,
    ) -> Result<MembershipResponse, ClientError> {
        let request = self.request(AddLearnerRequest { node_id, addr: addr.to_string() });
        Ok(self.inner.add_learner(request).await?.into_inner())
    }

    /// Make learners voters.
    pub async fn promote(&mut self, node_ids: Vec<NodeId>) -> Result<MembershipResponse, ClientError> {
        let request = self.request(NodeIds { node_ids });
        Ok(self.inner.promote(request).await?.into_inner())
    }

    /// Remove voters or learners from the cluster.
    pub async fn remove(&mut self, node_ids: Vec<NodeId>) -> Result<MembershipResponse, ClientError> {
        let request = self.request(NodeIds { node_ids });
        Ok(self.inner.remove(request).await?.into_inner())
    }

    /// The node's view of the cluster: its state, the leader, the members, the latest version.
    pub async fn status(&mut self) -> Result<StatusResponse, ClientError> {
        let request = self.request(StatusRequest {});
        Ok(self.inner.status(request).await?.into_inner())
    }
}
