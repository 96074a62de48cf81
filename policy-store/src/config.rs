//! [`PolicyStoreConfig`]: one node's config (`[policy_store]` in `airlock.toml`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use crate::NodeId;
use crate::error::StoreError;

/// Config for one node.
///
/// A node with no `peers` (the default) runs as a single-node cluster, exactly as `airlock up`
/// does. A 3- or 5-node cluster lists the *other* initial voters in `peers` on every node:
///
/// ```toml
/// [policy_store]
/// node_id = 1
/// listen = "10.0.0.1:17070"
/// peers = { 2 = "10.0.0.2:17070", 3 = "10.0.0.3:17070" }
/// admin_token_file = "/etc/airlock/admin-token"
/// read_token_file = "/etc/airlock/policy-read-token"
/// ```
///
/// Every call needs a bearer token: writes and the admin API the admin token, reads the read
/// token or the admin token, raft RPCs the admin token. A node without an admin token does not
/// start.
///
/// A node that joins an existing cluster later sets `join = true` and is added with
/// `airlock policy-store add-learner`, then `promote`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyStoreConfig {
    /// gRPC listen address (the API, the admin API and raft RPCs). Default 127.0.0.1:17070.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The `host:port` other nodes use to reach this one. Default: `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Where the raft log and state live. Default ./data/policy-store.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// This node's raft id (unique in the cluster, not 0). Default 1.
    #[serde(default = "default_node_id")]
    pub node_id: NodeId,
    /// The other voters of the initial cluster: node id → `host:port` of their gRPC listener.
    /// Every node of a new cluster initializes it with itself plus these (same members
    /// everywhere). This node also reaches those nodes at these addresses, whatever the
    /// membership says (useful behind NAT). Default: none (a single-node cluster).
    #[serde(default, deserialize_with = "peers")]
    pub peers: BTreeMap<NodeId, String>,
    /// Start without initializing a cluster and wait to be added by `add-learner`. Default false.
    #[serde(default)]
    pub join: bool,
    /// Bearer token for policy writes (`Apply`), the admin API and raft RPCs between nodes; it
    /// also reads. Every node of a cluster needs the same one. Required: a node without it
    /// refuses to start.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// A file holding the admin token (trimmed); used when `admin_token` is not set. Default: none.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Bearer token for reads only (`Get`, `History`, `Watch`): what proxies and the approval
    /// service follow the store with. Every node of a cluster needs the same one. Default: none
    /// (reads need the admin token).
    #[serde(default)]
    pub read_token: Option<String>,
    /// A file holding the read token (trimmed); used when `read_token` is not set. Default: none.
    #[serde(default)]
    pub read_token_file: Option<PathBuf>,
    /// Build a snapshot (and compact the log) after this many log entries. Default 1000.
    #[serde(default = "default_snapshot_logs")]
    pub snapshot_logs: u64,
    /// Serve gRPC over TLS with this certificate chain (PEM), and reach the peers at
    /// `https://`. Set on every node of a cluster, with `tls_key_file`. Default: none (plain
    /// HTTP/2, for a store reached only over loopback or a trusted network).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert_file`. Default: none.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// The CA (PEM) the peers' certificates are checked against. Default: the system's roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
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
fn default_snapshot_logs() -> u64 {
    1000
}

/// TOML keys are strings: `{ 2 = "..." }` arrives as `"2"`.
fn peers<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<NodeId, String>, D::Error> {
    let raw = BTreeMap::<String, String>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            k.parse::<NodeId>()
                .map(|id| (id, v))
                .map_err(|_| serde::de::Error::custom(format!("peers: `{k}` is not a node id")))
        })
        .collect()
}

impl Default for PolicyStoreConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            advertise: None,
            data_dir: default_data_dir(),
            node_id: default_node_id(),
            peers: BTreeMap::new(),
            join: false,
            admin_token: None,
            admin_token_file: None,
            read_token: None,
            read_token_file: None,
            snapshot_logs: default_snapshot_logs(),
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
        }
    }
}

impl PolicyStoreConfig {
    /// The address peers reach this node at.
    pub fn advertised(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    /// The URL a client on this host reaches the node at: `https://` when it serves TLS.
    pub fn local_url(&self) -> String {
        let scheme = if self.tls_cert_file.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.listen)
    }

    /// How clients on this host check the node's certificate (`tls_ca_file`).
    pub fn client_tls(&self) -> Result<crate::ClientTls, crate::ClientError> {
        crate::ClientTls::new(self.tls_ca_file.as_deref())
    }

    /// The admin token, from `admin_token` or `admin_token_file`; `None` when neither is set.
    pub fn token(&self) -> std::io::Result<Option<String>> {
        read(self.admin_token.as_ref(), self.admin_token_file.as_ref())
    }

    /// The read token, from `read_token` or `read_token_file`; `None` when neither is set.
    pub fn read_token(&self) -> std::io::Result<Option<String>> {
        read(self.read_token.as_ref(), self.read_token_file.as_ref())
    }

    /// The token a reader of this node uses (the event publisher beside it): the read token,
    /// else the admin token; `None` when neither is set.
    pub fn reader_token(&self) -> std::io::Result<Option<String>> {
        match self.read_token()? {
            Some(t) => Ok(Some(t)),
            None => self.token(),
        }
    }

