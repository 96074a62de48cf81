//! Airlock's policy store: a versioned, raft-replicated store of policy documents, served over gRPC.
//!
//! Every `Apply` validates the YAML document with [`proto::policy::parse`] first, then proposes a
//! [`Command::Apply`] to raft; the state machine turns it into version N+1, or into no change when
//! the document's SHA-256 equals the latest version's. Versions, the raft log and the vote live in
//! one redb file under [`PolicyStoreConfig::data_dir`], so a restarted node has the same history.
//! Proxies follow the `Watch` stream with [`client::follow`].
//!
//! Today a node runs as a single-member cluster; [`network`] is the seam where raft RPCs over
//! tonic will go when the store becomes a 3- or 5-node cluster.
//!
//! # Layout
//! - [`store`]: durable raft storage in redb: the log store and the state machine (the versions).
//! - [`command`]: what is proposed to raft ([`Command`]) and what applying it yields ([`ApplyOutcome`]).
//! - [`version`]: one stored policy version and its digest.
//! - [`network`]: the raft network factory (peers are not wired yet: every RPC is `Unreachable`).
//! - `grpc`: the tonic `PolicyStore` service (Apply, Get, History, Watch).
//! - [`client`]: [`client::PolicyClient`] for admin commands and [`client::follow`] for proxies.
//! - [`error`]: [`StoreError`] (server side, mapped once to `tonic::Status`) and [`ClientError`].

pub mod client;
pub mod command;
pub mod error;
mod grpc;
pub mod network;
pub mod store;
pub mod version;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use command::{ApplyOutcome, Command};
pub use error::{ClientError, DbError, StoreError};

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

/// How long `run` waits for a leader before serving anyway (requests then get UNAVAILABLE).
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// How long `run` waits, after raft stopped, for the storage file to be closed.
const STORAGE_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Config for one node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyStoreConfig {
    /// gRPC listen address. Default 127.0.0.1:17070.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the raft log and state live. Default ./data/policy-store.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// This node's raft id. Default 1.
    #[serde(default = "default_node_id")]
    pub node_id: NodeId,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 17070))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./data/policy-store")
}
fn default_node_id() -> NodeId {
    1
}

impl Default for PolicyStoreConfig {
    fn default() -> Self {
        Self { listen: default_listen(), data_dir: default_data_dir(), node_id: default_node_id() }
    }
}

impl proto::config::Validate for PolicyStoreConfig {
    fn validate(&self) -> Result<(), String> {
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir: must not be empty".into());
        }
        Ok(())
    }
}

/// Start the node: open storage, start raft, initialize a single-node cluster if new, serve gRPC on
/// `listener` until `shutdown` resolves. Returns once raft has stopped and the storage is closed, so
/// the same `data_dir` can be opened again right away.
pub async fn run(
    cfg: PolicyStoreConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StoreError> {
    let addr = listener.local_addr().map_err(StoreError::Listener)?;
    let (log_store, state_machine) = store::open(&cfg.data_dir)?;
    let storage = log_store.database();
    let versions = state_machine.subscribe();

    let raft_config = openraft::Config { cluster_name: "airlock-policy-store".into(), ..Default::default() };
    let raft_config = Arc::new(raft_config.validate().map_err(|e| StoreError::RaftConfig(Box::new(e)))?);
    let raft = Raft::new(cfg.node_id, raft_config, network::Network, log_store, state_machine)
        .await
        .map_err(|e| StoreError::RaftFatal(Box::new(e)))?;

    let served = serve(&cfg, addr, raft.clone(), versions, listener, shutdown).await;

    if let Err(e) = raft.shutdown().await {
        warn!(error = %e, "raft did not shut down cleanly");
    }
    drop(raft);
    wait_closed(storage).await;
    info!(node.id = cfg.node_id, "policy store stopped");
    served
}

async fn serve(
    cfg: &PolicyStoreConfig,
    addr: SocketAddr,
    raft: Raft,
    versions: tokio::sync::watch::Receiver<store::Versions>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StoreError> {
    if !raft.is_initialized().await.map_err(|e| StoreError::RaftFatal(Box::new(e)))? {
        let members = BTreeMap::from([(cfg.node_id, BasicNode::new(addr.to_string()))]);
        match raft.initialize(members).await {
            Ok(()) => info!(node.id = cfg.node_id, "initialized a single-node policy-store cluster"),
            Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
            Err(e) => return Err(StoreError::Initialize(Box::new(e))),
        }
    }
    let elected =
        raft.wait(Some(LEADER_WAIT)).metrics(|m| m.current_leader.is_some(), "leader elected").await;
    if let Err(e) = elected {
        warn!(error = %e, "no raft leader yet; serving anyway");
    }
    let latest = versions.borrow().last().map_or(0, |v| v.version);
    info!(listen = %addr, node.id = cfg.node_id, policy.version = latest, "policy store serving");

    let cancel = CancellationToken::new();
    let service = grpc::PolicyStoreService::new(raft, versions, cancel.clone());
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(proto::pb::policy_store_server::PolicyStoreServer::new(service))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
            shutdown.await;
            // Ends open Watch streams, so the graceful shutdown does not wait for them forever.
            cancel.cancel();
        })
        .await
        .map_err(StoreError::Serve)
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

    #[test]
    fn config_defaults_apply_per_field() {
        let cfg: PolicyStoreConfig =
            proto::config::load(Some("node_id = 3"), Vec::<(String, String)>::new(), "AIRLOCK_POLICY_STORE_")
                .expect("valid config");
        assert_eq!(cfg.node_id, 3);
        assert_eq!(cfg.listen, "127.0.0.1:17070".parse().expect("an address"));
        assert_eq!(cfg.data_dir, PathBuf::from("./data/policy-store"));
        assert_eq!(PolicyStoreConfig { node_id: 1, ..cfg }, PolicyStoreConfig::default());
    }

    #[test]
    fn unknown_config_field_is_rejected() {
        let loaded = proto::config::load::<PolicyStoreConfig>(
            Some("lissten = \"0.0.0.0:1\""),
            Vec::<(String, String)>::new(),
            "AIRLOCK_POLICY_STORE_",
        );
        assert!(loaded.is_err());
    }
}
