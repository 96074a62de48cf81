//! Serves the policy store's gRPC API from a raft node. The interceptor in front of it (`lib.rs`)
//! lets through callers with the read or the admin token; `Apply` needs the admin token.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use openraft::BasicNode;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use proto::pb::policy_store_client::PolicyStoreClient;
use proto::pb::policy_store_server::PolicyStore;
use proto::pb::watch_event::Event;
use proto::pb::{
    ApplyRequest, ApplyResponse, GetRequest, Heartbeat, HistoryRequest, HistoryResponse, PolicyVersion,
    WatchEvent, WatchRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::cluster::{CONSISTENCY_HEADER, Channels, LINEARIZABLE, MAX_HOPS, Role};
use crate::command::Command;
use crate::confirm::{CONFIRM_INTERVAL, Confirmations, Confirmed, UNCONFIRMED_LIMIT};
use crate::error::StoreError;
use crate::store::Versions;
use crate::version::StoredVersion;
use crate::{NodeId, Raft};

/// How many versions a Watch stream buffers for a slow reader.
const WATCH_BUFFER: usize = 16;
/// How long a write or linearizable read waits for a leader to be elected.
const LEADER_WAIT: Duration = Duration::from_secs(5);

pub(crate) struct PolicyStoreService {
    raft: Raft,
    versions: watch::Receiver<Versions>,
    confirmed: Confirmations,
    shutdown: CancellationToken,
    channels: Arc<Channels>,
}

/// What a request asks of the node that received it, and the caller's token, sent along when
/// the request is forwarded (the leader checks it again).
struct Routing {
    hops: u32,
    linearizable: bool,
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Routing {
    /// Whether this node may forward the request (again).
    fn may_forward(&self) -> bool {
        self.hops < MAX_HOPS
    }

    fn of<T>(request: &Request<T>) -> Self {
        let metadata = request.metadata();
        Self {
            hops: crate::cluster::hops(metadata),
            linearizable: metadata
                .get(CONSISTENCY_HEADER)
                .is_some_and(|v| v.as_bytes() == LINEARIZABLE.as_bytes()),
            authorization: metadata.get("authorization").cloned(),
        }
    }

    /// `message` as a request to the leader: marked forwarded, with the same consistency.
    fn forward<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        crate::cluster::mark_forwarded(&mut request, self.hops);
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert("authorization", authorization.clone());
        }
        if self.linearizable {
            request
                .metadata_mut()
                .insert(CONSISTENCY_HEADER, tonic::metadata::MetadataValue::from_static(LINEARIZABLE));
        }
        request
    }
}

impl PolicyStoreService {
    pub(crate) fn new(
        raft: Raft,
        versions: watch::Receiver<Versions>,
        confirmed: Confirmations,
        shutdown: CancellationToken,
        channels: Arc<Channels>,
    ) -> Self {
        Self { raft, versions, confirmed, shutdown, channels }
    }

    fn client(&self, id: NodeId, node: &BasicNode) -> Result<PolicyStoreClient<Channel>, StoreError> {
        Ok(PolicyStoreClient::new(self.channels.node(id, node)?))
    }