    /// The tokens a node serves with, checked: the admin token (required) and the read token.
    pub(crate) fn tokens(&self) -> Result<(String, Option<String>), StoreError> {
        let admin = self
            .token()
            .map_err(|source| StoreError::TokenFile {
                setting: "admin_token_file",
                path: self.admin_token_file.clone().unwrap_or_default(),
                source,
            })?
            .ok_or(StoreError::NoAdminToken)?;
        check_token("admin_token", &admin)?;
        let read = self.read_token().map_err(|source| StoreError::TokenFile {
            setting: "read_token_file",
            path: self.read_token_file.clone().unwrap_or_default(),
            source,
        })?;
        if let Some(read) = &read {
            check_token("read_token", read)?;
            if read == &admin {
                return Err(StoreError::BadToken {
                    setting: "read_token",
                    problem: "must differ from the admin token",
                });
            }
        }
        Ok((admin, read))
    }
}

fn read(value: Option<&String>, file: Option<&PathBuf>) -> std::io::Result<Option<String>> {
    if let Some(t) = value {
        return Ok(Some(t.clone()));
    }
    match file {
        Some(path) => Ok(Some(std::fs::read_to_string(path)?.trim().to_string())),
        None => Ok(None),
    }
}

/// A token must be non-empty and fit in an `authorization` header.
fn check_token(setting: &'static str, token: &str) -> Result<(), StoreError> {
    if token.is_empty() {
        return Err(StoreError::BadToken { setting, problem: "must not be empty" });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(StoreError::BadToken {
            setting,
            problem: "must be printable ASCII without spaces (it is sent as a bearer token)",
        });
    }
    Ok(())
}

impl proto::config::Validate for PolicyStoreConfig {
    fn validate(&self) -> Result<(), String> {
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir: must not be empty".into());
        }
        if self.node_id == 0 {
            return Err("node_id: must not be 0".into());
        }
        if self.peers.contains_key(&self.node_id) {
            return Err(format!("peers: must not list this node ({})", self.node_id));
        }
        if let Some((id, _)) = self.peers.iter().find(|(id, addr)| **id == 0 || addr.is_empty()) {
            return Err(format!("peers.{id}: needs a non-zero id and a host:port"));
        }
        if self.snapshot_logs == 0 {
            return Err("snapshot_logs: must be at least 1".into());
        }
        if self.admin_token.as_deref().is_some_and(str::is_empty) {
            return Err("admin_token: must not be empty".into());
        }
        if self.read_token.as_deref().is_some_and(str::is_empty) {
            return Err("read_token: must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str) -> Result<PolicyStoreConfig, proto::config::ConfigError> {
        proto::config::load(Some(toml), Vec::<(String, String)>::new(), "AIRLOCK_POLICY_STORE_")
    }

    #[test]
    fn config_defaults_apply_per_field() {
        let cfg = load("node_id = 3").expect("valid config");
        assert_eq!(cfg.node_id, 3);
        assert_eq!(cfg.listen, "127.0.0.1:17070".parse().expect("an address"));
        assert_eq!(cfg.data_dir, PathBuf::from("./data/policy-store"));
        assert!(cfg.peers.is_empty());
        assert_eq!(cfg.snapshot_logs, 1000);
        assert_eq!(PolicyStoreConfig { node_id: 1, ..cfg }, PolicyStoreConfig::default());
    }

    #[test]
    fn peers_are_a_table_of_node_ids_to_addresses() {
        let cfg = load("node_id = 1\npeers = { 2 = \"127.0.0.1:2\", 3 = \"127.0.0.1:3\" }\n").expect("valid");
        assert_eq!(cfg.peers.get(&2).map(String::as_str), Some("127.0.0.1:2"));
        assert_eq!(cfg.peers.len(), 2);
        assert!(load("peers = { x = \"127.0.0.1:2\" }").is_err());
        let own = load("node_id = 2\npeers = { 2 = \"127.0.0.1:2\" }").expect_err("self as peer");
        assert!(own.to_string().contains("peers"), "{own}");
    }

    #[test]
    fn tokens_are_required_checked_and_read_from_files() {
        let none = PolicyStoreConfig::default().tokens().expect_err("no admin token");
        assert!(matches!(none, StoreError::NoAdminToken));
        assert!(none.to_string().contains("policy_store.admin_token"), "{none}");

        let dir = tempfile::tempdir().expect("tempdir");
        let admin = dir.path().join("admin");
        let read = dir.path().join("read");
        std::fs::write(&admin, "adm\n").expect("write");
        std::fs::write(&read, " rd \n").expect("write");
        let cfg = PolicyStoreConfig {
            admin_token_file: Some(admin),
            read_token_file: Some(read),
            ..PolicyStoreConfig::default()
        };
        assert_eq!(cfg.tokens().expect("tokens"), ("adm".to_string(), Some("rd".to_string())));
        assert_eq!(cfg.reader_token().expect("read").as_deref(), Some("rd"));

        let same = PolicyStoreConfig {
            admin_token: Some("t".into()),
            read_token: Some("t".into()),
            ..PolicyStoreConfig::default()
        };
        assert!(same.tokens().expect_err("same tokens").to_string().contains("read_token"));
        let spaced = PolicyStoreConfig { admin_token: Some("a b".into()), ..PolicyStoreConfig::default() };
        assert!(spaced.tokens().expect_err("space").to_string().contains("admin_token"));
        let only_admin = PolicyStoreConfig { admin_token: Some("a".into()), ..PolicyStoreConfig::default() };
        assert_eq!(only_admin.reader_token().expect("read").as_deref(), Some("a"));
    }

    #[test]
    fn unknown_config_field_is_rejected() {
        assert!(load("lissten = \"0.0.0.0:1\"").is_err());
        assert!(load("node_id = 0").is_err());
    }
}
