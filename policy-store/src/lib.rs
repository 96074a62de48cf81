//! Airlock's policy store: a versioned, raft-replicated store of policy documents, served over gRPC.
//!
//! Every `Apply` validates the YAML document with [`proto::policy::parse`] first, then proposes a
//! [`Command::Apply`] to raft; the state machine turns it into version N+1, or into no change when
//! the document's SHA-256 equals the latest version's. Versions, the raft log and the vote live in
//! one redb file under [`PolicyStoreConfig::data_dir`], so a restarted node has the same history.
//! Proxies follow the `Watch` stream with [`client::follow`]; it carries a heartbeat each time
//! the node confirmed with its raft quorum that it is current, and only that (or a new version)
//! keeps a proxy fresh.
//!
//! A node runs alone (no `peers`) or as one of a 3- or 5-node cluster: raft RPCs go over tonic
//! ([`network`] out, `grpc::raft` in), followers forward writes to the leader, reads can be
//! linearizable, and the admin API changes the membership (see [`cluster`]).
//!
//! # Authentication
//! Every call carries `authorization: Bearer <token>`, checked in constant time by an interceptor
//! before the request body is decoded. `Apply`, the admin API and raft RPCs need the admin token;
//! `Get`, `History` and `Watch` the read token or the admin token. A node without an admin token
//! refuses to start. A version's `author` is `admin-token:<claim>`: the role that applied it,
//! then the caller's own, unverified `author` text.
//!
//! # Layout
//! - [`config`]: [`PolicyStoreConfig`], one node's config (peers, tokens, snapshots).
//! - [`store`]: durable raft storage in redb: the log store and the state machine (the versions).
//! - [`command`]: what is proposed to raft ([`Command`]) and what applying it yields ([`ApplyOutcome`]).
//! - [`version`]: one stored policy version and its digest.
//! - [`publish`]: every committed version as a `PolicyApplied` event on the bus.
//! - [`network`]: the raft network: openraft RPCs to peers over tonic.
//! - [`cluster`]: leader lookup, channels for forwarding, the token checks, routing headers.
//! - `confirm`: whether this node is current, confirmed with the raft quorum about every second;
//!   Watch streams send each confirmation as a heartbeat and end without one.
//! - `grpc`: the tonic services: `PolicyStore` (Apply, Get, History, Watch), `Raft`, `PolicyStoreAdmin`.
//! - [`client`]: [`client::PolicyClient`] for policy commands, [`client::AdminClient`] for the
//!   cluster, [`client::follow`] for proxies, [`client::diff`] between versions.
//! - [`error`]: [`StoreError`] (server side, mapped once to `tonic::Status`) and [`ClientError`].

pub mod client;
pub mod cluster;
pub mod command;
pub mod config;
mod confirm;
pub mod error;
mod grpc;
pub mod network;
pub mod publish;
pub mod store;
pub mod tls;
pub mod version;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use command::{ApplyOutcome, Command};
pub use config::PolicyStoreConfig;
pub use error::{ClientError, DbError, StoreError};
pub use tls::ClientTls;

/// The largest policy document (its YAML, in bytes) `Apply` accepts.
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;
/// The longest `author` text (bytes) `Apply` accepts; it is recorded as the applier's claim.
pub const MAX_AUTHOR_BYTES: usize = 256;
/// The largest stored version, encoded as a `PolicyVersion` message: the largest document plus
/// room for the author, digest and numbers. `Apply` refuses a version that would be larger, the
/// server accepts requests up to this size, and clients ([`client::PolicyClient`],
/// [`client::follow`]) accept messages this large (tonic's default limit is 4 MiB, which a
/// document near [`MAX_DOCUMENT_BYTES`] exceeds once stored).
pub const MAX_VERSION_BYTES: usize = MAX_DOCUMENT_BYTES + 64 * 1024;

/// A raft node id.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The raft type configuration of the policy store.
    pub TypeConfig:
        D = Command,
        R = ApplyOutcome,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// The raft handle of a policy-store node.
pub type Raft = openraft::Raft<TypeConfig>;

/// How long `run` waits for a single node to elect itself before serving anyway.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// How long `run` waits, after raft stopped, for the storage file to be closed.
const STORAGE_CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Raft timing: a leader sends heartbeats this often; a follower that hears nothing for a random
/// time between the election timeouts starts an election.
const HEARTBEAT_MS: u64 = 100;
const ELECTION_TIMEOUT_MIN_MS: u64 = 400;
const ELECTION_TIMEOUT_MAX_MS: u64 = 800;
/// The most log entries one AppendEntries carries, so that a batch of the largest entries still
/// fits in a raft message (openraft's default, 300, made batches of a lagging node's catch-up
/// past 64 MiB, which the peer refused, again and again). See [`MAX_ENTRY_JSON_BYTES`].
const MAX_PAYLOAD_ENTRIES: u64 = (network::MAX_MESSAGE_BYTES / MAX_ENTRY_JSON_BYTES) as u64;
/// The largest log entry as JSON: a document of [`MAX_DOCUMENT_BYTES`] (JSON escapes at most
/// double YAML's characters: quotes, backslashes, tabs, line ends), its author, and room for the
/// entry's other fields.
const MAX_ENTRY_JSON_BYTES: usize = 2 * MAX_DOCUMENT_BYTES + 64 * 1024;
/// Snapshots travel to lagging nodes in chunks of this size.
const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;

