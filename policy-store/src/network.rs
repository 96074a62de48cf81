//! The raft network: raft RPCs to peers over tonic (`proto/raft.proto`, service `Raft`).
//!
//! openraft's request and response types travel as JSON inside a protobuf `bytes` field; the
//! answer is the JSON of `Result<response, RaftError>`, so a remote raft error comes back as
//! [`RPCError::RemoteError`]. A transport failure is [`Unreachable`] (openraft backs off), any
//! other gRPC status a [`NetworkError`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use proto::pb::RaftPayload;
use proto::pb::raft_client::RaftClient;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use crate::{NodeId, TypeConfig};

/// Connecting to a peer may take this long before the RPC counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Raft messages (entries carry whole documents; snapshots come in chunks).
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Creates a [`Peer`] per target node. Carries the admin token, sent on every RPC (peers refuse
/// raft RPCs without it), and the configured peer addresses, which win over the addresses in the
/// membership.
#[derive(Clone)]
pub struct Network {
    token: Arc<str>,
    overrides: Arc<BTreeMap<NodeId, String>>,
    peers: crate::tls::Peers,
}

impl Network {
    /// A network whose RPCs carry `token` as a bearer token and reach the nodes in `overrides`
    /// at those addresses.
    pub(crate) fn new(
        token: Arc<str>,
        overrides: BTreeMap<NodeId, String>,
        peers: crate::tls::Peers,
    ) -> Self {
        Self { token, overrides: Arc::new(overrides), peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let addr = self.overrides.get(&target).unwrap_or(&node.addr).clone();
        let client = (self.peers)
            .endpoint(&addr, CONNECT_TIMEOUT)
            .map(|e| e.tcp_nodelay(true).connect_lazy())
            .map(|channel| {
                RaftClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
            })
            .map_err(|e| e.to_string());
        Peer { target, addr, client, token: self.token.clone() }
    }
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").field("overrides", &self.overrides).finish_non_exhaustive()
    }
}

/// A connection to one peer (connected lazily, reconnected by tonic when it drops).
#[derive(Clone)]
pub struct Peer {
    target: NodeId,
    addr: String,
    client: Result<RaftClient<Channel>, String>,
    token: Arc<str>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("target", &self.target).field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// Why a peer's address cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("node {target} has an invalid address {addr:?}: {message}")]
pub struct BadPeerAddress {
    target: NodeId,
    addr: String,
    message: String,
}

/// A payload that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("raft RPC {what}: {source}")]
pub struct CodecError {
    what: &'static str,
    #[source]
    source: serde_json::Error,
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Snapshot,
    Vote,
}

impl Peer {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(message) => {
                let why =
                    BadPeerAddress { target: self.target, addr: self.addr.clone(), message: message.clone() };
                return Err(RPCError::Unreachable(Unreachable::new(&why)));
            }
        };
        let payload = serde_json::to_vec(request).map_err(|source| {
            RPCError::Network(NetworkError::new(&CodecError { what: "request", source }))
        })?;
        let mut request = tonic::Request::new(RaftPayload { payload });
        request.set_timeout(option.hard_ttl());
        let value = format!("Bearer {}", self.token).parse().map_err(
            |e: tonic::metadata::errors::InvalidMetadataValue| RPCError::Network(NetworkError::new(&e)),
        )?;
        request.metadata_mut().insert("authorization", value);
        let mut client = client;
        let answer = match rpc {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
            Rpc::Vote => client.vote(request).await,
        };
        let answer = answer.map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&answer.into_inner().payload)
            .map_err(|source| {
                RPCError::Network(NetworkError::new(&CodecError { what: "response", source }))
            })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
