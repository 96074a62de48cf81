//! Serves raft RPCs from peers (`proto/raft.proto`, service `Raft`): decode the JSON request,
//! hand it to the local raft node, answer with the JSON of its `Result`.

use proto::pb::RaftPayload;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::Raft;
use crate::cluster::Auth;
use crate::error::StoreError;

pub(crate) struct RaftService {
    raft: Raft,
    auth: Auth,
}

impl RaftService {
    pub(crate) fn new(raft: Raft, auth: Auth) -> Self {
        Self { raft, auth }
    }
}

fn decode<T: DeserializeOwned>(request: Request<RaftPayload>, auth: &Auth) -> Result<T, Status> {
    auth.peer(request.metadata())?;
    serde_json::from_slice(&request.into_inner().payload).map_err(|e| StoreError::Payload(e).into())
}

fn encode<T: Serialize>(answer: &T) -> Result<Response<RaftPayload>, Status> {
    let payload = serde_json::to_vec(answer).map_err(StoreError::Payload)?;
    Ok(Response::new(RaftPayload { payload }))
}

#[tonic::async_trait]
impl proto::pb::raft_server::Raft for RaftService {
    async fn append_entries(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request, &self.auth)?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn install_snapshot(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request, &self.auth)?;
        encode(&self.raft.install_snapshot(rpc).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request, &self.auth)?;
        encode(&self.raft.vote(rpc).await)
    }
}