/// Start the node: open storage, start raft, serve gRPC on `listener` until `shutdown` resolves.
///
/// A new node initializes its cluster: alone when no `peers` are configured (then it waits for
/// its own election before serving, so the first request finds a leader), else with itself plus
/// `peers` (every node of a new cluster does the same; raft accepts identical initializations).
/// With `join = true` it initializes nothing and waits to be added as a learner. Returns once raft
/// has stopped and the storage is closed, so the same `data_dir` can be opened again right away.
pub async fn run(
    cfg: PolicyStoreConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StoreError> {
    let addr = listener.local_addr().map_err(StoreError::Listener)?;
    // Fail closed: no admin token, no node (before the storage is opened).
    let (admin, read) = cfg.tokens()?;
    let auth = cluster::Auth::new(Arc::from(admin.as_str()), read.as_deref().map(Arc::from));
    let token: Arc<str> = Arc::from(admin);
    let tls =
        tls::NodeTls::new(cfg.tls_cert_file.as_ref(), cfg.tls_key_file.as_ref(), cfg.tls_ca_file.as_ref())?;
    let (log_store, state_machine) = store::open(&cfg.data_dir)?;
    let storage = log_store.database();
    let versions = state_machine.subscribe();

    let raft_config = raft_config(&cfg);
    let raft_config = Arc::new(raft_config.validate().map_err(|e| StoreError::RaftConfig(Box::new(e)))?);
    let network = network::Network::new(token.clone(), cfg.peers.clone(), tls.peers.clone());
    let raft = Raft::new(cfg.node_id, raft_config, network, log_store, state_machine)
        .await
        .map_err(|e| StoreError::RaftFatal(Box::new(e)))?;

    let served = serve(&cfg, tls, addr, auth, raft.clone(), versions, listener, shutdown).await;

    if let Err(e) = raft.shutdown().await {
        warn!(error = %e, "raft did not shut down cleanly");
    }
    drop(raft);
    wait_closed(storage).await;
    info!(node.id = cfg.node_id, "policy store stopped");
    served
}

/// The raft settings of a node.
fn raft_config(cfg: &PolicyStoreConfig) -> openraft::Config {
    openraft::Config {
        cluster_name: "airlock-policy-store".into(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs),
        max_in_snapshot_log_to_keep: cfg.snapshot_logs,
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    }
}

/// Keep the node's Prometheus gauges current: its raft state and the latest version it holds.
async fn export_metrics(
    node_id: NodeId,
    raft: Raft,
    mut versions: tokio::sync::watch::Receiver<store::Versions>,
    cancel: CancellationToken,
) {
    use metrics::gauge;
    let leader = gauge!("airlock_policy_store_leader");
    let term = gauge!("airlock_policy_store_term");
    let applied = gauge!("airlock_policy_store_last_applied_index");
    let members = gauge!("airlock_policy_store_voters");
    let latest = gauge!("airlock_policy_store_latest_version");
    let mut raft_metrics = raft.metrics();
    loop {
        {
            let m = raft_metrics.borrow_and_update();
            leader.set(if m.current_leader == Some(node_id) { 1.0 } else { 0.0 });
            term.set(m.current_term as f64);
            applied.set(m.last_applied.map_or(0, |l| l.index) as f64);
            members.set(m.membership_config.membership().voter_ids().count() as f64);
        }
        latest.set(versions.borrow_and_update().last().map_or(0, |v| v.version) as f64);
        tokio::select! {
            () = cancel.cancelled() => return,
            r = raft_metrics.changed() => if r.is_err() { return },
            r = versions.changed() => if r.is_err() { return },
        }
    }
}

/// The members a new cluster starts with: this node plus the configured peers.
fn initial_members(cfg: &PolicyStoreConfig, addr: SocketAddr) -> BTreeMap<NodeId, BasicNode> {
    let own =
        if cfg.advertise.is_some() || cfg.listen.port() != 0 { cfg.advertised() } else { addr.to_string() };
    let mut members = BTreeMap::from([(cfg.node_id, BasicNode::new(own))]);
    for (id, peer) in &cfg.peers {
        members.insert(*id, BasicNode::new(peer.clone()));
    }
    members
}

async fn initialize(
    raft: &Raft,
    members: BTreeMap<NodeId, BasicNode>,
    node_id: NodeId,
) -> Result<(), StoreError> {
    if raft.is_initialized().await.map_err(|e| StoreError::RaftFatal(Box::new(e)))? {
        return Ok(());
    }
    let ids: Vec<NodeId> = members.keys().copied().collect();
    match raft.initialize(members).await {
        Ok(()) => {
            info!(node.id = node_id, members = ?ids, "initialized the policy-store cluster");
            Ok(())
        }
        Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(StoreError::Initialize(Box::new(e))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    cfg: &PolicyStoreConfig,
    tls: tls::NodeTls,
    addr: SocketAddr,
    auth: cluster::Auth,
    raft: Raft,
    versions: tokio::sync::watch::Receiver<store::Versions>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StoreError> {
    let members = initial_members(cfg, addr);
    if cfg.join {
        info!(node.id = cfg.node_id, "waiting to be added to a cluster (join = true)");
    } else if cfg.peers.is_empty() {
        initialize(&raft, members, cfg.node_id).await?;
        let elected =
            raft.wait(Some(LEADER_WAIT)).metrics(|m| m.current_leader.is_some(), "leader elected").await;
        if let Err(e) = elected {
            warn!(error = %e, "no raft leader yet; serving anyway");
        }
    } else {
        // Peers reach this node through the server below, so initialize beside it.
        let raft = raft.clone();
        let node_id = cfg.node_id;
        tokio::spawn(async move {
            if let Err(e) = initialize(&raft, members, node_id).await {
                warn!(error = %e, node.id = node_id, "initializing the policy-store cluster failed");
            }
        });
    }
    let latest = versions.borrow().last().map_or(0, |v| v.version);
    info!(listen = %addr, node.id = cfg.node_id, policy.version = latest, "policy store serving");

    let cancel = CancellationToken::new();
    let channels = Arc::new(cluster::Channels::new(cfg.peers.clone(), tls.peers));
    // Whether this node is current, confirmed with the raft quorum about every second: Watch
    // streams carry it as heartbeats and end when it is missing.
    let (confirmed, confirming) =
        confirm::spawn(raft.clone(), versions.clone(), channels.clone(), auth.admin(), cancel.clone());
    tokio::spawn(export_metrics(cfg.node_id, raft.clone(), versions.clone(), cancel.clone()));
    let service = grpc::PolicyStoreService::new(
        raft.clone(),
        versions.clone(),
        confirmed,
        cancel.clone(),
        channels.clone(),
    );
    let admin = grpc::AdminService::new(cfg.node_id, raft.clone(), versions, channels);
    let raft_rpc = grpc::RaftService::new(raft);
    // Every service checks the bearer token in an interceptor, before the body is decoded:
    // reads need the read or the admin token (`Apply` then checks for the admin role), the admin
    // API and raft RPCs the admin token.
    use cluster::Role::{Admin, Reader};
    use tonic::service::interceptor::InterceptedService;
    let mut server = tonic::transport::Server::builder();
    if let Some(config) = tls.server {
        server = server.tls_config(config).map_err(StoreError::Serve)?;
    }
    let served = server
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .add_service(InterceptedService::new(
            proto::pb::policy_store_server::PolicyStoreServer::new(service)
                .max_decoding_message_size(MAX_VERSION_BYTES),
            auth.guard(Reader),
        ))
        .add_service(InterceptedService::new(
            proto::pb::policy_store_admin_server::PolicyStoreAdminServer::new(admin),
            auth.guard(Admin),
        ))
        .add_service(InterceptedService::new(
            proto::pb::raft_server::RaftServer::new(raft_rpc)
                .max_decoding_message_size(network::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(network::MAX_MESSAGE_BYTES),
            auth.guard(Admin),
        ))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), {
            let cancel = cancel.clone();
            async move {
                shutdown.await;
                // Ends open Watch streams, so the graceful shutdown does not wait for them forever.
                cancel.cancel();
            }
        })
        .await
        .map_err(StoreError::Serve);
    // Also when serving failed: the confirmations stop before raft does.
    cancel.cancel();
    let _ = confirming.await;
    served
}

/// Wait until every raft task has dropped its handle on the storage file.
async fn wait_closed(storage: std::sync::Weak<redb::Database>) {
    let deadline = tokio::time::Instant::now() + STORAGE_CLOSE_WAIT;
    while storage.strong_count() > 0 {
        if tokio::time::Instant::now() >= deadline {
            warn!("policy-store storage still open after shutdown");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of as many of the largest entries as one AppendEntries may carry fits in a raft
    /// message, so a node far behind catches up.
    #[test]
    fn a_batch_of_the_largest_entries_fits_in_a_raft_message() {
        // Every character of the document escaped in JSON.
        let document_yaml = format!("# {}", "\"\\".repeat((MAX_DOCUMENT_BYTES - 2) / 2));
        assert!(document_yaml.len() <= MAX_DOCUMENT_BYTES);
        let command = Command::Apply { document_yaml, author: "a".repeat(256), applied_at_unix_ms: i64::MIN };
        let entry = openraft::Entry::<TypeConfig> {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(u64::MAX, u64::MAX), u64::MAX),
            payload: openraft::EntryPayload::Normal(command),
        };
        let json = serde_json::to_vec(&entry).unwrap().len();
        assert!(json <= MAX_ENTRY_JSON_BYTES, "{json} > {MAX_ENTRY_JSON_BYTES}");
        let entries = raft_config(&PolicyStoreConfig::default()).max_payload_entries;
        assert!(entries >= 1);
        assert!(entries as usize * MAX_ENTRY_JSON_BYTES <= network::MAX_MESSAGE_BYTES, "{entries} entries");
    }
}
