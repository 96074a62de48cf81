//! What every node needs to act as part of a cluster: who the leader is, channels to other nodes
//! for forwarding, and the bearer-token checks (`Auth`, and the `Guard` interceptor) in front of
//! every service.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::BasicNode;
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

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
    peers: crate::tls::Peers,
    by_addr: Mutex<HashMap<String, Channel>>,
}

impl Channels {
    pub(crate) fn new(overrides: BTreeMap<NodeId, String>, peers: crate::tls::Peers) -> Self {
        Self { overrides, peers, by_addr: Mutex::default() }
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
        let channel = (self.peers)
            .endpoint(addr, FORWARD_CONNECT_TIMEOUT)
            .map_err(|source| StoreError::PeerAddress { addr: addr.to_string(), source: Box::new(source) })?
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Who a caller is, by the bearer token it presented. Put in a request's extensions by [`Guard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The admin token: writes, the admin API, raft RPCs, and reads.
    Admin,
    /// The read token: `Get`, `History`, `Watch` only.
    Reader,
}

impl Role {
    /// How a version's author records the role that applied it.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Role::Admin => "admin-token",
            Role::Reader => "read-token",
        }
    }
}

/// The node's tokens; checks `authorization: Bearer <token>` in constant time.
#[derive(Clone)]
pub(crate) struct Auth {
    admin: Arc<str>,
    read: Option<Arc<str>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("read_token", &self.read.is_some()).finish_non_exhaustive()
    }
}

impl Auth {
    pub(crate) fn new(admin: Arc<str>, read: Option<Arc<str>>) -> Self {
        Self { admin, read }
    }

    /// The admin token, for this node's own calls to other nodes.
    pub(crate) fn admin(&self) -> Arc<str> {
        self.admin.clone()
    }

    /// The caller's role; `Unauthenticated` without a token or with a wrong one.
    pub(crate) fn role(&self, metadata: &MetadataMap) -> Result<Role, StoreError> {
        let presented = bearer(metadata).ok_or(StoreError::Unauthenticated)?;
        if matches(&self.admin, presented) {
            return Ok(Role::Admin);
        }
        match &self.read {
            Some(read) if matches(read, presented) => Ok(Role::Reader),
            _ => Err(StoreError::Unauthenticated),
        }
    }

    /// An interceptor that lets through callers with at least `need`, before the body is read.
    pub(crate) fn guard(&self, need: Role) -> Guard {
        Guard { auth: self.clone(), need }
    }
}

/// A tonic interceptor: checks the bearer token before the request body is decoded, refuses
/// callers without the role a service needs, and records the caller's [`Role`] in the request's
/// extensions.
#[derive(Clone)]
pub(crate) struct Guard {
    auth: Auth,
    need: Role,
}

impl tonic::service::Interceptor for Guard {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let role = self.auth.role(request.metadata())?;
        if self.need == Role::Admin && role != Role::Admin {
            return Err(StoreError::AdminOnly.into());
        }
        request.extensions_mut().insert(role);
        Ok(request)
    }
}

fn bearer(metadata: &MetadataMap) -> Option<&str> {
    metadata.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether `presented` is `token`, compared in constant time (for equal lengths).
fn matches(token: &str, presented: &str) -> bool {
    bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().expect("ascii"));
        m
    }

    fn auth() -> Auth {
        Auth::new("s3cret".into(), Some("r34d".into()))
    }

    #[test]
    fn tokens_give_their_roles_and_anything_else_is_unauthenticated() {
        let auth = auth();
        assert_eq!(auth.role(&with("Bearer s3cret")).ok(), Some(Role::Admin));
        assert_eq!(auth.role(&with("Bearer r34d")).ok(), Some(Role::Reader));
        for wrong in ["Bearer s3cre", "s3cret", "Bearer ", "bearer s3cret", "Bearer s3cret "] {
            assert!(matches!(auth.role(&with(wrong)), Err(StoreError::Unauthenticated)), "{wrong}");
        }
        assert!(matches!(auth.role(&MetadataMap::new()), Err(StoreError::Unauthenticated)));
        let admin_only = Auth::new("s3cret".into(), None);
        assert!(matches!(admin_only.role(&with("Bearer r34d")), Err(StoreError::Unauthenticated)));
    }

    #[test]
    fn guards_refuse_before_the_handler_and_record_the_role() {
        use tonic::service::Interceptor;
        let request = |value: &str| {
            let mut r = tonic::Request::new(());
            *r.metadata_mut() = with(value);
            r
        };
        let mut admin = auth().guard(Role::Admin);
        let mut reader = auth().guard(Role::Reader);
        let code = |r: Result<tonic::Request<()>, tonic::Status>| r.err().map(|s| s.code());
        assert_eq!(code(admin.call(request("Bearer r34d"))), Some(tonic::Code::PermissionDenied));
        assert_eq!(code(admin.call(request("Bearer x"))), Some(tonic::Code::Unauthenticated));
        assert_eq!(code(reader.call(tonic::Request::new(()))), Some(tonic::Code::Unauthenticated));
        let passed = reader.call(request("Bearer r34d")).expect("reader");
        assert_eq!(passed.extensions().get::<Role>(), Some(&Role::Reader));
        let passed = reader.call(request("Bearer s3cret")).expect("admin reads too");
        assert_eq!(passed.extensions().get::<Role>(), Some(&Role::Admin));
    }
}
