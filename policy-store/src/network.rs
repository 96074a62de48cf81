//! The raft network: how a node reaches its peers.
//!
//! A single-member cluster never sends a raft RPC, so peers are not wired yet: every RPC fails
//! with [`Unreachable`], which makes openraft back off and retry. Raft RPCs over tonic replace
//! [`Peer`] when the store runs as a 3- or 5-node cluster.

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::{NodeId, TypeConfig};

/// Creates a [`Peer`] per target node.
#[derive(Debug, Clone, Copy, Default)]
pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        Peer { target, addr: node.addr.clone() }
    }
}

/// A connection to one peer (not wired yet).
#[derive(Debug, Clone)]
pub struct Peer {
    target: NodeId,
    addr: String,
}

/// Why a peer cannot be reached.
#[derive(Debug, thiserror::Error)]
#[error("raft RPCs to peers are not implemented yet (node {target} at {addr})")]
pub struct PeersNotWired {
    target: NodeId,
    addr: String,
}

impl Peer {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<NodeId, BasicNode, E> {
        let why = PeersNotWired { target: self.target, addr: self.addr.clone() };
        RPCError::Unreachable(Unreachable::new(&why))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(self.unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(self.unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(self.unreachable())
    }
}
