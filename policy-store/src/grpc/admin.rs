//! Serves the admin API (`proto/raft.proto`, service `PolicyStoreAdmin`): membership changes
//! and status. Every call needs the admin token, checked by the interceptor the service is
//! registered with (`lib.rs`); a follower forwards changes to the leader with the caller's token.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Membership};
use proto::pb::policy_store_admin_client::PolicyStoreAdminClient;
use proto::pb::policy_store_admin_server::PolicyStoreAdmin;
use proto::pb::{AddLearnerRequest, Member, MembershipResponse, NodeIds, StatusRequest, StatusResponse};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::cluster::{Channels, MAX_HOPS};
use crate::error::StoreError;
use crate::store::Versions;
use crate::{NodeId, Raft};

/// How long a change waits for a leader to be elected before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(5);

/// How long a change waits for an earlier membership change to be committed.
const IN_PROGRESS_WAIT: Duration = Duration::from_secs(10);

type WriteError = RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>;
type Written = openraft::raft::ClientWriteResponse<crate::TypeConfig>;

/// Run a membership change; while an earlier one is still being committed, wait and retry.
async fn change<F, Fut>(attempt: F) -> Result<Written, WriteError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Written, WriteError>>,
{
    let deadline = tokio::time::Instant::now() + IN_PROGRESS_WAIT;
    loop {
        match attempt().await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            ))) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

pub(crate) struct AdminService {
    node_id: NodeId,
    raft: Raft,
    versions: watch::Receiver<Versions>,
    channels: Arc<Channels>,
}

impl AdminService {
    pub(crate) fn new(
        node_id: NodeId,
        raft: Raft,
        versions: watch::Receiver<Versions>,
        channels: Arc<Channels>,
    ) -> Self {
        Self { node_id, raft, versions, channels }
    }

    /// The leader's admin client when `error` says this node is not the leader and the request
    /// may be forwarded again; otherwise an error (the caller then reports `error`).
    async fn leader_client(
        &self,
        error: &WriteError,
        hops: u32,
    ) -> Result<PolicyStoreAdminClient<tonic::transport::Channel>, StoreError> {
        if let RaftError::APIError(ClientWriteError::ForwardToLeader(f)) = error
            && hops < MAX_HOPS
        {
            let (id, node) = match (f.leader_id, &f.leader_node) {
                (Some(id), Some(node)) => (id, node.clone()),
                _ => crate::cluster::leader(&self.raft, LEADER_WAIT).await.ok_or(StoreError::NoLeader)?,
            };
            return Ok(PolicyStoreAdminClient::new(self.channels.node(id, &node)?));
        }
        Err(StoreError::NoLeader)
    }
}

/// The same message with the caller's token, marked as forwarded.
fn forward<T>(message: T, from: &tonic::metadata::MetadataMap) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(auth) = from.get("authorization") {
        request.metadata_mut().insert("authorization", auth.clone());
    }
    crate::cluster::mark_forwarded(&mut request, crate::cluster::hops(from));
    request
}

fn members(membership: &Membership<NodeId, BasicNode>) -> Vec<Member> {
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, node)| Member { node_id: *id, addr: node.addr.clone(), voter: voters.contains(id) })
        .collect()
}

fn answer(written: Written) -> Response<MembershipResponse> {
    Response::new(MembershipResponse {
        log_index: written.log_id.index,
        members: written.membership.as_ref().map(members).unwrap_or_default(),
    })
}

#[tonic::async_trait]
impl PolicyStoreAdmin for AdminService {
    async fn add_learner(
        &self,
        request: Request<AddLearnerRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let hops = crate::cluster::hops(request.metadata());
        let metadata = request.metadata().clone();
        let AddLearnerRequest { node_id, addr } = request.into_inner();
        match change(|| self.raft.add_learner(node_id, BasicNode::new(addr.clone()), true)).await {
            Ok(written) => {
                info!(node.id = node_id, node.addr = %addr, "added a learner");
                Ok(answer(written))
            }
            Err(e) => {
                let mut leader =
                    self.leader_client(&e, hops).await.map_err(|_| StoreError::Write(Box::new(e)))?;
                leader.add_learner(forward(AddLearnerRequest { node_id, addr }, &metadata)).await
            }
        }
    }

    async fn promote(&self, request: Request<NodeIds>) -> Result<Response<MembershipResponse>, Status> {
        let hops = crate::cluster::hops(request.metadata());
        let metadata = request.metadata().clone();
        let ids = request.into_inner();
        let set: BTreeSet<NodeId> = ids.node_ids.iter().copied().collect();
        match change(|| self.raft.change_membership(ChangeMembers::AddVoterIds(set.clone()), false)).await {
            Ok(written) => {
                info!(node.ids = ?ids.node_ids, "promoted to voters");
                Ok(answer(written))
            }
            Err(e) => {
                let mut leader =
                    self.leader_client(&e, hops).await.map_err(|_| StoreError::Write(Box::new(e)))?;
                leader.promote(forward(ids, &metadata)).await
            }
        }
    }

    async fn remove(&self, request: Request<NodeIds>) -> Result<Response<MembershipResponse>, Status> {
        let hops = crate::cluster::hops(request.metadata());
        let metadata = request.metadata().clone();
        let ids = request.into_inner();
        let membership = self.raft.metrics().borrow().membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut remove_voters = BTreeSet::new();
        let mut remove_learners = BTreeSet::new();
        for id in &ids.node_ids {
            if voters.contains(id) {
                remove_voters.insert(*id);
            } else if membership.get_node(id).is_some() {
                remove_learners.insert(*id);
            } else {
                return Err(StoreError::NotAMember(*id).into());
            }
        }
        let mut last = None;
        for step in [ChangeMembers::RemoveVoters(remove_voters), ChangeMembers::RemoveNodes(remove_learners)]
        {
            let empty = match &step {
                ChangeMembers::RemoveVoters(s) | ChangeMembers::RemoveNodes(s) => s.is_empty(),
                _ => false,
            };
            if empty {
                continue;
            }
            match change(|| self.raft.change_membership(step.clone(), false)).await {
                Ok(written) => last = Some(written),
                Err(e) => {
                    let mut leader =
                        self.leader_client(&e, hops).await.map_err(|_| StoreError::Write(Box::new(e)))?;
                    return leader.remove(forward(ids, &metadata)).await;
                }
            }
        }
        info!(node.ids = ?ids.node_ids, "removed from the cluster");
        match last {
            Some(written) => Ok(answer(written)),
            None => Ok(Response::new(MembershipResponse { log_index: 0, members: members(&membership) })),
        }
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let m = self.raft.metrics().borrow().clone();
        Ok(Response::new(StatusResponse {
            node_id: self.node_id,
            state: format!("{:?}", m.state),
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied_index: m.last_applied.map_or(0, |l| l.index),
            policy_version: self.versions.borrow().last().map_or(0, |v| v.version),
            members: members(m.membership_config.membership()),
        }))
    }
}
