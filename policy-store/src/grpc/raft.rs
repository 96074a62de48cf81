//! Serves raft RPCs from peers (`proto/raft.proto`, service `Raft`): decode the JSON request,
//! hand it to the local raft node, answer with the JSON of its `Result`; and `ReadIndex`, with
//! which the other nodes confirm that they are current. The admin token is
//! checked before this, by the interceptor the service is registered with (`lib.rs`), so no
//! body is read for a caller without it.

use proto::pb::RaftPayload;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::Raft;
use crate::error::StoreError;

pub(crate) struct RaftService {
    raft: Raft,
}

impl RaftService {
    pub(crate) fn new(raft: Raft) -> Self {
        Self { raft }
    }
}

fn decode<T: DeserializeOwned>(request: Request<RaftPayload>) -> Result<T, Status> {
    serde_json::from_slice(&request.into_inner().payload).map_err(|e| StoreError::Payload(e).into())
}

fn encode<T: Serialize>(answer: &T) -> Result<Response<RaftPayload>, Status> {
    let payload = serde_json::to_vec(answer).map_err(StoreError::Payload)?;
    Ok(Response::new(RaftPayload { payload }))
}

#[tonic::async_trait]
impl proto::pb::raft_server::Raft for RaftService {
    async fn append_entries(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request)?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn install_snapshot(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request)?;
        encode(&self.raft.install_snapshot(rpc).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request)?;
        encode(&self.raft.vote(rpc).await)
    }

    /// The leader's read index, after it confirmed its leadership with a quorum: another node
    /// that has applied up to it is current (see `confirm`). The request carries nothing.
    async fn read_index(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        encode(&self.raft.get_read_log_id().await)
    }
}