    /// For a linearizable read: `None` when this node is the leader and has applied everything
    /// committed before the call; else a client of the leader to forward the read to.
    async fn read_barrier(
        &self,
        routing: &Routing,
    ) -> Result<Option<PolicyStoreClient<Channel>>, StoreError> {
        if !routing.linearizable {
            return Ok(None);
        }
        for _ in 0..2 {
            match self.raft.ensure_linearizable().await {
                Ok(_) => return Ok(None),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) if routing.may_forward() => {
                    match (f.leader_id, f.leader_node) {
                        (Some(id), Some(node)) => return self.client(id, &node).map(Some),
                        _ => {
                            crate::cluster::leader(&self.raft, LEADER_WAIT)
                                .await
                                .ok_or(StoreError::NoLeader)?;
                        }
                    }
                }
                Err(e) => return Err(StoreError::CheckLeader(Box::new(e))),
            }
        }
        Err(StoreError::NoLeader)
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

/// The author a version records: the role that applied it (server-side, from the token), then
/// the caller's `author` text as an unverified claim, e.g. `admin-token:alice`. Anyone holding
/// the token can claim any name; the prefix cannot be forged.
fn recorded_author(role: Role, claim: &str) -> Result<String, StoreError> {
    if claim.len() > crate::MAX_AUTHOR_BYTES {
        return Err(StoreError::InvalidAuthor("longer than policy_store::MAX_AUTHOR_BYTES (256 bytes)"));
    }
    if claim.chars().any(char::is_control) {
        return Err(StoreError::InvalidAuthor("must not contain control characters"));
    }
    let claim = claim.trim();
    Ok(if claim.is_empty() { role.label().to_string() } else { format!("{}:{claim}", role.label()) })
}

/// Refuse a document over [`crate::MAX_DOCUMENT_BYTES`], or one whose stored version would be
/// over [`crate::MAX_VERSION_BYTES`], the most followers decode.
fn check_size(document_yaml: &str, author: &str) -> Result<(), StoreError> {
    use prost::Message;
    if document_yaml.len() > crate::MAX_DOCUMENT_BYTES {
        return Err(StoreError::DocumentTooLarge {
            bytes: document_yaml.len(),
            limit: crate::MAX_DOCUMENT_BYTES,
        });
    }
    let stored = PolicyVersion {
        version: u64::MAX,
        document_yaml: document_yaml.to_string(),
        author: author.to_string(),
        applied_at_unix_ms: i64::MAX,
        digest: "0".repeat(64),
    };
    let bytes = stored.encoded_len();
    if bytes > crate::MAX_VERSION_BYTES {
        return Err(StoreError::VersionTooLarge { bytes, limit: crate::MAX_VERSION_BYTES });
    }
    Ok(())
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[tonic::async_trait]
impl PolicyStore for PolicyStoreService {
    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        // The interceptor let readers through; writing needs the admin token.
        let role = request.extensions().get::<Role>().copied();
        if role != Some(Role::Admin) {
            return Err(StoreError::AdminOnly.into());
        }
        let routing = Routing::of(&request);
        let ApplyRequest { document_yaml, author: claim } = request.into_inner();
        let author = recorded_author(Role::Admin, &claim)?;
        check_size(&document_yaml, &author)?;
        if let Err(errors) = proto::policy::parse(&document_yaml) {
            info!(errors = errors.0.len(), author = %author, "rejected an invalid policy document");
            return Err(StoreError::InvalidDocument(errors).into());
        }
        let command = Command::Apply {
            document_yaml: document_yaml.clone(),
            author: author.clone(),
            applied_at_unix_ms: now_unix_ms(),
        };
        // Once when this node leads; else forward to the leader, or wait for one to be elected.
        let mut last_error = None;
        for _ in 0..3 {
            match self.raft.client_write(command.clone()).await {
                Ok(written) => {
                    let outcome = written.data;
                    info!(policy.version = outcome.version, changed = outcome.changed, author = %author, "policy applied");
                    return Ok(Response::new(ApplyResponse {
                        version: outcome.version,
                        changed: outcome.changed,
                    }));
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) if routing.may_forward() => {
                    if let (Some(id), Some(node)) = (f.leader_id, &f.leader_node) {
                        debug!(leader = id, "forwarding a policy write to the leader");
                        // The leader checks the token and records the author itself.
                        let request = routing.forward(ApplyRequest { document_yaml, author: claim });
                        return self.client(id, node)?.apply(request).await;
                    }
                    crate::cluster::leader(&self.raft, LEADER_WAIT).await;
                    last_error = Some(RaftError::APIError(ClientWriteError::ForwardToLeader(f)));
                }
                Err(e) => return Err(StoreError::Write(Box::new(e)).into()),
            }
        }
        Err(last_error.map_or(StoreError::NoLeader, |e| StoreError::Write(Box::new(e))).into())
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<PolicyVersion>, Status> {
        let routing = Routing::of(&request);
        let message = request.into_inner();
        if let Some(mut leader) = self.read_barrier(&routing).await? {
            return leader.get(routing.forward(message)).await;
        }
        let found = self.find(message.version)?;
        Ok(Response::new(PolicyVersion::from(found.as_ref())))
    }

    async fn history(&self, request: Request<HistoryRequest>) -> Result<Response<HistoryResponse>, Status> {
        let routing = Routing::of(&request);
        let message = request.into_inner();
        if let Some(mut leader) = self.read_barrier(&routing).await? {
            return leader.history(routing.forward(message)).await;
        }
        let versions = self.versions.borrow().clone();
        let versions = versions
            .iter()
            .map(|v| PolicyVersion { document_yaml: String::new(), ..PolicyVersion::from(v.as_ref()) })
            .collect();
        Ok(Response::new(HistoryResponse { versions }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send + 'static>>;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let from_version = request.into_inner().from_version;
        // A node that is not confirmed current serves no stream: its versions may be old. One
        // that just started (or missed a round) gets a little time to confirm.
        let mut confirmed = self.confirmed.clone();
        let fresh = |c: &Option<Confirmed>| c.as_ref().is_some_and(Confirmed::fresh);
        if !fresh(&confirmed.borrow()) {
            let waited = tokio::time::timeout(2 * CONFIRM_INTERVAL, confirmed.wait_for(fresh)).await;
            if !matches!(waited, Ok(Ok(_))) {
                return Err(StoreError::NoQuorum.into());
            }
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(feed_watch(self.versions.clone(), confirmed, from_version, tx, self.shutdown.clone()));
        // A heartbeat's age is taken as it leaves the queue, so a slow reader never sees a
        // confirmation as newer than it is.
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), |item| {
            item.map(|item| {
                let event = match item {
                    Item::Version(v) => Event::Version(v),
                    Item::Beat(c) => Event::Heartbeat(Heartbeat {
                        version: c.version,
                        confirmed_ms_ago: u64::try_from(c.at.elapsed().as_millis()).unwrap_or(u64::MAX),
                    }),
                };
                WatchEvent { event: Some(event) }
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Send every version after `sent`, then each new one, and a heartbeat for each confirmation
/// that this node is current (the first one right after the backlog), until the client goes
/// away, the server shuts down, or the node has not been confirmed for [`UNCONFIRMED_LIMIT`]:
/// then the stream ends with UNAVAILABLE, so the follower moves to another node. The watch
/// channels always hold the latest state and `borrow_and_update` marks what was seen, so a
/// version committed between the backlog and the wait is never missed. The confirmation is read
/// before the versions, so a heartbeat comes after every version it names.
async fn feed_watch(
    mut versions: watch::Receiver<Versions>,
    mut confirmed: Confirmations,
    mut sent: u64,
    tx: mpsc::Sender<Result<Item, Status>>,
    shutdown: CancellationToken,
) {
    let mut beat: Option<Confirmed> = None;
    loop {
        let latest = *confirmed.borrow_and_update();
        let pending: Vec<Arc<StoredVersion>> =
            versions.borrow_and_update().iter().filter(|v| v.version > sent).cloned().collect();
        for v in pending {
            if !send(&tx, Item::Version(PolicyVersion::from(v.as_ref())), &shutdown).await {
                return;
            }
            sent = v.version;
        }
        let Some(latest) = latest.filter(Confirmed::fresh) else {
            // Not confirmed for too long: a partitioned node must not look current.
            tokio::select! {
                _ = tx.send(Err(StoreError::NoQuorum.into())) => {}
                () = shutdown.cancelled() => {}
            }
            return;
        };
        if beat != Some(latest) {
            if !send(&tx, Item::Beat(latest), &shutdown).await {
                return;
            }
            beat = Some(latest);
        }
        tokio::select! {
            changed = versions.changed() => if changed.is_err() { return },
            changed = confirmed.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(latest.at + UNCONFIRMED_LIMIT) => {}
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
        }
    }
}

/// What `feed_watch` queues for a Watch stream.
enum Item {
    Version(PolicyVersion),
    Beat(Confirmed),
}

/// Queue `item` on the stream; false when the client went away or the server is stopping.
async fn send(tx: &mpsc::Sender<Result<Item, Status>>, item: Item, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        delivered = tx.send(Ok(item)) => delivered.is_ok(),
        () = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_author_is_the_role_then_the_claim() {
        assert_eq!(recorded_author(Role::Admin, "alice").expect("ok"), "admin-token:alice");
        assert_eq!(recorded_author(Role::Admin, " ").expect("ok"), "admin-token");
        assert!(recorded_author(Role::Admin, "alice\nadmin-token:bob").is_err());
        assert!(recorded_author(Role::Admin, &"a".repeat(crate::MAX_AUTHOR_BYTES + 1)).is_err());
    }

    #[test]
    fn a_document_at_the_cap_fits_a_stored_version_and_one_byte_more_does_not() {
        let author = format!("admin-token:{}", "a".repeat(crate::MAX_AUTHOR_BYTES));
        assert!(check_size(&"x".repeat(crate::MAX_DOCUMENT_BYTES), &author).is_ok());
        let e = check_size(&"x".repeat(crate::MAX_DOCUMENT_BYTES + 1), &author).expect_err("too large");
        assert!(matches!(e, StoreError::DocumentTooLarge { .. }), "{e}");
    }
}
