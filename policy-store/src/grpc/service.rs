//! Serves the policy store's gRPC API from a raft node.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use proto::pb::policy_store_server::PolicyStore;
use proto::pb::{
    ApplyRequest, ApplyResponse, GetRequest, HistoryRequest, HistoryResponse, PolicyVersion, WatchRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::Raft;
use crate::command::Command;
use crate::error::StoreError;
use crate::store::Versions;
use crate::version::StoredVersion;

/// How many versions a Watch stream buffers for a slow reader.
const WATCH_BUFFER: usize = 16;

pub(crate) struct PolicyStoreService {
    raft: Raft,
    versions: watch::Receiver<Versions>,
    shutdown: CancellationToken,
}

impl PolicyStoreService {
    pub(crate) fn new(raft: Raft, versions: watch::Receiver<Versions>, shutdown: CancellationToken) -> Self {
        Self { raft, versions, shutdown }
    }

    fn find(&self, version: u64) -> Result<Arc<StoredVersion>, StoreError> {
        let versions = self.versions.borrow().clone();
        if version == 0 {
            return versions.last().cloned().ok_or(StoreError::NoVersions);
        }
        versions
            .binary_search_by_key(&version, |v| v.version)
            .map(|i| versions[i].clone())
            .map_err(|_| StoreError::VersionNotFound(version))
    }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[tonic::async_trait]
impl PolicyStore for PolicyStoreService {
    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let ApplyRequest { document_yaml, author } = request.into_inner();
        if let Err(errors) = proto::policy::parse(&document_yaml) {
            info!(errors = errors.0.len(), author = %author, "rejected an invalid policy document");
            return Err(StoreError::InvalidDocument(errors).into());
        }
        let command =
            Command::Apply { document_yaml, author: author.clone(), applied_at_unix_ms: now_unix_ms() };
        let written = self.raft.client_write(command).await.map_err(|e| StoreError::Write(Box::new(e)))?;
        let outcome = written.data;
        info!(policy.version = outcome.version, changed = outcome.changed, author = %author, "policy applied");
        Ok(Response::new(ApplyResponse { version: outcome.version, changed: outcome.changed }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<PolicyVersion>, Status> {
        let found = self.find(request.into_inner().version)?;
        Ok(Response::new(PolicyVersion::from(found.as_ref())))
    }

    async fn history(&self, _request: Request<HistoryRequest>) -> Result<Response<HistoryResponse>, Status> {
        let versions = self.versions.borrow().clone();
        let versions = versions
            .iter()
            .map(|v| PolicyVersion { document_yaml: String::new(), ..PolicyVersion::from(v.as_ref()) })
            .collect();
        Ok(Response::new(HistoryResponse { versions }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<PolicyVersion, Status>> + Send + 'static>>;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let from_version = request.into_inner().from_version;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(feed_watch(self.versions.clone(), from_version, tx, self.shutdown.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Send every version after `sent`, then each new one, until the client goes away or the server
/// shuts down. The watch channel always holds the full list and `borrow_and_update` marks what was
/// seen, so a version committed between the backlog and the wait is never missed.
async fn feed_watch(
    mut versions: watch::Receiver<Versions>,
    mut sent: u64,
    tx: mpsc::Sender<Result<PolicyVersion, Status>>,
    shutdown: CancellationToken,
) {
    loop {
        let pending: Vec<Arc<StoredVersion>> =
            versions.borrow_and_update().iter().filter(|v| v.version > sent).cloned().collect();
        for v in pending {
            tokio::select! {
                delivered = tx.send(Ok(PolicyVersion::from(v.as_ref()))) => if delivered.is_err() { return },
                () = shutdown.cancelled() => return,
            }
            sent = v.version;
        }
        tokio::select! {
            changed = versions.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
        }
    }
}
