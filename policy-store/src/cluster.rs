//! What every node needs to act as part of a cluster: who the leader is, channels to other nodes
//! for forwarding, and the bearer-token check of the admin API and raft RPCs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::BasicNode;
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};

use crate::error::StoreError;
use crate::{NodeId, Raft};

/// Set on a request a node forwarded to the leader: how many times it was forwarded. A request
/// that lands on a node that lost its leadership meanwhile is forwarded again, up to [`MAX_HOPS`].
pub const FORWARDED_HEADER: &str = "x-airlock-forwarded";
/// How many times a request may be forwarded.
pub const MAX_HOPS: u32 = 3;

/// How many times the request was forwarded already.
pub(crate) fn hops(metadata: &MetadataMap) -> u32 {
    metadata.get(FORWARDED_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Mark `request` as forwarded once more than `hops`.
pub(crate) fn mark_forwarded<T>(request: &mut tonic::Request<T>, hops: u32) {
    let value = tonic::metadata::MetadataValue::from(hops + 1);
    request.metadata_mut().insert(FORWARDED_HEADER, value);
}
/// `linearizable` on Get or History: the answer reflects every write committed before the call
/// (served by, or forwarded to, the leader after it confirmed its leadership).
pub const CONSISTENCY_HEADER: &str = "x-airlock-consistency";
/// The value of [`CONSISTENCY_HEADER`] that asks for a linearizable read.
pub const LINEARIZABLE: &str = "linearizable";

/// Connecting to another node for a forwarded request may take this long.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The leader's id and address, waiting up to `wait` for one to be elected.
pub(crate) async fn leader(raft: &Raft, wait: Duration) -> Option<(NodeId, BasicNode)> {
    let _ = raft.wait(Some(wait)).metrics(|m| m.current_leader.is_some(), "a leader is known").await;
    let metrics = raft.metrics().borrow().clone();
    let id = metrics.current_leader?;
    let node = metrics.membership_config.membership().get_node(&id)?.clone();
    Some((id, node))
}

/// Lazily connected channels to other nodes, by address. A node's configured `peers` address
/// wins over the one in the membership (see [`PolicyStoreConfig::peers`](crate::PolicyStoreConfig)).
#[derive(Debug, Default)]
pub(crate) struct Channels {
    overrides: BTreeMap<NodeId, String>,
    by_addr: Mutex<HashMap<String, Channel>>,
}

impl Channels {
    pub(crate) fn new(overrides: BTreeMap<NodeId, String>) -> Self {
        Self { overrides, by_addr: Mutex::default() }
    }

    /// A channel to node `id`, whose membership entry is `node`.
    pub(crate) fn node(&self, id: NodeId, node: &BasicNode) -> Result<Channel, StoreError> {
        self.get(self.overrides.get(&id).unwrap_or(&node.addr))
    }

    fn get(&self, addr: &str) -> Result<Channel, StoreError> {
        let mut channels = self.by_addr.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|source| StoreError::PeerAddress { addr: addr.to_string(), source })?
            .connect_timeout(FORWARD_CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Checks `authorization: Bearer <token>` in constant time.
#[derive(Debug, Clone, Default)]
pub(crate) struct Auth {
    token: Option<Arc<str>>,
}

impl Auth {
    pub(crate) fn new(token: Option<Arc<str>>) -> Self {
        Self { token }
    }

    /// Admin calls need the token; with none configured, the admin API is off.
    pub(crate) fn admin(&self, metadata: &MetadataMap) -> Result<(), StoreError> {
        match &self.token {
            None => Err(StoreError::AdminDisabled),
            Some(token) => check(token, metadata),
        }
    }

    /// Raft RPCs need the token when one is configured.
    pub(crate) fn peer(&self, metadata: &MetadataMap) -> Result<(), StoreError> {
        match &self.token {
            None => Ok(()),
            Some(token) => check(token, metadata),
        }
    }
}

fn check(token: &str, metadata: &MetadataMap) -> Result<(), StoreError> {
    let presented = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(StoreError::Unauthenticated)?;
    if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(StoreError::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().expect("ascii"));
        m
    }

    #[test]
    fn admin_api_needs_the_configured_token() {
        let auth = Auth::new(Some("s3cret".into()));
        assert!(auth.admin(&with("Bearer s3cret")).is_ok());
        assert!(matches!(auth.admin(&with("Bearer s3cre")), Err(StoreError::Unauthenticated)));
        assert!(matches!(auth.admin(&with("s3cret")), Err(StoreError::Unauthenticated)));
        assert!(matches!(auth.admin(&MetadataMap::new()), Err(StoreError::Unauthenticated)));
    }

    #[test]
    fn without_a_token_admin_is_off_and_raft_is_open() {
        let auth = Auth::new(None);
        assert!(matches!(auth.admin(&with("Bearer x")), Err(StoreError::AdminDisabled)));
        assert!(auth.peer(&MetadataMap::new()).is_ok());
        let auth = Auth::new(Some("t".into()));
        assert!(auth.peer(&MetadataMap::new()).is_err());
    }
}
